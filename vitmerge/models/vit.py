"""In-place patch of timm VisionTransformer-family models (ViT, DeiT, distilled DeiT, ...).

Each transformer block gets the merge between attention and MLP::

    x = x + ls1(attn(norm1(x), prop-attn bias = log(size)))   # metric = keys averaged over heads
    x, size = plan(method, metric, r).merge(x, size)           # static N -> N - r
    x = x + ls2(mlp(norm2(x)))

Unlike the reference ToMe patch, timm's own pieces stay in the path: LayerScale (ls1/ls2),
q_norm/k_norm, scale_norm, gated attention and the fused SDPA kernel (the proportional-attention
bias goes in as SDPA's additive mask). For plain ViT/DeiT these are identities, so the numbers are
the reference's.

Methods flag what else they need in their :class:`~vitmerge.merging.MethodSpec` (the adapter reads
the spec, never a method's name or module):

* ``needs_cls_attn``: merging blocks also return the class token's attention row, computed next to
  the (still fused) attention as one ``[1 x N]`` row per head;
* form ``slow_fast``: the step at ``blocks.N.token_merge`` picks the tokens the block computes on,
  the block runs on them, and ``blocks.N.token_merge.spread`` brings the result back to all N tokens
  (the spec's ``spread``; its ``evolve`` carries the class attention from block to block);
* form ``pre_encoder``: one grouping step, ``vwt_merge``, between the embeddings and block 0 (the
  spec's ``group``).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import merging


from ._numerics import _exporting, _f32  # shared with the transformers adapter (hf.py)


@dataclass
class MergeState:
    """Per-forward state shared by the blocks of one model (reset at every forward)."""

    method: str
    prop_attn: bool
    protected: int
    options: Dict[str, Any] = field(default_factory=dict)
    trace_source: bool = False
    need_cls: bool = False  # the method reads the class-token attention row (spec.needs_cls_attn)
    slow_fast: bool = False  # form slow_fast: blocks run on a plan's slots, then spread back to every token
    step_options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the form's spec hooks
    size: Optional[torch.Tensor] = None  # [B, N, 1] float32 whatever the model's dtype
    source: Optional[torch.Tensor] = None
    cls_attn: Optional[torch.Tensor] = None  # slow_fast: global class attention [B, N], carried across blocks
    record_decisions: bool = False  # collect every step's assignment (plan.assign, [B, N] int64) in .decisions
    scatter_free: bool = False  # merge with a one-hot MatMul instead of index-add (the native graph form: TensorRT)
    decisions: Optional[List[torch.Tensor]] = None
    #: assignments the merge steps take instead of deciding (one [B, N] per step, in order; None: they decide)
    forced: Optional[List[torch.Tensor]] = None
    forced_at: int = 0
    #: track the map from every original position to its current token (dense heads unmerge by it)
    track_positions: bool = False
    positions: Optional[torch.Tensor] = None  # [B, N0] int64: token of each original position (None: nothing merged yet)

    def reset(self) -> None:
        self.size = None
        self.source = None
        self.cls_attn = None
        self.positions = None
        self.decisions = [] if self.record_decisions else None
        self.forced_at = 0

    def __deepcopy__(self, memo):
        """Copy the configuration, not the last forward's tensors (they may be tracing leftovers)."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.options = copy.deepcopy(self.options, memo)
        new.step_options = copy.deepcopy(self.step_options, memo)
        new.size = new.source = new.cls_attn = new.decisions = new.positions = new.forced = None
        return new

    @property
    def spec(self) -> "merging.MethodSpec":
        return merging.method_spec(self.method)

    def record(self, plan, reduces: bool = True):
        """Note one step's plan: its assignment (decisions) and, for a step that reduces the tokens
        (not a slow-fast split, whose block hands all N tokens on), the position map. Returns the plan the step
        runs: ``plan``, or under :func:`forcing` the plan of the next forced assignment (same slots and weight)."""
        if self.forced is not None:
            if not reduces:
                raise RuntimeError("a slow-fast split keeps a chosen token per slot: its decisions cannot be forced")
            if self.forced_at >= len(self.forced):
                raise RuntimeError(f"{len(self.forced)} forced assignments for more merge steps")
            a = self.forced[self.forced_at].to(plan.keep.device)
            self.forced_at += 1
            if tuple(a.shape) != (plan.keep.shape[0], plan.n_in):
                raise RuntimeError(f"forced assignment {tuple(a.shape)} for a step on {plan.n_in} tokens")
            plan = merging.MergePlan.from_assign(a, plan.n_out, weight=plan.weight)
        if self.decisions is not None:
            self.decisions.append(plan.assign)
        if self.track_positions and reduces:
            self.positions = merging.compose(self.positions, plan.assign)
        return plan

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """The final tokens ``x [B, n, D]`` back at every original position: ``[B, N0, D]``, each position
        the token it was merged into (needs ``track_positions``; nothing merged: ``x`` as it is)."""
        if not self.track_positions:
            raise RuntimeError("unmerge needs MergeState.track_positions (set by the adapter for dense heads)")
        return merging.unmerge(x, self.positions)


def _ones_size(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention probabilities of the first token's query (the class token), averaged over heads.

    q, k [B, H, N, hd]; bias [B, 1, 1, N] or None. Returns [B, N]. One [1 x N] row per head: the
    main attention keeps its fused kernel, and this costs O(N * C) next to its O(N^2 * C).
    """
    logits = (_f32(q[:, :, :1]) * scale) @ _f32(k).transpose(-2, -1)  # [B, H, 1, N], float32: it decides merges
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def biased_logits(q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention logits ``(q * scale) @ k^T + bias`` for the explicit (exported) attention.

    q, k [B, H, N, hd]; bias [B, 1, 1, N] (proportional attention: log of the token sizes) or None. The bias
    is folded into the matrix product as one more channel (q gets a 1, k gets the key's log size), so the
    [B, H, N, N] logits are written once: no separate full-size Add (and no second [N, N] buffer alive at
    once), which at long sequences is the difference between the merged file's memory peak sitting below
    the unmerged one's or above it. The same sums as ``logits + bias`` up to float rounding. Only while
    exporting: eager PyTorch (and the FLOP counts, which count matrix products) keeps the plain sum.
    """
    q = q * scale
    if bias is None:
        return q @ k.transpose(-2, -1)
    if not _exporting():  # eager (and FLOP counting): the plain sum, as before
        return q @ k.transpose(-2, -1) + bias
    B, H, N, _ = k.shape
    qa = F.pad(q, (0, 1), value=1.0)  # [B, H, N, hd + 1]
    kb = torch.cat([k, bias.transpose(-1, -2).to(k.dtype).expand(B, H, N, 1)], dim=-1)  # [B, H, N, hd + 1]
    return qa @ kb.transpose(-2, -1)


def attention_with_metric(attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor], need_cls: bool = False):
    """timm Attention.forward plus proportional attention; returns (out, keys averaged over heads),
    and with ``need_cls`` also the class-token attention row averaged over heads ([B, N])."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0]  # [B, 1, 1, N], float32
    att_bias = None if bias is None else bias.to(q.dtype)
    # Under torch.export the fused kernel with an additive mask decomposes into a view that fails
    # (strides of the SDPA output); the explicit form exports to the same MatMul/Softmax ops.
    if attn.fused_attn and not _exporting():
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=att_bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        logits = biased_logits(q, k, attn.scale, att_bias)
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    if need_cls:
        return out, k.mean(1), class_attention(q, k, attn.scale, bias)
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

    def forward(self, x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
                cls_attn: Optional[torch.Tensor] = None):
        st = self.state
        size = _ones_size(x) if size is None else size
        extra = {} if cls_attn is None else {"cls_attn": _f32(cls_attn)}
        p = st.record(merging.plan(st.method, _f32(metric), self.r, st.protected, **st.options, **extra))
        if st.trace_source:
            st.source = p.merge_source(st.source)
        x_out, size_out = p.merge(_f32(x), _f32(size), scatter_free=st.scatter_free)
        return x_out.to(x.dtype), size_out


class SlowFastSplit(nn.Module):
    """The slow_fast form's step at ``blocks.N.token_merge``: the slow path's tokens (protected, informative and one
    representative of the placeholders) as a merge of the block input; ``.spread`` (its child, so
    its nodes carry ``blocks.N.token_merge.spread``) moves every token by its slot's residual."""

    def __init__(self, state: "MergeState", r: int):
        super().__init__()
        self.state = state
        self.r = int(r)
        self.spread = SlowFastSpread(state)

    def extra_repr(self) -> str:
        return f"method={self.state.method}, r={self.r}, protected={self.state.protected}"

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor):
        st = self.state
        p = merging.plan(st.method, _f32(x), self.r, st.protected, cls_attn=_f32(cls_attn), **st.options)
        st.record(p, reduces=False)
        x_slow, size = p.merge(_f32(x), _ones_size(x), scatter_free=st.scatter_free)
        return x_slow.to(x.dtype), size, p.assign, p.keep


class SlowFastSpread(nn.Module):
    def __init__(self, state: "MergeState"):
        super().__init__()
        self.state = state

    def forward(self, x, x_slow, y_slow, assign):
        return self.state.spec.spread(x, x_slow, y_slow, assign)


class PreEncoderMerge(nn.Module):
    """The pre_encoder form's step before the blocks (``vwt_merge``): (tokens, images, patch embeddings)
    -> (tokens', size'), ``r`` patches fewer, grouped by the method's ``group`` hook with the options its
    ``setup`` chose. Tensors it needs (a vocabulary) are non-persistent buffers: they become constants of
    the exported graph and leave the model's state dict unchanged."""

    def __init__(self, state: "MergeState", r: int, group, options: Dict[str, Any],
                 buffers: Optional[Dict[str, Optional[torch.Tensor]]] = None):
        super().__init__()
        self.state = state
        self.r = int(r)
        self.group = group
        self.options = dict(options)
        self.buffer_names = tuple(buffers or {})
        for name, t in (buffers or {}).items():
            self.register_buffer(name, t, persistent=False)

    def extra_repr(self) -> str:
        opts = "".join(f"{k}={v}, " for k, v in self.options.items() if k != "patch_size")
        bufs = "".join(f", {k}={tuple(getattr(self, k).shape)}" for k in self.buffer_names if getattr(self, k) is not None)
        return f"{opts}r={self.r}{bufs}"

    def forward(self, x: torch.Tensor, images: torch.Tensor, emb: torch.Tensor):
        st = self.state
        if self.r <= 0:
            return x, None  # nothing grouped: the blocks run exactly as unpatched
        bufs = {k: getattr(self, k) for k in self.buffer_names}
        p = st.record(self.group(images, emb, self.r, st.protected, **self.options, **bufs))  # (it widens what it reads)
        if st.trace_source:
            st.source = p.merge_source(st.source)
        x_out, size = p.merge(_f32(x), _ones_size(x), scatter_free=st.scatter_free)
        return x_out.to(x.dtype), size


class MergeBlockMixin:
    """Mixed into the block's own class, so parameters and state-dict keys stay unchanged."""

    _vm_state: MergeState
    token_merge: TokenMerge

    def forward(self, x, attn_mask=None, is_causal=False):  # noqa: D401 - timm signature
        if attn_mask is not None or is_causal:
            raise ValueError("token merging cannot be combined with an attention mask or causal attention")
        st = self._vm_state
        if st.slow_fast:
            return self._slow_fast(x)
        merging_here = self.token_merge.r > 0
        if st.need_cls and merging_here:
            out, metric, cls = attention_with_metric(self.attn, self.norm1(x), st.size if st.prop_attn else None,
                                                     need_cls=True)
        else:
            out, metric = attention_with_metric(self.attn, self.norm1(x), st.size if st.prop_attn else None)
            cls = None
        x = x + self.drop_path1(self.ls1(out))
        if merging_here:
            x, st.size = self.token_merge(x, metric, st.size, cls)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def _body(self, x: torch.Tensor, size: Optional[torch.Tensor]):
        """The unmodified block (attention with the prop-attn bias, MLP) plus the class-attention row."""
        st = self._vm_state
        out, _, cls = attention_with_metric(self.attn, self.norm1(x), size if st.prop_attn else None, need_cls=True)
        x = x + self.drop_path1(self.ls1(out))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, cls

    def _slow_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Slow-fast: full block where r == 0 (or no class attention yet); else the slow path on N - r
        tokens and the fast update for the placeholders. The token count stays N."""
        st = self._vm_state
        tm = self.token_merge
        if tm.r <= 0 or st.cls_attn is None:
            x, st.cls_attn = self._body(x, None)
            return x
        x_slow, size, assign, keep = tm(x, st.cls_attn)
        y_slow, cls = self._body(x_slow, size)
        st.cls_attn = st.spec.evolve(st.cls_attn, cls, keep, st.protected, **st.step_options)
        return tm.spread(x, x_slow, y_slow, assign)


class MergeModelMixin:
    _vm_state: MergeState

    def forward(self, *args, **kwargs):
        self._vm_state.reset()
        return super().forward(*args, **kwargs)


class PreMergeModelMixin(MergeModelMixin):
    """timm's forward_features with one grouping step (``vwt_merge``) between the embeddings and the
    blocks. The step sees the input images (pixel patches) and the patch embeddings before the
    position embedding, and sets the token sizes the blocks' proportional attention uses."""

    vwt_merge: nn.Module

    def forward_features(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("token merging cannot be combined with an attention mask or causal attention")
        st = self._vm_state
        images = x
        emb = self.patch_embed(x)
        x = self._pos_embed(emb)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x, st.size = self.vwt_merge(x, images, emb.reshape(emb.shape[0], -1, emb.shape[-1]))
        x = self.blocks(x)
        return self.norm(x)


_CLASS_CACHE: Dict[tuple, type] = {}


def mixed_class(mixin: type, cls: type) -> type:
    if issubclass(cls, mixin):
        return cls
    key = (mixin, cls)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Merged{cls.__name__}", (mixin, cls), {})
    return _CLASS_CACHE[key]


def original_class(cls: type, mixin: type) -> type:
    """Undo :func:`mixed_class`: its classes are ``type(name, (mixin, original), {})``."""
    return cls.__bases__[1] if issubclass(cls, mixin) and cls in _CLASS_CACHE.values() else cls


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


def patch_vit(model: nn.Module, state: MergeState, rs: List[int], pre: Optional[nn.Module] = None) -> None:
    """Swap classes in place and add the merge modules; ``pre`` (pre_encoder form) groups patches before block 0."""
    model._vm_state = state
    mixin = MergeModelMixin if pre is None else PreMergeModelMixin
    model.__class__ = mixed_class(mixin, type(model))
    if pre is not None:
        model.vwt_merge = pre
    step = SlowFastSplit if state.slow_fast else TokenMerge
    for blk, r in zip(model.blocks, rs):
        blk.__class__ = mixed_class(MergeBlockMixin, type(blk))
        blk._vm_state = state
        blk.token_merge = step(state, r)


@contextlib.contextmanager
def _state_flag(model: nn.Module, flag: str, on: bool):
    """Set ``model._vm_state.<flag>`` meanwhile (nothing for an unpatched model or ``on=False``)."""
    state = getattr(model, "_vm_state", None)
    if state is None or not on:
        yield
        return
    was = getattr(state, flag)
    setattr(state, flag, True)
    try:
        yield
    finally:
        setattr(state, flag, was)


def recording(model: nn.Module, on: bool = True):
    """Let ``model``'s merge steps collect their assignments (``model._vm_state.decisions``, one
    [B, N] int64 tensor per step that merges, in order) for the forwards run meanwhile."""
    return _state_flag(model, "record_decisions", on)


@contextlib.contextmanager
def forcing(model: nn.Module, decisions: List[Any]):
    """Run ``model``'s merge steps on the given assignments (one [B, N] per merging step, in order, as
    :func:`recording` collects them or a debug export outputs them) instead of their own decisions, for the
    forwards run meanwhile: the model's arithmetic on another implementation's choices."""
    state = getattr(model, "_vm_state", None)
    if state is None:
        raise RuntimeError("the model is not patched: it has no merge decisions to force")
    was = state.forced
    state.forced = [torch.as_tensor(d) for d in decisions]
    try:
        yield
    finally:
        state.forced = was


def scatter_free(model: nn.Module, on: bool = True):
    """Let ``model``'s merge steps add merged rows with a one-hot MatMul (no ScatterND) meanwhile."""
    return _state_flag(model, "scatter_free", on)


@torch.no_grad()
def run_with_decisions(model: nn.Module, images: torch.Tensor):
    """(logits as float32, [assignment per merging step]) of one forward; images are cast to the model's dtype."""
    dtype = next((p.dtype for p in model.blocks.parameters()), torch.float32)
    with recording(model):
        logits = model(images.to(dtype)).float()
        state = getattr(model, "_vm_state", None)
        return logits, list(state.decisions or []) if state is not None else []


def merge_steps(model: nn.Module) -> List[nn.Module]:
    """Every module of a patched model that removes tokens, each with an int ``.r`` (0 = off): the
    pre-encoder ``vwt_merge`` when there is one, then every ``blocks.N.token_merge``."""
    pre = model._modules.get("vwt_merge")
    steps = [pre] if pre is not None else []
    return steps + [b.token_merge for b in getattr(model, "blocks", []) if "token_merge" in b._modules]


def unpatch_vit(model: nn.Module) -> None:
    model.__class__ = original_class(type(model), MergeModelMixin)
    model._modules.pop("vwt_merge", None)
    for blk in model.blocks:
        blk.__class__ = original_class(type(blk), MergeBlockMixin)
        blk.__dict__.pop("_vm_state", None)
        blk._modules.pop("token_merge", None)
    for a in ("_vm_state", "vitmerge"):
        model.__dict__.pop(a, None)
