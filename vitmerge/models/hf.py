"""In-place patch of Hugging Face transformers classifiers (ViT, DeiT, VideoMAE, AST) and the YOLOS detector.

The same merge as the timm adapter (:mod:`.vit`), on the transformers modules::

    x = x + attention(layernorm_before(x), prop-attn bias = log(size))   # metric = keys averaged over heads
    x, size = plan(method, metric, r).merge(x, size)                     # static N -> N - r
    x = x + mlp(layernorm_after(x))

It reuses the timm adapter's :class:`~.vit.MergeState`, :class:`~.vit.TokenMerge` (so every merge
step is the module ``...layer(s).N.token_merge`` in exported graphs) and class swapping (the layer's
own class gets a mixin: parameters and state-dict keys stay the same, :func:`unpatch` restores it).

What is kept from transformers: the model's own modules (projections, layer norms, dropouts, heads),
the attention implementation it was loaded with (``eager``: explicit softmax; anything else: PyTorch's
fused SDPA, as transformers' ``sdpa`` does; exported graphs always take the explicit form), and the
pooling of each head: ViT's class token, DeiT's class + distillation tokens and AST's two prefix tokens
are protected (never merged, pooled as before). VideoMAE has no class token: with mean pooling its
merged tokens are averaged weighted by their size (as ToMe's video models do), so the pooled vector
still averages every original patch; without mean pooling it reads token 0, which is then protected.
Merging is spatiotemporal for video: a VideoMAE token is one tubelet, and any two may merge.

YOLOS (``YolosForObjectDetection``): the class token and all ``num_detection_tokens`` [DET] tokens are
protected. transformers appends the [DET] tokens at the end of the sequence, and merging protects a
prefix, so while any layer merges, layer 0 moves them right after the class token and the last layer
moves them back (the heads read the last tokens as before; with r = 0 nothing moves). Its mid position
embeddings (``use_mid_position_embeddings``: added after every layer but the last) reach a merged token as
the size-weighted average of its members' embeddings, from the position map (``MergeState.positions``).
Outputs: ``logits`` and ``boxes`` (its ``pred_boxes``). It runs at its config's ``image_size``.

What differs between these model types (tokens the embeddings add, protected tokens, shapes, pooling,
outputs, input-size overrides) is data, one record per ``model_type`` in :mod:`.hf_table`; the functions
here read the record and test no model type by name. Loading a save_pretrained folder is :mod:`.hf_load`
(:func:`load_pretrained` and the folder readers are re-exported here).

transformers is imported only where a model is loaded (:func:`load_pretrained`); this module reads
models by duck typing, so importing it costs nothing. Supported: transformers 5.x (the layer layouts
of 5.0 to 5.23, ``encoder.layer`` with query/key/value or ``layers`` with q_proj/k_proj/v_proj).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..metadata import OUTPUT_NAME
from ..merging import batch_scatter_add
from . import hf_table
from ._numerics import _exporting, _f32
from .hf_load import (MIN_TRANSFORMERS, WEIGHT_FILES, _quiet_transformers, _too_old, is_pretrained_folder,  # noqa: F401
                      load_pretrained, preprocessor_config, read_config)
from .hf_table import SUPPORTED, TYPES, HFType, ast_grid  # noqa: F401
from .vit import MergeState, TokenMerge, biased_logits, class_attention, mixed_class, original_class

#: config.json model_type -> the classifier classes vitmerge patches, and what the input is (read off the table)
MODELS: Dict[str, Tuple[Tuple[str, ...], str]] = {t: (k.classes, k.modality) for t, k in TYPES.items()}

#: model types whose output holds more than the logits (YOLOS: pred_boxes)
DETECTORS = tuple(t for t, k in TYPES.items() if k.extra_outputs)


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (read from its classes; transformers is not imported)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _class_name(model: nn.Module) -> str:
    return original_class(type(model), HFMergeModelMixin).__name__


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def hf_type(model: nn.Module) -> HFType:
    """The table record of ``model``'s model_type (:data:`.hf_table.UNKNOWN` for others)."""
    return hf_table.hf_type(model_type(model))


def modality(model: nn.Module) -> str:
    """"image", "video" or "audio"."""
    return hf_type(model).modality


# --------------------------------------------------------------------------------------------
# Structure: layers, prefix tokens, shapes (read off the model type's record)
# --------------------------------------------------------------------------------------------


def layers(model: nn.Module) -> List[nn.Module]:
    """The transformer layers in order (``base.layers`` in recent transformers, ``base.encoder.layer`` before)."""
    base = model.base_model
    seq = getattr(base, "layers", None)
    if seq is None:
        seq = getattr(getattr(base, "encoder", None), "layer", None)
    if seq is None:
        raise UnsupportedModelError(f"{_class_name(model)} has no encoder layers where vitmerge looks "
                                    "(base_model.layers or base_model.encoder.layer)")
    return list(seq)


def prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches that never merge: class (ViT), class + distillation (DeiT, AST), class +
    [DET] (YOLOS); VideoMAE: none with mean pooling, else token 0 (which the head reads)."""
    return hf_type(model).protected(model.config)


def detection_tokens(model: nn.Module) -> int:
    """YOLOS's [DET] tokens (transformers appends them at the END of the sequence); 0 for other models."""
    return hf_type(model).detection_tokens(model.config)


def has_class_token(model: nn.Module) -> bool:
    return hf_type(model).class_token


def input_shape(model: nn.Module) -> tuple:
    """One input sample: (C, H, W) image, (T, C, H, W) video, (time frames, mel bins) audio."""
    return hf_type(model).input_shape(model.config)


def num_tokens(model: nn.Module) -> int:
    """Tokens entering the first layer."""
    return hf_table.num_tokens(hf_type(model), model.config)


def num_classes(model: nn.Module) -> int:
    return int(model.config.num_labels)


# --------------------------------------------------------------------------------------------
# The two layer layouts of transformers 5.x
# --------------------------------------------------------------------------------------------


@dataclass
class _Attn:
    """The pieces of one layer's self-attention, whichever layout the layer has."""

    q: Callable[[torch.Tensor], torch.Tensor]
    k: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor], torch.Tensor]  # output projection (+ its dropout)
    linears: List[nn.Linear]  # q, k, v, output projection (FLOP model)
    heads: int
    head_dim: int
    scale: float
    dropout: float
    impl: str  # the attention implementation the model was loaded with


def _impl(module: nn.Module) -> str:
    cfg = getattr(module, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def attention_parts(layer: nn.Module) -> _Attn:
    att = layer.attention
    if all(hasattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):  # ViT/DeiT/AST, recent 5.x
        return _Attn(q=att.q_proj, k=att.k_proj, v=att.v_proj, out=att.o_proj,
                     linears=[att.q_proj, att.k_proj, att.v_proj, att.o_proj], heads=int(att.num_attention_heads),
                     head_dim=int(att.head_dim), scale=float(att.scaling), dropout=float(att.attention_dropout),
                     impl=_impl(att))
    sa, so = getattr(att, "attention", None), getattr(att, "output", None)
    if sa is None or so is None or not all(hasattr(sa, n) for n in ("query", "key", "value")):
        raise UnsupportedModelError(f"{type(layer).__name__}: unknown attention layout (expected q_proj/k_proj/v_proj/"
                                    "o_proj or attention.query/key/value + output.dense)")
    hd = int(getattr(sa, "attention_head_size", 0) or getattr(sa, "head_dim"))
    q_bias, v_bias = getattr(sa, "q_bias", None), getattr(sa, "v_bias", None)
    if q_bias is not None or v_bias is not None:  # VideoMAE in early 5.x: separate q/v biases, no k bias
        q = lambda h: F.linear(h, sa.query.weight, q_bias)  # noqa: E731
        k = lambda h: F.linear(h, sa.key.weight, None)  # noqa: E731
        v = lambda h: F.linear(h, sa.value.weight, v_bias)  # noqa: E731
    else:
        q, k, v = sa.query, sa.key, sa.value
    out = lambda c: so.dropout(so.dense(c))  # noqa: E731
    return _Attn(q=q, k=k, v=v, out=out, linears=[sa.query, sa.key, sa.value, so.dense],
                 heads=int(sa.num_attention_heads), head_dim=hd, scale=float(getattr(sa, "scaling", hd ** -0.5)),
                 dropout=float(getattr(sa, "dropout_prob", 0.0) or 0.0), impl=_impl(sa))


def _after_attention(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the layer does to the attention output before the residual add (the q_proj layout's dropout)."""
    return layer.dropout if hasattr(layer.attention, "o_proj") and hasattr(layer, "dropout") else (lambda t: t)


def mlp_half(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + MLP(layernorm_after(x)), in the layer's own layout."""
    h = layer.layernorm_after(x)
    if hasattr(layer, "mlp"):
        return x + layer.dropout(layer.mlp(h))
    return layer.output(layer.intermediate(h), x)  # dense, dropout, + residual


def mlp_linears(layer: nn.Module) -> List[nn.Linear]:
    mods = [layer.mlp] if hasattr(layer, "mlp") else [layer.intermediate, layer.output]
    return [m for mod in mods for m in mod.modules() if isinstance(m, nn.Linear)]


def _layout_problem(layer: nn.Module) -> Optional[str]:
    try:
        attention_parts(layer)
    except (UnsupportedModelError, AttributeError) as e:
        return str(e)
    if not (hasattr(layer, "layernorm_before") and hasattr(layer, "layernorm_after")):
        return f"{type(layer).__name__} has no layernorm_before/layernorm_after"
    if not (hasattr(layer, "mlp") or (hasattr(layer, "intermediate") and hasattr(layer, "output"))):
        return f"{type(layer).__name__} has neither mlp nor intermediate/output"
    return None


def attention_with_metric(layer: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor], need_cls: bool = False):
    """The layer's self-attention with the proportional-attention bias; returns (out, keys averaged over
    heads[, class-token attention row]). ``out`` is what the layer adds to its residual stream."""
    a = attention_parts(layer)
    B, N, _ = x.shape
    shape = (B, N, a.heads, a.head_dim)
    q = a.q(x).view(shape).transpose(1, 2)  # [B, H, N, hd]
    k = a.k(x).view(shape).transpose(1, 2)
    v = a.v(x).view(shape).transpose(1, 2)
    bias = None if size is None else size.log()[:, None, None, :, 0]  # [B, 1, 1, N], float32 (sizes stay float32)
    att_bias = None if bias is None else bias.to(q.dtype)  # the attention itself runs in the model's dtype
    p = a.dropout if layer.training else 0.0
    if a.impl != "eager" and not _exporting():  # transformers' sdpa (and other fused kernels): PyTorch's SDPA
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=att_bias, dropout_p=p, scale=a.scale)
    else:  # eager, and every exported graph (the explicit form exports to plain MatMul / Softmax)
        if att_bias is None or not _exporting():
            logits = torch.matmul(q, k.transpose(2, 3)) * a.scale  # as transformers' eager
            if att_bias is not None:
                logits = logits + att_bias
        else:  # exported: the bias folded into the product, one [N, N] buffer (vit.biased_logits)
            logits = biased_logits(q, k, a.scale, att_bias)
        if logits.dtype in (torch.float16, torch.bfloat16):
            w = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # as transformers' eager
        else:
            w = logits.softmax(dim=-1)
        ctx = torch.matmul(F.dropout(w, p=p, training=layer.training), v)
    ctx = ctx.transpose(1, 2).reshape(B, N, a.heads * a.head_dim)
    out = _after_attention(layer)(a.out(ctx))
    if need_cls:
        return out, k.mean(1), class_attention(q, k, a.scale, bias)
    return out, k.mean(1)


# --------------------------------------------------------------------------------------------
# Mixins (class swapping, as in vit.py)
# --------------------------------------------------------------------------------------------


class HFMergeLayerMixin:
    """Mixed into the transformers layer class: attention, merge, MLP (YOLOS while merging: the first layer
    moves the [DET] tokens from the end to after the class token, the last layer moves them back; the
    hidden states between layers are in that order).

    The ``attention_mask`` a layer receives is the one transformers builds from the user's mask; the
    model-level mixin refuses a user mask, so what arrives here is the all-attend mask (transformers
    materialises it while exporting) and is not needed: merged sequences have no padding.
    """

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):  # noqa: D401 - transformers signature
        st = self._vm_state
        tm = self.token_merge
        x = hidden_states
        tail_in = self.__dict__.get("_vm_tail_in", 0)
        if tail_in:  # YOLOS: [cls, patches, det] -> [cls, det, patches], so the protected tokens lead
            x = torch.cat([x[:, :1], x[:, -tail_in:], x[:, 1:-tail_in]], dim=1)
        merging = tm.r > 0
        size = st.size if st.prop_attn else None
        if st.need_cls and merging:
            out, metric, cls = attention_with_metric(self, self.layernorm_before(x), size, need_cls=True)
        else:
            out, metric = attention_with_metric(self, self.layernorm_before(x), size)
            cls = None
        x = x + out
        if merging:
            x, st.size = tm(x, metric, st.size, cls)
        x = mlp_half(self, x)
        tail_out = self.__dict__.get("_vm_tail_out", 0)
        if tail_out:  # back to transformers' order: the head reads the last tokens
            x = torch.cat([x[:, :1], x[:, 1 + tail_out:], x[:, 1:1 + tail_out]], dim=1)
        return x


class HFMergeModelMixin:
    """Mixed into the classifier class: resets the merge state at every forward."""

    def forward(self, *args, **kwargs):
        _no_user_mask(self, args, kwargs)
        self._vm_state.reset()
        return super().forward(*args, **kwargs)


def _no_user_mask(model: nn.Module, args, kwargs) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        import inspect

        names = list(inspect.signature(original_class(type(model), _model_mixin(model)).forward).parameters)[1:]
        mask = dict(zip(names, args)).get("attention_mask")
    if mask is not None:
        raise ValueError("token merging cannot be combined with an attention mask: merged tokens have no padding "
                         "positions (remove the merge with vitmerge.remove to use one)")


class HFVideoMAEMixin(HFMergeModelMixin):
    """VideoMAE with mean pooling: the merged tokens are averaged weighted by their size (ToMe's video
    models do the same), so the pooled vector is still the mean over every original tubelet."""

    def forward(self, pixel_values=None, labels=None, **kwargs):
        _no_user_mask(self, (), kwargs)
        st = self._vm_state
        st.reset()
        if self.fc_norm is None:
            return super(HFMergeModelMixin, self).forward(pixel_values, labels=labels, **kwargs)
        seq = self.videomae(pixel_values, **kwargs).last_hidden_state
        if st.size is None:
            pooled = seq.mean(1)
        else:
            # sizes are (at least) float32, they reach the hundreds: average in at least float32, back to the model's dtype
            pooled = ((_f32(seq) * st.size).sum(1) / st.size.sum(1)).to(seq.dtype)
        logits = self.classifier(self.fc_norm(pooled))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return _classifier_output(logits, loss)


class HFYolosEncoderMixin:
    """YOLOS's encoder loop with its mid position embeddings (added after every layer but the last) on
    merged tokens: a merged token gets the size-weighted average of its members' embeddings (what it
    would hold had the embedding been added before the merge: the merge is a weighted average), read
    off the position map (``MergeState.positions``). Without merging they are added as transformers does."""

    def forward(self, hidden_states, height, width, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput  # only reached with transformers loaded

        st = self._vm_state
        mid = self.interpolation((height, width)) if self.config.use_mid_position_embeddings else None
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            hidden_states = layer(hidden_states)
            if mid is not None and i < last:
                hidden_states = hidden_states + _merged_positions(mid[i], st, self._vm_tail).to(hidden_states.dtype)
        return BaseModelOutput(last_hidden_state=hidden_states)


def _merged_positions(pe: torch.Tensor, st: MergeState, tail: int) -> torch.Tensor:
    """pe [1, N0, D] (transformers' order) as the current tokens hold it: [1 or B, n, D]."""
    if tail:
        pe = torch.cat([pe[:, :1], pe[:, -tail:], pe[:, 1:-tail]], dim=1)
    if st.positions is None:
        return pe
    B, n = st.positions.shape[0], st.size.shape[1]
    pe32 = pe.to(st.size.dtype).expand(B, -1, -1)
    summed = batch_scatter_add(pe32.new_zeros(B, n, pe.shape[-1]), st.positions, pe32, scatter_free=st.scatter_free)
    return summed / st.size


def _classifier_output(logits, loss):
    from transformers.modeling_outputs import ImageClassifierOutput  # only reached with transformers loaded

    return ImageClassifierOutput(loss=loss, logits=logits)


def _model_mixin(model: nn.Module) -> type:
    return HFVideoMAEMixin if hf_type(model).pooling == "mean" else HFMergeModelMixin


def _transformers_version() -> Optional[str]:
    """The version of transformers when it is imported (a model of it exists), else None."""
    import sys

    return getattr(sys.modules.get("transformers"), "__version__", None)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    t = model_type(model)
    name = _class_name(model)
    if t not in TYPES:
        return f"{name} (model_type {t!r}) is not a supported transformers model"
    if name not in TYPES[t].classes:
        return f"{name} is not one of the supported {t} classes ({', '.join(TYPES[t].classes)})"
    version = _transformers_version()
    if _too_old(version):
        return f"transformers {version} is installed; vitmerge patches transformers >= {MIN_TRANSFORMERS} models"
    try:
        ls = layers(model)
    except UnsupportedModelError as e:
        return str(e)
    for i, layer in enumerate(ls):
        problem = _layout_problem(layer)
        if problem:
            return f"layer {i}: {problem}"
    return None


def patch(model: nn.Module, state: MergeState, rs: List[int]) -> None:
    model._vm_state = state
    model.__class__ = mixed_class(_model_mixin(model), original_class(type(model), _model_mixin(model)))
    ls = layers(model)
    # YOLOS: its [DET] tokens (at the end) lead the protected prefix while any layer merges
    tail = detection_tokens(model) if any(int(r) > 0 for r in rs) else 0
    for i, (layer, r) in enumerate(zip(ls, rs)):
        layer.__class__ = mixed_class(HFMergeLayerMixin, type(layer))
        layer._vm_state = state
        layer.token_merge = TokenMerge(state, r)
        layer._vm_tail_in = tail if i == 0 else 0
        layer._vm_tail_out = tail if i == len(ls) - 1 else 0
    if hf_type(model).mid_positions:  # YOLOS: the mid position embeddings reach merged tokens
        enc = model.base_model.encoder
        enc.__class__ = mixed_class(HFYolosEncoderMixin, original_class(type(enc), HFYolosEncoderMixin))
        enc._vm_state = state
        enc._vm_tail = tail
        state.track_positions = bool(model.config.use_mid_position_embeddings)


def unpatch(model: nn.Module) -> None:
    model.__class__ = original_class(type(model), _model_mixin(model))
    for layer in layers(model):
        layer.__class__ = original_class(type(layer), HFMergeLayerMixin)
        for a in ("_vm_state", "_vm_tail_in", "_vm_tail_out"):
            layer.__dict__.pop(a, None)
        layer._modules.pop("token_merge", None)
    enc = getattr(model.base_model, "encoder", None)
    if enc is not None:
        enc.__class__ = original_class(type(enc), HFYolosEncoderMixin)
        for a in ("_vm_state", "_vm_tail"):
            enc.__dict__.pop(a, None)
    for a in ("_vm_state", "vitmerge"):
        model.__dict__.pop(a, None)


def merge_steps(model: nn.Module) -> List[nn.Module]:
    return [layer.token_merge for layer in layers(model) if "token_merge" in layer._modules]


def flops_parts(model: nn.Module) -> Tuple[int, List[Tuple[int, int, int, int]]]:
    """(FLOPs outside the layers per sample, (attn_linear, attn_dim, mlp_linear, metric_dim) per layer):
    the patch embedding's convolution and every linear outside the layers (the heads)."""
    base = model.base_model
    pe = base.embeddings.patch_embeddings.projection
    n_patches = hf_table.patches(hf_type(model), model.config)
    kernel = math.prod(int(k) for k in pe.kernel_size)
    fixed = 2 * n_patches * pe.in_channels * kernel * pe.out_channels // pe.groups
    inside = {id(m) for layer in layers(model) for m in layer.modules()}
    per_token = max(1, detection_tokens(model))  # YOLOS's heads run on each [DET] token
    fixed += per_token * sum(2 * m.in_features * m.out_features for m in model.modules()
                             if isinstance(m, nn.Linear) and id(m) not in inside)
    out = []
    for layer in layers(model):
        a = attention_parts(layer)
        attn_linear = sum(2 * m.in_features * m.out_features for m in a.linears)
        mlp = sum(2 * m.in_features * m.out_features for m in mlp_linears(layer))
        out.append((attn_linear, a.heads * a.head_dim, mlp, a.head_dim))
    return fixed, out


@contextlib.contextmanager
def explicit_attention(model: nn.Module):
    """Run the attention in its explicit matmul form (FLOP counting sees every product), then restore."""
    cfgs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    saved = {k: c._attn_implementation for k, c in cfgs.items()}
    try:
        for c in cfgs.values():
            _set_impl(c, "eager")
        yield
    finally:
        for k, c in cfgs.items():
            _set_impl(c, saved[k])


def _set_impl(config, impl: str) -> None:
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = impl
    else:  # pragma: no cover - other transformers versions
        config._attn_implementation = impl


def logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def output_names(model: nn.Module) -> Tuple[str, ...]:
    """Graph outputs: ``logits``; detectors (YOLOS) also ``boxes`` (their ``pred_boxes``)."""
    return (OUTPUT_NAME,) + tuple(name for name, _ in hf_type(model).extra_outputs)


def outputs(model: nn.Module, output) -> Tuple[torch.Tensor, ...]:
    """``model``'s output as the tensors :func:`output_names` names, in their order."""
    return (logits(output),) + tuple(getattr(output, attr) for _, attr in hf_type(model).extra_outputs)


__all__ = ["MODELS", "DETECTORS", "SUPPORTED", "is_hf", "model_type", "hf_type", "modality", "layers",
           "prefix_tokens", "has_class_token", "input_shape", "num_tokens", "num_classes", "attention_with_metric",
           "unsupported_reason", "patch", "unpatch", "merge_steps", "flops_parts", "explicit_attention", "logits",
           "output_names", "outputs", "is_pretrained_folder", "read_config", "load_pretrained", "preprocessor_config",
           "ast_grid"]
