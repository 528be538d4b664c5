"""Filesystem helpers shared by every writer: a writable-folder check and the one staged writer.

Every file or folder vitmerge writes for the user (ONNX files, engines, reports, vocabularies,
Triton repositories, the digits model) goes through :func:`staged`: it is written under its final
name inside a private staging folder next to the target, and renamed into place only when the
whole job succeeded. A failure or an interrupt leaves no half-written output behind, and an old
output of the same name stays untouched until the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Union

from .errors import OutputPathError

PathLike = Union[str, Path]


def cache_root() -> Path:
    """``$VITMERGE_CACHE`` (default: ``<tmp>/vitmerge-cache``): where the demo models and ``tune``'s measurements
    are kept between runs."""
    return Path(os.environ.get("VITMERGE_CACHE", Path(tempfile.gettempdir()) / "vitmerge-cache"))


def writable_dir(path: PathLike, what: str) -> Path:
    """Create ``path`` (and parents) if needed and check it is a writable folder.

    ``what`` names it in the error, e.g. "--repo" or "report folder".
    """
    d = Path(path).expanduser()
    if d.exists() and not d.is_dir():
        raise OutputPathError(f"{what} {str(d)!r} exists and is not a folder; choose another path")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create {what} {str(d)!r}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK):
        raise OutputPathError(f"{what} {str(d)!r} is not writable")
    return d


def check_output_path(output: PathLike, suffix: Union[str, tuple, None] = ".onnx") -> Path:
    """An output file path, checked before minutes of work: the ``suffix`` ending (one or a tuple; None: any), not a
    folder, and a folder that is writable or can be created (like --report-dir, a missing folder is made when the
    output is written, by :func:`staged`; nothing is created when the work fails)."""
    out = Path(output).expanduser()
    if suffix is not None:
        ok = (suffix,) if isinstance(suffix, str) else tuple(suffix)
        if out.suffix.lower() not in ok:
            raise OutputPathError(f"--output {str(out)!r} must end in {' or '.join(ok)}")
    if out.is_dir():
        raise OutputPathError(f"--output {str(out)!r} is a folder; give a file name in it, e.g. {out / ('model' + (ok[0] if suffix else ''))}")
    d = out.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise OutputPathError(f"cannot write {str(out)!r}: {str(d)!r} is a file, not a folder; choose another --output")
    if not os.access(d, os.W_OK):
        raise OutputPathError(f"output folder {str(d)!r} is not writable; choose another --output")
    return out


def _make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first (to remove them again)."""
    made = []
    d = folder
    while not d.exists() and d != d.parent:
        made.append(d)
        d = d.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create output folder {str(folder)!r}: {e.strerror or e}") from None
    return made


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _put(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; a folder replaces a folder whole (the old one is moved aside first)."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)  # put the previous output back
            raise
        _remove(old)
    else:
        os.replace(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: not ours to judge
    return True


#: scratch folders older than this whose name carries no process id (written before ids were added) are stale
STALE_SECONDS = 6 * 3600

# Signals (SIGTERM) the CLI's handler received. The handler raises KeyboardInterrupt, but Python swallows an
# exception raised while a finaliser (__del__, a weakref callback) happens to run ("Exception ignored in ..."),
# and the command would then finish and put its outputs in place: staged() checks this list before it moves
# anything, so a terminated command never publishes an output.
_TERMINATED: list = []


def note_termination(signum: int) -> None:
    _TERMINATED.append(signum)


def check_terminated() -> None:
    """Raise KeyboardInterrupt when a termination signal arrived (even one whose exception was swallowed)."""
    if _TERMINATED:
        raise KeyboardInterrupt(f"terminated (signal {_TERMINATED[0]})")



def clean_stale(folder: PathLike, prefix: str) -> int:
    """Remove leftovers ``<prefix><pid>-*`` in ``folder`` of processes that no longer run (a run killed with
    SIGKILL, a power cut), and ``<prefix>*`` without a process id older than :data:`STALE_SECONDS`. Returns how
    many were removed. Only names that start with ``prefix`` are touched: each command cleans what it owns."""
    folder = Path(folder)
    removed = 0
    try:
        entries = [e for e in folder.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return 0
    for e in entries:
        rest = e.name[len(prefix):]
        head = rest.split("-", 1)[0]
        if head.isdigit() and "-" in rest:
            stale = int(head) != os.getpid() and not _pid_alive(int(head))
        else:
            try:
                stale = time.time() - e.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
        if stale:
            _remove(e)
            removed += 1
    return removed


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A private temporary folder ``<tmp>/<prefix><pid>-XXXX``, removed afterwards; leftovers of killed runs
    with the same prefix are removed first (:func:`clean_stale`)."""
    base = Path(tempfile.gettempdir())
    clean_stale(base, prefix)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-") as d:
        yield Path(d)


@contextlib.contextmanager
def staged(*targets: PathLike) -> Iterator[Path]:
    """Stage outputs and move them into place only on success.

    ``targets``: the final paths (files or folders), all in one folder. Yields a private staging
    folder next to them; the caller writes each target there *under its own name*
    (``stage / target.name``), plus any scratch files it likes. When the block ends without an
    exception, the targets that were written are renamed into place in the order given (so list a
    completion marker, e.g. a model file whose weights sit in a side file, last) and the staging
    folder is removed with whatever else it holds. On an exception nothing is moved and the
    staging folder is removed: no half-written output, and the old outputs stay as they were.
    """
    if not targets:
        raise ValueError("staged() needs at least one target path")
    paths = [Path(t) for t in targets]
    parent = paths[0].parent
    if any(p.parent != parent for p in paths):
        raise ValueError(f"staged targets must share one folder, got {[str(p) for p in paths]}")
    prefix = f".{paths[-1].name}.partial-"
    made = _make_parents(parent)  # a missing output folder is created (and removed again when nothing is written)
    published = False
    clean_stale(parent, prefix)  # what a killed earlier run of the same output left behind
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    except OSError as e:
        _unmake(made)
        raise OutputPathError(f"cannot write into {str(parent)!r}: {e.strerror or e}") from None
    try:
        yield stage
        check_terminated()  # a swallowed SIGTERM must not publish the outputs
        for p in paths:
            src = stage / p.name
            if src.exists() or src.is_symlink():
                if src.is_file():
                    os.chmod(src, 0o666 & ~_umask())  # mkstemp-style 0600 files become ordinary ones
                _put(src, p)
                published = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not published:
            _unmake(made)


def _unmake(made: List[Path]) -> None:
    for d in made:  # deepest first; only while empty
        try:
            d.rmdir()
        except OSError:
            break


def atomic_write(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write ``data`` to ``path`` through :func:`staged` (flushed to disk before the rename)."""
    path = Path(path)
    with staged(path) as stage:
        with open(stage / path.name, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return path


__all__ = ["writable_dir", "staged", "atomic_write", "scratch", "clean_stale", "check_output_path",
           "note_termination", "check_terminated"]
