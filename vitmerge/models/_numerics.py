"""Two helpers the model adapters (:mod:`.vit`, :mod:`.hf`) share: defined once, here."""
from __future__ import annotations

from typing import Optional

import torch


def _exporting() -> bool:
    """Whether the forward runs inside an export (torch.export / dynamo or the TorchScript ONNX exporter)."""
    return bool(torch.compiler.is_exporting()) or torch.onnx.is_in_onnx_export()


# Reduced precision: the merge decides *which* tokens merge from similarity scores, and a tiny rounding
# difference near a tie changes the decision, not just a value. So every merge step computes in
# (at least) float32 whatever the model runs in: the metric's normalisation, the scores, the size-weighted sums
# x * size (sizes grow into the hundreds at long sequences) and the divide. Token sizes stay float32
# across blocks. In a float32 model these casts are no-ops and leave no node in the exported graph.
def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` in at least float32 (float16 / bfloat16 widen; float32 and float64 stay as they are)."""
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))
