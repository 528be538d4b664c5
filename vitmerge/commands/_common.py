"""What every command shares: the console, error reporting, int-list parsing."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, List

import typer
from rich.console import Console

from ..errors import VitmergeError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # errors stay one greppable line

EXIT_USAGE = 2  # bad input (model name, checkpoint, r, paths, data layout)
EXIT_FAILED = 1  # the work ran but its result failed a check (e.g. verification)


def fail(message: str, code: int = EXIT_USAGE) -> "typer.Exit":
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one red line and a non-zero exit (no traceback)."""
    from ..errors import VerificationError

    try:
        yield
    except VerificationError as e:
        raise fail(str(e), EXIT_FAILED) from None
    except VitmergeError as e:
        raise fail(str(e)) from None


@contextlib.contextmanager
def loud_warnings() -> Iterator[None]:
    """Show library warnings (e.g. random weights) as yellow console lines, once each."""
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in shown:
            shown.add(text)
            err_console.print(f"[bold yellow]warning:[/] {text}")

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            yield
    finally:
        warnings.showwarning = old


def int_list(text: str, what: str = "value") -> List[int]:
    """'1,8,64' -> [1, 8, 64] with a clear error."""
    try:
        out = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise fail(f"{what} must be comma-separated integers like 1,8,64; got {text!r}") from None
    if not out:
        raise fail(f"{what} is empty; give comma-separated integers like 1,8,64")
    return out
