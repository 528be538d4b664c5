"""The one dispatch from a model to the adapter that knows its structure.

Two families of models are merged in place: timm Vision Transformers (:mod:`.vit`) and Hugging Face
transformers classifiers (:mod:`.hf`: ViT, DeiT, VideoMAE, AST). Everything that reads a model's
structure (``apply`` / ``remove``, input and token shapes, the FLOP counter, the budget solver, the
exporter's logits) asks :func:`family` for the model's :class:`Family` instead of testing types
itself. A new family = one adapter module + one class here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import UnsupportedModelError
from . import hf, vit

#: (attn_linear, attn_dim, mlp_linear, metric_dim) of one block: what the analytic FLOP model needs
BlockShape = Tuple[int, int, int, int]


def _linear_flops(module) -> int:
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class Family:
    """timm Vision Transformers (and, for shapes and FLOPs only, other timm models such as MobileViT)."""

    name = "timm"
    forms: Sequence[str] = ("block", "slow_fast", "pre_encoder")  # method forms the adapter implements
    supported = (
        "timm VisionTransformer models with standard blocks: vit_* (any size, patch size and image size), "
        "deit_* and deit_*_distilled_*, and other timm models built on VisionTransformer/Block"
    )

    def unsupported_reason(self, model: nn.Module) -> Optional[str]:
        return vit.unsupported_reason(model)

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return list(model.blocks)

    def prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def num_tokens(self, model: nn.Module) -> int:
        return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None

    def num_classes(self, model: nn.Module) -> int:
        return int(model.num_classes)

    def input_shape(self, model: nn.Module) -> tuple:
        """ViT-family: the patch embedding's image size (which follows ``img_size`` overrides); models
        without one (MobileViT and other CNN-style timm models): their configured input size."""
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

    def patch(self, model: nn.Module, state, rs, pre=None) -> None:
        vit.patch_vit(model, state, rs, pre=pre)

    def unpatch(self, model: nn.Module) -> None:
        vit.unpatch_vit(model)

    def merge_steps(self, model: nn.Module) -> List[nn.Module]:
        return vit.merge_steps(model)

    def flops_parts(self, model: nn.Module) -> Tuple[int, List[BlockShape]]:
        """(FLOPs outside the blocks per image, one BlockShape per block)."""
        pe = model.patch_embed.proj
        if not isinstance(pe, nn.Conv2d):
            raise UnsupportedModelError(f"patch embedding {type(pe).__name__} is not a Conv2d")
        fixed = 2 * int(model.patch_embed.num_patches) * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] \
            * pe.out_channels // pe.groups
        fixed += _linear_flops(model.head) if isinstance(model.head, nn.Module) else 0
        return fixed, [(_linear_flops(b.attn), b.attn.num_heads * b.attn.head_dim, _linear_flops(b.mlp),
                        b.attn.head_dim) for b in model.blocks]

    @contextlib.contextmanager
    def explicit_attention(self, model: nn.Module) -> Iterator[None]:
        """timm's fused attention off (FlopCounterMode misses the CPU flash kernel), then restored."""
        fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
        try:
            for m, _ in fused:
                m.fused_attn = False
            yield
        finally:
            for m, f in fused:
                m.fused_attn = f

    def logits(self, output) -> torch.Tensor:
        return output


class HFFamily(Family):
    """Hugging Face transformers classifiers (:mod:`.hf`): merging in the block form only."""

    name = "transformers"
    forms = ("block",)
    supported = hf.SUPPORTED

    def unsupported_reason(self, model):
        return hf.unsupported_reason(model)

    def blocks(self, model):
        return hf.layers(model)

    def prefix_tokens(self, model):
        return hf.prefix_tokens(model)

    def num_tokens(self, model):
        return hf.num_tokens(model)

    def has_class_token(self, model):
        return hf.has_class_token(model)

    def num_classes(self, model):
        return hf.num_classes(model)

    def input_shape(self, model):
        return hf.input_shape(model)

    def patch(self, model, state, rs, pre=None):
        if pre is not None:
            raise UnsupportedModelError("transformers models take merge steps inside their layers only")
        hf.patch(model, state, rs)

    def unpatch(self, model):
        hf.unpatch(model)

    def merge_steps(self, model):
        return hf.merge_steps(model)

    def flops_parts(self, model):
        return hf.flops_parts(model)

    def explicit_attention(self, model):
        return hf.explicit_attention(model)

    def logits(self, output):
        return hf.logits(output)


TIMM = Family()
TRANSFORMERS = HFFamily()


def family(model: nn.Module) -> Family:
    """The adapter family of ``model``: transformers models by their classes' module, timm otherwise."""
    return TRANSFORMERS if hf.is_hf(model) else TIMM


def supported() -> str:
    """What vitmerge can merge, for error messages: every family's list."""
    return f"{TIMM.supported}; {TRANSFORMERS.supported}"


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as one logits tensor [B, classes] (transformers models return an output object)."""
    return family(model).logits(model(x))


__all__ = ["Family", "HFFamily", "TIMM", "TRANSFORMERS", "family", "supported", "forward_logits", "BlockShape"]
