"""Top-1 / top-5 accuracy of several models on the same labelled images, in one pass over the data.

Each model is a :class:`vitmerge.backends.Runner` (or any callable mapping a batch of preprocessed
images [B, C, H, W] to logits [B, classes]): PyTorch modules, ONNX files in ONNX Runtime and TensorRT
engines alike, so the unmerged model, the merged model, their ONNX files and INT8 versions are all
compared on exactly the same inputs. The first runner is the reference: every other model's top-1
agreement with it is reported too.
"""
from __future__ import annotations


import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from ..backends import OrtRunner, TorchRunner
from ..data.datasets import BatchStats, ImageDataset, batches
from ..errors import DataError, UsageError
from ..exporter import export
from ..models.flops import count_flops

Runner = Callable[[torch.Tensor], torch.Tensor]  # images -> logits; every backends.Runner is one


@dataclass
class ModelAccuracy:
    name: str
    n: int = 0
    correct1: int = 0
    correct5: int = 0
    agree: int = 0  # same top-1 class as the reference (first) model
    k: int = 5  # top-k actually used (min(5, classes))

    @property
    def top1(self) -> float:
        return self.correct1 / self.n if self.n else float("nan")

    @property
    def top5(self) -> float:
        return self.correct5 / self.n if self.n else float("nan")

    @property
    def agreement(self) -> float:
        return self.agree / self.n if self.n else float("nan")

    #: the name of :attr:`score`, eval's headline metric for a classifier
    METRIC: ClassVar[str] = "top-1"

    @property
    def score(self) -> float:
        """The headline metric (a fraction): top-1."""
        return self.top1

    @property
    def fidelity(self) -> float:
        """How alike the reference it behaves (a fraction): top-1 agreement."""
        return self.agreement

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "images": self.n, "top1": self.top1, f"top{self.k}": self.top5,
                "top1_agreement_with_reference": self.agreement}


@dataclass
class EvalResult:
    models: Dict[str, ModelAccuracy]
    dataset: str
    images: int  # images scored (unreadable ones excluded)
    unreadable: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def reference(self) -> str:
        return next(iter(self.models))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "dataset": self.dataset,
            "images": self.images,
            "unreadable_count": len(self.unreadable),
            "unreadable": self.unreadable[:100],
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
            "reference": self.reference,
            "models": {k: v.to_dict() for k, v in self.models.items()},
        }


def _topk_hits(logits: torch.Tensor, y: torch.Tensor, k: int) -> tuple[int, int, torch.Tensor]:
    top = logits.topk(k, dim=-1).indices  # [B, k]
    hit1 = int((top[:, 0] == y).sum())
    hitk = int((top == y[:, None]).any(-1).sum())
    return hit1, hitk, top[:, 0]


def check_classes(dataset: ImageDataset, num_classes: int, what: str = "the model") -> None:
    """Labels the head cannot produce make accuracy meaningless: refuse with the reason."""
    labels = dataset.labels
    top = max(labels) if labels else -1
    if top >= num_classes:
        raise DataError(
            f"the data has labels up to {top} ({dataset.num_classes} classes, {dataset.layout}) but {what} has "
            f"{num_classes} outputs: is it the checkpoint fine-tuned on this dataset (give it with --checkpoint)?"
        )


def class_mismatch(dataset: ImageDataset, num_classes: int, what: str = "the model") -> Optional[str]:
    """Why accuracy may be meaningless though every label fits the head: the model has more outputs than the
    data has classes, in a layout that maps classes to outputs by index only (an image folder, CIFAR, Pets). The
    ImageNet layouts map by WordNet id, so a 1000-class model on a subset of ImageNet classes is right. None when
    nothing is off."""
    if dataset.num_classes == num_classes or str(dataset.layout).startswith("imagenet"):
        return None
    return (f"{what} has {num_classes} outputs but the data has {dataset.num_classes} classes ({dataset.layout}): "
            f"top-1 compares data class i with model output i, which means something only for a model trained on "
            f"exactly these classes in this order (give that checkpoint with --checkpoint; --num-classes "
            f"{dataset.num_classes} gives a new, random head)")


@contextmanager
def progress_task(progress: Union[bool, Any], description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress task of ``total`` items; yields ``update(completed)``. ``progress``: True for a rich bar on
    stderr (started and stopped here), False for none, or an existing ``rich.progress.Progress`` to add to."""
    own = None
    if progress is True:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        own = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=False)
        prog = own
    else:
        prog = progress or None
    task = prog.add_task(description, total=total) if prog is not None else None
    if own is not None:
        own.start()
    try:
        yield (lambda done: prog.update(task, completed=done)) if prog is not None else (lambda done: None)
    finally:
        if own is not None:
            own.stop()


def evaluate(
    runners: Mapping[str, Runner],
    dataset: ImageDataset,
    batch_size: int = 64,
    progress: Union[bool, Any] = True,
    description: str = "evaluating",
    workers: int = 0,
) -> EvalResult:
    """Score every runner on every readable image of ``dataset`` (which must carry a transform).

    progress: True for a rich progress bar on stderr, False for none, or an existing
    ``rich.progress.Progress`` to add a task to.
    """
    if not runners:
        raise ValueError("evaluate needs at least one runner")
    stats = BatchStats()
    names = list(runners)
    acc = {n: ModelAccuracy(n) for n in names}
    t0 = time.perf_counter()

    with progress_task(progress, description, len(dataset)) as update:
        for x, y in batches(dataset, batch_size, workers, stats):
            ref_top1 = None
            for n in names:
                logits = runners[n](x)
                if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                    raise DataError(f"model {n!r} returned shape {tuple(logits.shape)} for a batch of "
                                    f"{x.shape[0]} images; expected [batch, classes]")
                if int(y.max()) >= logits.shape[1]:
                    raise DataError(f"label {int(y.max())} is outside model {n!r}'s {logits.shape[1]} classes: "
                                    "is the checkpoint the one fine-tuned on this dataset?")
                k = min(5, logits.shape[1])
                h1, hk, top1 = _topk_hits(logits, y, k)
                a = acc[n]
                a.k = k
                a.n += len(y)
                a.correct1 += h1
                a.correct5 += hk
                if ref_top1 is None:
                    ref_top1 = top1
                a.agree += int((top1 == ref_top1).sum())
            update(stats.seen)
    images = acc[names[0]].n
    if images == 0:
        raise DataError(f"none of the {stats.seen} images of {dataset.describe()} could be read")
    return EvalResult(models=acc, dataset=dataset.describe(), images=images, unreadable=stats.unreadable,
                      notes=list(dataset.notes), seconds=time.perf_counter() - t0)


def make_runners(models: Mapping[str, "torch.nn.Module"], runtime: str, tmp: Path,
                 on_export: Any = None) -> Tuple[Dict[str, Any], Dict[str, Dict[str, float]]]:
    """Runners of PyTorch ``models`` in ``runtime`` ("torch"; "ort": each exported to ONNX in ``tmp``, verified)
    and each model's FLOPs per image with its fraction of the first model's."""
    if runtime not in ("torch", "ort"):
        raise UsageError(f"unknown runtime {runtime!r} for accuracy; use torch or ort "
                         "(TensorRT engines: score them with a TrtRunner, or profile them with `vitmerge profile`)")
    flops = {k: float(count_flops(m)) for k, m in models.items()}
    first = next(iter(flops.values()))
    fl = {k: {"flops": f, "fraction": f / first} for k, f in flops.items()}
    if runtime == "ort":
        runners = {}
        for key, m in models.items():
            res = export(m, tmp / f"{key.replace(' ', '_')}.onnx",
                         on_step=(lambda s, k=key: on_export(f"{k}: {s}")) if on_export else None)
            runners[key] = OrtRunner(res.path, label=key)
    else:
        runners = {k: TorchRunner(m, label=k, device="cpu") for k, m in models.items()}
    return runners, fl


__all__ = ["Runner", "ModelAccuracy", "EvalResult", "evaluate", "progress_task", "make_runners", "check_classes",
           "class_mismatch"]
