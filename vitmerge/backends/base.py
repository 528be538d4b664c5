"""The one runner interface every runtime implements (Polygraphy's ``backend/*`` split, in small).

A :class:`Runner` is one model in one runtime. Two ways to use it, for the two kinds of callers:

* ``runner(images)``: host tensor in [B, C, H, W], the model's first output back on the host as a
  float32 torch tensor. Verification, accuracy, calibration checks and the self-test use this.
  ``runner.outputs(images)``: every named output (detectors: ``logits`` and ``boxes``) as a dict.
* ``runner.timed(batch)``: a zero-argument callable that runs one batch on inputs prepared once
  (already on the device, so input creation and host copies are never timed), plus
  ``runner.sync()`` to wait for the device. Latency and energy measurement use this.

Runtimes implement ``_infer`` and ``_prepare``; everything else (batch range checks, labels) is here.

What the model was built with (method, r per block, token counts, graph form, dtype) is one typed record,
:class:`ScheduleInfo`, made by one function, :func:`schedule_info`, from the ``vitmerge.*`` metadata
(an ONNX file's, the copy in an engine's metadata JSON, or a PyTorch model's merge record): every runner
returns it as ``runner.schedule``, and ``runner.info`` is its dict plus the runtime's own facts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UsageError
from ..request import ENGINE_SUFFIXES, TIMM_PREFIX  # noqa: F401  (re-exported; model references are read in request.py)

#: every runtime a Runner exists for
RUNTIMES = ("torch", "ort", "ort-cuda", "trt")
DEVICES = ("auto", "cpu", "cuda")  # where PyTorch runs a timm model


def _noop() -> None:
    return None


def _ints(v) -> Optional[Tuple[int, ...]]:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


@dataclass(frozen=True)
class ScheduleInfo:
    """What a runner's model was built with: the same record for PyTorch, ONNX Runtime and TensorRT.

    ``r_mean`` is 0.0 for a model built without merging (known to be unmerged) and None only when
    nothing is known (a file vitmerge did not write, an engine without its metadata JSON): profiling
    plots every model with a known ``r_mean`` against r, the unmerged baselines at r = 0.
    """

    method: Optional[str] = None
    r: Optional[Tuple[int, ...]] = None  # requested r per block; None: no merging (or unknown)
    r_mean: Optional[float] = None  # mean r over the blocks; 0.0 unmerged; None unknown
    tokens_in: Optional[Tuple[int, ...]] = None  # tokens entering each block
    tokens_out: Optional[Tuple[int, ...]] = None  # tokens leaving each block
    merge_op: Optional[str] = None  # graph form of the merge steps (ONNX files and their engines)
    dtype: Optional[str] = None  # what the model computes in: fp32 | fp16 | bf16

    @property
    def known(self) -> bool:
        return self.r_mean is not None

    @property
    def merged(self) -> bool:
        return bool(self.r) and any(v > 0 for v in self.r)

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready: tuples as lists (reports, ``runner.info``)."""
        return {"method": self.method, "r": None if self.r is None else list(self.r), "r_mean": self.r_mean,
                "tokens_in": None if self.tokens_in is None else list(self.tokens_in),
                "tokens_out": None if self.tokens_out is None else list(self.tokens_out),
                "merge_op": self.merge_op, "dtype": self.dtype}


#: keys every vitmerge export writes, merged or not (metadata.INPUT_SHAPE, metadata.DTYPE without the prefix)
_EXPORTED_KEYS = ("input_shape", "dtype")


def schedule_info(meta: Optional[Mapping[str, Any]] = None) -> ScheduleInfo:
    """The one place a :class:`ScheduleInfo` is made.

    ``meta``: ``vitmerge.*`` metadata with the prefix stripped and JSON decoded (:func:`vitmerge.metadata.parsed`):
    an ONNX file's, the ``schedule`` an engine's metadata JSON copied from its ONNX file, or the same keys
    for a PyTorch model (:func:`vitmerge.backends.torch.model_schedule`). A model with an ``r`` list is
    merged (r_mean its mean); one vitmerge wrote without ``r`` is unmerged (r_mean 0.0, and the same record
    in every runtime: no graph form without merge steps); anything else (None, a foreign file's empty
    metadata) is unknown (r_mean None)."""
    meta = dict(meta or {})
    r = _ints(meta.get("r")) if meta.get("r") not in (None, [], ()) else None
    if r:
        r_mean: Optional[float] = sum(r) / len(r)
    elif "method" in meta or any(k in meta for k in _EXPORTED_KEYS):
        r_mean = 0.0
    else:
        r_mean = None
    merges = bool(r) and any(v > 0 for v in r)
    return ScheduleInfo(method=meta.get("method") or None, r=r, r_mean=r_mean,
                        tokens_in=_ints(meta.get("tokens_in")), tokens_out=_ints(meta.get("tokens_out")),
                        # the form of merge steps: none without merging (an unmerged export records "native")
                        merge_op=meta.get("merge_op") if merges else None, dtype=meta.get("dtype"))


@dataclass(eq=False)
class Runner:
    """One model in one runtime, ready to run at any batch size it supports."""

    label: str
    spec: str  # what the user gave: a path or timm:NAME
    runtime: str  # one of RUNTIMES
    device: str  # "cpu" or "cuda"
    input_shape: Tuple[int, ...]  # per-image shape, e.g. (3, 224, 224)
    #: ``schedule.as_dict()`` plus what the runtime adds (an engine: precision, TensorRT version, GPU)
    info: Dict[str, Any] = field(default_factory=dict)
    batch_range: Tuple[int, int] = (1, 1 << 30)
    input_dtype: Any = np.float32  # numpy dtype the model takes
    output_names: Sequence[str] = ("logits",)  # every output, in order (the first is what ``runner(x)`` returns)
    schedule: ScheduleInfo = field(default_factory=ScheduleInfo)  # what the model was built with (unknown by default)

    def __post_init__(self) -> None:
        self.info = {**self.schedule.as_dict(), **self.info}

    # -------------------------------------------------------------- what a runtime implements

    def _infer(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """Run one batch given on the host; return the first output on the host."""
        raise NotImplementedError

    def _infer_all(self, images: np.ndarray) -> Sequence[np.ndarray]:
        """Run one batch given on the host; return every output, in :attr:`output_names` order.
        Runtimes of multi-output models (detectors: logits and boxes) override it."""
        return [self._infer(images)]

    def _prepare(self, batch: int) -> Callable[[], object]:  # pragma: no cover - interface
        """Inputs for ``batch`` images made once (on the device); return a zero-argument run."""
        raise NotImplementedError

    def interleave(self) -> Optional[str]:
        """Called before this model is timed in turn with others in one process: a runtime whose idle threads
        would disturb the others' timing settles them here. Returns a note of what changed (None: nothing)."""
        return None

    def sync(self) -> None:
        """Wait until the device has finished the work queued so far (no-op for synchronous runtimes)."""
        return None

    # -------------------------------------------------------------- shared

    def check_batch(self, batch: int) -> None:
        lo, hi = self.batch_range
        if batch < 1:  # not the model's limit: no model takes an empty or negative batch
            raise UsageError(f"batch sizes must be at least 1, got {batch}")
        if not lo <= batch <= hi:
            raise UsageError(
                f"{self.label}: batch {batch} is outside what this model accepts ({lo}..{hi}); "
                + ("rebuild the engine with a larger --max-batch" if self.runtime == "trt"
                   else "export it with a dynamic batch axis (vitmerge export does)")
            )

    def __call__(self, images) -> torch.Tensor:
        """images [B, C, H, W] (torch or numpy, on the host) -> first output as float32 torch tensor."""
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        self.check_batch(int(x.shape[0]))
        out = self._infer(np.ascontiguousarray(x, dtype=self.input_dtype))
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def outputs(self, images) -> Dict[str, torch.Tensor]:
        """images [B, C, H, W] on the host -> every named output (detectors: ``logits`` and ``boxes``) as
        float32 torch tensors."""
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        self.check_batch(int(x.shape[0]))
        outs = self._infer_all(np.ascontiguousarray(x, dtype=self.input_dtype))
        names = list(self.output_names)
        if len(names) != len(outs):
            raise UsageError(f"{self.label}: {len(outs)} outputs came back for the {len(names)} named ({names})")
        return {n: torch.from_numpy(np.asarray(o, dtype=np.float32)) for n, o in zip(names, outs)}

    def timed(self, batch: int) -> Callable[[], object]:
        """A zero-argument callable that runs one batch of ``batch`` images prepared once."""
        self.check_batch(batch)
        return self._prepare(batch)

    def example(self, batch: int, seed: int = 0) -> np.ndarray:
        """The random input batch every runtime's ``timed`` uses (the same numbers everywhere)."""
        x = np.random.default_rng(seed).standard_normal((batch, *self.input_shape))
        return x.astype(self.input_dtype)


__all__ = ["Runner", "ScheduleInfo", "schedule_info", "RUNTIMES", "DEVICES", "TIMM_PREFIX", "ENGINE_SUFFIXES"]
