"""Labelled image sets from local folders (never downloaded), preprocessed as the model expects.

``open_dataset(path)`` recognises the layout by looking at the folder:

* ImageFolder (and ImageNet validation sorted into class folders): ``DIR/<class>/<image>``
* ImageNet validation, flat: ``DIR/*.JPEG`` plus a labels file (``val.txt`` with ``<file> <index>``
  lines, or Kaggle's ``LOC_val_solution.csv``)
* CIFAR-100: the official ``cifar-100-python`` pickles (``test``, ``meta``)
* Oxford-IIIT Pet: ``images/`` plus ``annotations/test.txt``
* a folder holding ``train/`` and ``val/`` or ``test/`` splits in any of the layouts above

Images that cannot be decoded are skipped, counted and named in the result, never fatal.
Preprocessing comes from the timm model's own data config (resize, crop, mean/std).
"""
from __future__ import annotations

import csv
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_NAMES = ("train", "val", "validation", "test")
EVAL_SPLITS = ("val", "validation", "test", "train")
CALIBRATION_SPLITS = ("train", "val", "validation", "test")
LABEL_FILES = ("val.txt", "labels.txt", "val_labels.txt", "LOC_val_solution.csv")

LAYOUTS = """\
Supported layouts (local folders only; nothing is downloaded):
  ImageFolder / ImageNet val in class folders   DIR/<class name>/<image>.jpg|png|...  (classes sorted by name)
  ImageNet val, flat + labels file              DIR/*.JPEG + DIR/val.txt ('<file name> <class index>' per line)
                                                 or DIR/LOC_val_solution.csv (or give the file with --labels)
  CIFAR-100 (official python version)           DIR/cifar-100-python/{test,meta} or DIR/{test,meta}
  Oxford-IIIT Pet                               DIR/images/*.jpg + DIR/annotations/test.txt
  Split folders                                 DIR/train/ and DIR/val/ or DIR/test/, each in a layout above"""

Ref = Union[str, int]  # an image file path, or an index into in-memory arrays (CIFAR)


def _layout_error(msg: str) -> DataError:
    return DataError(f"{msg}\n{LAYOUTS}")


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")


def _images_in(folder: Path, recursive: bool = True) -> List[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if is_image(p))


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label, reference) triples; ``image`` is None when the file cannot be decoded."""

    def __init__(
        self,
        root: Path,
        layout: str,
        items: Sequence[Tuple[Ref, int]],
        classes: Sequence[str],
        load: Callable[[Ref], "object"],
        transform: Optional[Callable] = None,
        notes: Sequence[str] = (),
    ):
        self.root = Path(root)
        self.layout = layout
        self.items = list(items)
        self.classes = list(classes)
        self._load = load
        self.transform = transform
        self.notes = list(notes)  # things the user should know (skipped entries, chosen split)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> List[int]:
        return [y for _, y in self.items]

    def describe(self) -> str:
        return f"{self.layout}: {len(self)} images, {self.num_classes} classes ({self.root})"

    def load_image(self, i: int):
        """The decoded RGB PIL image of item ``i``, or None when it cannot be read."""
        ref, _ = self.items[i]
        try:
            return self._load(ref)
        except Exception:  # truncated, not an image, unreadable: counted by the caller
            return None

    def __getitem__(self, i: int):
        ref, label = self.items[i]
        img = self.load_image(i)
        if img is not None and self.transform is not None:
            try:
                img = self.transform(img)
            except Exception:
                img = None
        return img, label, str(ref)

    def _copy(self, items, extra_note: Optional[str] = None) -> "ImageDataset":
        notes = self.notes + ([extra_note] if extra_note else [])
        return ImageDataset(self.root, self.layout, items, self.classes, self._load, self.transform, notes)

    def with_transform(self, transform: Optional[Callable]) -> "ImageDataset":
        out = self._copy(self.items)
        out.transform = transform
        return out

    def order(self, seed: int = 0) -> np.ndarray:
        """A fixed pseudo-random order of all items (the same for the same seed and dataset)."""
        return np.random.RandomState(seed).permutation(len(self.items))

    def select(self, indices: Sequence[int]) -> "ImageDataset":
        return self._copy([self.items[int(i)] for i in indices])

    def subset(self, limit: Optional[int], seed: int = 0) -> "ImageDataset":
        """``limit`` items chosen by a fixed seed (every class can appear), kept in file order."""
        if limit is None or limit >= len(self.items):
            return self
        if limit <= 0:
            raise DataError(f"--limit must be a positive number of images, got {limit}")
        idx = np.sort(self.order(seed)[:limit])
        return self._copy([self.items[int(i)] for i in idx],
                          f"subset of {limit} of {len(self.items)} images (fixed seed {seed})")


def _load_file(ref: Ref):
    from PIL import Image

    with Image.open(ref) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _cifar_dir(p: Path) -> Optional[Path]:
    for d in (p / "cifar-100-python", p):
        if (d / "meta").is_file() and ((d / "test").is_file() or (d / "train").is_file()):
            return d
    return None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"could not read CIFAR-100 file {str(path)!r} ({type(e).__name__}: {e}); "
                        "is it the official 'CIFAR-100 python version' archive, extracted?") from None
    if not isinstance(obj, dict):
        raise DataError(f"{str(path)!r} is not a CIFAR-100 pickle (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def open_cifar100(d: Path, split: str = "test") -> ImageDataset:
    if split not in ("test", "train"):
        split = "test"
    f = d / split
    if not f.is_file():
        raise _layout_error(f"CIFAR-100 folder {str(d)!r} has no '{split}' file")
    meta, data = _unpickle(d / "meta"), _unpickle(f)
    names = meta.get("fine_label_names")
    if names is None or "data" not in data or "fine_labels" not in data:
        raise DataError(
            f"{str(d)!r} does not hold CIFAR-100 pickles: need 'meta' with fine_label_names and '{split}' "
            "with data and fine_labels (CIFAR-10's data_batch_* files are a different dataset)"
        )
    arr = np.asarray(data["data"], dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-100 '{split}' data has shape {arr.shape}; expected [N, 3072]")
    images = arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [int(v) for v in data["fine_labels"]]
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def load(i):
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(images[int(i)]), "RGB")

    return ImageDataset(d, f"cifar-100 ({split})", list(zip(range(len(labels)), labels)), classes, load)


def open_pets(p: Path, split: str = "test") -> ImageDataset:
    ann = p / "annotations" / ("trainval.txt" if split == "train" else "test.txt")
    if not ann.is_file():
        ann = p / "annotations" / "test.txt"
    items, names, missing = [], {}, 0
    for line in ann.read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise DataError(f"{str(ann)!r}: line {line!r} is not '<image name> <class id 1..37> ...'")
        stem, cid = parts[0], int(parts[1]) - 1
        names.setdefault(cid, stem.rsplit("_", 1)[0])
        f = p / "images" / f"{stem}.jpg"
        if not f.exists():
            missing += 1
        items.append((str(f), cid))
    if not items:
        raise _layout_error(f"{str(ann)!r} lists no images")
    n = max(names) + 1
    classes = [names.get(i, str(i)) for i in range(n)]
    notes = [f"{missing} images listed in {ann.name} are missing from images/"] if missing else []
    return ImageDataset(p, f"oxford-iiit-pet ({ann.stem})", items, classes, _load_file, notes=notes)


def _read_labels_file(path: Path) -> Tuple[Dict[str, Union[int, str]], str]:
    """{file stem or name: label} and the kind of label ('index' or 'synset')."""
    out: Dict[str, Union[int, str]] = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        for row in rows:
            if len(row) < 2 or not row[1].split() or not re.fullmatch(r"n\d{8}", row[1].split()[0]):
                continue  # header ("ImageId,PredictionString") or blank
            out[row[0].strip()] = row[1].split()[0]
        return out, "synset"
    for ln, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2:
            raise DataError(f"{str(path)!r} line {ln}: {line!r} is not '<file name> <class index>'")
        lab = parts[-1]
        out[parts[0]] = int(lab) if lab.lstrip("-").isdigit() else lab
    kind = "index" if all(isinstance(v, int) for v in out.values()) else "synset"
    return out, kind


def open_flat_labelled(p: Path, labels_file: Path, files: List[Path]) -> ImageDataset:
    if not labels_file.is_file():
        raise DataError(f"labels file {str(labels_file)!r} does not exist")
    table, kind = _read_labels_file(labels_file)
    if not table:
        raise _layout_error(f"labels file {str(labels_file)!r} holds no '<file> <label>' entries")
    if kind == "index":
        if any(v < 0 for v in table.values()):
            raise DataError(f"labels file {str(labels_file)!r} has negative class indices")
        classes = [str(i) for i in range(max(table.values()) + 1)]
        to_idx = lambda v: v  # noqa: E731
    else:
        classes = sorted({str(v) for v in table.values()})
        pos = {c: i for i, c in enumerate(classes)}
        to_idx = lambda v: pos[str(v)]  # noqa: E731
    items, unlabelled = [], 0
    for f in files:
        lab = table.get(f.name, table.get(f.stem))
        if lab is None:
            unlabelled += 1
            continue
        items.append((str(f), to_idx(lab)))
    notes = []
    if unlabelled:
        notes.append(f"{unlabelled} images have no entry in {labels_file.name} and were left out")
    listed_missing = len(table) - len(items)
    if listed_missing > 0:
        notes.append(f"{listed_missing} entries of {labels_file.name} have no image file")
    if not items:
        raise _layout_error(f"none of the {len(files)} images in {str(p)!r} is named in {str(labels_file)!r}")
    return ImageDataset(p, "imagenet-val (flat + labels file)", items, classes, _load_file, notes=notes)


def open_image_folder(p: Path, class_dirs: List[Path]) -> ImageDataset:
    items, classes = [], []
    for d in class_dirs:
        files = _images_in(d)
        classes.append(d.name)
        items.extend((str(f), len(classes) - 1) for f in files)
    imagenet = len(classes) >= 100 and all(re.fullmatch(r"n\d{8}", c) for c in classes)
    layout = "imagenet-val (class folders)" if imagenet else "imagefolder"
    return ImageDataset(p, layout, items, classes, _load_file)


def open_dataset(
    path: Union[str, Path],
    split: Optional[str] = None,
    labels: Optional[Union[str, Path]] = None,
    transform: Optional[Callable] = None,
    limit: Optional[int] = None,
    prefer: Sequence[str] = EVAL_SPLITS,
) -> ImageDataset:
    """Recognise the layout of ``path`` and return its labelled images.

    split: for folders holding several splits (train/val/test folders, CIFAR pickles, Pets lists),
    which one to use; default: the first of ``prefer`` that exists (evaluation prefers val/test,
    calibration passes ``CALIBRATION_SPLITS`` to prefer train).
    labels: a labels file for a flat folder of images (default: val.txt / LOC_val_solution.csv there).
    limit: keep this many images, chosen by a fixed seed (see :meth:`ImageDataset.subset`).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise _layout_error(f"data folder {str(p)!r} does not exist")
    if not p.is_dir():
        raise _layout_error(f"--data {str(p)!r} is a file; give the folder that holds the images")
    ds = _detect(p, split, labels, prefer)
    if len(ds) == 0:
        raise _layout_error(f"no images found in {str(p)!r} (layout looked like {ds.layout})")
    ds.transform = transform
    log.info("data %s: %s", p, ds.describe())
    return ds.subset(limit)


def _detect(p: Path, split: Optional[str], labels, prefer: Sequence[str]) -> ImageDataset:
    want = split or prefer[0]
    cif = _cifar_dir(p)
    if cif is not None:
        s = split or next((s for s in prefer if s in ("test", "train") and (cif / s).is_file()), "test")
        return open_cifar100(cif, s)
    if (p / "images").is_dir() and (p / "annotations").is_dir():
        if not (p / "annotations" / "test.txt").is_file() and not (p / "annotations" / "trainval.txt").is_file():
            raise _layout_error(f"{str(p)!r} looks like Oxford-IIIT Pet but annotations/test.txt is missing")
        return open_pets(p, "train" if want == "train" else "test")

    try:
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
    except PermissionError:
        raise DataError(f"cannot list {str(p)!r}: permission denied") from None
    subdirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if is_image(e)]

    names = {d.name.lower(): d for d in subdirs}
    if subdirs and set(names) <= set(SPLIT_NAMES) and not files:
        order = [split] if split else list(prefer)
        chosen = next((names[s] for s in order if s in names), None)
        if chosen is None:
            raise _layout_error(f"{str(p)!r} holds the splits {sorted(names)} but not {split!r}")
        ds = _detect(chosen, None, labels, prefer)
        ds.notes.insert(0, f"using the '{chosen.name}' split of {p}")
        return ds

    if labels is not None or files:
        lf = Path(labels) if labels is not None else next((p / n for n in LABEL_FILES if (p / n).is_file()), None)
        if lf is None:
            raise _layout_error(
                f"{str(p)!r} holds {len(files)} images directly but no labels file "
                f"({', '.join(LABEL_FILES)}); put the images in class folders or give --labels FILE"
            )
        return open_flat_labelled(p, lf, files if files else _images_in(p))

    class_dirs = [d for d in subdirs if _images_in(d)]
    if class_dirs:
        ds = open_image_folder(p, class_dirs)
        empty = len(subdirs) - len(class_dirs)
        if empty:
            ds.notes.append(f"{empty} sub-folders hold no images and are not classes")
        return ds
    if not entries:
        raise _layout_error(f"data folder {str(p)!r} is empty")
    raise _layout_error(
        f"no images found in {str(p)!r} or its sub-folders (it holds {len(entries)} entries; "
        f"image types read: {', '.join(IMAGE_SUFFIXES)})"
    )


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@dataclass
class BatchStats:
    seen: int = 0
    unreadable: List[str] = field(default_factory=list)


def _collate(rows):
    ok = [(x, y) for x, y, _ in rows if x is not None]
    bad = [ref for x, _, ref in rows if x is None]
    if not ok:
        return None, None, bad
    return torch.stack([x for x, _ in ok]), torch.tensor([y for _, y in ok]), bad


def batches(ds: ImageDataset, batch_size: int = 64, workers: int = 0,
            stats: Optional[BatchStats] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images [B,C,H,W], labels [B]) in dataset order; unreadable images go to ``stats.unreadable``."""
    if ds.transform is None:
        raise ValueError("dataset has no transform: open it with transform=transform_for(model)")
    if batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    stats = stats if stats is not None else BatchStats()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate)
    for x, y, bad in loader:
        stats.unreadable.extend(bad)
        stats.seen += len(bad) + (0 if x is None else len(x))
        if x is not None:
            yield x, y


__all__ = [
    "ImageDataset", "open_dataset", "batches", "BatchStats",
    "LAYOUTS", "EVAL_SPLITS", "CALIBRATION_SPLITS", "IMAGE_SUFFIXES",
]
