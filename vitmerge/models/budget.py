"""FLOP and latency budgets -> per-block r. The cost models here read a model's structure, so they
live with the models; the solver itself is integer code (:func:`vitmerge.merging.schedule.solve`).

* :func:`solve_budget`: analytic FLOPs per block (:class:`BlockFlops`) + the method's matching
  cost from its spec; per-block r for a FLOP fraction.
* :func:`budget_schedule`: that where it applies, otherwise :func:`constant_r_for_budget` (one r,
  FLOPs counted by running the model): what ``--budget F`` means for any method.
* :func:`resolve_schedule`: ``--r`` / ``--schedule`` / ``--budget`` / ``--budget-latency`` -> what
  :func:`vitmerge.apply` takes.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from ..errors import ScheduleError, UnsupportedModelError
from ..merging import DEFAULT_METHOD, METHODS, MethodSpec, method_spec
from ..merging.schedule import parse_schedule, solve, solve_budget_latency, token_counts
from ..request import MergeRequest
from .apply import apply, remove
from .family import family
from .flops import count_flops, flop_ratio
from .shapes import depth, num_tokens, prefix_tokens

log = logging.getLogger(__name__)


@dataclass
class BlockFlops:
    """Analytic FLOPs (2 x multiply-adds) of one ViT block (timm or transformers) as a function of its token counts.

    Counted like :func:`vitmerge.models.flops.count_flops` counts the real module: matrix
    products only (qkv, the two attention products, proj, the MLP linears, the merge's own
    products); norms, softmax and elementwise ops are left out.
    """

    attn_linear: int  # per token: qkv + proj (+ gate) = sum of 2 * in * out
    attn_dim: int  # heads * head_dim: each of q @ k^T and attn @ v costs 2 * N^2 * attn_dim
    mlp_linear: int  # per token: 2 * in * out summed over the MLP's linears
    metric_dim: int  # width of the merge metric (keys averaged over heads: head_dim)

    def attention(self, n: int) -> int:
        return self.attn_linear * n + 4 * n * n * self.attn_dim

    def mlp(self, n: int) -> int:
        return self.mlp_linear * n


def model_flops_parts(model) -> tuple[int, list[BlockFlops]]:
    """(FLOPs outside the blocks per input, one :class:`BlockFlops` per block) of a timm ViT or a
    transformers classifier (the patch embedding and the heads are the part outside the blocks)."""
    fam = family(model)
    reason = fam.unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(f"cannot solve a FLOP budget for this model: {reason}")
    fixed, shapes = fam.flops_parts(model)
    return fixed, [BlockFlops(attn_linear=a, attn_dim=d, mlp_linear=m, metric_dim=c) for a, d, m, c in shapes]


def _match_flops(ms: MethodSpec):
    """The spec's matching-cost model, or a ScheduleError naming the methods that have one."""
    if ms.match_flops is None:
        modelled = [m for m, s in METHODS.items() if s.match_flops is not None]
        raise ScheduleError(
            f"no FLOP model for method {ms.name!r}: budgets can be solved for {', '.join(modelled)}; "
            f"give {ms.name!r} an explicit r per block instead"
        )
    return ms.match_flops


def merge_flops(method: str, n: int, protected: int, metric_dim: int, r: int = 0, **options) -> int:
    """FLOPs of one merge step's matching on ``n`` tokens removing ``r`` (the method's spec says how)."""
    return int(_match_flops(method_spec(method))(n, protected, metric_dim, r=r, **options))


def schedule_flops(model, rs: Sequence[int], method: str = DEFAULT_METHOD, protected: Optional[int] = None,
                   **options) -> int:
    """Analytic FLOPs of one image through ``model`` merged with per-block ``rs`` (see BlockFlops)."""
    ms = method_spec(method)
    fixed, blocks = model_flops_parts(model)
    p = prefix_tokens(model) if protected is None else int(protected)
    rows = token_counts(num_tokens(model), list(rs), p, ms.clamp_r)
    return fixed + _blocks_cost(blocks, rows, ms, p, options)


def _blocks_cost(blocks, rows, ms: MethodSpec, protected, options) -> int:
    total = 0
    for bf, (n_in, removed, n_out) in zip(blocks, rows):
        total += bf.attention(n_in) + bf.mlp(n_out)
        if removed:
            total += int(_match_flops(ms)(n_in, protected, bf.metric_dim, r=removed, **options))
    return total


def solve_budget(model, fraction: float, method: str = DEFAULT_METHOD, protected: Optional[int] = None,
                 **options) -> list[int]:
    """Per-block r for ``model`` (a timm ViT or transformers classifier, patched or not) whose FLOPs are at most ``fraction``
    of the unmerged model's, as close to that as possible.

    FLOPs come from an analytic model of each block (:class:`BlockFlops`: linears linear in the
    token count, attention quadratic, plus the method's matching cost); the schedule is found by
    :func:`vitmerge.merging.schedule.solve` (smallest constant r that fits, then tokens given back
    from the last blocks). ``options``: the method's options that change its cost (``hash``: bits, rounds).
    """
    ms = method_spec(method)  # unknown method -> ScheduleError listing the methods
    _match_flops(ms)  # a method without a FLOP model -> ScheduleError
    fixed, blocks = model_flops_parts(model)
    p = prefix_tokens(model) if protected is None else int(protected)
    rs = solve(
        len(blocks), num_tokens(model), p, ms.clamp_r,
        lambda rows: fixed + _blocks_cost(blocks, rows, ms, p, options),
        fraction, "FLOP", method,
    )
    log.info("FLOP budget %g with %s: r per block %s (analytic block model)", float(fraction), method, rs)
    return rs


# --------------------------------------------------------------------------------------------
# Any method: one r found by counting FLOPs
# --------------------------------------------------------------------------------------------


def budget_schedule(model: nn.Module, fraction: float, method: str = DEFAULT_METHOD, **options):
    """The r to give :func:`vitmerge.apply` so the FLOPs are at most ``fraction`` of the unmerged model.

    Uses :func:`solve_budget` (per-block r from the analytic FLOP model) where the method's spec has
    a matching-cost model and merges inside the blocks; otherwise the smallest constant r (for
    methods that group once before the encoder, such as vwt: the one r) whose FLOPs, counted by
    running the model, meet the budget. ``options`` are the method's options.
    """
    ms = method_spec(method)
    if ms.match_flops is not None and ms.form == "block":
        return list(solve_budget(model, fraction, method=method, **options))
    return constant_r_for_budget(model, fraction, method, **options)


def constant_r_for_budget(model: nn.Module, fraction: float, method: str = DEFAULT_METHOD, **options):
    """Fallback solver: binary search of one r, FLOPs counted by running the model (batch 1).

    Returns one r per block, or a single int for methods that merge once before the encoder.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ScheduleError(f"the FLOP budget must be a fraction in (0, 1], got {fraction!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise ScheduleError(f"the FLOP budget must be a fraction in (0, 1], got {fraction}")
    single = method_spec(method).form == "pre_encoder"
    n_blocks = depth(model)
    probe = copy.deepcopy(model)
    if getattr(probe, "vitmerge", None) is not None:
        remove(probe)
    base = count_flops(probe)

    def r_spec(r: int):
        return r if single else [r] * n_blocks

    def frac(r: int) -> float:
        apply(probe, method=method, r=r_spec(r), **options)
        try:
            return count_flops(probe) / base
        finally:
            remove(probe)

    def accepted(r: int):
        try:
            return frac(r)
        except ScheduleError:
            return None

    hi = num_tokens(model) - prefix_tokens(model) - 1
    f_hi = accepted(hi)
    if f_hi is None:  # the largest r the method accepts (binary search; r=0 always is)
        ok, bad = 0, hi
        while bad - ok > 1:
            mid = (ok + bad) // 2
            if accepted(mid) is None:
                bad = mid
            else:
                ok = mid
        hi, f_hi = ok, accepted(ok)
    if f_hi > fraction:
        raise ScheduleError(f"{method}: a FLOP budget of {fraction} cannot be met with one r "
                            f"(r={hi} gives {f_hi:.3f}); ask for a larger fraction")
    lo = 0
    while lo < hi:  # smallest r that meets the budget
        mid = (lo + hi) // 2
        if frac(mid) <= fraction:
            hi = mid
        else:
            lo = mid + 1
    return r_spec(lo)


def achieved_fraction(model: nn.Module) -> float:
    """FLOPs of the merged model over the unmerged one, both counted by running them (batch 1)."""
    base, merged, _ = flop_ratio(model)
    return merged / base


# --------------------------------------------------------------------------------------------
# The options users give -> what apply takes
# --------------------------------------------------------------------------------------------


def load_latency_table(path: Union[str, Path]) -> dict:
    """A measured per-block latency table: JSON {"tokens": ms, ...} (e.g. {"197": 1.9, "99": 0.9})."""
    try:
        raw = json.loads(Path(path).read_text())
        table = {int(k): float(v) for k, v in raw.items()}
    except FileNotFoundError:
        raise ScheduleError(f"--budget-latency table {str(path)!r} does not exist") from None
    except (ValueError, AttributeError, TypeError) as e:
        raise ScheduleError(f"--budget-latency table {str(path)!r} must be a JSON object "
                            f"{{\"token count\": milliseconds per block, ...}}: {e}") from None
    if len(table) < 2:
        raise ScheduleError(f"--budget-latency table {str(path)!r} needs at least two token counts to interpolate")
    return table


def resolve_schedule(model: nn.Module, method: str, r, schedule: str = "constant", budget: Optional[float] = None,
                     budget_latency: Optional[Union[str, Path]] = None, **options):
    """--r / --schedule / --budget [--budget-latency TABLE] -> what ``vitmerge.apply`` takes: the
    :class:`~vitmerge.request.MergeRequest` of these values (which refuses contradictions; ``r`` None: 16 per
    block without a budget) solved for ``model`` by :func:`schedule_for`."""
    return schedule_for(model, MergeRequest(method=method, r=r, schedule=schedule, budget=budget,
                                            budget_latency=budget_latency, options=options))


def schedule_for(model: nn.Module, request: MergeRequest):
    """The per-block r (or vwt's single r) ``request`` asks of ``model``: as given (constant), the decreasing
    schedule, or solved from its FLOP or latency budget. The request was validated when it was made."""
    if request.budget_latency is not None:
        return solve_budget_latency(load_latency_table(request.budget_latency), request.budget, depth(model),
                                    num_tokens(model), prefix_tokens(model), request.method)
    if request.budget is not None:
        return budget_schedule(model, request.budget, request.method, **request.options)
    if request.schedule == "constant":
        return request.r_value  # as given: an int, or one r per block (vwt takes its single r as is)
    return parse_schedule(depth(model), request.r_value, request.schedule)


__all__ = ["BlockFlops", "model_flops_parts", "merge_flops", "schedule_flops", "solve_budget", "budget_schedule",
           "constant_r_for_budget", "achieved_fraction", "load_latency_table", "resolve_schedule", "schedule_for"]
