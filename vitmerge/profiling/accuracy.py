"""Top-1 / top-5 accuracy of several models on the same labelled images, in one pass over the data.

A *runner* maps a batch of preprocessed images [B, C, H, W] to logits [B, classes]; PyTorch
modules and ONNX Runtime sessions both become runners, so the unmerged model, the merged model,
their ONNX files and INT8 versions are all compared on exactly the same inputs. The first runner
is the reference: every other model's top-1 agreement with it is reported too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from ..calibration.data import BatchStats, ImageDataset, batches
from ..errors import DataError, ScheduleError

Runner = Callable[[torch.Tensor], torch.Tensor]


def torch_runner(model: nn.Module) -> Runner:
    model.eval()

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x).float()

    return run


def ort_runner(session_or_path: Any, input_name: Optional[str] = None) -> Runner:
    """Runner over an ONNX Runtime session (or the path of an .onnx file, opened on the CPU)."""
    if isinstance(session_or_path, (str, Path)):
        from ..exporter.verify import ort_session

        sess = ort_session(session_or_path)
    else:
        sess = session_or_path
    name = input_name or sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        out = sess.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    return run


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

    own = None
    if progress is True:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        own = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=False)
        prog = own
    else:
        prog = progress or None
    task = prog.add_task(description, total=len(dataset)) if prog is not None else None
    try:
        if own is not None:
            own.start()
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
            if prog is not None:
                prog.update(task, completed=stats.seen)
    finally:
        if own is not None:
            own.stop()
    images = acc[names[0]].n
    if images == 0:
        raise DataError(f"none of the {stats.seen} images of {dataset.describe()} could be read")
    return EvalResult(models=acc, dataset=dataset.describe(), images=images, unreadable=stats.unreadable,
                      notes=list(dataset.notes), seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Schedules at a FLOP budget
# --------------------------------------------------------------------------------------------


def _pre_encoder(method: str) -> bool:
    from .. import merging

    fn = merging.METHODS.get(method, (None,))[0]
    return bool(getattr(fn, "pre_encoder", False))


def budget_schedule(model: nn.Module, fraction: float, method: str = "tome", **options):
    """The r to give :func:`vitmerge.apply` so the FLOPs are at most ``fraction`` of the unmerged model.

    Uses the project's budget solver (``merging.schedule.solve_budget``, per-block r from an analytic
    FLOP model) where it covers the method; otherwise the smallest constant r (for methods that
    group once before the encoder, such as vwt: the one r) whose FLOPs, counted by running the
    model, meet the budget. ``options`` are the method's options (passed to ``apply`` in the search).
    """
    from ..merging import schedule as sched

    if method in sched.MATCH_FLOPS and not _pre_encoder(method):
        return list(sched.solve_budget(model, fraction, method=method))
    return constant_r_for_budget(model, fraction, method, **options)


def constant_r_for_budget(model: nn.Module, fraction: float, method: str = "tome", **options):
    """Fallback solver: binary search of one r, FLOPs counted by running the model (batch 1).

    Returns one r per block, or a single int for methods that merge once before the encoder.
    """
    import copy

    import vitmerge
    from ..models import num_tokens

    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ScheduleError(f"the FLOP budget must be a fraction in (0, 1], got {fraction!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise ScheduleError(f"the FLOP budget must be a fraction in (0, 1], got {fraction}")
    single = _pre_encoder(method)
    depth = len(model.blocks)
    probe = copy.deepcopy(model)
    if getattr(probe, "vitmerge", None) is not None:
        vitmerge.remove(probe)
    base = None

    def spec(r: int):
        return r if single else [r] * depth

    def frac(r: int) -> float:
        nonlocal base
        from .flops import count_flops

        if base is None:
            base = count_flops(probe)
        vitmerge.apply(probe, method=method, r=spec(r), **options)
        try:
            return count_flops(probe) / base
        finally:
            vitmerge.remove(probe)

    def accepted(r: int):
        try:
            return frac(r)
        except ScheduleError:
            return None

    hi = num_tokens(model) - int(model.num_prefix_tokens) - 1
    f_hi = accepted(hi)
    if f_hi is None:  # the largest r the method accepts (binary search; r=0 always is)
        ok, bad = 0, hi
        while bad - ok > 1:
            mid = (ok + bad) // 2
            if accepted(mid) is None:
                bad = mid
            else:
                ok = mid
        hi, f_hi = ok, accepted(ok)
    if f_hi > fraction:
        raise ScheduleError(f"{method}: a FLOP budget of {fraction} cannot be met with one r "
                            f"(r={hi} gives {f_hi:.3f}); ask for a larger fraction")
    lo = 0
    while lo < hi:  # smallest r that meets the budget
        mid = (lo + hi) // 2
        if frac(mid) <= fraction:
            hi = mid
        else:
            lo = mid + 1
    return spec(lo)


def achieved_fraction(model: nn.Module) -> float:
    """FLOPs of the merged model over the unmerged one, both counted by running them (batch 1)."""
    from .flops import flop_ratio

    base, merged, _ = flop_ratio(model)
    return merged / base


__all__ = ["Runner", "torch_runner", "ort_runner", "ModelAccuracy", "EvalResult", "evaluate", "check_classes",
           "budget_schedule", "constant_r_for_budget", "achieved_fraction"]
