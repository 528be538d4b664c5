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
a detection evaluation reads; ``read_coco`` takes any such folder (images resized to one square size,
boxes normalised, category ids mapped to 0..K-1 in id order).

``decode_dense`` / ``decode_yolos``: the two detectors' outputs (``logits``, ``boxes``) as the per-image
prediction lists the metric takes. The dense head's logits are per-class sigmoid scores (one score per
cell and class, CenterNet / FCOS-like), YOLOS's are a softmax over the classes plus "no object" (last).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

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


def read_coco(folder: Union[str, Path], size: Optional[int] = None) -> DetectionSet:
    """A COCO-format folder (``annotations.json`` and the images it names, paths relative to the folder) as a
    :class:`DetectionSet`: images resized to ``size`` x ``size`` (default: the first image's height, which
    every image must then share), boxes normalised, labels = category index in id order."""
    from PIL import Image

    root = Path(folder).expanduser()
    ann_path = root / ANNOTATIONS
    if not ann_path.is_file():
        raise DataError(f"{str(root)!r} has no {ANNOTATIONS}: a COCO-format folder holds {ANNOTATIONS} (images, "
                        "annotations with bbox [x, y, w, h] in pixels, categories) and the images it names")
    try:
        coco = json.loads(ann_path.read_text())
        images, anns, cats = coco["images"], coco["annotations"], coco["categories"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{str(ann_path)!r} is not COCO annotations ({type(e).__name__}: {e}); it needs the keys "
                        "images, annotations and categories") from None
    if not images or not cats:
        raise DataError(f"{str(ann_path)!r} lists no images or no categories")
    cat_ids = sorted(int(c["id"]) for c in cats)
    index = {cid: k for k, cid in enumerate(cat_ids)}
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    per_image: Dict[int, list] = {int(im["id"]): [] for im in images}
    for a in anns:
        if int(a["category_id"]) not in index or int(a["image_id"]) not in per_image:
            raise DataError(f"annotation {a.get('id')} in {str(ann_path)!r} names an unknown image or category")
        per_image[int(a["image_id"])].append(a)
    tensors, boxes, labels = [], [], []
    for im in images:
        p = root / im["file_name"]
        if not p.is_file():
            raise DataError(f"{str(ann_path)!r} names {im['file_name']!r}, which is not in {str(root)!r}")
        pil = Image.open(p).convert("RGB")
        w, h = pil.size
        side = size or (tensors[0].shape[1] if tensors else h)
        if size is None and (w, h) != (side, side):
            raise DataError(f"{im['file_name']!r} is {w} x {h}; the images differ in size or are not square: "
                            "give size=N to resize them all to N x N")
        if (w, h) != (side, side):
            pil = pil.resize((side, side), Image.BILINEAR)
        tensors.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
        bx = [[(a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h, a["bbox"][2] / w,
               a["bbox"][3] / h] for a in per_image[int(im["id"])]]
        boxes.append(torch.tensor(bx, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([index[int(a["category_id"])] for a in per_image[int(im["id"])]], dtype=torch.int64))
    return DetectionSet(images=torch.stack(tensors), boxes=boxes, labels=labels,
                        categories=[names[c] for c in cat_ids])


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
                  [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets])
    res = metric.compute()
    return {k: float(res[k]) for k in ("map", "map_50", "map_75")}


__all__ = ["DetectionSet", "digit_canvases", "write_coco", "read_coco", "ANNOTATIONS", "decode_dense", "decode_yolos", "mean_average_precision", "SPLITS"]
