"""The package version, in a module of its own so that any layer can read it without importing the rest,
and the installed version of any distribution (one lookup for runtime checks and reports)."""
from importlib import metadata as _metadata
from typing import Optional

__version__ = "0.1.0"


def dist_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name`` (e.g. ``onnxruntime-gpu``), or None when absent."""
    try:
        return _metadata.version(name)
    except _metadata.PackageNotFoundError:
        return None
