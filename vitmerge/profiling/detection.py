"""Detection mAP of several detectors on the same COCO-format images, in one pass over the data.

The detection counterpart of :mod:`.accuracy`: each model is a :class:`vitmerge.backends.Runner` whose
``outputs(images)`` gives ``logits`` and ``boxes``; a :class:`~vitmerge.data.detection.DetectorInput`
decodes them into per-image detections, and torchmetrics' ``MeanAveragePrecision`` (pycocotools backend,
through :func:`~vitmerge.data.detection.mean_average_precision`) scores them against the ground truth:
mAP@[.5:.95], mAP@0.5, mAP@0.75. The first model is the reference: every model is also scored against
the reference's own detections as if they were the ground truth, mAP@0.5 "fidelity", which says how much
merging changed *what the detector finds*: on each image the model's k most confident detections against
the reference's k most confident, k = the number of ground-truth boxes of that image (no score threshold,
which would mean different things for sigmoid and softmax scores). The reference scores 1 by definition.
"""
from __future__ import annotations


import time
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Union

import torch

from ..data.detection import CocoFolder, DetectorInput, mean_average_precision
from ..errors import DataError
from .accuracy import EvalResult, progress_task

@dataclass
class DetectorScore:
    name: str
    map: float  # mAP@[.5:.95]
    map_50: float
    map_75: float
    fidelity_50: float  # mAP@0.5 of its top-k detections per image against the reference's (k = ground-truth boxes)
    detections: float  # mean detections per image after decoding

    #: the name of :attr:`score`, eval's headline metric for a detector
    METRIC: ClassVar[str] = "mAP"

    @property
    def score(self) -> float:
        """The headline metric (a fraction): mAP@[.5:.95]."""
        return self.map

    @property
    def fidelity(self) -> float:
        """How alike the reference it behaves (a fraction): mAP@0.5 against the reference's detections."""
        return self.fidelity_50

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "map": self.map, "map_50": self.map_50, "map_75": self.map_75,
                "fidelity_map_50": self.fidelity_50, "detections_per_image": self.detections}


@dataclass
class DetectionResult(EvalResult):
    """:class:`~.accuracy.EvalResult` of detectors: the same fields and report, a score per model."""

    models: Dict[str, DetectorScore]


def _top_k(preds: List[Dict[str, torch.Tensor]], ks: List[int]) -> List[Dict[str, torch.Tensor]]:
    """Each image's ``k`` most confident detections."""
    out = []
    for p, k in zip(preds, ks):
        top = p["scores"].argsort(descending=True)[:k]
        out.append({key: v[top] for key, v in p.items()})
    return out


def evaluate_detection(runners: Mapping[str, Any], data: CocoFolder, spec: DetectorInput, batch_size: int = 16,
                       workers: int = 0, progress: Union[bool, Any] = True,
                       description: str = "detecting") -> DetectionResult:
    """mAP of every runner on every readable image of ``data`` (sized and normalised for ``spec``)."""
    if not runners:
        raise ValueError("evaluate_detection needs at least one runner")
    if batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    names = list(runners)
    preds: Dict[str, List[Dict[str, torch.Tensor]]] = {n: [] for n in names}
    targets: List[Dict[str, torch.Tensor]] = []
    unreadable: List[str] = []
    t0 = time.perf_counter()
    with progress_task(progress, description, len(data)) as update:
        for x, tgt, _ in data.batches(batch_size, workers, unreadable):
            targets += tgt
            for n in names:
                out = runners[n].outputs(x)
                missing = {"logits", "boxes"} - set(out)
                if missing:
                    raise DataError(f"model {n!r} has no output {', '.join(sorted(missing))} (outputs: "
                                    f"{', '.join(out)}): is it a detector exported by vitmerge?")
                if out["boxes"].shape[:2] != out["logits"].shape[:2] or out["boxes"].shape[0] != x.shape[0]:
                    raise DataError(f"model {n!r} returned logits {tuple(out['logits'].shape)} and boxes "
                                    f"{tuple(out['boxes'].shape)} for {x.shape[0]} images; expected [batch, queries, "
                                    "classes] and [batch, queries, 4]")
                preds[n] += spec.decode(out["logits"], out["boxes"])
            update(len(targets) + len(unreadable))
    if not targets:
        raise DataError(f"none of the {len(unreadable)} images of {data.describe()} could be read")
    ks = [len(t["boxes"]) for t in targets]
    ref = [{"boxes": p["boxes"], "labels": p["labels"]} for p in _top_k(preds[names[0]], ks)]
    scores = {}
    for n in names:
        m = mean_average_precision(preds[n], targets)
        fid = mean_average_precision(_top_k(preds[n], ks), ref)["map_50"]
        scores[n] = DetectorScore(n, m["map"], m["map_50"], m["map_75"], fid,
                                  sum(len(p["boxes"]) for p in preds[n]) / len(targets))
    notes = list(data.notes) + [f"preprocessing: resized to {spec.size[0]} x {spec.size[1]} (H x W), normalised with "
                                f"{spec.source}"]
    return DetectionResult(models=scores, dataset=data.describe(), images=len(targets), unreadable=unreadable,
                           notes=notes, seconds=time.perf_counter() - t0)


__all__ = ["DetectorScore", "DetectionResult", "evaluate_detection"]
