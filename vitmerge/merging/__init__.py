"""Training-free token reduction: every method returns a :class:`MergePlan` with a static count."""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ..errors import ScheduleError
from .base import MergePlan, batch_gather, batch_scatter_add, identity_plan
from .bipartite import bipartite_plan, clamp_r as _tome_clamp_r
from . import hashing
from . import evo, importance, vwt

PlanFn = Callable[..., MergePlan]

# name -> (plan function, function giving the effective r for (n_tokens, r, protected))
METHODS: Dict[str, tuple[PlanFn, Callable[[int, int, int], int]]] = {
    "tome": (bipartite_plan, _tome_clamp_r),
    "hash": (hashing.hash_plan, hashing.clamp_r),
    # Flags on the plan functions tell the model adapter what else they need (see models/vit.py):
    # needs_cls_attn (class-attention row), slow_fast (evo's block form), pre_encoder (vwt: once, before block 0).
    "importance": (importance.importance_plan, importance.clamp_r),
    "evo": (evo.evo_plan, evo.clamp_r),
    "vwt": (vwt.vwt_plan, vwt.clamp_r),
}


def available_methods() -> list[str]:
    return sorted(METHODS)


def _lookup(method: str):
    try:
        return METHODS[method]
    except KeyError:
        raise ScheduleError(
            f"unknown merge method {method!r}; available: {', '.join(available_methods())}"
        ) from None


def plan(method: str, metric: torch.Tensor, r: int, protected: int = 1, **options) -> MergePlan:
    """Decide which tokens merge into which.

    metric: [B, N, C] similarity features (ToMe: attention keys averaged over heads);
    r: tokens to remove (clamped to what the method can do in one step);
    protected: the first ``protected`` tokens (class, distillation, registers) never merge.
    Returns a plan whose ``.merge(x, size)`` gives ``(x_merged, size_merged)`` with N - r tokens.
    """
    fn, _ = _lookup(method)
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    if protected < 0 or protected > metric.shape[1]:
        raise ValueError(f"protected={protected} is outside [0, N={metric.shape[1]}]")
    return fn(metric, int(r), protected, **options)


def effective_r(method: str, n_tokens: int, r: int, protected: int) -> int:
    """How many tokens ``method`` really removes from ``n_tokens`` when asked for ``r``."""
    _, clamp = _lookup(method)
    return clamp(n_tokens, r, protected)


__all__ = ["MergePlan", "batch_gather", "batch_scatter_add", "identity_plan", "plan", "effective_r", "available_methods", "METHODS"]
