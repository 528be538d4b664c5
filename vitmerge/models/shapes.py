"""Input and token shapes read off a model (the one place that knows where they live)."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one input image.

    ViT-family models: their patch embedding's image size (which follows ``img_size`` overrides);
    models without one (MobileViT and other CNN-style timm models): their configured input size.
    """
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        h, w = pe.img_size
        return (int(pe.proj.in_channels), int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    if not size or len(size) != 3:
        raise UnsupportedModelError(
            f"cannot tell the input size of {type(model).__name__}: it has no patch_embed and no "
            "pretrained_cfg['input_size']"
        )
    return (int(size[0]), int(size[1]), int(size[2]))


def num_tokens(model: nn.Module) -> int:
    """Tokens entering the first block at the model's configured image size."""
    return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)


__all__ = ["input_shape", "num_tokens"]
