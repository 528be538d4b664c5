"""Evo-ViT-style slow-fast token updating (arXiv 2108.01390), training-free inference form.

Per block with ``r > 0`` (sizes are static: they depend on N and r only):

* the global class attention ``g [B, N]`` carried over from the earlier blocks ranks the unprotected
  tokens; the ``K = N - protected - r - 1`` best are *informative*, the other ``r + 1`` are
  *placeholders*;
* the placeholders are summarised into ONE representative token, their g-weighted average
  (size ``r + 1``, so proportional attention counts it as the ``r + 1`` tokens it stands for);
* protected + informative + representative (``N - r`` tokens) run the full block (slow path);
* every placeholder is then moved by the representative's residual, ``x_p += y_rep - x_rep``
  (fast path), and the informative tokens take their block outputs. The block returns N tokens in
  their original order: Evo-ViT keeps the full token set, it only thins what the block computes on.
* g evolves as in the reference code: a full block sets ``g`` to its class attention; a slow-fast
  block mixes ``g <- (1 - t) g + t a`` for the informative tokens (``t`` = ``tradeoff``, 0.5) and
  leaves the placeholders' g as it was.

The summarising step IS a merge (r placeholders merge into the slot of one of them, weighted by g),
so it is written as a :class:`MergePlan` and shares the gather/scatter mechanics with every other
method; :func:`spread` is the way back to N tokens.
"""
from __future__ import annotations

import torch

from ..errors import ScheduleError
from .base import MergePlan, batch_gather, identity_plan
from .importance import MIN_WEIGHT, check_cls_attn
from .spec import MethodSpec, Setup, SetupContext, clamp
from .topk import topk


DEFAULT_TRADEOFF = 0.5


def max_r(n_tokens: int, protected: int) -> int:
    """At least one informative token: r + 1 placeholders out of N - protected - 1."""
    return max(n_tokens - protected - 2, 0)


def check_options(tradeoff: float = DEFAULT_TRADEOFF) -> None:
    if isinstance(tradeoff, bool) or not isinstance(tradeoff, (int, float)) or not 0.0 <= float(tradeoff) <= 1.0:
        raise ScheduleError(f"tradeoff must be a number in [0, 1], got {tradeoff!r}")


def evo_plan(metric: torch.Tensor, r: int, protected: int = 1, cls_attn: torch.Tensor | None = None) -> MergePlan:
    """The slow path's token set as a merge plan.

    metric [B, N, C] is only used for its shape (the choice is by class attention); cls_attn [B, N]
    is the global class attention g. Output slots: protected tokens, then the K informative tokens in
    their original order, then the representative (last slot, ``n_out - 1``).
    """
    g = check_cls_attn(cls_attn, metric, "evo")
    B, N, _ = metric.shape
    r = clamp(r, max_r(N, protected))
    if r <= 0:
        return identity_plan(metric)
    n_free = N - protected
    k = n_free - r - 1
    dev = metric.device
    with torch.no_grad():
        # (merging.topk: one TopK, or chunks below TensorRT's TopK limit for long sequences)
        order = topk(g[:, protected:].float(), n_free, largest=True).indices
        informative = topk(order[:, :k], k, largest=False, unique=True).values
        rep_token = order[:, k : k + 1]  # the best-ranked placeholder holds the representative's slot
        src = order[:, k + 1 :]
        keep = torch.cat([
            torch.arange(protected, device=dev).expand(B, protected),
            protected + informative,
            protected + rep_token,
        ], dim=-1)
        dst = torch.full_like(src, protected + k)
    weight = g.detach().clamp_min(MIN_WEIGHT)[..., None].to(metric.dtype)
    return MergePlan(keep=keep, src=protected + src, dst=dst, weight=weight)


def spread(x: torch.Tensor, x_slow: torch.Tensor, y_slow: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Back to N tokens: every input token moves by the residual of its slot.

    x [B, N, D] block input; x_slow / y_slow [B, n_out, D] the slow path's input and output;
    assign [B, N] slot of every token (``MergePlan.assign``). Informative and protected tokens sit
    alone in their slot, so they get ``y_slow`` (up to rounding); placeholders get ``x + y_rep - x_rep``.
    """
    return x + batch_gather(y_slow - x_slow, assign)


def evolve(g: torch.Tensor, a_slow: torch.Tensor, keep: torch.Tensor, protected: int, tradeoff: float) -> torch.Tensor:
    """Global class attention after a slow-fast block.

    g [B, N]; a_slow [B, n_out] the block's class attention over its slots; keep [B, n_out] the plan's
    kept tokens (the last slot is the representative, whose g stays as it was, like every placeholder).
    """
    idx = keep[:, :-1]
    mixed = (1.0 - tradeoff) * g.gather(1, idx) + tradeoff * a_slow[:, :-1]
    return g.scatter(1, idx, mixed)


def setup(options, ctx: SetupContext) -> Setup:
    """Nothing goes to the plan; ``tradeoff`` goes to :func:`evolve` (and is reported)."""
    t = float(options.get("tradeoff", DEFAULT_TRADEOFF))  # validated by check_options
    return Setup(plan_options={}, info={"tradeoff": t}, step_options={"tradeoff": t})


SPEC = MethodSpec(
    name="evo",
    plan=evo_plan,
    max_r=max_r,
    summary="Evo-ViT slow-fast updating, training-free (opt-in: measured weak without training)",
    form="slow_fast",  # the adapter runs the block on the plan's slots, then spreads back to all N tokens
    needs_cls_attn=True,
    options={"tradeoff": DEFAULT_TRADEOFF},
    validate=check_options,
    invariance="any",
    setup=setup,
    evolve=evolve,
    spread=spread,
)

