"""In-place patch of timm VisionTransformer-family models (ViT, DeiT, distilled DeiT, ...).

Each transformer block gets the merge between attention and MLP::

    x = x + ls1(attn(norm1(x), prop-attn bias = log(size)))   # metric = keys averaged over heads
    x, size = plan(method, metric, r).merge(x, size)           # static N -> N - r
    x = x + ls2(mlp(norm2(x)))

Unlike the reference ToMe patch, timm's own pieces stay in the path: LayerScale (ls1/ls2),
q_norm/k_norm, scale_norm, gated attention and the fused SDPA kernel (the proportional-attention
bias goes in as SDPA's additive mask). For plain ViT/DeiT these are identities, so the numbers are
the reference's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import merging


def _exporting() -> bool:
    return bool(torch.compiler.is_exporting()) or torch.onnx.is_in_onnx_export()


@dataclass
class MergeState:
    """Per-forward state shared by the blocks of one model (reset at every forward)."""

    method: str
    prop_attn: bool
    protected: int
    options: Dict[str, Any] = field(default_factory=dict)
    trace_source: bool = False
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.size = None
        self.source = None


def attention_with_metric(attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]):
    """timm Attention.forward plus proportional attention; returns (out, keys averaged over heads)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0]  # [B, 1, 1, N]
    # Under torch.export the fused kernel with an additive mask decomposes into a view that fails
    # (strides of the SDPA output); the explicit form exports to the same MatMul/Softmax ops.
    if attn.fused_attn and not _exporting():
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(1)


class TokenMerge(nn.Module):
    """One merge step as a module of its own: (x, metric, size) -> (x', size').

    Being a module gives the step its own name scope in exported graphs (``blocks.3.token_merge``),
    which is how graph surgery finds every merge subgraph without guessing at op patterns.
    It holds no parameters, so state dicts are unchanged.
    """

    def __init__(self, state: "MergeState", r: int):
        super().__init__()
        self.state = state
        self.r = int(r)

    def extra_repr(self) -> str:
        return f"method={self.state.method}, r={self.r}, protected={self.state.protected}"

    def forward(self, x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor]):
        st = self.state
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        p = merging.plan(st.method, metric, self.r, st.protected, **st.options)
        if st.trace_source:
            st.source = p.merge_source(st.source)
        return p.merge(x, size)


class MergeBlockMixin:
    """Mixed into the block's own class, so parameters and state-dict keys stay unchanged."""

    _vm_state: MergeState
    token_merge: TokenMerge

    def forward(self, x, attn_mask=None, is_causal=False):  # noqa: D401 - timm signature
        if attn_mask is not None or is_causal:
            raise ValueError("token merging cannot be combined with an attention mask or causal attention")
        st = self._vm_state
        out, metric = attention_with_metric(self.attn, self.norm1(x), st.size if st.prop_attn else None)
        x = x + self.drop_path1(self.ls1(out))
        if self.token_merge.r > 0:
            x, st.size = self.token_merge(x, metric, st.size)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class MergeModelMixin:
    _vm_state: MergeState

    def forward(self, *args, **kwargs):
        self._vm_state.reset()
        return super().forward(*args, **kwargs)


_CLASS_CACHE: Dict[tuple, type] = {}


def mixed_class(mixin: type, cls: type) -> type:
    if issubclass(cls, mixin):
        return cls
    key = (mixin, cls)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Merged{cls.__name__}", (mixin, cls), {})
    return _CLASS_CACHE[key]


def original_class(cls: type, mixin: type) -> type:
    return cls.__mro__[2] if issubclass(cls, mixin) else cls


def unsupported_reason(model: nn.Module) -> Optional[str]:
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a timm VisionTransformer"
    for i, blk in enumerate(model.blocks):
        base = original_class(type(blk), MergeBlockMixin)
        if base is not Block:
            return f"block {i} is a {base.__name__}, not timm's standard Block"
        if type(blk.attn) is not Attention:
            return f"block {i} uses {type(blk.attn).__name__}, not timm's standard Attention"
    return None


def patch_vit(model: nn.Module, state: MergeState, rs: List[int]) -> None:
    model._vm_state = state
    model.__class__ = mixed_class(MergeModelMixin, type(model))
    for blk, r in zip(model.blocks, rs):
        blk.__class__ = mixed_class(MergeBlockMixin, type(blk))
        blk._vm_state = state
        blk.token_merge = TokenMerge(state, r)


def unpatch_vit(model: nn.Module) -> None:
    model.__class__ = original_class(type(model), MergeModelMixin)
    for blk in model.blocks:
        blk.__class__ = original_class(type(blk), MergeBlockMixin)
        blk.__dict__.pop("_vm_state", None)
        blk._modules.pop("token_merge", None)
    for a in ("_vm_state", "vitmerge"):
        model.__dict__.pop(a, None)
