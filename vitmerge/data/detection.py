"""An offline detection set made in code, and detection metrics through a maintained library.

``digit_canvases(n, ...)``: scikit-learn's 8 x 8 handwritten digits (1,797 glyphs, bundled with
scikit-learn: nothing is downloaded) pasted, scaled by nearest-neighbour and without overlap, on a
noisy square canvas. Each image has 1 to ``max_digits`` digits; its boxes are the tight boxes of the
glyphs' ink, as ``(cx, cy, w, h)`` normalised to [0, 1] (the detectors' box format), labels 0-9. The
``train`` split pastes glyphs 0-1347 and ``test`` glyphs 1348-1796, so no glyph is in both.

``mean_average_precision(preds, targets)``: COCO mAP@[.5:.95], mAP@0.5 and mAP@0.75 from torchmetrics'
``MeanAveragePrecision`` (pycocotools backend); not a hand-written metric. torchmetrics and pycocotools are
imported only here, at the call.

``write_coco(set, folder)`` / ``read_coco(folder)``: a detection set as a COCO-format folder
(``images/*.png`` + ``annotations.json``: ``bbox`` = [x, y, w, h] in pixels, ``category_id``), the layout
a detection evaluation reads; ``read_coco`` takes any such folder into memory (images resized to one square
size, boxes normalised, category ids mapped to 0..K-1 in id order). ``CocoFolder`` reads any COCO folder
lazily (COCO's own ``instances_val2017.json`` + ``val2017/`` too) for ``vitmerge eval``: images resized to
the model's (H, W) and normalised, category ids mapped to the model's classes by name, id or id order.

``decode_dense`` / ``decode_yolos``: the two detectors' outputs (``logits``, ``boxes``) as the per-image
prediction lists the metric takes. The dense head's logits are per-class sigmoid scores (one score per
cell and class, CenterNet / FCOS-like), YOLOS's are a softmax over the classes plus "no object" (last).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._io import staged
from ..errors import DataError, RuntimeMissingError, UsageError

#: glyph indices of each split in scikit-learn's digits (1,797 glyphs)
SPLITS = {"train": (0, 1348), "test": (1348, 1797)}


@dataclass
class DetectionSet:
    images: torch.Tensor  # [N, 3, S, S] float32 in [0, 1]
    boxes: List[torch.Tensor]  # per image [k, 4] float32: (cx, cy, w, h) in [0, 1]
    labels: List[torch.Tensor]  # per image [k] int64, 0..K-1
    categories: List[str] = field(default_factory=lambda: [str(i) for i in range(10)])  # name of each label

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def targets(self, idx: Sequence[int] = None) -> List[Dict[str, torch.Tensor]]:
        """The ground truth as the metric (and transformers' detection losses) take it."""
        idx = range(len(self)) if idx is None else idx
        return [{"boxes": self.boxes[i], "labels": self.labels[i]} for i in idx]


def digit_canvases(n: int, size: int = 64, max_digits: int = 3, scale=(12, 24), split: str = "train",
                   seed: int = 0, noise: float = 0.05) -> DetectionSet:
    """``n`` canvases of ``size`` x ``size`` with 1..``max_digits`` digits each, glyph side in ``scale`` px."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    lo, hi = int(scale[0]), int(scale[1])
    if n < 1 or max_digits < 1 or not 8 <= lo <= hi <= size:
        raise UsageError(f"need n >= 1, max_digits >= 1 and 8 <= scale[0] <= scale[1] <= size={size}; got n={n}, "
                         f"max_digits={max_digits}, scale={scale}")
    from sklearn.datasets import load_digits

    d = load_digits()
    a, b = SPLITS[split]
    glyphs, classes = d.images[a:b] / 16.0, d.target[a:b]
    rng = np.random.default_rng(seed)
    images = np.clip(rng.normal(0.0, noise, (n, size, size)), 0.0, 1.0).astype(np.float32)
    all_boxes, all_labels = [], []
    for i in range(n):
        taken: List[tuple] = []  # pixel boxes (x0, y0, x1, y1) of pasted glyphs (ink boxes)
        for _ in range(int(rng.integers(1, max_digits + 1))):
            for _attempt in range(50):
                j = int(rng.integers(len(glyphs)))
                s = int(rng.integers(lo, hi + 1))
                x, y = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
                g = glyphs[j]
                ys, xs = np.nonzero(g > 0)
                # nearest-neighbour scaling: output pixel p shows glyph pixel p * 8 // s, so glyph pixel c
                # covers output pixels ceil(c * s / 8) .. ceil((c + 1) * s / 8) - 1
                box = (x + -(-xs.min() * s // 8), y + -(-ys.min() * s // 8), x + -(-(xs.max() + 1) * s // 8),
                       y + -(-(ys.max() + 1) * s // 8))
                if any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
                    continue
                rows = (np.arange(s) * 8 // s)
                big = g[rows][:, rows]
                images[i, y:y + s, x:x + s] = np.maximum(images[i, y:y + s, x:x + s], big)
                taken.append(box + (int(classes[j]),))
                break
        px = np.array([t[:4] for t in taken], dtype=np.float64)
        cxcywh = np.stack([(px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2, px[:, 2] - px[:, 0],
                           px[:, 3] - px[:, 1]], axis=1) / size
        all_boxes.append(torch.from_numpy(cxcywh.astype(np.float32)))
        all_labels.append(torch.tensor([t[4] for t in taken], dtype=torch.int64))
    imgs = torch.from_numpy(images)[:, None].expand(n, 3, size, size).contiguous()
    return DetectionSet(images=imgs, boxes=all_boxes, labels=all_labels)


ANNOTATIONS = "annotations.json"


def write_coco(data: DetectionSet, folder: Union[str, Path]) -> Path:
    """``data`` as a COCO-format folder (written whole or not at all): images/NNNNNN.png + annotations.json."""
    from PIL import Image

    out = Path(folder).expanduser()
    if out.exists():
        raise UsageError(f"{str(out)!r} exists: choose a new folder for the COCO export")
    anns, imgs = [], []
    with staged(out) as stage:
        root = stage / out.name
        (root / "images").mkdir(parents=True)
        for i in range(len(data)):
            img = data.images[i]
            _, h, w = img.shape
            name = f"images/{i:06d}.png"
            arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(root / name)
            imgs.append({"id": i, "file_name": name, "width": int(w), "height": int(h)})
            for (cx, cy, bw, bh), c in zip(data.boxes[i].tolist(), data.labels[i].tolist()):
                anns.append({"id": len(anns), "image_id": i, "category_id": int(c), "iscrowd": 0, "area": bw * w * bh * h,
                             "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]})
        cats = [{"id": i, "name": n} for i, n in enumerate(data.categories)]
        (root / ANNOTATIONS).write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return out


#: how COCO category ids become the model's class indices (``CocoFolder(class_map=...)``)
CLASS_MAPS = ("auto", "id", "order", "name")


def _class_index(cats: Sequence[dict], class_map: str, num_classes: Optional[int],
                 class_names: Optional[Sequence[str]], where: str) -> Tuple[Dict[int, int], str]:
    """{category id: model class index} and a sentence saying how it was chosen.

    ``name``: by category name in ``class_names`` (the model's own, e.g. transformers' ``id2label``);
    ``id``: the category id is the class index (COCO-trained DETR/YOLOS checkpoints: 91 classes, ids 1..90);
    ``order``: index in ascending id order (0..K-1). ``auto``: name when the model names classes and every
    category name is one of them, else id when every id fits the model's classes, else order."""
    if class_map not in CLASS_MAPS:
        raise UsageError(f"class map must be one of {', '.join(CLASS_MAPS)}, got {class_map!r}")
    ids = sorted(int(c["id"]) for c in cats)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    known = {n.strip().lower(): i for i, n in enumerate(class_names or ())}
    fits = num_classes is None or max(ids) < num_classes
    if class_map == "auto":
        class_map = ("name" if known and all(n.strip().lower() in known for n in names.values())
                     else "id" if min(ids) >= 0 and fits else "order")
    if class_map == "name":
        missing = [n for n in names.values() if n.strip().lower() not in known]
        if not known or missing:
            raise DataError(f"{where}: categories {', '.join(map(repr, missing[:5])) or '(all)'} are not among the "
                            "model's class names: use class map id or order")
        return {cid: known[names[cid].strip().lower()] for cid in ids}, "category names matched to the model's class names"
    if class_map == "id":
        if min(ids) < 0 or not fits:
            raise DataError(f"{where}: category ids {ids[0]}..{ids[-1]} are not all class indices of a model with "
                            f"{num_classes} classes: use class map order (index in id order) or name")
        return {cid: cid for cid in ids}, "category id = class index"
    if num_classes is not None and len(ids) > num_classes:
        raise DataError(f"{where} has {len(ids)} categories but the model has {num_classes} classes: is it the "
                        "detector trained on these categories?")
    return {cid: k for k, cid in enumerate(ids)}, f"category ids {ids[0]}..{ids[-1]} -> class 0..{len(ids) - 1} in id order"


class CocoFolder(torch.utils.data.Dataset):
    """A COCO-format detection set read lazily: ``annotations`` (default ``FOLDER/annotations.json``; COCO's
    own ``instances_val2017.json`` works) and the images it names (``file_name`` relative to ``folder``, or
    to ``folder/images``). Item ``i``: (image [3, H, W] resized to ``size`` and normalised by ``mean`` /
    ``std``, or None when unreadable; the image's index; its file name). :meth:`target` gives the ground
    truth as boxes (cx, cy, w, h) normalised to the image, labels as model class indices (``class_map``),
    and ``iscrowd``. A resize to a fixed (H, W) keeps normalised boxes exact (no crop)."""

    def __init__(self, folder: Union[str, Path], annotations: Union[str, Path, None] = None,
                 size: Union[int, Tuple[int, int], None] = None, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), class_map: str = "order", num_classes: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, limit: Optional[int] = None, seed: int = 0):
        self.root = Path(folder).expanduser()
        if not self.root.is_dir():
            raise DataError(f"detection data folder {str(self.root)!r} does not exist or is not a folder")
        self.ann_path = Path(annotations).expanduser() if annotations is not None else self.root / ANNOTATIONS
        if not self.ann_path.is_file():
            raise DataError(f"{str(self.root)!r} has no {ANNOTATIONS}: a COCO-format folder holds {ANNOTATIONS} (images, "
                            "annotations with bbox [x, y, w, h] in pixels, categories) and the images it names; "
                            "or give the annotations file (e.g. instances_val2017.json) with --labels")
        try:
            coco = json.loads(self.ann_path.read_text())
            images, anns, cats = coco["images"], coco["annotations"], coco["categories"]
            images = [{"id": int(im["id"]), "file_name": str(im["file_name"])} for im in images]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{str(self.ann_path)!r} is not COCO annotations ({type(e).__name__}: {e}); it needs the "
                            "keys images (id, file_name), annotations and categories") from None
        if not images or not cats:
            raise DataError(f"{str(self.ann_path)!r} lists no images or no categories")
        self.index, self.mapping = _class_index(cats, class_map, num_classes, class_names, str(self.ann_path))
        self.categories = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
        per_image: Dict[int, list] = {im["id"]: [] for im in images}
        for a in anns:
            try:
                cid, iid, box = int(a["category_id"]), int(a["image_id"]), [float(v) for v in a["bbox"]]
            except (KeyError, TypeError, ValueError):
                raise DataError(f"annotation {a.get('id')} in {str(self.ann_path)!r} lacks category_id, image_id or "
                                "bbox [x, y, w, h]") from None
            if cid not in self.index or iid not in per_image or len(box) != 4:
                raise DataError(f"annotation {a.get('id')} in {str(self.ann_path)!r} names an unknown image or "
                                "category, or its bbox is not [x, y, w, h]")
            per_image[iid].append((box, self.index[cid], int(a.get("iscrowd", 0))))
        self.notes: List[str] = [f"classes: {self.mapping}"]
        if limit is not None:
            if limit < 1:
                raise DataError(f"--limit must be positive, got {limit}")
            if limit < len(images):
                pick = np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))
                images = [images[i] for i in pick]
                self.notes.append(f"{limit} of the images, chosen with seed {seed}")
        self.images = images
        self.paths = [self._locate(im["file_name"]) for im in images]
        self._anns = [per_image[im["id"]] for im in images]
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.size = size
        self.mean = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(3, 1, 1)

    def _locate(self, name: str) -> Path:
        for p in (self.root / name, self.root / "images" / name):
            if p.is_file():
                return p
        raise DataError(f"{str(self.ann_path)!r} names image {name!r}, which is neither in {str(self.root)!r} nor in "
                        "its images/ folder: give the image folder with --data")

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        return f"COCO-format folder {str(self.root)} ({len(self)} images, {len(self.categories)} categories)"

    def target(self, i: int, size: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
        """Ground truth of image ``i``; ``size`` = the image's (width, height) in pixels (read if not given)."""
        if size is None:
            from PIL import Image

            with Image.open(self.paths[i]) as im:
                size = im.size
        w, h = size
        rows = self._anns[i]
        bx = [[(b[0] + b[2] / 2) / w, (b[1] + b[3] / 2) / h, b[2] / w, b[3] / h] for b, _, _ in rows]
        return {"boxes": torch.tensor(bx, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([c for _, c, _ in rows], dtype=torch.int64),
                "iscrowd": torch.tensor([z for _, _, z in rows], dtype=torch.int64)}

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                pil = im.convert("RGB")
        except Exception:  # unreadable or truncated files are reported, not fatal  # noqa: BLE001
            return None, i, None
        w, h = pil.size
        side = self.size or (h, w)
        if (h, w) != side:
            pil = pil.resize((side[1], side[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, i, (w, h)

    def batches(self, batch_size: int = 16, workers: int = 0, unreadable: Optional[List[str]] = None):
        """(images [B, 3, H, W], targets of those images, their indices); unreadable files go to ``unreadable``."""
        if self.size is None:
            raise UsageError("CocoFolder.batches needs a fixed size=(H, W): the model's input size")

        def collate(rows):
            return rows

        loader = torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=collate)
        for rows in loader:
            ok = [(x, i, wh) for x, i, wh in rows if x is not None]
            if unreadable is not None:
                unreadable.extend(str(self.paths[i]) for x, i, _ in rows if x is None)
            if ok:
                yield (torch.stack([x for x, _, _ in ok]), [self.target(i, wh) for _, i, wh in ok],
                       [i for _, i, _ in ok])


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DetectorInput:
    """What a detector takes: the image size, the normalisation, its classes and how to decode its outputs."""

    kind: str  # "dense" (vitmerge.models.dense) or "yolos" (transformers)
    size: Tuple[int, int]  # (H, W) of the model's input
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    num_classes: int
    class_names: Optional[List[str]]  # the model's class names (transformers' id2label), None when it has none
    source: str  # where mean/std came from, for the report

    def decode(self, logits: torch.Tensor, boxes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        return decode_dense(logits, boxes) if self.kind == "dense" else decode_yolos(logits, boxes)


def detector_input(model: torch.nn.Module, normalize: bool = True) -> DetectorInput:
    """The preprocessing and decoding of a detector: a dense detector normalises with its timm backbone's
    mean/std, YOLOS with its folder's preprocessor_config.json (default: ImageNet's, as YolosImageProcessor).
    ``normalize=False``: pixels in [0, 1] (what vitmerge's demo detectors were trained on)."""
    from ..models import hf
    from ..models.dense import is_dense
    from ..models.family import family
    from ..models.shapes import input_shape

    _, h, w = (int(v) for v in input_shape(model))
    if is_dense(model):
        kind, names = "dense", None
        cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        source = "the backbone's timm config"
    elif hf.is_hf(model) and hf.model_type(model) in hf.DETECTORS:
        kind = "yolos"
        pre = hf.preprocessor_config(model)
        mean, std = tuple(pre.get("image_mean") or IMAGENET_MEAN), tuple(pre.get("image_std") or IMAGENET_STD)
        source = "preprocessor_config.json" if pre.get("image_mean") else "YolosImageProcessor's defaults (ImageNet)"
        labels = getattr(model.config, "id2label", None) or {}
        names = [str(labels.get(i, labels.get(str(i), ""))) for i in range(hf.num_classes(model))]
        if all(n == f"LABEL_{i}" or not n for i, n in enumerate(names)):
            names = None  # transformers' placeholder names say nothing
    else:
        raise UsageError(f"{type(model).__name__} is not a detector (outputs: "
                         f"{', '.join(family(model).output_names(model))})")
    if not normalize:
        mean, std, source = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none (pixels in [0, 1])"
    return DetectorInput(kind, (h, w), tuple(map(float, mean)), tuple(map(float, std)),
                         int(family(model).num_classes(model)), names, source)


def read_coco(folder: Union[str, Path], size: Optional[int] = None) -> DetectionSet:
    """A COCO-format folder (``annotations.json`` and the images it names, paths relative to the folder) as a
    :class:`DetectionSet` held in memory: images resized to ``size`` x ``size`` (default: the first image's
    height, which every image must then share), boxes normalised, labels = category index in id order.
    Large sets: iterate a :class:`CocoFolder` instead."""
    coco = CocoFolder(folder, class_map="order")
    if size is None:
        from PIL import Image

        for p in coco.paths:
            with Image.open(p) as im:
                w, h = im.size
            if size is None:
                size = h
            if (w, h) != (size, size):
                raise DataError(f"{p.name!r} is {w} x {h}; the images differ in size or are not square: "
                                "give size=N to resize them all to N x N")
    coco.size = (int(size), int(size))
    tensors, targets = [], []
    for i in range(len(coco)):
        x, _, wh = coco[i]
        if x is None:
            raise DataError(f"{str(coco.paths[i])!r} could not be read as an image")
        tensors.append(x)
        targets.append(coco.target(i, wh))
    return DetectionSet(images=torch.stack(tensors), boxes=[t["boxes"] for t in targets],
                        labels=[t["labels"] for t in targets], categories=[coco.categories[c] for c in sorted(coco.index)])


def decode_dense(logits: torch.Tensor, boxes: torch.Tensor, max_dets: int = 20, min_score: float = 0.05,
                 iou: float = 0.5) -> List[Dict[str, torch.Tensor]]:
    """Dense head outputs ``logits [B, Q, C]`` (sigmoid scores), ``boxes [B, Q, 4]`` -> per image the
    (cell, class) pairs scoring above ``min_score``, class-wise non-maximum suppression at ``iou``,
    at most ``max_dets``."""
    from torchvision.ops import batched_nms, box_convert

    out = []
    scores = torch.as_tensor(logits).float().sigmoid()
    boxes = torch.as_tensor(boxes).float()
    B, Q, C = scores.shape
    for b in range(B):
        s = scores[b].reshape(-1)
        keep = (s > min_score).nonzero().flatten()
        cells, cls = keep // C, keep % C
        bx = boxes[b, cells]
        sel = batched_nms(box_convert(bx, "cxcywh", "xyxy"), s[keep], cls, iou)[:max_dets]
        out.append({"boxes": bx[sel], "scores": s[keep][sel], "labels": cls[sel]})
    return out


def decode_yolos(logits: torch.Tensor, boxes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """YOLOS outputs ``logits [B, d, C + 1]`` (last: no object), ``boxes [B, d, 4]`` -> per image one
    prediction per [DET] token: its best real class and that class's probability."""
    prob = torch.as_tensor(logits).float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    boxes = torch.as_tensor(boxes).float()
    return [{"boxes": boxes[b], "scores": scores[b], "labels": labels[b]} for b in range(boxes.shape[0])]


def mean_average_precision(preds: List[Dict[str, torch.Tensor]],
                           targets: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """COCO mAP of (cx, cy, w, h) boxes: ``{"map": mAP@[.5:.95], "map_50": ..., "map_75": ...}`` (torchmetrics)."""
    if len(preds) != len(targets):
        raise UsageError(f"{len(preds)} predictions for {len(targets)} images: give one per image")
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError:
        raise RuntimeMissingError("detection mAP needs torchmetrics and pycocotools: "
                                  "pip install torchmetrics pycocotools") from None
    metric = MeanAveragePrecision(box_format="cxcywh", iou_type="bbox")
    metric.update([{k: v.detach().float() if k != "labels" else v.long() for k, v in p.items()} for p in preds],
                  [{"boxes": t["boxes"].float(), "labels": t["labels"].long(),
                    **({"iscrowd": t["iscrowd"].long()} if "iscrowd" in t else {})} for t in targets])
    res = metric.compute()
    return {k: float(res[k]) for k in ("map", "map_50", "map_75")}


__all__ = ["DetectionSet", "digit_canvases", "write_coco", "read_coco", "CocoFolder", "CLASS_MAPS", "DetectorInput", "detector_input", "ANNOTATIONS", "decode_dense", "decode_yolos", "mean_average_precision", "SPLITS"]
