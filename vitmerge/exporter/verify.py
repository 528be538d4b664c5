"""Check an exported file: ONNX checker, then ONNX Runtime vs PyTorch on the same random batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import VerificationError
from ..profiling.flops import input_shape
from .onnx_export import INPUT_NAME


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


CUSTOM_DOMAIN = "vitmerge"


def uses_custom_ops(path: str | Path) -> bool:
    """Whether the graph holds vitmerge custom nodes (``vitmerge::TokenMerge``)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(o.domain == CUSTOM_DOMAIN for o in proto.opset_import)


def ort_session(path: str | Path, threads: int = 0, optimization: str = "all", providers=None):
    """An ONNX Runtime session (CPU unless ``providers`` says otherwise); the vitmerge::TokenMerge
    kernels are registered when the graph holds such nodes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if uses_custom_ops(path):
        from .. import plugins
        from ..errors import RuntimeMissingError

        register = getattr(plugins, "register_ort", None)
        if register is None:
            raise RuntimeMissingError(
                f"{Path(path).name} contains vitmerge::TokenMerge custom nodes, but this vitmerge has no ONNX Runtime "
                "kernel for them (vitmerge.plugins.register_ort); use a standard or native export instead")
        register(so)  # the vitmerge::TokenMerge kernel for ONNX Runtime
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or ["CPUExecutionProvider"]))


def check_onnx(path: str | Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise VerificationError(f"ONNX checker rejected {path}: {e}") from None


@torch.no_grad()
def verify(
    model: nn.Module,
    path: str | Path,
    batch_sizes: Sequence[int] = (1, 4),
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    session=None,
) -> VerifyReport:
    """Run the same random images through PyTorch and ONNX Runtime; max |diff| and top-1 agreement.

    Tolerance per batch: atol + rtol * max|reference output|.
    """
    model = model.eval()
    sess = session or ort_session(path)
    gen = torch.Generator().manual_seed(seed)
    shape = input_shape(model)
    report = VerifyReport(path=str(path))
    for b in batch_sizes:
        x = torch.randn(b, *shape, generator=gen)
        ref = model(x).float().numpy()
        out = sess.run(None, {INPUT_NAME: x.numpy()})[0]
        if out.shape != ref.shape:
            raise VerificationError(f"ONNX output shape {out.shape} != PyTorch {ref.shape} at batch {b}")
        diff = float(np.abs(out - ref).max())
        scale = float(np.abs(ref).max())
        agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
        report.checks.append(BatchCheck(b, diff, scale, agree, atol + rtol * scale))
    return report
