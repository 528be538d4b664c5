"""Shared by the bench scripts that fill docs tables: replace the block between two HTML comment markers."""
from __future__ import annotations

import re
from pathlib import Path


def write_block(path: Path, marker: str, table: str) -> None:
    """Put ``table`` between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` in ``path`` (replacing what
    was there, or appending the block when the markers are absent), and say so."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"\nwrote the table into {path}")
