"""PyTorch eager: a module (plain or merged with ``vitmerge.apply``) behind the runner interface."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..errors import RuntimeMissingError, UsageError
from ..models import input_shape
from ..models.family import family, forward_logits, forward_outputs
from ..models.precision import dtype_name, model_dtype
from .base import DEVICES, Runner, ScheduleInfo, schedule_info


def resolve_device(device: str = "auto") -> str:
    if device not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeMissingError("--device cuda: PyTorch sees no CUDA GPU here (CPU-only build or no driver); "
                                  "use --device cpu")
    return device


def model_schedule(model: nn.Module) -> ScheduleInfo:
    """The :class:`ScheduleInfo` of a PyTorch model: its merge record (``model.vitmerge``) in the keys an export
    writes, through the same :func:`schedule_info` as an ONNX file's or an engine's metadata."""
    mi = getattr(model, "vitmerge", None)
    meta: Dict[str, Any] = {"dtype": dtype_name(model_dtype(model))}
    if mi is not None:
        meta.update(method=mi.method, r=list(mi.r), tokens_in=mi.tokens_in, tokens_out=mi.tokens_out)
    return schedule_info(meta)


class TorchRunner(Runner):
    """``model`` in PyTorch eager on ``device`` (inference mode); CUDA work is synchronised by ``sync``."""

    def __init__(self, model: nn.Module, label: str = "torch", spec: Optional[str] = None, device: str = "auto",
                 info: Optional[Dict[str, Any]] = None):
        device = resolve_device(device)
        super().__init__(label=label, spec=spec or label, runtime="torch", device=device,
                         input_shape=tuple(input_shape(model)), info=dict(info or {}),
                         schedule=model_schedule(model))
        self.model = model.eval().to(device)
        self.output_names = tuple(family(model).output_names(model))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return forward_logits(self.model, x)

    def _infer(self, images: np.ndarray) -> np.ndarray:
        return self._run(torch.from_numpy(images).to(self.device)).float().cpu().numpy()

    def __call__(self, images) -> torch.Tensor:  # no numpy round trip for torch inputs
        if isinstance(images, torch.Tensor):
            self.check_batch(int(images.shape[0]))
            return self._run(images.to(self.device, torch.float32)).float().cpu()
        return super().__call__(images)

    def outputs(self, images) -> Dict[str, torch.Tensor]:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
        self.check_batch(int(x.shape[0]))
        with torch.inference_mode():
            out = forward_outputs(self.model, x.to(self.device, torch.float32))
        return {k: v.float().cpu() for k, v in out.items()}

    def _prepare(self, batch: int) -> Callable[[], object]:
        x = torch.from_numpy(self.example(batch)).to(self.device)
        return lambda: self._run(x)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


__all__ = ["TorchRunner", "model_schedule", "resolve_device", "DEVICES"]
