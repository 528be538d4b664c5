"""Labelled image sets from local folders (never downloaded), preprocessed as the model expects.

``open_dataset(path)`` recognises the layout by looking at the folder, then reads it with the
maintained reader where one exists:

* ImageFolder (and ImageNet val sorted into class folders): ``DIR/<class>/<image>``, read by
  torchvision's ``ImageFolder`` (classes = sub-folders sorted by name; empty ones stay classes);
* ImageNet val, flat, with the ILSVRC2012 devkit (archive or extracted): labels from the devkit
  (:mod:`.imagenet`), in sorted-WordNet-id order unless ``class_order="devkit"`` is asked for;
* ImageNet val, flat, with a labels file (``val.txt`` with ``<file> <index>`` lines, or Kaggle's
  ``LOC_val_solution.csv``): read here, no maintained reader knows these;
* CIFAR-100: the official ``cifar-100-python`` pickles, read by torchvision's ``CIFAR100``;
* Oxford-IIIT Pet: ``images/`` plus ``annotations/test.txt``, read by torchvision's ``OxfordIIITPet``;
* MNIST / Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte`` ..., optionally ``.gz``), read
  with numpy (:mod:`.idx`); Fashion-MNIST's class names when the folder's name contains "fashion";
* a folder holding ``train/`` and ``val/`` or ``test/`` splits in any of the layouts above;
* video clips (``.npy``) or audio files (``.wav``) in class folders (:mod:`.clips`).

Entries whose name starts with '.' (``.ipynb_checkpoints``, macOS ``._x.jpg``) are never classes or
images. Images that cannot be decoded are skipped, counted and named in the result, never fatal.
Preprocessing comes from the timm model's own data config (resize, crop, mean/std). docs/data.md has
the rules in full.
"""
from __future__ import annotations

import csv
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision.datasets import CIFAR100, ImageFolder, OxfordIIITPet
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, pil_loader

from ..errors import DataError, UsageError
from . import clips, idx, imagenet
from .imagenet import CLASS_ORDERS, WNID

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(IMG_EXTENSIONS)  # torchvision's list, so every layout reads the same file types
SPLIT_NAMES = ("train", "val", "validation", "test")
EVAL_SPLITS = ("val", "validation", "test", "train")
CALIBRATION_SPLITS = ("train", "val", "validation", "test")
LABEL_FILES = ("val.txt", "labels.txt", "val_labels.txt", "LOC_val_solution.csv")
DEVKIT_LAYOUT = "imagenet-val (flat + devkit)"

LAYOUTS = """\
Supported layouts (local folders only; nothing is downloaded; details in docs/data.md):
  ImageFolder / ImageNet val in class folders   DIR/<class name>/<image>.jpg|png|...  (classes sorted by name)
  ImageNet val, flat + devkit                   DIR/ILSVRC2012_val_*.JPEG + DIR/ILSVRC2012_devkit_t12.tar.gz
                                                 (or the devkit extracted, or given with --labels)
  ImageNet val, flat + labels file              DIR/*.JPEG + DIR/val.txt ('<file name> <class index>' per line)
                                                 or DIR/LOC_val_solution.csv (or give the file with --labels)
  CIFAR-100 (official python version)           DIR/cifar-100-python/{test,meta} or DIR/{test,meta}
  Oxford-IIIT Pet                               DIR/images/*.jpg + DIR/annotations/test.txt
  MNIST / Fashion-MNIST (IDX files)             DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
                                                 (Fashion-MNIST's class names if DIR's name contains 'fashion')
  Video clips in class folders                  DIR/<class name>/<clip>.npy  ([T, H, W(, C)] or [T, C, H, W] frames)
  Audio clips in class folders                  DIR/<class name>/<clip>.wav
  Split folders                                 DIR/train/ and DIR/val/ or DIR/test/, each in a layout above"""

Ref = Union[str, int]  # an image file path, or an index into a reader's in-memory arrays (CIFAR)


def _layout_error(msg: str) -> DataError:
    return DataError(f"{msg}\n{LAYOUTS}")


def _hidden(name: str) -> bool:
    return name.startswith(".")


def is_image(p: Path) -> bool:
    return has_file_allowed_extension(p.name, IMG_EXTENSIONS) and p.is_file() and not _hidden(p.name)


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if is_image(p))


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label, reference) triples; ``image`` is None when the file cannot be decoded.

    ``class_order`` says how class indices were assigned when that matters for comparing top-1 with
    published numbers (ImageNet: sorted WordNet ids or the devkit's order); None otherwise.
    """

    def __init__(
        self,
        root: Path,
        layout: str,
        items: Sequence[Tuple[Ref, int]],
        classes: Sequence[str],
        load: Callable[[Ref], "object"],
        transform: Optional[Callable] = None,
        notes: Sequence[str] = (),
        class_order: Optional[str] = None,
    ):
        self.root = Path(root)
        self.layout = layout
        self.items = list(items)
        self.classes = list(classes)
        self._load = load
        self.transform = transform
        self.notes = list(notes)  # things the user should know (skipped entries, chosen split)
        self.class_order = class_order

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> List[int]:
        return [y for _, y in self.items]

    def describe(self) -> str:
        order = f", class order: {self.class_order}" if self.class_order else ""
        what = "clips" if self.layout.startswith(("video", "audio")) else "images"
        return f"{self.layout}: {len(self)} {what}, {self.num_classes} classes{order} ({self.root})"

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
            except DataError:  # readable, but not what the model takes (a clip's frame count): say so
                raise
            except Exception:
                img = None
        return img, label, str(ref)

    def _copy(self, items, extra_note: Optional[str] = None) -> "ImageDataset":
        notes = self.notes + ([extra_note] if extra_note else [])
        return ImageDataset(self.root, self.layout, items, self.classes, self._load, self.transform, notes,
                            self.class_order)

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


class _ByIndex:
    """Item ``i`` of a torchvision dataset, decoded by that dataset (its transform is None)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, i: Ref):
        return self.dataset[int(i)][0]


# --------------------------------------------------------------------------------------------
# Layouts read by torchvision
# --------------------------------------------------------------------------------------------


class _LocalCIFAR100(CIFAR100):
    """torchvision's CIFAR100 on local pickles in any folder: only the asked split's file must be
    there, and the md5 sums of the official download are not required (torchvision's
    ``check_integrity(path, None)`` then checks that the file exists)."""

    def __init__(self, folder: Path, train: bool):
        self.base_folder = folder.name
        self.train_list = [["train", None]] if train else []
        self.test_list = [] if train else [["test", None]]
        self.meta = dict(CIFAR100.meta, md5=None)
        super().__init__(str(folder.parent), train=train, download=False)


def _cifar_dir(p: Path) -> Optional[Path]:
    for d in (p / "cifar-100-python", p):
        if (d / "meta").is_file() and ((d / "test").is_file() or (d / "train").is_file()):
            return d
    return None


def open_cifar100(d: Path, split: str = "test") -> ImageDataset:
    split = "train" if split == "train" else "test"
    if not (d / split).is_file():
        raise _layout_error(f"CIFAR-100 folder {str(d)!r} has no '{split}' file")
    try:
        tv = _LocalCIFAR100(d, train=split == "train")
    except Exception as e:  # unpickling, missing keys, wrong shapes: torchvision's own error, named
        raise DataError(
            f"{str(d)!r} does not hold CIFAR-100 pickles readable by torchvision's CIFAR100 (need 'meta' with "
            f"fine_label_names and '{split}' with data [N, 3072] and fine_labels; CIFAR-10's batches are a "
            f"different dataset): {type(e).__name__}: {e}"
        ) from None
    labels = [int(t) for t in tv.targets]
    return ImageDataset(d, f"cifar-100 ({split})", list(enumerate(labels)), [str(c) for c in tv.classes], _ByIndex(tv))


def _pets_dir(p: Path) -> Optional[Path]:
    for d in (p / "oxford-iiit-pet", p):
        if (d / "images").is_dir() and (d / "annotations").is_dir():
            return d
    return None


def _pets_reader(d: Path, split: str) -> OxfordIIITPet:
    """torchvision reads ROOT/oxford-iiit-pet/; a folder of another name is linked under that name."""
    if d.name == "oxford-iiit-pet":
        return OxfordIIITPet(str(d.parent), split=split)
    with tempfile.TemporaryDirectory(prefix="vitmerge-pets-") as tmp:
        (Path(tmp) / "oxford-iiit-pet").symlink_to(d.resolve(), target_is_directory=True)
        return OxfordIIITPet(tmp, split=split)  # its image paths are re-rooted at d below


def open_pets(d: Path, split: str = "test") -> ImageDataset:
    want = "trainval" if split in ("train", "trainval") else "test"
    ann, notes = d / "annotations", []
    if want == "trainval" and not (ann / "trainval.txt").is_file() and (ann / "test.txt").is_file():
        notes.append("annotations/trainval.txt is missing: using test.txt")
        want = "test"
    if not (ann / f"{want}.txt").is_file():
        raise _layout_error(f"{str(d)!r} looks like Oxford-IIIT Pet but annotations/{want}.txt is missing "
                            "(give --split train to read trainval.txt)")
    try:
        tv = _pets_reader(d, want)
    except (ValueError, OSError, RuntimeError) as e:
        raise DataError(f"{str(ann / (want + '.txt'))!r} is not an Oxford-IIIT Pet list as torchvision's "
                        "OxfordIIITPet reads it ('<image> <class id 1..37> <species> <breed id>' per line): "
                        f"{type(e).__name__}: {e}") from None
    files, labels = [d / "images" / f.name for f in tv._images], [int(y) for y in tv._labels]
    if not files:
        raise _layout_error(f"{str(ann / (want + '.txt'))!r} lists no images")
    present = sorted(set(labels))  # torchvision names the classes present, in label order
    names = dict(zip(present, tv.classes)) if len(present) == len(tv.classes) else {}
    classes = [names.get(i, str(i)) for i in range(max(labels) + 1)]
    missing = sum(not f.exists() for f in files)
    if missing:
        notes.append(f"{missing} images listed in {want}.txt are missing from images/")
    return ImageDataset(d, f"oxford-iiit-pet ({want})", [(str(f), y) for f, y in zip(files, labels)], classes,
                        pil_loader, notes=notes)


class _VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder, except that hidden sub-folders (and ``skip``) are not classes."""

    def __init__(self, root: str, skip: Sequence[str] = (), **kwargs):
        self.skip = set(skip)
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        classes = [c for c in find_classes(directory)[0] if not _hidden(c) and c not in self.skip]
        return classes, {c: i for i, c in enumerate(classes)}


def open_image_folder(p: Path, skip: Sequence[str] = ()) -> ImageDataset:
    """``skip``: sub-folders that are not classes (the ImageNet devkit beside the class folders)."""
    root = str(p)

    def visible_image(path: str) -> bool:
        rel = os.path.relpath(path, root).split(os.sep)
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(_hidden(part) for part in rel)

    tv = _VisibleImageFolder(root, skip, loader=pil_loader, is_valid_file=visible_image, allow_empty=True)
    classes, notes, used = list(tv.classes), [], set(tv.targets)
    empty = [c for i, c in enumerate(classes) if i not in used]
    if empty and tv.samples:
        notes.append(f"{len(empty)} class folders hold no images (kept as classes, so the others keep their "
                     f"index): {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}")
    from timm.utils.misc import natural_key

    if sorted(classes, key=natural_key) != classes:
        notes.append("classes are in name order ('10' before '2'), as torchvision's ImageFolder numbers them; "
                     "timm's folder reader numbers them naturally ('2' before '10'): check which the model used")
    imagenet_like = len(classes) >= 100 and all(WNID.fullmatch(c) for c in classes)
    layout = "imagenet-val (class folders)" if imagenet_like else "imagefolder"
    return ImageDataset(p, layout, tv.samples, classes, pil_loader, notes=notes)


def open_idx(root: Path, folder: Path, split: Optional[str], prefer: Sequence[str]) -> ImageDataset:
    """MNIST / Fashion-MNIST IDX files in ``folder`` (``root`` is the folder given; see :mod:`.idx`)."""
    complete = idx.check_pairs(folder)
    if not complete:  # pragma: no cover - find() only returns folders holding IDX files
        raise _layout_error(f"{str(folder)!r} holds no complete pair of IDX files; {idx.EXPECTED}")
    s, note = idx.choose_split(complete, split, prefer)
    sp = idx.read_split(root, folder, s)
    notes = [note] if note else []
    if split is None and len(complete) > 1:
        notes.append(f"using the '{s}' split ({sp.files[0].name}); --split train|test picks the other")
    elif split is None:
        notes.append(f"only the '{s}' split's files are present: using them")
    if not sp.fashion and len(sp.labels) in (60000, 10000):
        notes.append("class names are the digits 0..9 (MNIST); Fashion-MNIST's names are used when the folder's "
                     "name contains 'fashion' (the files themselves do not say which of the two they are)")
    return ImageDataset(root, f"{sp.name} idx ({s})", list(enumerate(sp.labels.tolist())), sp.classes,
                        idx.GreyToRGB(sp.images), notes=notes)


# --------------------------------------------------------------------------------------------
# Layouts no maintained reader covers: ImageNet val flat + devkit, flat + labels file
# --------------------------------------------------------------------------------------------


def open_devkit_val(p: Path, devkit: Path, files: List[Path], class_order: str = "sorted") -> ImageDataset:
    kit = imagenet.read_devkit(devkit)
    if kit.val_ids is None:
        raise DataError(f"the devkit {str(devkit)!r} has no {imagenet.GROUND_TRUTH}: it is needed for the val labels")
    classes = kit.order(class_order)
    pos = {w: i for i, w in enumerate(classes)}
    items, unnamed = [], 0
    for f in files:
        k = imagenet.val_number(f.name)
        if k is None or not 1 <= k <= len(kit.val_ids):
            unnamed += 1
            continue
        items.append((str(f), pos[kit.wnids[kit.val_ids[k - 1] - 1]]))
    notes = [f"labels from the devkit {devkit.name}"]
    if unnamed:
        notes.append(f"{unnamed} images are not named ILSVRC2012_val_<1..{len(kit.val_ids)}> and were left out")
    if not items:
        raise _layout_error(f"none of the {len(files)} images in {str(p)!r} is named ILSVRC2012_val_NNNNNNNN "
                            f"(the devkit {devkit.name} labels val images by that number)")
    order = imagenet.DEVKIT if class_order == "devkit" else imagenet.SORTED
    return ImageDataset(p, DEVKIT_LAYOUT, items, classes, pil_loader, notes=notes, class_order=order)


def _read_labels_file(path: Path) -> Tuple[Dict[str, Union[int, str]], str]:
    """{file stem or name: label} and the kind of label ('index' or 'synset')."""
    out: Dict[str, Union[int, str]] = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        for row in rows:
            if len(row) < 2 or not row[1].split() or not WNID.fullmatch(row[1].split()[0]):
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
        order = f"the indices written in {labels_file.name}"
    else:
        classes = sorted({str(v) for v in table.values()})
        pos = {c: i for i, c in enumerate(classes)}
        to_idx = lambda v: pos[str(v)]  # noqa: E731
        order = imagenet.SORTED if all(WNID.fullmatch(c) for c in classes) else None
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
    return ImageDataset(p, "imagenet-val (flat + labels file)", items, classes, pil_loader, notes=notes,
                        class_order=order)


# --------------------------------------------------------------------------------------------
# Class order (ImageNet) and layout detection
# --------------------------------------------------------------------------------------------


def _set_class_order(ds: ImageDataset, class_order: str, devkit: Optional[Path]) -> ImageDataset:
    """Labels named by WordNet id: say the order; for ``devkit``, renumber by ILSVRC2012_ID."""
    if ds.layout == DEVKIT_LAYOUT:
        return ds  # numbered in the asked order by open_devkit_val
    if not (ds.classes and all(WNID.fullmatch(c) for c in ds.classes)):
        if class_order == "devkit":
            raise DataError(f"--class-order devkit applies to ImageNet labels named by WordNet id (n########); "
                            f"{ds.layout} has classes like {', '.join(ds.classes[:3])}")
        return ds
    if class_order == "sorted":
        ds.class_order = imagenet.SORTED
        if len(ds.classes) < 1000:
            ds.notes.append(f"only {len(ds.classes)} ImageNet classes: labels are 0..{len(ds.classes) - 1} in "
                            "sorted WordNet-id order of these classes, which fits a model trained on them, not "
                            "a 1000-class ImageNet checkpoint")
        return ds
    if devkit is None:
        raise DataError(f"--class-order devkit needs the ImageNet devkit to number WordNet ids by ILSVRC2012_ID: "
                        f"put {imagenet.DEVKIT_ARCHIVE} in {str(ds.root)!r} or give it with --labels")
    kit = imagenet.read_devkit(devkit)
    unknown = sorted(set(ds.classes) - set(kit.wnids))
    if unknown:
        raise DataError(f"{len(unknown)} classes of {str(ds.root)!r} are not in the devkit {devkit.name} "
                        f"(e.g. {unknown[0]})")
    pos = {w: i for i, w in enumerate(kit.wnids)}
    ds.items = [(ref, pos[ds.classes[y]]) for ref, y in ds.items]
    ds.classes, ds.class_order = list(kit.wnids), imagenet.DEVKIT
    return ds


def open_dataset(
    path: Union[str, Path],
    split: Optional[str] = None,
    labels: Optional[Union[str, Path]] = None,
    transform: Optional[Callable] = None,
    limit: Optional[int] = None,
    prefer: Sequence[str] = EVAL_SPLITS,
    class_order: str = "sorted",
) -> ImageDataset:
    """Recognise the layout of ``path`` and return its labelled images.

    split: for folders holding several splits (train/val/test folders, CIFAR pickles, Pets lists,
    MNIST IDX files: train or test, val meaning test),
    which one to use; default: the first of ``prefer`` that exists (evaluation prefers val/test,
    calibration passes ``CALIBRATION_SPLITS`` to prefer train).
    labels: a labels file for a flat folder of images (default: the ImageNet devkit, val.txt or
    LOC_val_solution.csv found there), or the devkit archive / folder.
    limit: keep this many images, chosen by a fixed seed (see :meth:`ImageDataset.subset`).
    class_order: for ImageNet labels, ``sorted`` (sorted WordNet ids: timm / torchvision checkpoints)
    or ``devkit`` (ILSVRC2012_ID order; warns, since standard checkpoints do not use it).
    """
    if class_order not in CLASS_ORDERS:
        raise UsageError(f"unknown class order {class_order!r}; use one of {', '.join(CLASS_ORDERS)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise _layout_error(f"data folder {str(p)!r} does not exist")
    if not p.is_dir():
        raise _layout_error(f"--data {str(p)!r} is a file; give the folder that holds the images")
    devkit = None
    if labels is not None and imagenet.is_devkit(Path(labels)):
        devkit, labels = Path(labels), None
    ds, devkit = _detect(p, split, labels, prefer, class_order, devkit)
    if len(ds) == 0:
        raise _layout_error(f"no images found in {str(p)!r} (layout looked like {ds.layout})")
    ds = _set_class_order(ds, class_order, devkit)
    if class_order == "devkit":
        ds.notes.insert(0, imagenet.DEVKIT_WARNING)
        warnings.warn(imagenet.DEVKIT_WARNING, UserWarning, stacklevel=2)
    ds.transform = transform
    log.info("data %s: %s", p, ds.describe())
    return ds.subset(limit)


def _detect(p: Path, split: Optional[str], labels, prefer: Sequence[str], class_order: str,
            devkit: Optional[Path]) -> Tuple[ImageDataset, Optional[Path]]:
    want = split or prefer[0]
    devkit = devkit or imagenet.find_devkit(p)
    cif = _cifar_dir(p)
    if cif is not None:
        s = split or next((s for s in prefer if s in ("test", "train") and (cif / s).is_file()), "test")
        return open_cifar100(cif, s), devkit
    pets = _pets_dir(p)
    if pets is not None:
        return open_pets(pets, "train" if want == "train" else "test"), devkit
    idx_dir = idx.find(p)
    if idx_dir is not None:
        if labels is not None:
            raise DataError(f"--labels does not apply to {str(p)!r}: MNIST / Fashion-MNIST IDX files hold their labels")
        return open_idx(p, idx_dir, split, prefer), devkit

    kit = devkit.resolve() if devkit is not None else None
    skip = [kit.name] if kit is not None and kit.parent == p.resolve() else []  # the devkit is no class or split
    try:
        entries = sorted(e for e in p.iterdir() if not _hidden(e.name) and e.name not in skip)
    except PermissionError:
        raise DataError(f"cannot list {str(p)!r}: permission denied") from None
    subdirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if is_image(e)]

    names = {d.name.lower(): d for d in subdirs}
    kind = None if (subdirs and set(names) <= set(SPLIT_NAMES)) else clips.detect(p)
    if kind is not None:
        c = clips.scan(p, kind)
        return ImageDataset(p, c.layout, c.items, c.classes, c.load, notes=c.notes), devkit
    if subdirs and set(names) <= set(SPLIT_NAMES) and not files:
        order = [split] if split else list(prefer)
        chosen = next((names[s] for s in order if s in names), None)
        if chosen is None:
            raise _layout_error(f"{str(p)!r} holds the splits {sorted(names)} but not {split!r}")
        ds, devkit = _detect(chosen, None, labels, prefer, class_order, devkit)
        ds.notes.insert(0, f"using the '{chosen.name}' split of {p}")
        return ds, devkit

    if files and labels is None and devkit is not None:
        return open_devkit_val(p, devkit, files, class_order), devkit
    if labels is not None or files:
        lf = Path(labels) if labels is not None else next((p / n for n in LABEL_FILES if (p / n).is_file()), None)
        if lf is None:
            raise _layout_error(
                f"{str(p)!r} holds {len(files)} images directly but no labels file "
                f"({', '.join(LABEL_FILES)}) and no ImageNet devkit ({imagenet.DEVKIT_ARCHIVE}); "
                "put the images in class folders or give --labels FILE"
            )
        return open_flat_labelled(p, lf, files if files else _images_in(p)), devkit

    if subdirs:
        ds = open_image_folder(p, skip)
        if len(ds) == 0:
            raise _layout_error(
                f"no images found in {str(p)!r} or its {len(subdirs)} sub-folders "
                f"(image types read: {', '.join(IMAGE_SUFFIXES)})"
            )
        return ds, devkit
    if not entries:
        raise _layout_error(f"data folder {str(p)!r} is empty")
    raise _layout_error(
        f"no images found in {str(p)!r} (it holds {len(entries)} entries; "
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
