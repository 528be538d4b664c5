"""FLOP counts measured by running the model under torch's FlopCounterMode (batch 1)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    h, w = model.patch_embed.img_size
    return (model.patch_embed.proj.in_channels, int(h), int(w))


@torch.no_grad()
def count_flops(model: nn.Module, shape: tuple[int, int, int] | None = None) -> int:
    """Total FLOPs (2 x multiply-adds) of one image through ``model``, counted op by op."""
    shape = shape or input_shape(model)
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *shape)
    # FlopCounterMode does not count every fused attention kernel (the CPU flash kernel is missed,
    # the masked path is counted as bmm): count all attention in its explicit matmul form.
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        for m, _ in fused:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, f in fused:
            m.fused_attn = f
        model.train(was_training)
    return int(counter.get_total_flops())


def flop_ratio(model: nn.Module) -> tuple[int, int, float]:
    """(unmerged FLOPs, merged FLOPs, ratio unmerged/merged) for a model patched by vitmerge.apply."""
    from ..models import MergeInfo

    info: MergeInfo | None = getattr(model, "vitmerge", None)
    merged = count_flops(model)
    if info is None:
        return merged, merged, 1.0
    saved = [b.token_merge.r for b in model.blocks]
    try:
        for b in model.blocks:
            b.token_merge.r = 0
        base = count_flops(model)
    finally:
        for b, r in zip(model.blocks, saved):
            b.token_merge.r = r
    return base, merged, base / merged
