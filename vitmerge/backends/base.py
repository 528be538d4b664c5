"""The one runner interface every runtime implements (Polygraphy's ``backend/*`` split, in small).

A :class:`Runner` is one model in one runtime. Two ways to use it, for the two kinds of callers:

* ``runner(images)``: host tensor in [B, C, H, W], the model's first output back on the host as a
  float32 torch tensor. Verification, accuracy, calibration checks and the self-test use this.
  ``runner.outputs(images)``: every named output (detectors: ``logits`` and ``boxes``) as a dict.
* ``runner.timed(batch)``: a zero-argument callable that runs one batch on inputs prepared once
  (already on the device, so input creation and host copies are never timed), plus
  ``runner.sync()`` to wait for the device. Latency and energy measurement use this.

Runtimes implement ``_infer`` and ``_prepare``; everything else (batch range checks, labels) is here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UsageError

#: every runtime a Runner exists for
RUNTIMES = ("torch", "ort", "ort-cuda", "trt")
DEVICES = ("auto", "cpu", "cuda")  # where PyTorch runs a timm model
TIMM_PREFIX = "timm:"  # a model spec naming a timm model (run in PyTorch)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # serialized TensorRT engines


def _noop() -> None:
    return None


@dataclass(eq=False)
class Runner:
    """One model in one runtime, ready to run at any batch size it supports."""

    label: str
    spec: str  # what the user gave: a path or timm:NAME
    runtime: str  # one of RUNTIMES
    device: str  # "cpu" or "cuda"
    input_shape: Tuple[int, ...]  # per-image shape, e.g. (3, 224, 224)
    info: Dict[str, Any] = field(default_factory=dict)  # method, r, tokens, precision, ... where known
    batch_range: Tuple[int, int] = (1, 1 << 30)
    input_dtype: Any = np.float32  # numpy dtype the model takes
    output_names: Sequence[str] = ("logits",)  # every output, in order (the first is what ``runner(x)`` returns)

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


__all__ = ["Runner", "RUNTIMES", "DEVICES", "TIMM_PREFIX", "ENGINE_SUFFIXES"]
