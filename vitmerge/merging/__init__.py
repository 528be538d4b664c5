"""Training-free token reduction: pure tensor and integer code, no I/O, no model knowledge.

Every method returns a :class:`MergePlan` with a static token count; the methods are listed in one
registry (:mod:`.registry`), each with its :class:`~.spec.MethodSpec`.
"""
from __future__ import annotations

import torch

from .base import MergePlan, batch_gather, batch_scatter_add, compose, identity_plan, unmerge
from .registry import DEFAULT_METHOD, METHODS, available_methods, method_spec
from .spec import LeanStep, MethodSpec, Setup, SetupContext


def plan(method: str, metric: torch.Tensor, r: int, protected: int = 1, **options) -> MergePlan:
    """Decide which tokens merge into which.

    metric: [B, N, C] similarity features (ToMe: attention keys averaged over heads);
    r: tokens to remove (clamped to what the method can do in one step);
    protected: the first ``protected`` tokens (class, distillation, registers) never merge.
    Returns a plan whose ``.merge(x, size)`` gives ``(x_merged, size_merged)`` with N - r tokens.
    """
    s = method_spec(method)
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    if protected < 0 or protected > metric.shape[1]:
        raise ValueError(f"protected={protected} is outside [0, N={metric.shape[1]}]")
    return s.plan(metric, int(r), protected, **options)


def effective_r(method: str, n_tokens: int, r: int, protected: int) -> int:
    """How many tokens ``method`` really removes from ``n_tokens`` when asked for ``r``."""
    return method_spec(method).clamp_r(n_tokens, r, protected)


__all__ = ["MergePlan", "MethodSpec", "batch_gather", "batch_scatter_add", "compose", "unmerge", "identity_plan", "plan", "effective_r",
           "available_methods", "method_spec", "METHODS", "DEFAULT_METHOD", "Setup", "SetupContext", "LeanStep"]
