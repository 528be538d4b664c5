"""Per-layer token reduction schedules. Token counts depend only on the schedule, never on data.

Pure integer code: named schedules, the static token simulation, and the budget solver over any
cost function (:func:`solve`). FLOP cost models that read a model's structure live in
:mod:`vitmerge.models.budget`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

from ..errors import ScheduleError
from .registry import DEFAULT_METHOD, method_spec

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


def check_r(r):
    """``r`` (one int, or one int per block) when no entry is negative: the one place this is checked."""
    if isinstance(r, int):
        if r < 0:
            raise ScheduleError(f"r must be >= 0, got {r}")
    elif any(v < 0 for v in r):
        raise ScheduleError(f"every r must be >= 0, got {list(r)}")
    return r


def r_too_large(method: str, where: str, asked: int, n_in: int, protected: int, cap: int) -> ScheduleError:
    """The error for an r that the merge step at ``where`` cannot honour (every form's one message)."""
    return ScheduleError(
        f"r={asked} is too large: {where} sees {n_in} tokens ({protected} protected) and "
        f"one {method} step can remove at most {cap} of them; use r <= {cap}"
    )


def parse_r(num_layers: int, r: RSpec) -> list[int]:
    """int -> same r each layer; (r, inflection) -> inflection schedule; list -> one r per layer."""
    if isinstance(r, bool):
        raise ScheduleError("r must be an int, a list of ints or an (r, inflection) tuple, not bool")
    if isinstance(r, int):
        return constant(num_layers, check_r(r))
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        return decreasing(num_layers, int(r[0]), r[1])
    rs = [int(v) for v in r]
    if len(rs) != num_layers:
        raise ScheduleError(
            f"r list has {len(rs)} entries but the model has {num_layers} blocks: give one r per block"
        )
    return check_r(rs)


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
    use :func:`vitmerge.models.budget.solve_budget` / :func:`solve_budget_latency` instead.
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
        return decreasing(num_layers, check_r(r), float(inflection))
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


def solve(
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
    method: str = DEFAULT_METHOD,
    overhead: float = 0.0,
) -> list[int]:
    """Per-block r whose modelled latency is at most ``fraction`` of the unmerged model's.

    ``table``: measured latency of one (unmerged) block by token count, a dict {tokens: ms}
    (interpolated) or a callable. A block whose tokens go from ``n_in`` to ``n_out`` is costed as
    the mean of the table at the two counts (attention and matching run on ``n_in``, the MLP on
    ``n_out``); ``overhead`` is the latency outside the blocks (patch embedding, head), which no
    schedule changes. Same solver as :func:`solve_budget`.
    """
    clamp = method_spec(method).clamp_r  # unknown method -> ScheduleError listing the methods
    if num_layers < 1 or n_tokens < 1 or not 0 <= protected <= n_tokens:
        raise ScheduleError(f"need num_layers >= 1, n_tokens >= 1 and 0 <= protected <= n_tokens, got "
                            f"{num_layers}, {n_tokens}, {protected}")
    lat = _interpolator(table)

    def cost(rows) -> float:
        return overhead + sum(lat(a) if e == 0 else 0.5 * (lat(a) + lat(b)) for a, e, b in rows)

    return solve(num_layers, n_tokens, protected, clamp, cost, fraction, "latency", method)
