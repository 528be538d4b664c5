"""FLOP counts measured by running the model under torch's FlopCounterMode (batch 1)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    pe = getattr(model, "patch_embed", None)
    if pe is None:  # MobileViT and other models without a ViT patch embedding: their configured size
        from ..models.mobilevit import input_shape as configured_input_shape

        return configured_input_shape(model)
    h, w = pe.img_size
    return (pe.proj.in_channels, int(h), int(w))


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
    from ..models.vit import merge_steps

    steps = merge_steps(model)  # every blocks.N.token_merge, and vwt's pre-encoder step
    saved = [s.r for s in steps]
    try:
        for s in steps:
            s.r = 0
        base = count_flops(model)
    finally:
        for s, r in zip(steps, saved):
            s.r = r
    return base, merged, base / merged
