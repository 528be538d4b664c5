"""Small filesystem helpers shared by every command that writes a folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .errors import OutputPathError


def writable_dir(path: Union[str, Path], what: str) -> Path:
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
