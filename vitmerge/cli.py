"""``vitmerge``: one Typer app whose commands are the deployment workflow.

Each command lives in its own module under :mod:`vitmerge.commands` and registers itself with
``register(app)``; this file only collects them, so commands stay independent of each other.
"""
from __future__ import annotations

import importlib
import pkgutil

import typer
import typer.core

from . import commands
from ._version import __version__
from .commands._common import set_verbosity

#: the global options a user may also put after the command name (`vitmerge export ... -v`)
_GLOBAL_FLAGS = {"-v", "-vv", "-vvv", "--verbose", "-q", "--quiet"}


class _Group(typer.core.TyperGroup):
    """The `vitmerge` group: -v / -q work after the command name too (they are the group's options, which click
    parses only before it); they are moved in front of the command, everything else stays in order. A `--`
    ends the moving: what follows it is the command's, verbatim."""

    def parse_args(self, ctx, args):
        args = list(args)
        first = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        if first is not None:
            end = args.index("--") if "--" in args[first:] else len(args)
            moved = [a for a in args[first + 1:end] if a in _GLOBAL_FLAGS]
            if moved:
                rest = [a for a in args[first + 1:end] if a not in _GLOBAL_FLAGS]
                args = moved + args[:first + 1] + rest + args[end:]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_Group,
    name="vitmerge",
    help="Training-free token merging for timm ViTs, exported and measured where they are deployed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"vitmerge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="More detail: -v logs what the library decides, -vv also debug lines and tracebacks"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and warnings (no progress, no tables)"),
):
    """vitmerge: export, build, calibrate, profile, eval and package token-merged ViTs."""
    set_verbosity(verbose, quiet)
    _terminate_like_interrupt()


def _terminate_like_interrupt() -> None:
    """SIGTERM (a scheduler's stop, `kill`, a container shutdown) ends a command the way Ctrl-C does: the
    exception unwinds every staged write and scratch folder, so nothing half-written or temporary is left.
    (SIGKILL cannot be caught: its leftovers carry the process id and the next run removes them.)"""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return

    from . import _io

    def terminate(signum, frame):
        _io.note_termination(signum)  # remembered: staged() refuses to publish even if this exception is swallowed
        raise KeyboardInterrupt(f"terminated (signal {signum})")

    signal.signal(signal.SIGTERM, terminate)


for _mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{commands.__name__}.{_mod}").register(app)


if __name__ == "__main__":  # python -m vitmerge.cli
    app()
