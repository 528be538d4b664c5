"""ImageNet validation labels from the ILSVRC2012 devkit, and which class-index order they are in.

The devkit (``ILSVRC2012_devkit_t12.tar.gz``, or that archive extracted) holds

* ``data/meta.mat``: the synsets; the 1000 classes are the leaves (``num_children == 0``), each with
  its ``ILSVRC2012_ID`` (1..1000), ``WNID`` (``n01440764``) and ``words``;
* ``data/ILSVRC2012_validation_ground_truth.txt``: the ``ILSVRC2012_ID`` of val image 1, 2, ... 50000
  (image ``k`` is ``ILSVRC2012_val_0000000k.JPEG``).

torchvision's ``ImageNet`` parses these in ``parse_devkit_archive``, but only behind an md5 check of
the official archive, and it then MOVES the val images into class folders; its ``parse_meta_mat`` /
``parse_val_groundtruth_txt`` are local functions of ``parse_devkit_archive`` (torchvision 0.29),
not importable. So the two files are read here with the same rules (scipy ``loadmat``, leaves =
``num_children == 0``); ``tests/test_data_imagenet.py`` checks the result against torchvision's own
``parse_devkit_archive`` and ``ImageNet`` on a generated devkit. Archives are read in memory: nothing
is extracted, nothing in the user's folders is written or moved.

Class order: timm and torchvision ImageNet-1k checkpoints number the classes by SORTED WordNet id
(the ImageFolder order; ``timm.data.ImageNetInfo().label_names()`` is that list), which is not the
devkit's ``ILSVRC2012_ID`` order. ``sorted`` is the default; ``devkit`` must be asked for, and then
says so loudly, because top-1 of a standard checkpoint against devkit-order labels is near chance.
"""
from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import DataError

DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
WNID = re.compile(r"n\d{8}")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+", re.IGNORECASE)

CLASS_ORDERS = ("sorted", "devkit")
SORTED = "sorted WordNet ids (the order of timm / torchvision ImageNet checkpoints)"
DEVKIT = "devkit ILSVRC2012_ID order (NOT the order of timm / torchvision ImageNet checkpoints)"
DEVKIT_WARNING = ("labels use the devkit's ILSVRC2012_ID class order (--class-order devkit): timm and "
                  "torchvision ImageNet checkpoints number classes by sorted WordNet id, so their top-1 "
                  "against these labels is near chance; use it only for a model trained in devkit order")


@dataclass
class Devkit:
    source: Path
    wnids: List[str]  # devkit order: wnids[ILSVRC2012_ID - 1]
    words: Dict[str, str]  # wnid -> "tench, Tinca tinca"
    val_ids: Optional[List[int]]  # ILSVRC2012_ID of val image 1, 2, ...; None without the ground-truth file

    def order(self, class_order: str) -> List[str]:
        return list(self.wnids) if class_order == "devkit" else sorted(self.wnids)


def find_devkit(folder: Path) -> Optional[Path]:
    """The devkit archive or extracted folder inside ``folder``, if there is one."""
    if (folder / DEVKIT_ARCHIVE).is_file():
        return folder / DEVKIT_ARCHIVE
    return folder / DEVKIT_DIR if (folder / DEVKIT_DIR / META_MAT).is_file() else None


def is_devkit(path: Path) -> bool:
    """Given as the labels: a folder or a tar archive can only be meant as the devkit."""
    return path.is_dir() or path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def _read_members(path: Path) -> Dict[str, Optional[bytes]]:
    """The bytes of meta.mat and the ground-truth file, from an archive or a folder (None when absent)."""
    want = (META_MAT, GROUND_TRUTH)
    if path.is_dir():
        root = path if (path / META_MAT).is_file() else path / DEVKIT_DIR
        return {w: (root / w).read_bytes() if (root / w).is_file() else None for w in want}
    try:
        with tarfile.open(path, "r:*") as tar:
            found = {w: next((m for m in tar.getmembers() if m.isfile() and (m.name == w or m.name.endswith("/" + w))),
                             None) for w in want}
            return {w: tar.extractfile(m).read() if m is not None else None for w, m in found.items()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the ImageNet devkit archive {str(path)!r} ({type(e).__name__}: {e}); "
                        f"give {DEVKIT_ARCHIVE} as downloaded, or its extracted folder") from None


def read_devkit(path: Path) -> Devkit:
    """Classes (devkit order) and val ground truth of an ILSVRC2012 devkit archive or folder."""
    import numpy as np
    import scipy.io

    files = _read_members(Path(path))
    if files[META_MAT] is None:
        raise DataError(f"{str(path)!r} is not an ILSVRC2012 devkit: it has no {META_MAT} "
                        f"(expected {DEVKIT_DIR}/{META_MAT} and {DEVKIT_DIR}/{GROUND_TRUTH})")
    try:
        syn = scipy.io.loadmat(io.BytesIO(files[META_MAT]), squeeze_me=True)["synsets"]
        leaves = syn[np.asarray(syn["num_children"]) == 0]
        ids = [int(i) for i in leaves["ILSVRC2012_ID"]]
        wnids = [str(w) for w in leaves["WNID"]]
        words = {str(w): str(t) for w, t in zip(leaves["WNID"], leaves["words"])}
    except Exception as e:  # not a .mat, no 'synsets', missing fields: say which file and why
        raise DataError(f"cannot read {META_MAT} of the devkit {str(path)!r} ({type(e).__name__}: {e}); "
                        "expected the ILSVRC2012 'synsets' struct (ILSVRC2012_ID, WNID, words, num_children)") from None
    if sorted(ids) != list(range(1, len(ids) + 1)) or not all(WNID.fullmatch(w) for w in wnids):
        raise DataError(f"{META_MAT} of {str(path)!r}: the leaf synsets do not carry ILSVRC2012_IDs 1..{len(ids)} "
                        "and WordNet ids n########; is it the ILSVRC2012 devkit?")
    by_id = sorted(zip(ids, wnids))
    val_ids = None
    if files[GROUND_TRUTH] is not None:
        text = files[GROUND_TRUTH].decode(errors="replace").split()
        if not all(t.isdigit() and 1 <= int(t) <= len(ids) for t in text):
            raise DataError(f"{GROUND_TRUTH} of {str(path)!r} must hold one ILSVRC2012_ID (1..{len(ids)}) per line")
        val_ids = [int(t) for t in text]
    return Devkit(Path(path), [w for _, w in by_id], words, val_ids)


def val_number(name: str) -> Optional[int]:
    """k for ``ILSVRC2012_val_0000000k.JPEG`` (its line in the ground-truth file), else None."""
    m = VAL_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def order_mismatch_hint(class_order: Optional[str], num_classes: int, top1: float, images: int) -> Optional[str]:
    """A warning when a trained model's top-1 on ImageNet-style labels is near chance: the usual
    cause is labels in a class order other than the model's. None when the check does not apply."""
    if class_order is None or num_classes < 100 or images < 100 or not top1 < 5.0 / num_classes:
        return None
    return (f"top-1 is {top1:.2%}, near chance (1/{num_classes}) on {images} images: if the checkpoint is an "
            f"ImageNet model, its class order probably differs from the labels'. Labels: {class_order}. "
            "See --class-order and docs/data.md")


__all__ = ["CLASS_ORDERS", "DEVKIT_ARCHIVE", "Devkit", "find_devkit", "is_devkit", "read_devkit", "val_number",
           "order_mismatch_hint"]
