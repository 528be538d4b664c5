"""Per-layer token reduction schedules. Token counts depend only on the schedule, never on data."""
from __future__ import annotations

from typing import Callable, Sequence, Union

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
