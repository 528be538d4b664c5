"""``apply(model, method, r, prop_attn)``: patch a timm ViT or a transformers classifier in place;
``remove`` undoes it.

What the method needs (block form, class-attention row, options, set-up) comes from its
:class:`~vitmerge.merging.MethodSpec` in the registry, never from the method's name: one set-up
function per *form* here, and the method's own ``setup`` hook for what only it knows. What the model
is made of comes from its adapter family (:func:`vitmerge.models.family.family`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torch import nn

from ..errors import ScheduleError, UnsupportedModelError
from ..merging import DEFAULT_METHOD, MethodSpec, SetupContext, available_methods, method_spec
from ..merging.schedule import RSpec, check_r, parse_r, r_too_large, token_counts
from .family import family, supported
from .mobilevit import unsupported_reason as mobilevit_reason
from .shapes import depth, num_tokens, prefix_tokens
from .vit import MergeState, PreEncoderMerge
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
    method: str = DEFAULT_METHOD,
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
    if ms.needs_cls_attn:
        _check_class_token(model, ms)
    return _FORMS[ms.form](model, ms, r, prop_attn, trace_source, options)


def _apply_block(model, ms: MethodSpec, r, prop_attn, trace_source, options) -> nn.Module:
    """A step between attention and MLP of every block: N -> N - r there."""
    rs = parse_r(depth(model), r)
    protected = prefix_tokens(model)
    n0 = num_tokens(model)
    tokens = token_counts(n0, rs, protected, ms.clamp_r)
    # Later layers clamp r to what is left (as the reference ToMe does), but an r that the very
    # first merge cannot honour is a mistake in the request, not a schedule detail.
    first = next((i for i, v in enumerate(rs) if v > 0), None)
    if first is not None and rs[first] > tokens[first][1]:
        raise r_too_large(ms.name, f"block {first}", rs[first], tokens[first][0], protected, tokens[first][1])
    setup = ms.configure(options, _context(model, ms, r, protected, n0))
    state = MergeState(method=ms.name, prop_attn=prop_attn, protected=protected, options=setup.plan_options,
                       trace_source=trace_source, need_cls=ms.needs_cls_attn, step_options=setup.step_options)
    _install(model, state, rs)
    model.vitmerge = MergeInfo(method=ms.name, r=rs, prop_attn=prop_attn, protected=protected,
                               tokens=tokens, options=setup.info)
    log.info("%s: r per block %s, tokens %d -> %d (%d protected)", ms.name, rs, n0, tokens[-1][2] if tokens else n0,
             protected)
    return model


def _install(model: nn.Module, state: MergeState, rs, pre: Optional[nn.Module] = None) -> None:
    """Patch after every check passed; re-applying replaces the previous merge instead of stacking on
    it (and a request that fails its checks leaves the model as it was)."""
    fam = family(model)
    if getattr(model, "_vm_state", None) is not None:
        fam.unpatch(model)
    fam.patch(model, state, rs, pre=pre)


def _check_class_token(model: nn.Module, ms: MethodSpec) -> None:
    fam = family(model)
    if not fam.has_class_token(model):
        pool = getattr(model, "global_pool", None)
        what = f"class_token=False, global_pool={pool!r}" if pool is not None else f"{type(model).__name__} pools its tokens"
        takes = [m for m in available_methods()
                 if not method_spec(m).needs_cls_attn and method_spec(m).form in fam.forms]
        raise UnsupportedModelError(
            f"method {ms.name!r} ranks tokens by the class token's attention, and this model has no class token "
            f"({what}); use method={' or '.join(repr(m) for m in takes)} for it"
        )


def _load_vocabulary(model: nn.Module, value, space: Optional[str] = None) -> Vocabulary:
    voc = value if isinstance(value, Vocabulary) else load_vocabulary(value)
    check_vocabulary(model, voc, space)
    return voc


#: resource kind (``MethodSpec.resources``) -> loader (model, option value, **context) -> the object
RESOURCE_LOADERS = {"vocabulary": _load_vocabulary}


def _context(model: nn.Module, ms: MethodSpec, r, protected: int, n_tokens: int, patch_size=None) -> SetupContext:
    def load(name: str, value, **context):
        kind = ms.resources.get(name)
        return value if kind is None else RESOURCE_LOADERS[kind](model, value, **context)

    return SetupContext(method=ms.name, r=r, protected=protected, n_tokens=n_tokens, patch_size=patch_size, load=load)


def _apply_slow_fast(model, ms: MethodSpec, r, prop_attn, trace_source, options) -> nn.Module:
    """The block keeps N tokens; r = tokens that skip it (fast path) next to the one representative
    that runs it (``ms.spread`` brings them back, ``ms.evolve`` carries the class attention on).
    Block 0 always runs in full: the choice needs the class attention of an earlier block."""
    rs = parse_r(depth(model), r)
    protected = prefix_tokens(model)
    n0 = num_tokens(model)
    cap = ms.max_r(n0, protected)
    for i, v in enumerate(rs):
        if i > 0 and v > cap:
            raise r_too_large(ms.name, f"block {i}", v, n0, protected, cap)
    removed = [0] + [ms.clamp_r(n0, v, protected) for v in rs[1:]]
    tokens = [(n0, e, n0) for e in removed]
    setup = ms.configure(options, _context(model, ms, r, protected, n0))
    state = MergeState(method=ms.name, prop_attn=prop_attn, protected=protected, options=setup.plan_options,
                       trace_source=trace_source, need_cls=True, slow_fast=True, step_options=setup.step_options)
    _install(model, state, rs)
    model.vitmerge = MergeInfo(method=ms.name, r=rs, prop_attn=prop_attn, protected=protected, tokens=tokens,
                               options=setup.info, slow_fast=True)
    return model


def _apply_pre_encoder(model, ms: MethodSpec, r, prop_attn, trace_source, options) -> nn.Module:
    """One grouping of the patch tokens before block 0; r = patches removed there (one int). The
    step sees the images and the patch embeddings, so the patch embedding must cut plain patches."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise ScheduleError(
            f"method {ms.name!r} groups patches once, before the encoder: give one int r (patches removed), not {r!r}"
        )
    check_r(r)
    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    patch = tuple(int(v) for v in pe.patch_size)
    if (getattr(model, "dynamic_img_size", False) or not isinstance(proj, nn.Conv2d)
            or tuple(proj.kernel_size) != patch or tuple(proj.stride) != patch or not getattr(pe, "flatten", True)):
        raise UnsupportedModelError(
            f"method {ms.name!r} needs a plain patch embedding (one Conv2d with stride = kernel = patch size, fixed "
            "image size); this model's patch_embed is different"
        )
    protected = int(model.num_prefix_tokens)
    n0 = num_tokens(model)
    cap = ms.max_r(n0, protected)
    if r > cap:
        raise r_too_large(ms.name, "the step before the encoder", r, n0, protected, cap)
    setup = ms.configure(options, _context(model, ms, r, protected, n0, patch_size=patch))
    n = n0 - r
    rs = [0] * len(model.blocks)
    tokens = [(n, 0, n) for _ in rs]
    state = MergeState(method=ms.name, prop_attn=prop_attn, protected=protected, options=setup.plan_options,
                       trace_source=trace_source)
    pre = PreEncoderMerge(state, r, ms.group, setup.step_options, setup.buffers)
    _install(model, state, rs, pre=pre)
    model.vitmerge = MergeInfo(method=ms.name, r=rs, prop_attn=prop_attn, protected=protected, tokens=tokens,
                               options=setup.info, pre_r=r)
    return model


#: one set-up per block form (``MethodSpec.form``); the method's own part is its ``setup`` hook
_FORMS = {"block": _apply_block, "slow_fast": _apply_slow_fast, "pre_encoder": _apply_pre_encoder}


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is the plain timm / transformers model again."""
    family(model).unpatch(model)
    return model


def last_source(model: nn.Module):
    """With ``trace_source=True``: [B, N_final, N_0] 0/1 map of original tokens per final token."""
    return model._vm_state.source


__all__ = ["apply", "remove", "MergeInfo", "SUPPORTED", "last_source"]
