"""``apply(model, method, r, prop_attn)``: patch a timm ViT or a transformers classifier in place;
``remove`` undoes it.

What the method needs (block form, class-attention row, options) comes from its
:class:`~vitmerge.merging.MethodSpec` in the registry, never from the method's name; what the model
is made of comes from its adapter family (:func:`vitmerge.models.family.family`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torch import nn

from ..errors import ScheduleError, UnsupportedModelError
from ..merging import available_methods, method_spec, vwt
from ..merging.schedule import RSpec, parse_r, token_counts
from .family import family, supported
from .mobilevit import unsupported_reason as mobilevit_reason
from .shapes import depth, num_tokens, prefix_tokens
from .vit import MergeState, VWTMerge
from .vocabulary import Vocabulary, check_vocabulary, load_vocabulary

log = logging.getLogger(__name__)

SUPPORTED = supported()


@dataclass
class MergeInfo:
    """What ``apply`` did: attached to the model as ``model.vitmerge``."""

    method: str
    r: List[int]  # requested r per block
    prop_attn: bool
    protected: int
    tokens: List[tuple]  # (in, removed, out) per block: the static schedule
    options: Dict[str, Any]
    # Patches grouped once before block 0 (vwt); tokens[0][0] already counts them out.
    pre_r: int = 0
    # evo: the block keeps all its tokens; "removed" counts those that skip it (fast path).
    slow_fast: bool = False

    @property
    def tokens_in(self) -> List[int]:
        return [t[0] for t in self.tokens]

    @property
    def tokens_out(self) -> List[int]:
        return [t[2] for t in self.tokens]


def apply(
    model: nn.Module,
    method: str = "tome",
    r: RSpec = 16,
    prop_attn: bool = True,
    trace_source: bool = False,
    **options,
) -> nn.Module:
    """Patch ``model`` in place to merge tokens between attention and MLP in every block.

    r: an int (same for every block), a list with one count per block, or ``(r, inflection)`` for
    ToMe's inflection schedule. ``r=0`` leaves the outputs exactly those of the unpatched model.
    Returns the same model, with ``model.vitmerge`` describing the static token schedule.
    """
    fam = family(model)
    reason = mobilevit_reason(model) or fam.unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(f"cannot merge tokens in this model: {reason}. Supported: {SUPPORTED}.")
    ms = method_spec(method)
    ms.check_options(**options)  # bad option names and values fail here, not at the first forward
    if ms.form not in fam.forms:
        takes = [m for m in available_methods() if method_spec(m).form in fam.forms]
        raise UnsupportedModelError(
            f"method {method!r} ({ms.form} form) is implemented for timm ViTs only; {fam.name} models take the "
            f"methods that merge inside a block: {', '.join(takes)}"
        )
    if ms.form == "pre_encoder":
        return _apply_pre_encoder(model, method, r, prop_attn, trace_source, options)
    if ms.needs_cls_attn:
        _check_class_token(model, method)
    if ms.form == "slow_fast":
        return _apply_slow_fast(model, method, r, prop_attn, trace_source, options)
    rs = parse_r(depth(model), r)
    protected = prefix_tokens(model)
    n0 = num_tokens(model)
    tokens = token_counts(n0, rs, protected, ms.clamp_r)
    # Later layers clamp r to what is left (as the reference ToMe does), but an r that the very
    # first merge cannot honour is a mistake in the request, not a schedule detail.
    first = next((i for i, v in enumerate(rs) if v > 0), None)
    if first is not None and rs[first] > tokens[first][1]:
        cap = tokens[first][1]
        raise ScheduleError(
            f"r={rs[first]} is too large: block {first} sees {tokens[first][0]} tokens ({protected} protected) and "
            f"one {method} step can remove at most {cap} of them; use r <= {cap}"
        )
    state = MergeState(method=method, prop_attn=prop_attn, protected=protected, options=dict(options),
                       trace_source=trace_source, need_cls=ms.needs_cls_attn)
    _install(model, state, rs)
    model.vitmerge = MergeInfo(method=method, r=rs, prop_attn=prop_attn, protected=protected,
                               tokens=tokens, options=dict(options))
    log.info("%s: r per block %s, tokens %d -> %d (%d protected)", method, rs, n0, tokens[-1][2] if tokens else n0,
             protected)
    return model


def _install(model: nn.Module, state: MergeState, rs, pre: Optional[nn.Module] = None) -> None:
    """Patch after every check passed; re-applying replaces the previous merge instead of stacking on
    it (and a request that fails its checks leaves the model as it was)."""
    fam = family(model)
    if getattr(model, "_vm_state", None) is not None:
        fam.unpatch(model)
    fam.patch(model, state, rs, pre=pre)


def _check_class_token(model: nn.Module, method: str) -> None:
    if not family(model).has_class_token(model):
        pool = getattr(model, "global_pool", None)
        what = f"class_token=False, global_pool={pool!r}" if pool is not None else f"{type(model).__name__} pools its tokens"
        raise UnsupportedModelError(
            f"method {method!r} ranks tokens by the class token's attention, and this model has no class token "
            f"({what}); use method='tome' or 'hash' for it"
        )


def _too_large(method: str, block: int, asked: int, n_in: int, protected: int, cap: int) -> ScheduleError:
    return ScheduleError(
        f"r={asked} is too large: block {block} sees {n_in} tokens ({protected} protected) and "
        f"one {method} step can remove at most {cap} of them; use r <= {cap}"
    )


def _apply_slow_fast(model, method, r, prop_attn, trace_source, options) -> nn.Module:
    """evo: every block keeps N tokens; r = tokens that skip the block (fast path) next to the one
    representative that runs it. Block 0 always runs in full: the choice needs the class attention
    of an earlier block (the reference code also keeps its first blocks full)."""
    ms = method_spec(method)
    tradeoff = options.get("tradeoff", ms.options["tradeoff"])  # validated by the spec
    rs = parse_r(depth(model), r)
    protected = prefix_tokens(model)
    n0 = num_tokens(model)
    cap = ms.max_r(n0, protected)
    for i, v in enumerate(rs):
        if i > 0 and v > cap:
            raise _too_large(method, i, v, n0, protected, cap)
    removed = [0] + [ms.clamp_r(n0, v, protected) for v in rs[1:]]
    tokens = [(n0, e, n0) for e in removed]
    state = MergeState(method=method, prop_attn=prop_attn, protected=protected, options={},
                       trace_source=trace_source, need_cls=True, slow_fast=True, tradeoff=float(tradeoff))
    _install(model, state, rs)
    model.vitmerge = MergeInfo(method=method, r=rs, prop_attn=prop_attn, protected=protected, tokens=tokens,
                               options={"tradeoff": float(tradeoff)}, slow_fast=True)
    return model


def _apply_pre_encoder(model, method, r, prop_attn, trace_source, options) -> nn.Module:
    """vwt: one grouping of the patch tokens before block 0; r = patches removed there (one int)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise ScheduleError(
            f"method {method!r} groups patches once, before the encoder: give one int r (patches removed), not {r!r}"
        )
    if r < 0:
        raise ScheduleError(f"r must be >= 0, got {r}")
    opts = {**method_spec(method).options, **options}  # names and values validated by the spec
    mode, vocab, space, thresh = opts["mode"], opts["vocab"], opts["space"], opts["thresh"]
    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    patch = tuple(int(v) for v in pe.patch_size)
    if (getattr(model, "dynamic_img_size", False) or not isinstance(proj, nn.Conv2d)
            or tuple(proj.kernel_size) != patch or tuple(proj.stride) != patch or not getattr(pe, "flatten", True)):
        raise UnsupportedModelError(
            f"method {method!r} needs a plain patch embedding (one Conv2d with stride = kernel = patch size, fixed "
            "image size); this model's patch_embed is different"
        )
    protected = int(model.num_prefix_tokens)
    n0 = num_tokens(model)
    n_patches = n0 - protected
    cap = vwt.max_r(n0, protected)
    if r > cap:
        raise ScheduleError(
            f"r={r} is too large: the image has {n_patches} patches and vwt keeps at least one; use r <= {cap}"
        )
    centroids = None
    if mode == "inter":
        if vocab is None:
            raise ScheduleError(
                "vwt mode inter needs a vocabulary of visual words: build one with "
                "`vitmerge vocab build DATA_DIR -o vocab.pt --model NAME` and give it with -O vocab=vocab.pt "
                "(in Python: vitmerge.apply(model, 'vwt', r, vocab='vocab.pt')), or use -O mode=intra, which needs none"
            )
        voc = vocab if isinstance(vocab, Vocabulary) else load_vocabulary(vocab)
        check_vocabulary(model, voc, space)
        space = voc.space
        centroids = voc.centroids.clone()
    else:
        space = space or "pixels"
    vwt.quant_levels(n_patches)  # fails early for images with more patches than the exact ranks allow
    n = n0 - r
    rs = [0] * len(model.blocks)
    tokens = [(n, 0, n) for _ in rs]
    state = MergeState(method=method, prop_attn=prop_attn, protected=protected, options={},
                       trace_source=trace_source)
    pre = VWTMerge(state, r, mode=mode, space=space, patch_size=patch, centroids=centroids,
                   thresh=None if thresh is None else float(thresh))
    _install(model, state, rs, pre=pre)
    info_opts = {"mode": mode, "space": space}
    if mode == "inter":
        info_opts.update(words=int(centroids.shape[0]), vocab=str(vocab) if not isinstance(vocab, Vocabulary) else "<in memory>")
    if thresh is not None:
        info_opts["thresh"] = float(thresh)
    model.vitmerge = MergeInfo(method=method, r=rs, prop_attn=prop_attn, protected=protected, tokens=tokens,
                               options=info_opts, pre_r=r)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is the plain timm / transformers model again."""
    family(model).unpatch(model)
    return model


def last_source(model: nn.Module):
    """With ``trace_source=True``: [B, N_final, N_0] 0/1 map of original tokens per final token."""
    return model._vm_state.source


__all__ = ["apply", "remove", "MergeInfo", "SUPPORTED", "last_source"]
