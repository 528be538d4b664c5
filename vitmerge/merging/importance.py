"""Importance-guided merging (training-free form of arXiv 2306.04897).

One step, given the class-token attention of the block (averaged over heads):

* importance ``i_n`` of token n = how much the class token attends to it;
* the ``N - protected - r`` most important unprotected tokens stay (protected tokens always stay,
  first, in their original order; the kept tokens follow in their original order);
* each of the ``r`` least important tokens merges into the kept unprotected token whose metric
  (attention keys averaged over heads) is most cosine-similar;
* the merged slot is the importance-weighted average
  ``m_j = (w_j x_j + sum_k w_k u_k) / (w_j + sum_k w_k)`` with ``w = importance * size``
  (``MergePlan(weight=importance)``; the plan multiplies by size itself).

The count is static (``n_out = N - r``); the choice of tokens is data-dependent but happens with
TopK / ArgMax of static sizes, which export as such.
"""
from __future__ import annotations

import torch

from ..errors import ScheduleError
from .base import MergePlan, identity_plan
from .spec import LeanStep, MethodSpec, clamp
from .topk import topk

# Importance is a softmax probability; an underflowed 0 would give a kept token no weight at all
# (and a 0/0 slot when nothing merges into it). A floor far below any real attention value fixes that.
MIN_WEIGHT = 1e-12


def max_r(n_tokens: int, protected: int) -> int:
    """At least one unprotected token must stay for the others to merge into."""
    return max(n_tokens - protected - 1, 0)


def match_flops(n: int, protected: int, metric_dim: int, r: int = 0) -> int:
    """FLOPs of the matching step: similarities of the r merged tokens to the kept ones."""
    u = n - protected
    return 2 * r * (u - r) * metric_dim


def check_cls_attn(cls_attn, metric: torch.Tensor, method: str) -> torch.Tensor:
    if cls_attn is None:
        raise ScheduleError(
            f"the {method!r} method needs the class-token attention of the block (cls_attn=[B, N]); "
            "apply it with vitmerge.apply(model, method=...), which computes it, or pass cls_attn to plan()"
        )
    if cls_attn.shape != metric.shape[:2]:
        raise ScheduleError(f"cls_attn must be [B, N] = {tuple(metric.shape[:2])}, got {tuple(cls_attn.shape)}")
    return cls_attn


def importance_plan(metric: torch.Tensor, r: int, protected: int = 1, cls_attn: torch.Tensor | None = None) -> MergePlan:
    """Plan one importance-guided merge step.

    metric [B, N, C] (keys averaged over heads), cls_attn [B, N] (class-token attention probabilities
    averaged over heads, including the class token's attention to itself; only the unprotected
    entries are used).
    """
    cls_attn = check_cls_attn(cls_attn, metric, "importance")
    B, N, _ = metric.shape
    r = clamp(r, max_r(N, protected))
    if r <= 0:
        return identity_plan(metric)
    n_free = N - protected
    n_keep = n_free - r
    dev = metric.device
    with torch.no_grad():
        imp = cls_attn[:, protected:].float()  # [B, n_free]
        # One TopK ranks all unprotected tokens: the head stays, the tail merges away (a token can
        # never be in both sets, whatever the ties).
        # (merging.topk: one TopK, or chunks below TensorRT's TopK limit for long sequences)
        order = topk(imp, n_free, largest=True).indices
        kept = topk(order[:, :n_keep], n_keep, largest=False, unique=True).values  # original order
        src = order[:, n_keep:]
        unit = metric / metric.norm(dim=-1, keepdim=True)
        free = unit[:, protected:]
        idx_k = kept[..., None].expand(B, n_keep, unit.shape[-1])
        idx_s = src[..., None].expand(B, r, unit.shape[-1])
        sim = free.gather(1, idx_s) @ free.gather(1, idx_k).transpose(-1, -2)  # [B, r, n_keep]
        dst = protected + sim.argmax(dim=-1)
        keep = torch.cat([torch.arange(protected, device=dev).expand(B, protected), protected + kept], dim=-1)
    weight = cls_attn.detach().clamp_min(MIN_WEIGHT)[..., None].to(metric.dtype)
    return MergePlan(keep=keep, src=protected + src, dst=dst, weight=weight)


SPEC = MethodSpec(
    name="importance",
    plan=importance_plan,
    max_r=max_r,
    summary="class-attention importance decides what stays; the rest merges into its most similar kept token",
    needs_cls_attn=True,
    match_flops=match_flops,
    invariance="any",
    lean=LeanStep("class_attention", {"min_weight": MIN_WEIGHT}),
)
