"""The one merge contract shared by every method.

A method decides *which* token goes *where*; this module does the rest. A plan is an assignment
``assign[b, i] -> slot in [0, n_out)`` for every input token ``i`` (several tokens may share a
slot), plus a STATIC output count ``n_out`` that depends only on the schedule, never on the data.
Merging is then a size-weighted average per slot, computed with sums (scatter-add of ``x * w`` and
of ``w``, then one division): ONNX ScatterElements has no "mean" reduction, and sum-then-divide is
what the reference ToMe does (``merge_wavg``).

Shapes: x [B, N, D], size [B, N, 1] (token sizes: how many patches a token stands for),
assign [B, N] int64, optional weight [B, N, 1] (extra per-token weight, e.g. importance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class MergePlan:
    """Which input token goes to which output slot; ``n_out`` is static."""

    assign: torch.Tensor  # [B, N] int64, values in [0, n_out)
    n_out: int
    weight: Optional[torch.Tensor] = None  # [B, N, 1] extra averaging weight (None = size only)

    @property
    def n_in(self) -> int:
        return self.assign.shape[1]

    def merge(
        self, x: torch.Tensor, size: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of the tokens that share a slot.

        Returns ``(x_merged [B, n_out, D], size_merged [B, n_out, 1])``; ``size`` defaults to ones.
        """
        return merge_wavg(self.assign, self.n_out, x, size, self.weight)

    def merge_source(self, source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Track which original patches each token holds: source [B, n_out, N0] (0/1)."""
        B, N = self.assign.shape
        if source is None:
            source = torch.eye(N, device=self.assign.device).expand(B, N, N)
        out = source.new_zeros(B, self.n_out, source.shape[-1])
        idx = self.assign[..., None].expand(B, N, source.shape[-1])
        return out.scatter_add(1, idx, source).clamp_(max=1)


def merge_wavg(
    assign: torch.Tensor,
    n_out: int,
    x: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    B, N, D = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    w = size if weight is None else size * weight
    # One scatter for values and weights together: [x * w, w] along the channel axis.
    packed = torch.cat([x * w, w], dim=-1)
    out = packed.new_zeros(B, n_out, D + 1)
    out = out.scatter_add(1, assign[..., None].expand(B, N, D + 1), packed)
    x_out = out[..., :D] / out[..., D:]
    if weight is None:
        size_out = out[..., D:]
    else:
        size_out = size.new_zeros(B, n_out, 1).scatter_add(1, assign[..., None], size)
    return x_out, size_out
