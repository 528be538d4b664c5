"""What every command shares: the console, verbosity, error reporting, option parsing."""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ..errors import UsageError, VerificationError, VitmergeError

def _pipe_width() -> Optional[int]:
    """Width for output that is not a terminal (logs, CI, `| tee`): rich would use 80 columns and crop table cells
    (a "vs 1st" column read "1."); numbers are never cropped, so pipes get wide lines instead. A terminal: its own."""
    import os
    import sys

    try:
        if sys.stdout.isatty():
            return None
    except (AttributeError, ValueError):
        pass
    return max(int(os.environ.get("COLUMNS") or 0), 240)


console = Console(highlight=False, width=_pipe_width())
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # errors stay one greppable line

EXIT_USAGE = 2  # bad input (model name, checkpoint, r, paths, data layout)
EXIT_FAILED = 1  # the work ran but its result failed a check (e.g. verification)

log = logging.getLogger("vitmerge")


def set_verbosity(verbose: int = 0, quiet: bool = False) -> None:
    """``-q``: errors and warnings only (no progress, no tables); default: the command's output and
    library warnings; ``-v``: plus the library's INFO log (what it decided and why); ``-vv``: DEBUG,
    and tracebacks behind the one-line errors."""
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    log.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        handler = RichHandler(console=err_console, show_path=verbose >= 2, show_time=verbose >= 2,
                              rich_tracebacks=True, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    console.quiet = quiet


def fail(message: str, code: int = EXIT_USAGE) -> "typer.Exit":
    err_console.print(f"[bold red]error:[/] {escape(message)}")  # messages may hold brackets: vitmerge[gpu]
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one red line and a non-zero exit (no traceback; ``-vv``
    logs it at DEBUG level)."""
    try:
        yield
    except VerificationError as e:
        log.debug("traceback", exc_info=True)
        raise fail(str(e), EXIT_FAILED) from None
    except VitmergeError as e:
        log.debug("traceback", exc_info=True)
        raise fail(str(e)) from None


@contextlib.contextmanager
def loud_warnings() -> Iterator[None]:
    """Show library warnings (e.g. random weights) as yellow console lines, once each."""
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in shown:
            shown.add(text)
            err_console.print(f"[bold yellow]warning:[/] {escape(text)}")

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            yield
    finally:
        warnings.showwarning = old


def int_list(text: str, what: str = "value", minimum: Optional[int] = None) -> List[int]:
    """'1,8,64' -> [1, 8, 64] with a clear error; ``minimum``: each value must be at least that."""
    try:
        out = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise fail(f"{what} must be comma-separated integers like 1,8,64; got {text!r}") from None
    if not out:
        raise fail(f"{what} is empty; give comma-separated integers like 1,8,64")
    if minimum is not None and any(v < minimum for v in out):
        raise fail(f"{what} values must be at least {minimum}; got {text!r}")
    return out


def batch_list(text: str, what: str = "--batch") -> List[int]:
    """Batch sizes: comma-separated integers, each at least 1."""
    return int_list(text, what, minimum=1)


def float_list(text: str, what: str = "value") -> List[float]:
    """'0.75,0.5' -> [0.75, 0.5] with a clear error."""
    try:
        out = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise fail(f"{what} must be comma-separated numbers like 0.75,0.5; got {text!r}") from None
    if not out:
        raise fail(f"{what} is empty; give comma-separated numbers like 0.75,0.5")
    return out


def parse_json_option(text: Optional[str], what: str) -> dict:
    """'{"depth": 4}' -> dict, or the contents of a .json file."""
    if not text:
        return {}
    src = Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text
    try:
        out = json.loads(src)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} must be a JSON object like '{{\"depth\": 6}}' or a .json file; {e}") from None
    if not isinstance(out, dict):
        raise UsageError(f"{what} must be a JSON object, got {type(out).__name__}")
    return out


def merge_request(method="tome", r: Optional[str] = None, schedule="constant", budget: Optional[float] = None,
                  budget_latency: Optional[Path] = None, option: Optional[List[str]] = None, prop_attn: bool = True):
    """The merge options every command declares (``_options``) as one validated
    :class:`~vitmerge.request.MergeRequest` (a malformed --r or -O fails before torch is imported)."""
    from ..request import MergeRequest
    from ._options import value

    return MergeRequest(method=value(method), r=r, schedule=value(schedule), budget=budget,
                        budget_latency=budget_latency, prop_attn=prop_attn, options=option or [])


def model_source(model: Optional[str], checkpoint: Optional[Path] = None, config: Optional[Path] = None,
                 model_kwargs: Optional[str] = None, img_size: Optional[int] = None, num_classes: Optional[int] = None,
                 frames: Optional[int] = None, audio_length: Optional[int] = None, seed: int = 0):
    """The model options every command declares (``_options``) as one
    :class:`~vitmerge.models.build.ModelSource` (imports the library: call it after the argument checks)."""
    from ..models.build import resolve_model

    return resolve_model(model, checkpoint, config, parse_json_option(model_kwargs, "--model-kwargs"),
                         img_size=img_size, num_classes=num_classes, frames=frames, audio_length=audio_length,
                         seed=seed)
