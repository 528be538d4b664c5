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

transformers is imported only where a model is loaded (:func:`load_pretrained`); this module reads
models by duck typing, so importing it costs nothing. Supported: transformers 5.x (the layer layouts
of 5.0 to 5.23, ``encoder.layer`` with query/key/value or ``layers`` with q_proj/k_proj/v_proj).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ModelNotFoundError, RuntimeMissingError, UnsupportedModelError, UsageError
from ..metadata import BOXES_NAME, OUTPUT_NAME
from ..merging import batch_scatter_add
from .vit import MergeState, TokenMerge, _f32, biased_logits, class_attention, mixed_class, original_class

log = logging.getLogger(__name__)

#: config.json model_type -> the classifier classes vitmerge patches, and what the input is
MODELS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "vit": (("ViTForImageClassification",), "image"),
    "deit": (("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"), "image"),
    "videomae": (("VideoMAEForVideoClassification",), "video"),
    "audio-spectrogram-transformer": (("ASTForAudioClassification",), "audio"),
    "yolos": (("YolosForObjectDetection",), "image"),
}

#: model types whose output holds boxes (pred_boxes) next to the logits
DETECTORS = ("yolos",)

SUPPORTED = (
    "Hugging Face transformers 5.x classifiers and detectors saved with save_pretrained: "
    + ", ".join(f"{c} (model_type {t!r}, {m})" for t, (cs, m) in MODELS.items() for c in cs)
)

MIN_TRANSFORMERS = "5.0"


def _exporting() -> bool:
    return bool(torch.compiler.is_exporting()) or torch.onnx.is_in_onnx_export()


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (read from its classes; transformers is not imported)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _class_name(model: nn.Module) -> str:
    return original_class(type(model), HFMergeModelMixin).__name__


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def modality(model: nn.Module) -> str:
    """"image", "video" or "audio"."""
    return MODELS.get(model_type(model), ((), "image"))[1]


# --------------------------------------------------------------------------------------------
# Structure: layers, prefix tokens, shapes
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
    """Tokens before the patches that never merge: class (ViT), class + distillation (DeiT, AST);
    VideoMAE: none with mean pooling, else token 0 (which the head reads)."""
    t = model_type(model)
    if t == "vit":
        return 1
    if t in ("deit", "audio-spectrogram-transformer"):
        return 2
    if t == "videomae":
        return 0 if model.config.use_mean_pooling else 1
    if t == "yolos":
        return 1 + detection_tokens(model)
    raise UnsupportedModelError(f"unknown prefix tokens for model_type {t!r}")


def detection_tokens(model: nn.Module) -> int:
    """YOLOS's [DET] tokens (transformers appends them at the END of the sequence); 0 for other models."""
    return int(model.config.num_detection_tokens) if model_type(model) == "yolos" else 0


def has_class_token(model: nn.Module) -> bool:
    return model_type(model) != "videomae"


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def ast_grid(config) -> Tuple[int, int]:
    """(frequency, time) patches of an AST config (its patch embedding's output size)."""
    f = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t = (config.max_length - config.patch_size) // config.time_stride + 1
    return int(f), int(t)


def input_shape(model: nn.Module) -> tuple:
    """One input sample: (C, H, W) image, (T, C, H, W) video, (time frames, mel bins) audio."""
    c, t = model.config, model_type(model)
    if t == "videomae":
        h, w = _pair(c.image_size)
        return (int(c.num_frames), int(c.num_channels), h, w)
    if t == "audio-spectrogram-transformer":
        return (int(c.max_length), int(c.num_mel_bins))
    h, w = _pair(c.image_size)
    return (int(c.num_channels), h, w)


def num_tokens(model: nn.Module) -> int:
    """Tokens entering the first layer."""
    c, t = model.config, model_type(model)
    if t == "videomae":
        h, w = _pair(c.image_size)
        ph, pw = _pair(c.patch_size)
        return (int(c.num_frames) // int(c.tubelet_size)) * (h // ph) * (w // pw)
    if t == "audio-spectrogram-transformer":
        f, tt = ast_grid(c)
        return f * tt + 2
    h, w = _pair(c.image_size)
    ph, pw = _pair(c.patch_size)
    return (h // ph) * (w // pw) + prefix_tokens(model)


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
    return HFVideoMAEMixin if model_type(model) == "videomae" else HFMergeModelMixin


def _transformers_version() -> Optional[str]:
    """The version of transformers when it is imported (a model of it exists), else None."""
    import sys

    return getattr(sys.modules.get("transformers"), "__version__", None)


def _too_old(version: Optional[str]) -> bool:
    return version is not None and int(version.split(".")[0]) < int(MIN_TRANSFORMERS.split(".")[0])


def unsupported_reason(model: nn.Module) -> Optional[str]:
    t = model_type(model)
    name = _class_name(model)
    if t not in MODELS:
        return f"{name} (model_type {t!r}) is not a supported transformers model"
    if name not in MODELS[t][0]:
        return f"{name} is not one of the supported {t} classes ({', '.join(MODELS[t][0])})"
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
    if model_type(model) == "yolos":
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
    n_patches = num_tokens(model) - _embedded_prefix(model)
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


def _embedded_prefix(model: nn.Module) -> int:
    """Tokens the embeddings add in front of the patches (VideoMAE: none, even when token 0 is protected)."""
    return 0 if model_type(model) == "videomae" else prefix_tokens(model)


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
    return (OUTPUT_NAME, BOXES_NAME) if model_type(model) in DETECTORS else (OUTPUT_NAME,)


def outputs(model: nn.Module, output) -> Tuple[torch.Tensor, ...]:
    if model_type(model) in DETECTORS:
        return (output.logits, output.pred_boxes)
    return (logits(output),)


# --------------------------------------------------------------------------------------------
# Loading a save_pretrained folder (never the hub)
# --------------------------------------------------------------------------------------------


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_pretrained_folder(path: Union[str, Path]) -> bool:
    """A folder written by transformers' save_pretrained (it holds config.json)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def read_config(folder: Union[str, Path]) -> Dict[str, Any]:
    """config.json of a save_pretrained folder, checked: a clear error for every way it can be wrong."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ModelNotFoundError(f"{str(p)!r} is not a folder: give a timm model name or a folder written by "
                                 "transformers' save_pretrained (config.json + weights)")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{str(p)!r} has no config.json: a transformers model folder is written by "
                                 "model.save_pretrained(FOLDER) (config.json + model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(cfg_path)!r} is not readable JSON ({e}); save the model again with "
                              "save_pretrained") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{str(cfg_path)!r} is not a transformers config (expected a JSON object)")
    t = cfg.get("model_type")
    if t not in MODELS:
        raise UnsupportedModelError(f"{str(p)!r} holds model_type {t!r}, which vitmerge cannot merge. Supported: "
                                    f"{SUPPORTED}")
    arch = cfg.get("architectures") or []
    if arch and not any(a in MODELS[t][0] for a in arch):
        raise UnsupportedModelError(
            f"{str(p)!r} holds {', '.join(arch)}; vitmerge merges the {t} classifiers {', '.join(MODELS[t][0])}. "
            f"Supported: {SUPPORTED}"
        )
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointError(f"{str(p)!r} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                              "save the model with save_pretrained")
    return cfg


def _model_class(cfg: Dict[str, Any]):
    import transformers

    t = cfg["model_type"]
    names = [a for a in (cfg.get("architectures") or []) if a in MODELS[t][0]] or [MODELS[t][0][0]]
    return getattr(transformers, names[0])


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or load reports from transformers on the user's console."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(folder: Union[str, Path], img_size: Optional[int] = None, frames: Optional[int] = None,
                    audio_length: Optional[int] = None) -> nn.Module:
    """A supported classifier from a save_pretrained folder, in eval mode, float32; weights read with
    ``local_files_only`` (nothing is fetched). Input-size overrides: ``img_size`` (ViT, DeiT, VideoMAE),
    ``frames`` (VideoMAE), ``audio_length`` (AST: time frames); learned position embeddings are resampled."""
    p = Path(folder).expanduser()
    cfg = read_config(p)
    t = cfg["model_type"]
    mod = MODELS[t][1]
    _check_sizes(p, t, mod, cfg, img_size, frames, audio_length)
    try:
        import transformers
    except ImportError:
        raise RuntimeMissingError(f"loading a transformers model folder needs transformers >= {MIN_TRANSFORMERS}: "
                                  "pip install 'vitmerge[hf]'") from None
    if _too_old(transformers.__version__):
        raise RuntimeMissingError(f"transformers {transformers.__version__} is installed; vitmerge loads and patches "
                                  f"transformers >= {MIN_TRANSFORMERS} models: pip install 'vitmerge[hf]'")
    cls = _model_class(cfg)
    overrides: Dict[str, Any] = {}
    if t == "videomae":  # sin/cos positions are computed from the config: no weights change
        if frames is not None:
            overrides["num_frames"] = int(frames)
        if img_size is not None:
            overrides["image_size"] = int(img_size)
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(str(p), local_files_only=True, output_loading_info=True,
                                              trust_remote_code=False, **overrides)
        except (OSError, ValueError, RuntimeError, EnvironmentError, KeyError, TypeError) as e:
            raise CheckpointError(f"could not load the weights in {str(p)!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}). Are they complete and saved "
                                  "with save_pretrained?") from None
        except Exception as e:  # safetensors' own errors (corrupt header, truncated file)
            raise CheckpointError(f"could not read the weights in {str(p)!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}). Is the file complete?") from None
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        parts = [f"{len(v)} {k.replace('_', ' ')} ({', '.join(str(x) for x in v[:3])}{', ...' if len(v) > 3 else ''})"
                 for k, v in bad.items()]
        raise CheckpointError(f"the weights in {str(p)!r} do not fit its config.json: {'; '.join(parts)}")
    model = model.float().eval()
    if t in ("vit", "deit") and img_size is not None and _pair(model.config.image_size) != (img_size, img_size):
        model = _resized(model, cls, {"image_size": int(img_size)})
    if t == "audio-spectrogram-transformer" and audio_length is not None and audio_length != model.config.max_length:
        model = _resized(model, cls, {"max_length": int(audio_length)})
    return model


def _check_sizes(p: Path, t: str, mod: str, cfg: Dict[str, Any], img_size, frames, audio_length) -> None:
    where = f"{p.name} ({t}, {mod})"
    if frames is not None and t != "videomae":
        raise UsageError(f"--frames applies to video models (VideoMAE); {where} takes no frames")
    if audio_length is not None and t != "audio-spectrogram-transformer":
        raise UsageError(f"--audio-length applies to audio models (AST); {where} is not one")
    if img_size is not None and t == "yolos":
        raise UsageError(f"--img-size does not apply to {where}: it runs at its config.json image_size "
                         f"{cfg.get('image_size')} (save the model with another image_size to change it)")
    if img_size is not None and t == "audio-spectrogram-transformer":
        raise UsageError(f"--img-size does not apply to {where}: set its length with --audio-length (time frames)")
    for name, v in (("--frames", frames), ("--img-size", img_size), ("--audio-length", audio_length)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    if frames is not None:
        tub = int(cfg.get("tubelet_size", 2))
        if frames % tub:
            raise UsageError(f"--frames {frames} is not a multiple of the tubelet size {tub} of {where}: "
                             f"use {max(tub, frames - frames % tub)} or {frames - frames % tub + tub}")
    if img_size is not None:
        patch = cfg.get("patch_size", 16)
        patch = patch[0] if isinstance(patch, (list, tuple)) else int(patch)
        if img_size % patch:
            raise UsageError(f"--img-size {img_size} is not a multiple of the patch size {patch} of {where}")
    if audio_length is not None:
        need = int(cfg.get("patch_size", 16))
        if audio_length < need:
            raise UsageError(f"--audio-length {audio_length} is shorter than one patch ({need} frames) of {where}")


def _resized(model: nn.Module, cls, changes: Dict[str, Any]) -> nn.Module:
    """The same weights in a model built for another input size: the learned position embedding is
    resampled (bicubic over the patch grid, prefix tokens kept), as timm does for its ViTs."""
    from timm.layers import resample_abs_pos_embed

    old_grid = _grid(model.config)
    cfg = model.config.__class__.from_dict({**model.config.to_dict(), **changes})
    cfg._attn_implementation_internal = model.config._attn_implementation
    with _quiet_transformers():
        new = cls(cfg)
    sd = model.state_dict()
    key = next(k for k in sd if k.endswith("embeddings.position_embeddings"))
    prefix = prefix_tokens(model)
    sd[key] = resample_abs_pos_embed(sd[key], list(_grid(cfg)), list(old_grid), num_prefix_tokens=prefix,
                                     interpolation="bicubic", antialias=True, verbose=False)
    new.load_state_dict(sd, strict=True)
    new.name_or_path = model.name_or_path
    log.info("%s: position embedding resampled from grid %s to %s", type(model).__name__, old_grid, _grid(cfg))
    return new.float().eval()


def _grid(config) -> Tuple[int, int]:
    if config.model_type == "audio-spectrogram-transformer":
        return ast_grid(config)
    h, w = _pair(config.image_size)
    ph, pw = _pair(config.patch_size)
    return h // ph, w // pw


def preprocessor_config(model: nn.Module) -> Dict[str, Any]:
    """The folder's preprocessor_config.json (image mean/std and size, or the audio feature extractor's
    settings), or {} when the model was not loaded from a folder that has one."""
    p = Path(str(getattr(model, "name_or_path", "") or "")) / "preprocessor_config.json"
    try:
        out = json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        out = {}
    return out if isinstance(out, dict) else {}


__all__ = ["MODELS", "SUPPORTED", "is_hf", "model_type", "modality", "layers", "prefix_tokens", "has_class_token",
           "input_shape", "num_tokens", "num_classes", "attention_with_metric", "unsupported_reason", "patch",
           "unpatch", "merge_steps", "flops_parts", "explicit_attention", "logits", "output_names", "outputs", "is_pretrained_folder",
           "read_config", "load_pretrained", "preprocessor_config", "ast_grid"]
