"""Per-layer token reduction schedules. Token counts depend only on the schedule, never on data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

from ..errors import ScheduleError

RSpec = Union[int, Sequence[int], tuple]


def constant(num_layers: int, r: int) -> list[int]:
    return [int(r)] * num_layers


def decreasing(num_layers: int, r: int, inflection: float = -1.0) -> list[int]:
    """ToMe's inflection schedule: r per layer trends from 2r down to 0 (inflection -1),
    up (+1) or stays constant (0); the mean stays about r."""
    if not -1.0 <= inflection <= 1.0:
        raise ScheduleError(f"inflection must be in [-1, 1], got {inflection}")
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    if num_layers == 1:
        return [lo]
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


def parse_r(num_layers: int, r: RSpec) -> list[int]:
    """int -> same r each layer; (r, inflection) -> inflection schedule; list -> one r per layer."""
    if isinstance(r, bool):
        raise ScheduleError("r must be an int, a list of ints or an (r, inflection) tuple, not bool")
    if isinstance(r, int):
        if r < 0:
            raise ScheduleError(f"r must be >= 0, got {r}")
        return constant(num_layers, r)
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        return decreasing(num_layers, int(r[0]), r[1])
    rs = [int(v) for v in r]
    if len(rs) != num_layers:
        raise ScheduleError(
            f"r list has {len(rs)} entries but the model has {num_layers} blocks: give one r per block"
        )
    if any(v < 0 for v in rs):
        raise ScheduleError(f"every r must be >= 0, got {rs}")
    return rs


def token_counts(
    n_tokens: int, rs: Sequence[int], protected: int, effective_r: Callable[[int, int, int], int]
) -> list[tuple[int, int, int]]:
    """Simulate the static schedule: (tokens in, tokens removed, tokens out) for each layer."""
    rows = []
    t = n_tokens
    for r in rs:
        e = effective_r(t, r, protected)
        rows.append((t, e, t - e))
        t -= e
    return rows


# ---------------------------------------------------------------------------------------------
# Named schedules and budget-driven schedules
# ---------------------------------------------------------------------------------------------

SCHEDULES = ("constant", "decreasing")


def parse_schedule(num_layers: int, r=None, schedule: str = "constant", inflection: float = -1.0) -> list[int]:
    """One r per block from a named schedule.

    ``constant``: ``r`` every block (``r`` may also be a list with one r per block);
    ``decreasing``: ToMe's inflection schedule around a mean of ``r`` (``inflection`` in [-1, 1]:
    -1 front-loads from 2r down to 0, 0 is constant, +1 back-loads). For a FLOP or latency budget
    use :func:`solve_budget` / :func:`solve_budget_latency` instead.
    """
    if num_layers < 1:
        raise ScheduleError(f"num_layers must be >= 1, got {num_layers}")
    if r is None:
        raise ScheduleError(f"schedule {schedule!r} needs r (tokens removed per block), e.g. r=16")
    if schedule == "constant":
        return parse_r(num_layers, r)
    if schedule == "decreasing":
        if isinstance(r, bool) or not isinstance(r, int):
            raise ScheduleError(f"the decreasing schedule needs one integer r (its mean), got {r!r}")
        if r < 0:
            raise ScheduleError(f"r must be >= 0, got {r}")
        return decreasing(num_layers, r, float(inflection))
    raise ScheduleError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)} "
                        "(or a budget: solve_budget / --budget F)")


def _check_fraction(fraction, what: str) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ScheduleError(f"the {what} budget must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < f <= 1.0):  # also rejects NaN
        raise ScheduleError(
            f"the {what} budget must be a fraction of the unmerged model in (0, 1], got {fraction!r} "
            "(e.g. 0.5 for half the cost)"
        )
    return f


def _solve(
    num_layers: int,
    n_tokens: int,
    protected: int,
    effective_r: Callable[[int, int, int], int],
    cost: Callable[[list], float],
    fraction: float,
    what: str,
    method: str,
) -> list[int]:
    """Per-block r whose cost is <= fraction * cost(unmerged), as close to it as the solver gets.

    ``cost`` maps the simulated schedule (``token_counts`` rows) to a total cost.
    1. The largest reduction is ``r = cap`` in every block (each block removes all it can):
       if even that costs more than the budget, the budget is unreachable.
    2. Binary search the smallest constant r that meets the budget (for r >= 1 the cost falls as r
       grows; r = 0 is skipped by the check above, as it only fits a budget of 1).
    3. Give tokens back while the budget still holds: passes from the last block to the first,
       each lowering every block's r by one if that stays within budget. Late blocks are the
       cheapest to give back, so the schedule ends up constant or gently front-loaded, and the
       leftover slack is below the cost of one more token in any block.
    Every returned r is what the method really removes at that block (no clamping left to do).
    """
    f = _check_fraction(fraction, what)

    def run(rs: Sequence[int]) -> tuple[list[int], float]:
        rows = token_counts(n_tokens, rs, protected, effective_r)
        return [e for _, e, _ in rows], float(cost(rows))

    _, base = run([0] * num_layers)
    budget = f * base * (1 + 1e-12)
    if base <= budget:  # fraction 1: nothing to merge (a merge step's own cost could only add)
        return [0] * num_layers
    cap = effective_r(n_tokens, n_tokens, protected)
    _, c_min = run([cap] * num_layers)
    if c_min > budget:
        raise ScheduleError(
            f"a {what} budget of {f:g} of the unmerged model is unreachable with method {method!r}: "
            f"merging as much as it can in every block still costs {c_min / base:.4f}; "
            f"use a budget >= {c_min / base:.4f}"
        )
    lo, hi = 0, cap  # smallest constant r whose cost fits lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if run([mid] * num_layers)[1] <= budget:
            hi = mid
        else:
            lo = mid + 1
    rs, _ = run([lo] * num_layers)
    changed = True
    while changed:
        changed = False
        for i in reversed(range(num_layers)):
            if rs[i] == 0:
                continue
            trial = list(rs)
            trial[i] -= 1
            eff, c = run(trial)
            if c <= budget:
                rs, changed = eff, True
    return rs


@dataclass
class BlockFlops:
    """Analytic FLOPs (2 x multiply-adds) of one timm ViT block as a function of its token counts.

    Counted like :func:`vitmerge.profiling.flops.count_flops` counts the real module: matrix
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


def _linear_flops(module) -> int:
    from torch import nn

    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def model_flops_parts(model) -> tuple[int, list[BlockFlops]]:
    """(FLOPs outside the blocks per image, one :class:`BlockFlops` per block) of a timm ViT."""
    from torch import nn

    from ..errors import UnsupportedModelError
    from ..models.vit import unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(f"cannot solve a FLOP budget for this model: {reason}")
    pe = model.patch_embed.proj
    if not isinstance(pe, nn.Conv2d):
        raise UnsupportedModelError(f"patch embedding {type(pe).__name__} is not a Conv2d")
    fixed = 2 * int(model.patch_embed.num_patches) * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] \
        * pe.out_channels // pe.groups
    fixed += _linear_flops(model.head) if isinstance(model.head, nn.Module) else 0
    blocks = []
    for blk in model.blocks:
        a = blk.attn
        blocks.append(BlockFlops(attn_linear=_linear_flops(a), attn_dim=a.num_heads * a.head_dim,
                                 mlp_linear=_linear_flops(blk.mlp), metric_dim=a.head_dim))
    return fixed, blocks


def _tome_match_flops(n: int, protected: int, metric_dim: int, **options) -> int:
    return 2 * ((n + 1) // 2) * (n // 2) * metric_dim  # the A x B score matrix


def _hash_match_flops(n: int, protected: int, metric_dim: int, **options) -> int:
    from . import hashing

    bits = int(options.get("bits", hashing.DEFAULT_BITS))
    rounds = int(options.get("rounds", hashing.DEFAULT_ROUNDS))
    u = n - protected
    # projections (a matrix product, counted by count_flops) + one dot product per order neighbour
    return 2 * n * metric_dim * bits * rounds + 2 * rounds * max(u - 1, 0) * metric_dim


def _importance_match_flops(n: int, protected: int, metric_dim: int, r: int = 0, **options) -> int:
    u = n - protected
    return 2 * r * (u - r) * metric_dim  # similarities of the r merged tokens to the kept ones


# Methods whose blocks work as the budget model assumes (attention on N_in tokens, r tokens removed,
# MLP on N_in - r) -> FLOPs of their matching step. Other methods change the block differently and
# need their own entry before a budget can be solved for them.
MATCH_FLOPS: dict = {"tome": _tome_match_flops, "hash": _hash_match_flops, "importance": _importance_match_flops}


def merge_flops(method: str, n: int, protected: int, metric_dim: int, r: int = 0, **options) -> int:
    """FLOPs of one merge step's matching on ``n`` tokens removing ``r``."""
    try:
        fn = MATCH_FLOPS[method]
    except KeyError:
        raise ScheduleError(
            f"no FLOP model for method {method!r}: budgets can be solved for {', '.join(sorted(MATCH_FLOPS))}; "
            f"give {method!r} an explicit r per block instead"
        ) from None
    return int(fn(n, protected, metric_dim, r=r, **options))


def schedule_flops(model, rs: Sequence[int], method: str = "tome", protected: Optional[int] = None,
                   **options) -> int:
    """Analytic FLOPs of one image through ``model`` merged with per-block ``rs`` (see BlockFlops)."""
    from .. import merging
    from ..models import num_tokens

    fixed, blocks = model_flops_parts(model)
    p = int(model.num_prefix_tokens) if protected is None else int(protected)
    rows = token_counts(num_tokens(model), list(rs), p, lambda t, r, pp: merging.effective_r(method, t, r, pp))
    return fixed + _blocks_cost(blocks, rows, method, p, options)


def _blocks_cost(blocks, rows, method, protected, options) -> int:
    total = 0
    for bf, (n_in, removed, n_out) in zip(blocks, rows):
        total += bf.attention(n_in) + bf.mlp(n_out)
        if removed:
            total += merge_flops(method, n_in, protected, bf.metric_dim, r=removed, **options)
    return total


def solve_budget(model, fraction: float, method: str = "tome", protected: Optional[int] = None,
                 **options) -> list[int]:
    """Per-block r for ``model`` (a timm ViT, patched or not) whose FLOPs are at most ``fraction``
    of the unmerged model's, as close to that as possible.

    FLOPs come from an analytic model of each block (:class:`BlockFlops`: linears linear in the
    token count, attention quadratic, plus the method's matching cost); the schedule is found by
    :func:`_solve` (largest constant r that fits, then tokens given back from the last blocks).
    ``options``: the method's options that change its cost (``hash``: bits, rounds).
    """
    from .. import merging
    from ..models import num_tokens

    merging.effective_r(method, 2, 0, 0)  # unknown method -> ScheduleError listing the methods
    merge_flops(method, 2, 0, 1)  # a method without a FLOP model -> ScheduleError
    fixed, blocks = model_flops_parts(model)
    p = int(model.num_prefix_tokens) if protected is None else int(protected)
    return _solve(
        len(blocks), num_tokens(model), p,
        lambda t, r, pp: merging.effective_r(method, t, r, pp),
        lambda rows: fixed + _blocks_cost(blocks, rows, method, p, options),
        fraction, "FLOP", method,
    )


LatencyTable = Union[Mapping[int, float], Callable[[int], float]]


def _interpolator(table: LatencyTable) -> Callable[[int], float]:
    """A dict {tokens: ms} -> piecewise-linear function; below the smallest count the latency is
    scaled in proportion to the token count, above the largest it extends the last segment."""
    if callable(table):
        return lambda n: float(table(n))
    if not isinstance(table, Mapping) or not table:
        raise ScheduleError("the latency table must be a non-empty {token count: latency} mapping or a callable")
    pts = []
    for k, v in table.items():
        try:
            n, t = int(k), float(v)
        except (TypeError, ValueError):
            raise ScheduleError(f"latency table entry {k!r}: {v!r} is not (token count: latency)") from None
        if n < 1 or not t > 0 or t == float("inf"):
            raise ScheduleError(f"latency table entry {k!r}: {v!r} needs a token count >= 1 and a latency > 0")
        pts.append((n, t))
    pts.sort()

    def f(n: int) -> float:
        if n <= pts[0][0]:
            return pts[0][1] * n / pts[0][0]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        if len(pts) == 1:
            return pts[0][1] * n / pts[0][0]
        (n0, t0), (n1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) * (n - n1) / (n1 - n0)

    return f


def solve_budget_latency(
    table: LatencyTable,
    fraction: float,
    num_layers: int,
    n_tokens: int,
    protected: int = 1,
    method: str = "tome",
    overhead: float = 0.0,
) -> list[int]:
    """Per-block r whose modelled latency is at most ``fraction`` of the unmerged model's.

    ``table``: measured latency of one (unmerged) block by token count, a dict {tokens: ms}
    (interpolated) or a callable. A block whose tokens go from ``n_in`` to ``n_out`` is costed as
    the mean of the table at the two counts (attention and matching run on ``n_in``, the MLP on
    ``n_out``); ``overhead`` is the latency outside the blocks (patch embedding, head), which no
    schedule changes. Same solver as :func:`solve_budget`.
    """
    from .. import merging

    merging.effective_r(method, 2, 0, 0)
    if num_layers < 1 or n_tokens < 1 or not 0 <= protected <= n_tokens:
        raise ScheduleError(f"need num_layers >= 1, n_tokens >= 1 and 0 <= protected <= n_tokens, got "
                            f"{num_layers}, {n_tokens}, {protected}")
    lat = _interpolator(table)

    def cost(rows) -> float:
        return overhead + sum(lat(a) if e == 0 else 0.5 * (lat(a) + lat(b)) for a, e, b in rows)

    return _solve(num_layers, n_tokens, protected, lambda t, r, p: merging.effective_r(method, t, r, p),
                  cost, fraction, "latency", method)
