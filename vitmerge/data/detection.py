"""An offline detection set made in code, and detection metrics through a maintained library.

``digit_canvases(n, ...)``: scikit-learn's 8 x 8 handwritten digits (1,797 glyphs, bundled with
scikit-learn: nothing is downloaded) pasted, scaled by nearest-neighbour and without overlap, on a
noisy square canvas. Each image has 1 to ``max_digits`` digits; its boxes are the tight boxes of the
glyphs' ink, as ``(cx, cy, w, h)`` normalised to [0, 1] (the detectors' box format), labels 0-9. The
``train`` split pastes glyphs 0-1347 and ``test`` glyphs 1348-1796, so no glyph is in both.

``mean_average_precision(preds, targets)``: COCO mAP@[.5:.95], mAP@0.5 and mAP@0.75 from torchmetrics'
``MeanAveragePrecision`` (pycocotools backend); not a hand-written metric. torchmetrics and pycocotools are
imported only here, at the call.

``decode_dense`` / ``decode_yolos``: the two detectors' outputs (``logits``, ``boxes``) as the per-image
prediction lists the metric takes. The dense head's logits are per-class sigmoid scores (one score per
cell and class, CenterNet / FCOS-like), YOLOS's are a softmax over the classes plus "no object" (last).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..errors import RuntimeMissingError, UsageError

#: glyph indices of each split in scikit-learn's digits (1,797 glyphs)
SPLITS = {"train": (0, 1348), "test": (1348, 1797)}


@dataclass
class DetectionSet:
    images: torch.Tensor  # [N, 3, S, S] float32 in [0, 1]
    boxes: List[torch.Tensor]  # per image [k, 4] float32: (cx, cy, w, h) in [0, 1]
    labels: List[torch.Tensor]  # per image [k] int64, 0-9

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


__all__ = ["DetectionSet", "digit_canvases", "decode_dense", "decode_yolos", "mean_average_precision", "SPLITS"]
