"""Unmerged vs merged on the same data: the library's one "build both, run both, report" workflow.

:func:`compare` takes a :class:`~vitmerge.models.build.ModelSource` (which model, which weights), a
:class:`~vitmerge.request.MergeRequest` and a data folder; it builds the unmerged model and (when the request
merges) the merged one, opens the data the way the model's task needs (classification folders, or a COCO folder
for detectors), scores both on the same images in PyTorch or ONNX Runtime, and returns a :class:`Comparison`
whose ``to_dict()`` is the report payload. ``vitmerge eval`` only parses options and prints it.

:func:`score` is eval's metric for any model, the one function that scores: top-1 / top-5 for a classifier,
mAP for a detector (its :class:`~vitmerge.data.detection.DetectorInput` from :func:`open_eval_data`). Each model's
``score`` and ``fidelity`` (top-1 and top-1 agreement; mAP and mAP@0.5 against the reference's detections) are
what ``vitmerge tune`` ranks its candidates by: it opens its held-out data with :func:`open_eval_data` and scores
every candidate with :func:`score` against the unmerged model's recorded outputs (exported once, not once per
candidate).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

from ..errors import DataError, UsageError
from ..models.build import ModelSource, merge
from ..request import MergeRequest


@dataclass
class Comparison:
    """What :func:`compare` measured: ``result`` (an accuracy or detection result whose first model is
    ``unmerged``), ``flops`` per model, the merged model's schedule in ``info`` (None when nothing merged)."""

    source: ModelSource
    request: Optional[MergeRequest]
    detector: bool
    dataset: Any
    result: Any
    flops: Dict[str, Dict[str, float]]
    runtime: str
    data: Path
    info: Any = None
    r_used: Any = None  # the per-block r the request resolved to for this model
    classes: Optional[int] = None  # classifiers: the model's number of classes

    @property
    def merged(self) -> bool:
        return self.info is not None

    def change(self) -> Optional[Dict[str, float]]:
        """Merged minus unmerged, in points: top-1 (classifiers) or mAP and mAP@0.5 (detectors)."""
        if "merged" not in self.result.models:
            return None
        a, b = self.result.models["unmerged"], self.result.models["merged"]
        if self.detector:
            return {"map": (b.map - a.map) * 100, "map_50": (b.map_50 - a.map_50) * 100}
        return {"top1": (b.top1 - a.top1) * 100, "correct": b.correct1 - a.correct1, "of": a.n}

    def to_dict(self) -> Dict[str, Any]:
        src = self.source
        return {
            "model": src.ref.spec if src.ref.kind != "timm" else src.ref.name,
            "task": "detection" if self.detector else "classification",
            "weights": str(src.checkpoint) if src.checkpoint else "the folder's own" if src.ref.kind == "folder"
            else "random (no --checkpoint)",
            "model_kwargs": src.kwargs,
            "data": str(self.data),
            "runtime": self.runtime,
            "method": self.request.method if self.info else None,
            "options": {k: str(v) for k, v in self.request.options.items()} if self.info else None,
            "r": self.r_used,
            "tokens_out": self.info.tokens_out if self.info else None,
            "budget": self.request.budget if self.request else None,
            "flops": self.flops,
            "eval": self.result.to_dict(),
        }


def open_eval_data(model, data: Union[str, Path], *, limit: Optional[int] = None, split: Optional[str] = None,
                   labels: Optional[Path] = None, class_order: str = "sorted", class_map: str = "auto",
                   normalize: bool = True, what: str = "the model"):
    """(dataset, detector input spec or None): the labelled data ``model`` is scored on, opened the way its task
    needs (a classification folder with the model's own preprocessing; detectors: a COCO folder)."""
    from ..data import open_dataset, transform_for
    from ..data.detection import CocoFolder, detector_input
    from ..models.family import family
    from ..models.shapes import num_classes
    from .accuracy import check_classes, class_mismatch

    detector = family(model).output_names(model) != ("logits",)
    if detector:
        if split is not None or class_order != "sorted":
            raise UsageError("--split and --class-order apply to classification folders; a detector reads "
                             "a COCO-format folder (--data, and --labels for its annotations JSON)")
        spec = detector_input(model, normalize=normalize)
        ds = CocoFolder(data, annotations=labels, size=spec.size, mean=spec.mean, std=spec.std, class_map=class_map,
                        num_classes=spec.num_classes, class_names=spec.class_names, limit=limit)
        return ds, spec
    if class_map != "auto" or not normalize:
        raise UsageError("--class-map and --no-normalize apply to detectors; a classifier is "
                         "preprocessed by its own data config")
    ds = open_dataset(data, split=split, labels=labels, transform=transform_for(model), limit=limit,
                      class_order=class_order)
    check_classes(ds, num_classes(model), what)
    off = class_mismatch(ds, num_classes(model), what)
    if off:
        warnings.warn(off, stacklevel=2)
    return ds, None


def score(runners: Mapping[str, Any], dataset, spec=None, *, batch_size: int = 64, workers: int = 0,
          progress: Union[bool, Any] = True, description: str = "scoring"):
    """Every runner scored on the same images of ``dataset``, the first as the reference: top-1 / top-5 and
    agreement (``spec`` None: classifiers, :func:`~.accuracy.evaluate`), or mAP and fidelity (``spec``: the
    detector input :func:`open_eval_data` gave, :func:`~.detection.evaluate_detection`). Each model's result has
    ``score``, ``fidelity`` and ``METRIC`` whichever it is."""
    if spec is None:
        from .accuracy import evaluate

        return evaluate(runners, dataset, batch_size=batch_size, progress=progress, workers=workers,
                        description=description)
    from .detection import evaluate_detection

    return evaluate_detection(runners, dataset, spec, batch_size=batch_size, workers=workers, progress=progress,
                              description=description)


def score_models(models: Mapping[str, Any], dataset, spec=None, *, runtime: str = "torch", batch_size: int = 64,
                 workers: int = 0, progress: Union[bool, Any] = True, on_export: Any = None):
    """(result, flops): PyTorch ``models`` scored by :func:`score` in ``runtime`` ("torch", or "ort": each exported
    to ONNX, verified and run in ONNX Runtime), and each model's FLOPs per image with its fraction of the first's."""
    from .._io import scratch
    from .accuracy import make_runners

    with scratch("vitmerge-eval-") as tmp:
        runners, fl = make_runners(models, runtime, Path(tmp), on_export)
        result = score(runners, dataset, spec, batch_size=batch_size, workers=workers, progress=progress,
                       description=f"{'detecting' if spec is not None else 'scoring'} ({runtime})")
    return result, fl


def compare(source: ModelSource, request: Optional[MergeRequest], data: Optional[Union[str, Path]] = None, *,
            runtime: str = "torch", batch_size: int = 64, workers: int = 0, limit: Optional[int] = None,
            split: Optional[str] = None, labels: Optional[Path] = None, class_order: str = "sorted",
            class_map: str = "auto", normalize: bool = True, progress: Union[bool, Any] = True,
            on_data: Optional[Callable[[Any], None]] = None,
            on_export: Optional[Callable[[str], None]] = None) -> Comparison:
    """Score the unmerged model of ``source`` and, given a ``request``, the merged one on the same images of
    ``data`` (default: the folder its model.json names) in ``runtime`` (torch, or ort: both exported, verified and
    scored in ONNX Runtime). ``on_data(dataset)`` is called once the data is open (before the scoring)."""
    if batch_size < 1:
        raise UsageError(f"--batch must be at least 1, got {batch_size}")
    data = data or source.data_dir
    if data is None:
        raise DataError("give the labelled images with --data DIR")
    model = source.build()
    ds, spec = open_eval_data(model, data, limit=limit, split=split, labels=labels, class_order=class_order,
                              class_map=class_map, normalize=normalize, what=f"{source.ref.label} ({source.weights})")
    if on_data is not None:
        on_data(ds)
    models = {"unmerged": model}
    info = r_used = None
    if request is not None:  # r = 0 too: the patched model, which must score exactly as the unmerged one
        merged = merge(copy.deepcopy(model), request)
        info = getattr(merged, "vitmerge", None)
        r_used = None if info is None else list(info.r) if info.pre_r == 0 else info.pre_r
        models["merged"] = merged
    result, flops = score_models(models, ds, spec, runtime=runtime, batch_size=batch_size, workers=workers,
                                 progress=progress, on_export=on_export)
    from ..models.shapes import num_classes

    return Comparison(source=source, request=request, detector=spec is not None, dataset=ds, result=result,
                      flops=flops, runtime=runtime, data=Path(data), info=info, r_used=r_used,
                      classes=None if spec is not None else num_classes(model))


__all__ = ["Comparison", "compare", "open_eval_data", "score", "score_models"]
