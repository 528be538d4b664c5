"""FLOP counts measured by running the model under torch's FlopCounterMode (batch 1)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .family import family
from .shapes import input_shape


@torch.no_grad()
def flop_counter(model: nn.Module, shape: Optional[tuple] = None) -> FlopCounterMode:
    """Run one input (zeros) through ``model`` under a FlopCounterMode and return the counter.

    Attention is counted in its explicit matmul form: FlopCounterMode does not count every fused
    attention kernel (the CPU flash kernel is missed, the masked path is counted as bmm).
    """
    shape = shape or input_shape(model)
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *shape)
    try:
        with family(model).explicit_attention(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter


def count_flops(model: nn.Module, shape: Optional[tuple] = None) -> int:
    """Total FLOPs (2 x multiply-adds) of one input through ``model``, counted op by op."""
    return int(flop_counter(model, shape).get_total_flops())


def flop_ratio(model: nn.Module) -> tuple[int, int, float]:
    """(unmerged FLOPs, merged FLOPs, ratio unmerged/merged) for a model patched by vitmerge.apply."""
    merged = count_flops(model)
    if getattr(model, "vitmerge", None) is None:
        return merged, merged, 1.0
    steps = family(model).merge_steps(model)  # every merge step (token_merge, vwt's pre-encoder step)
    saved = [s.r for s in steps]
    try:
        for s in steps:
            s.r = 0
        base = count_flops(model)
    finally:
        for s, r in zip(steps, saved):
            s.r = r
    return base, merged, base / merged


__all__ = ["count_flops", "flop_counter", "flop_ratio"]
