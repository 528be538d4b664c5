"""The one dispatch from a model to the adapter that knows its structure.

Three families of models are merged in place: timm Vision Transformers (:mod:`.vit`), Hugging Face
transformers models (:mod:`.hf`: ViT, DeiT, VideoMAE, AST classifiers, the YOLOS detector) and the dense
detector (:mod:`.dense`: a timm ViT backbone unmerged before a per-cell head). Everything that reads a model's
structure (``apply`` / ``remove``, input and token shapes, the FLOP counter, the budget solver, the
exporter's logits) asks :func:`family` for the model's :class:`Family` instead of testing types
itself. A new family = one adapter module + one class here.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import metadata as md
from ..errors import UnsupportedModelError
from . import dense, hf, vit

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

    def output_names(self, model: nn.Module) -> Tuple[str, ...]:
        """The named outputs of an exported graph, in order (classifiers: ``logits`` only)."""
        return (md.OUTPUT_NAME,)

    def outputs(self, model: nn.Module, output) -> Tuple[torch.Tensor, ...]:
        """``model``'s output as the tensors named by :meth:`output_names`, in their order."""
        return (self.logits(output),)


#: what a family answers about a model (besides ``patch``): the methods of :class:`Family`
QUESTIONS = ("unsupported_reason", "blocks", "prefix_tokens", "num_tokens", "has_class_token", "num_classes",
             "input_shape", "unpatch", "merge_steps", "flops_parts", "explicit_attention", "logits", "output_names",
             "outputs")


def _answered_by(module, **renamed: str):
    """Class decorator: every :data:`QUESTIONS` method the class body does not define calls ``module``'s function
    of the same name (or of ``renamed[name]``), looked up at call time."""

    def forward(cls, name: str, fn: str):
        def method(self, *args):
            return getattr(module, fn)(*args)

        method.__name__, method.__qualname__ = name, f"{cls.__qualname__}.{name}"
        method.__doc__ = getattr(module, fn).__doc__
        return method

    def decorate(cls):
        for q in QUESTIONS:
            if q not in vars(cls):
                setattr(cls, q, forward(cls, q, renamed.get(q, q)))
        return cls

    return decorate


@_answered_by(hf, blocks="layers")
class HFFamily(Family):
    """Hugging Face transformers classifiers (:mod:`.hf`): merging in the block form only. :mod:`.hf` answers
    every question by a function of the same name (its ``layers`` are the blocks); what differs between its
    model types is its table (:mod:`.hf_table`)."""

    name = "transformers"
    forms = ("block",)
    supported = hf.SUPPORTED

    def patch(self, model, state, rs, pre=None):
        if pre is not None:
            raise UnsupportedModelError("transformers models take merge steps inside their layers only")
        hf.patch(model, state, rs)


class DenseFamily(Family):
    """:class:`~.dense.DenseDetector`: a timm ViT backbone (merged in its blocks, as :class:`Family`) whose
    final tokens are unmerged to every patch position for a per-cell head; outputs ``logits`` and ``boxes``."""

    name = "dense detector"
    forms = ("block", "slow_fast")  # vwt's pre-encoder step reads the classifier's own embedding attributes
    supported = "vitmerge.models.dense.DenseDetector (a timm ViT backbone + per-cell box head)"

    def unsupported_reason(self, model):
        return dense.unsupported_reason(model)

    def blocks(self, model):
        return TIMM.blocks(model.backbone)

    def prefix_tokens(self, model):
        return TIMM.prefix_tokens(model.backbone)

    def num_tokens(self, model):
        return TIMM.num_tokens(model.backbone)

    def has_class_token(self, model):
        return TIMM.has_class_token(model.backbone)

    def num_classes(self, model):
        return int(model.num_classes)

    def input_shape(self, model):
        return TIMM.input_shape(model.backbone)

    def patch(self, model, state, rs, pre=None):
        state.track_positions = True  # the head reads every patch position: unmerge after the last block
        TIMM.patch(model.backbone, state, rs, pre=pre)
        model._vm_state = state

    def unpatch(self, model):
        TIMM.unpatch(model.backbone)
        for a in ("_vm_state", "vitmerge"):
            model.__dict__.pop(a, None)

    def merge_steps(self, model):
        return TIMM.merge_steps(model.backbone)

    def flops_parts(self, model):
        fixed, blocks = TIMM.flops_parts(model.backbone)
        q = model.num_queries
        head = sum(2 * q * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                   for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.backbone.patch_embed.proj)
        return fixed + head, blocks

    def explicit_attention(self, model):
        return TIMM.explicit_attention(model.backbone)

    def logits(self, output):
        return output.logits

    def output_names(self, model):
        return (md.OUTPUT_NAME, md.BOXES_NAME)

    def outputs(self, model, output):
        return (output.logits, output.boxes)


TIMM = Family()
TRANSFORMERS = HFFamily()
DENSE = DenseFamily()


def family(model: nn.Module) -> Family:
    """The adapter family of ``model``: transformers models by their classes' module, timm otherwise."""
    if dense.is_dense(model):
        return DENSE
    return TRANSFORMERS if hf.is_hf(model) else TIMM


def supported() -> str:
    """What vitmerge can merge, for error messages: every family's list."""
    return f"{TIMM.supported}; {TRANSFORMERS.supported}; {DENSE.supported}"


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as one logits tensor [B, classes] (transformers models return an output object)."""
    return family(model).logits(model(x))


def forward_outputs(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``model(x)`` as its named outputs (:meth:`Family.output_names`: ``logits``, detectors also ``boxes``)."""
    fam = family(model)
    return dict(zip(fam.output_names(model), fam.outputs(model, model(x))))


__all__ = ["Family", "HFFamily", "DenseFamily", "TIMM", "TRANSFORMERS", "DENSE", "family", "supported",
           "forward_logits", "forward_outputs", "BlockShape"]
