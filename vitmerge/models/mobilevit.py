"""MobileViT (timm ``mobilevit_*`` and ``mobilevitv2_*``): the mobile baseline, exported and profiled unmerged.

Why vitmerge does not merge tokens inside it (see docs/methods/mobilevit.md for the numbers):
a MobileViT block unfolds a conv feature map into ``patch_area`` (e.g. 2 x 2 = 4) sequences, one
per pixel position inside the patches, runs a small transformer over each (tokens = patch
positions, e.g. 256, 64, 16 at 256 px), then *folds every token back* into the feature map for the
convolutions that follow. Merging would therefore need an unmerge before the fold (ToMe-for-SD
style), the convolutions would not get cheaper, and the transformers are only about half of the FLOPs (45-52 %).

What it does get: its configured input size (:func:`vitmerge.models.shapes.input_shape`: export,
verification, FLOP counting and latency all start from it), and a clear :class:`UnsupportedModelError` from ``apply``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .flops import flop_counter

REASON = (
    "MobileViT folds every transformer token back into a convolutional feature map, so its blocks need "
    "all tokens at every position; token merging inside them is not supported (it would need an unmerge "
    "before each fold, and only about half of MobileViT's FLOPs are in its transformers). Export and profile it "
    "unmerged as the mobile baseline: vitmerge export MODEL --r 0 -o mobilevit.onnx (in Python: "
    "vitmerge.export(model, 'mobilevit.onnx') on the plain model)"
)


def is_mobilevit(model: nn.Module) -> bool:
    try:
        from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block
    except ImportError:  # pragma: no cover - timm without MobileViT
        return False
    return any(isinstance(m, (MobileVitBlock, MobileVitV2Block)) for m in model.modules())


def unsupported_reason(model: nn.Module) -> Optional[str]:
    return REASON if is_mobilevit(model) else None


def transformer_flop_share(model: nn.Module, shape: Optional[tuple[int, int, int]] = None) -> float:
    """Fraction of one image's FLOPs spent inside MobileViT's transformer stacks."""
    counter = flop_counter(model, shape)
    total = counter.get_total_flops()
    inside = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if k.endswith(".transformer"))
    return inside / total if total else 0.0


__all__ = ["is_mobilevit", "unsupported_reason", "transformer_flop_share", "REASON"]
