"""Adapters that patch timm models in place: ``apply(model, method, r, prop_attn)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torch import nn

from .. import merging
from ..merging.schedule import RSpec, parse_r, token_counts
from ..errors import ScheduleError, UnsupportedModelError
from .vit import MergeState, patch_vit, unpatch_vit, unsupported_reason

SUPPORTED = (
    "timm VisionTransformer models with standard blocks: vit_* (any size, patch size and image size), "
    "deit_* and deit_*_distilled_*, and other timm models built on VisionTransformer/Block"
)


@dataclass
class MergeInfo:
    """What ``apply`` did: attached to the model as ``model.vitmerge``."""

    method: str
    r: List[int]  # requested r per block
    prop_attn: bool
    protected: int
    tokens: List[tuple]  # (in, removed, out) per block: the static schedule
    options: Dict[str, Any]

    @property
    def tokens_in(self) -> List[int]:
        return [t[0] for t in self.tokens]

    @property
    def tokens_out(self) -> List[int]:
        return [t[2] for t in self.tokens]


def num_tokens(model: nn.Module) -> int:
    """Tokens entering the first block at the model's configured image size."""
    return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)


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
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(f"cannot merge tokens in this model: {reason}. Supported: {SUPPORTED}.")
    if method not in merging.METHODS:
        raise ScheduleError(f"unknown merge method {method!r}; available: {', '.join(merging.available_methods())}")
    rs = parse_r(len(model.blocks), r)
    protected = int(model.num_prefix_tokens)
    n0 = num_tokens(model)
    tokens = token_counts(n0, rs, protected, lambda t, rr, p: merging.effective_r(method, t, rr, p))
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
                       trace_source=trace_source)
    patch_vit(model, state, rs)
    model.vitmerge = MergeInfo(method=method, r=rs, prop_attn=prop_attn, protected=protected,
                               tokens=tokens, options=dict(options))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is the plain timm model again."""
    unpatch_vit(model)
    return model


def last_source(model: nn.Module):
    """With ``trace_source=True``: [B, N_final, N_0] 0/1 map of original tokens per final token."""
    return model._vm_state.source


__all__ = ["apply", "remove", "MergeInfo", "UnsupportedModelError", "SUPPORTED", "num_tokens", "last_source"]
