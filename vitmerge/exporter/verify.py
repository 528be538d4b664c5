"""Check an exported file: ONNX checker, then ONNX Runtime vs PyTorch on the same random batches;
and compare two files (two graph forms of one model) in ONNX Runtime.

The check is max |diff| of the outputs against a tolerance of ``atol + rtol * max |reference|``,
and top-1 agreement is reported next to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import onnx
import torch
from torch import nn

from ..backends.ort import OrtRunner
from ..errors import SurgeryError, VerificationError
from ..models import input_shape
from ..models.family import forward_logits

PathLike = Union[str, Path]


@dataclass
class BatchCheck:
    batch: int
    max_abs_diff: float
    max_abs_ref: float
    top1_agreement: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance


@dataclass
class VerifyReport:
    path: str
    checks: List[BatchCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.checks)

    @property
    def top1_agreement(self) -> float:
        return min(c.top1_agreement for c in self.checks)


def check_onnx(path: PathLike) -> None:
    """The ONNX checker with full shape inference; :class:`VerificationError` when it rejects the file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise VerificationError(f"ONNX checker rejected {path}: {e}") from None


@torch.no_grad()
def batch_check(batch: int, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float) -> BatchCheck:
    """Compare one batch of outputs with the reference: max |diff|, top-1 agreement, tolerance."""
    if out.shape != ref.shape:
        raise VerificationError(f"output shape {out.shape} != reference {ref.shape} at batch {batch}")
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(out - ref).max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return BatchCheck(int(batch), diff, scale, agree, atol + rtol * scale)


@torch.no_grad()
def verify(
    model: nn.Module,
    path: PathLike,
    batch_sizes: Sequence[int] = (1, 4),
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    runner: Optional[OrtRunner] = None,
) -> VerifyReport:
    """Run the same random images through PyTorch and ONNX Runtime; max |diff| and top-1 agreement.

    Tolerance per batch: atol + rtol * max|reference output|.
    """
    model = model.eval()
    run = runner or OrtRunner(path)
    gen = torch.Generator().manual_seed(seed)
    shape = input_shape(model)
    report = VerifyReport(path=str(path))
    for b in batch_sizes:
        x = torch.randn(b, *shape, generator=gen)
        report.checks.append(batch_check(b, forward_logits(model, x).float().numpy(), run(x).numpy(), atol, rtol))
    return report


def compare_files(a: PathLike, b: PathLike, batch_sizes: Sequence[int] = (1, 4), atol: float = 1e-4,
                  rtol: float = 1e-3, seed: int = 0, threads: int = 0) -> List[BatchCheck]:
    """Run ``a`` and ``b`` in ONNX Runtime (CPU) on the same random images; ``a`` is the reference.

    Returns one :class:`BatchCheck` per batch size (max |diff|, top-1 agreement, tolerance
    atol + rtol * max |a|). Graphs with TokenMerge nodes get the custom-op kernel registered.
    """
    for p in (a, b):
        if not Path(p).is_file():
            raise SurgeryError(f"no ONNX file at {str(p)!r}")
    ra, rb = OrtRunner(a, threads=threads), OrtRunner(b, threads=threads)
    if ra.input_shape != rb.input_shape:
        raise SurgeryError(f"the two graphs take different inputs: {a} {ra.input_shape}, {b} {rb.input_shape}")
    rng = np.random.default_rng(seed)
    checks = []
    for n in batch_sizes:
        x = rng.standard_normal((int(n), *ra.input_shape), dtype=np.float32)
        checks.append(batch_check(n, ra(x).numpy(), rb(x).numpy(), atol, rtol))
    return checks


__all__ = ["BatchCheck", "VerifyReport", "batch_check", "verify", "compare_files", "check_onnx"]
