"""Input and token shapes read off a model (through its adapter family: :mod:`.family`)."""
from __future__ import annotations

from torch import nn

from .family import family


def input_shape(model: nn.Module) -> tuple:
    """One input sample without the batch axis: (channels, height, width) for images (timm and
    transformers ViT/DeiT; MobileViT and other CNN-style timm models: their configured input size),
    (frames, channels, height, width) for video (VideoMAE), (time frames, mel bins) for audio (AST)."""
    return family(model).input_shape(model)


def num_tokens(model: nn.Module) -> int:
    """Tokens entering the first block at the model's configured input size."""
    return family(model).num_tokens(model)


def prefix_tokens(model: nn.Module) -> int:
    """Tokens that never merge (class, distillation, registers; 0 for VideoMAE with mean pooling)."""
    return family(model).prefix_tokens(model)


def depth(model: nn.Module) -> int:
    """Transformer blocks (timm ``blocks``, transformers ``layers``)."""
    return len(family(model).blocks(model))


def num_classes(model: nn.Module) -> int:
    return family(model).num_classes(model)


__all__ = ["input_shape", "num_tokens", "prefix_tokens", "depth", "num_classes"]
