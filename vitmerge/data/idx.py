"""MNIST / Fashion-MNIST in their original IDX files (LeCun's format), read with numpy.

A folder holds up to four files, each optionally gzipped (``.gz``, as Debian's
``dataset-fashion-mnist`` package at /usr/share/datasets/fashion-mnist and torchvision's downloads
ship them)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte    (60,000 images)
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte     (10,000 images)

torchvision's download folders (``ROOT/FashionMNIST/raw/``, ``ROOT/MNIST/raw/``, ``ROOT/raw/``) are
found from ``ROOT`` too.

An IDX file is a 4-byte big-endian magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the data in C order. Images are magic 2051
(uint8, 3 dims: N, rows, cols) and labels 2049 (uint8, 1 dim: N). Everything is checked before use:
magic, type, dimension count, the byte count the header promises (a truncated or padded file is an
error, never a silently short dataset), and that images and labels agree in number.

The files do not say whether they are MNIST or Fashion-MNIST (same names, sizes and format). The
class names are Fashion-MNIST's when the folder's name (or the torchvision sub-folder's) contains
"fashion" in any case, else the digits "0".."9". Only the names depend on this: labels are the
0..9 indices in the files either way.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension
UBYTE = 0x08

SPLIT_FILES: Dict[str, Tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES: Tuple[str, ...] = tuple(n for pair in SPLIT_FILES.values() for n in pair)
SUB_FOLDERS = ("FashionMNIST/raw", "MNIST/raw", "raw")  # torchvision's download folders under ROOT

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))

EXPECTED = ("the MNIST / Fashion-MNIST IDX layout is the four files " + ", ".join(FILE_NAMES)
            + " (each may end in .gz); a split needs both of its files")


def file_in(folder: Path, name: str) -> Optional[Path]:
    """``folder/name``, else ``folder/name.gz``, else None (the uncompressed file wins: it reads faster)."""
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def present(folder: Path) -> Dict[str, Path]:
    """{IDX file name without .gz: path} for the IDX files in ``folder``."""
    out = {}
    for n in FILE_NAMES:
        f = file_in(folder, n)
        if f is not None:
            out[n] = f
    return out


def find(p: Path) -> Optional[Path]:
    """The folder holding IDX files: ``p`` itself or one of torchvision's download folders under it;
    None when there are none. Two candidate folders (MNIST and FashionMNIST downloads side by side)
    are ambiguous and an error."""
    if present(p):
        return p
    found = [p / s for s in SUB_FOLDERS if (p / s).is_dir() and present(p / s)]
    if len(found) > 1:
        raise DataError(f"{str(p)!r} holds IDX files in {len(found)} folders "
                        f"({', '.join(str(f.relative_to(p)) for f in found)}): give one of them as --data")
    return found[0] if found else None


def is_fashion(root: Path, folder: Path) -> bool:
    """Whether the names of ``root`` (the folder given) or of the folders down to ``folder`` (where the
    files are) say Fashion-MNIST."""
    root = root.resolve()
    names = [root.name] + list(folder.resolve().relative_to(root).parts)
    return any("fashion" in n.lower() for n in names)


def class_names(fashion: bool, n: int = 10) -> List[str]:
    """10 names (Fashion-MNIST's or digits); more labels than that (EMNIST-style files) are named by index."""
    base = list(FASHION_CLASSES if fashion else DIGIT_CLASSES)
    return base + [str(i) for i in range(len(base), n)]


# --------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------


def _raw_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if data[:2] == b"\x1f\x8b":  # gzip, whatever the name says
        try:
            return gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:  # truncated download, corrupt stream
            raise DataError(f"{str(path)!r} is a damaged gzip file ({type(e).__name__}: {e}); "
                            "re-install or re-download it") from None
    if path.suffix == ".gz":
        raise DataError(f"{str(path)!r} is named .gz but is not gzip-compressed")
    return data


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of the IDX file ``path`` (gzipped or not), checked against ``magic``
    (:data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`) and its own header."""
    data = _raw_bytes(Path(path))
    what = {IMAGES_MAGIC: "images (magic 2051)", LABELS_MAGIC: "labels (magic 2049)"}[magic]
    if len(data) < 4:
        raise DataError(f"{str(path)!r} is not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        other = {IMAGES_MAGIC: "an images file (2051)", LABELS_MAGIC: "a labels file (2049)"}.get(got)
        hint = f": it is {other}; are the file names swapped?" if other else \
            " (not an IDX file, or a damaged one)"
        raise DataError(f"{str(path)!r} has magic number {got} (bytes {data[:4].hex()}), expected IDX "
                        f"{what}{hint}")
    ndim = data[3]
    assert data[2] == UBYTE and ndim == (3 if magic == IMAGES_MAGIC else 1)  # implied by the magic number
    head = 4 + 4 * ndim
    if len(data) < head:
        raise DataError(f"{str(path)!r} is truncated: {len(data)} bytes, shorter than its {head}-byte header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(dims, dtype=np.int64))
    have = len(data) - head
    shape = " x ".join(str(d) for d in dims)
    if have < need:
        raise DataError(f"{str(path)!r} is truncated: its header promises {shape} = {need:,} bytes of data, "
                        f"the file holds {have:,}; re-install or re-download it")
    if have > need:
        raise DataError(f"{str(path)!r} is corrupt: its header promises {shape} = {need:,} bytes of data, "
                        f"the file holds {have:,} (extra bytes at the end)")
    if magic == IMAGES_MAGIC and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{str(path)!r} holds images of size {dims[1]} x {dims[2]}")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)


# --------------------------------------------------------------------------------------------
# A split
# --------------------------------------------------------------------------------------------


@dataclass
class IdxSplit:
    folder: Path
    split: str  # "train" or "test"
    images: np.ndarray  # [N, rows, cols] uint8, read-only
    labels: np.ndarray  # [N] int64
    classes: List[str]
    fashion: bool
    files: Tuple[Path, Path]

    @property
    def name(self) -> str:
        return "fashion-mnist" if self.fashion else "mnist"


class GreyToRGB:
    """Item ``i`` of an images array as a 3-channel RGB PIL image (grey replicated), as torchvision's
    ``pil_loader`` gives grey files of the other layouts (``Image.convert("RGB")``). A class, not a
    closure, so DataLoader workers can pickle it."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i) -> "object":
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(self.images[int(i)])).convert("RGB")


def check_pairs(folder: Path) -> List[str]:
    """The splits whose two files are both in ``folder``; a split with one file of two is an error."""
    have = present(folder)
    complete = []
    for split, (img, lab) in SPLIT_FILES.items():
        if img in have and lab in have:
            complete.append(split)
        elif img in have or lab in have:
            missing = lab if img in have else img
            raise DataError(f"{str(folder)!r} has {(have.get(img) or have.get(lab)).name} but not {missing} "
                            f"(nor {missing}.gz); {EXPECTED}")
    return complete


def read_split(root: Path, folder: Path, split: str) -> IdxSplit:
    img_name, lab_name = SPLIT_FILES[split]
    img_f, lab_f = file_in(folder, img_name), file_in(folder, lab_name)
    missing = [n for n, f in ((img_name, img_f), (lab_name, lab_f)) if f is None]
    if missing:
        raise DataError(f"{str(folder)!r} has no {' or '.join(missing)} (nor .gz) for the {split!r} split; {EXPECTED}")
    images = read_idx(img_f, IMAGES_MAGIC)
    labels = read_idx(lab_f, LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{img_f.name} holds {len(images):,} images but {lab_f.name} holds {len(labels):,} labels "
                        f"(in {str(folder)!r}): the two files do not belong together")
    fashion = is_fashion(root, folder)
    n_classes = max(10, int(labels.max()) + 1 if len(labels) else 10)
    return IdxSplit(folder, split, images, labels, class_names(fashion, n_classes), fashion, (img_f, lab_f))


def choose_split(complete: Sequence[str], split: Optional[str], prefer: Sequence[str]) -> Tuple[str, Optional[str]]:
    """(split to read, a note or None). ``val``/``validation`` mean the test files (MNIST has no val
    split); without ``split`` the first of ``prefer`` with both files present is read."""
    alias = {"train": "train", "test": "test", "t10k": "test", "val": "test", "validation": "test"}
    if split is not None:
        if split not in alias:
            raise DataError(f"the MNIST / Fashion-MNIST IDX layout has the splits 'train' and 'test', "
                            f"not {split!r}")
        s = alias[split]
        note = f"no '{split}' split in MNIST IDX files: using 'test' (t10k)" if split in ("val", "validation") else None
        return s, note
    for want in prefer:
        s = alias.get(want)
        if s in complete:
            return s, None
    return (complete[0] if complete else "test"), None


__all__ = ["read_idx", "read_split", "find", "check_pairs", "choose_split", "IdxSplit", "GreyToRGB",
           "IMAGES_MAGIC", "LABELS_MAGIC", "FILE_NAMES", "SPLIT_FILES", "FASHION_CLASSES", "DIGIT_CLASSES"]
