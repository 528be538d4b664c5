"""MobileViT (timm ``mobilevit_*`` and ``mobilevitv2_*``): the mobile baseline, exported and profiled unmerged.

Why vitmerge does not merge tokens inside it (see docs/methods/mobilevit.md for the numbers):
a MobileViT block unfolds a conv feature map into ``patch_area`` (e.g. 2 x 2 = 4) sequences, one
per pixel position inside the patches, runs a small transformer over each (tokens = patch
positions, e.g. 256, 64, 16 at 256 px), then *folds every token back* into the feature map for the
convolutions that follow. Merging would therefore need an unmerge before the fold (ToMe-for-SD
style), the convolutions would not get cheaper, and the transformers are only about half of the FLOPs (45-52 %).

What it does get: ``input_shape`` for models without ``patch_embed`` (export, verification, FLOP
counting and latency all start from it), and a clear :class:`UnsupportedModelError` from ``apply``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

REASON = (
    "MobileViT folds every transformer token back into a convolutional feature map, so its blocks need "
    "all tokens at every position; token merging inside them is not supported (it would need an unmerge "
    "before each fold, and only about half of MobileViT's FLOPs are in its transformers). Export and profile it "
    "unmerged as the mobile baseline: vitmerge.export(model, 'mobilevit.onnx') works on the plain model"
)


def is_mobilevit(model: nn.Module) -> bool:
    try:
        from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block
    except ImportError:  # pragma: no cover - timm without MobileViT
        return False
    return any(isinstance(m, (MobileVitBlock, MobileVitV2Block)) for m in model.modules())


def unsupported_reason(model: nn.Module) -> Optional[str]:
    return REASON if is_mobilevit(model) else None


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one input image for models without a ``patch_embed``
    (MobileViT, other timm CNN-style models): the model's configured input size."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    if not size or len(size) != 3:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"cannot tell the input size of {type(model).__name__}: it has no patch_embed and no "
            "pretrained_cfg['input_size']"
        )
    return (int(size[0]), int(size[1]), int(size[2]))


def transformer_flop_share(model: nn.Module, shape: Optional[tuple[int, int, int]] = None) -> float:
    """Fraction of one image's FLOPs spent inside MobileViT's transformer stacks."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    shape = shape or input_shape(model)
    was = model.training
    model.eval()
    # Count attention in its explicit matmul form, as vitmerge's count_flops does: FlopCounterMode
    # misses the fused CPU attention kernel.
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        for m, _ in fused:
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *shape))
    finally:
        for m, f in fused:
            m.fused_attn = f
        model.train(was)
    total = counter.get_total_flops()
    inside = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if k.endswith(".transformer"))
    return inside / total if total else 0.0


__all__ = ["is_mobilevit", "unsupported_reason", "input_shape", "transformer_flop_share", "REASON"]
