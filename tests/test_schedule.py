"""Per-layer schedules: named ones, and ones solved from a FLOP or latency budget."""
import re

import pytest
import timm
import torch

import vitmerge
from vitmerge.errors import ScheduleError
from vitmerge.merging.schedule import (constant, decreasing, parse_r, parse_schedule, solve, solve_budget_latency,
                                       token_counts)
from vitmerge.models.budget import schedule_flops, solve_budget
from vitmerge.models.flops import count_flops


def tome_cap(n, r, p):
    return max(0, min(r, (n - p) // 2))


def test_named_schedules():
    assert parse_schedule(4, 8) == constant(4, 8) == [8, 8, 8, 8]
    assert parse_schedule(3, [1, 2, 3]) == [1, 2, 3]
    # ToMe's inflection schedule, worked by hand: 2r down to 0 in equal (truncated) steps
    assert parse_schedule(4, 8, "decreasing") == [16, 10, 5, 0]
    assert parse_schedule(4, 8, "decreasing", inflection=0.0) == [8, 8, 8, 8]
    assert parse_schedule(3, 6, "decreasing", inflection=1.0) == [0, 6, 12]
    assert parse_schedule(1, 5, "decreasing") == decreasing(1, 5) == [10]
    assert parse_r(2, (4, -1.0)) == [8, 0]
    assert token_counts(20, [8, 8, 8], 1, tome_cap) == [(20, 8, 12), (12, 5, 7), (7, 3, 4)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=4), "needs r"),
    (dict(num_layers=4, r=4, schedule="zigzag"), "unknown schedule 'zigzag'.*constant, decreasing"),
    (dict(num_layers=4, r=-1), "r must be >= 0"),
    (dict(num_layers=4, r=[1, 2]), "one r per block"),
    (dict(num_layers=4, r=[1, 2, 3, 4], schedule="decreasing"), "one integer r"),
    (dict(num_layers=4, r=4, schedule="decreasing", inflection=2.0), r"inflection must be in \[-1, 1\]"),
    (dict(num_layers=0, r=4), "num_layers"),
])
def test_named_schedule_errors(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        parse_schedule(**kwargs)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()  # 197 tokens, 12 blocks
    # count_flops counts matrix products; the fused CPU attention kernel is not among the ops it
    # knows, so use the explicit attention form: every block's attention is then counted.
    for b in m.blocks:
        b.attn.fused_attn = False
    return m


def measured_fraction(model, method, rs):
    vitmerge.apply(model, method, r=rs)
    try:
        assert [e for _, e, _ in model.vitmerge.tokens] == rs  # the solver's r is what really runs
        return count_flops(model)
    finally:
        vitmerge.remove(model)


@pytest.mark.parametrize("method", ["tome", "hash"])
def test_budget_meets_count_flops(vit, method):
    base = count_flops(vit)
    assert schedule_flops(vit, [0] * 12) == base  # the analytic model is exact for the unmerged ViT
    previous = 0
    for f in (0.8, 0.5):
        rs = solve_budget(vit, f, method)
        assert len(rs) == 12 and all(isinstance(r, int) and r >= 0 for r in rs)
        modelled = schedule_flops(vit, rs, method) / base
        measured = measured_fraction(vit, method, rs) / base
        assert f - 0.01 <= modelled <= f  # meets the budget, and uses it
        assert measured == pytest.approx(modelled, rel=0.01)  # the model agrees with the real count
        assert measured <= f + 0.002
        assert sum(rs) > previous  # a smaller budget merges more
        previous = sum(rs)
        # near constant: the solver spreads the reduction rather than dumping it on a few blocks
        assert max(rs[:10]) - min(rs[:10]) <= 2
        # documented shape: tokens are given back from the last blocks, so r never grows with depth ...
        assert all(a >= b for a, b in zip(rs, rs[1:])), rs
        # ... and what is left of the budget is less than giving back one more token in any block costs
        for i in range(12):
            if rs[i]:
                assert schedule_flops(vit, rs[:i] + [rs[i] - 1] + rs[i + 1:], method) > f * base


@pytest.mark.parametrize("fraction,want", [
    (0.8, [8, 8, 8, 8]),  # r = 8 uses the budget exactly: nothing to give back
    (0.81, [8, 8, 7, 6]),
    (0.815, [8, 7, 7, 7]),
    (0.87, [6, 5, 5, 3]),
])
def test_solver_schedule_worked_by_hand(fraction, want):
    """The documented algorithm on a cost simple enough to follow by hand.

    4 blocks, 100 tokens; cost = tokens leaving the blocks, summed (unmerged: 400). A constant r costs
    400 - 10 r; giving one token back in block i costs 4 - i (every later block carries it).

    * 0.81 (budget 324): the smallest constant r that fits is 8 (320). First pass, last block first:
      block 3 +1 (321), block 2 +2 (323), block 1 +3 (326: no), block 0 +4 (no). Second pass: block 3
      +1 (324), the rest no. Third pass: nothing fits -> [8, 8, 7, 6].
    * 0.815 (326): from 8: 321, 323, 326 (block 1 fits), block 0 no; next pass nothing -> [8, 7, 7, 7].
    * 0.87 (348): r = 6 (340); pass 1: 341, 343, 346, block 0 no (350); pass 2: block 3 (347), then
      no; pass 3: block 3 (348); pass 4 nothing -> [6, 5, 5, 3].
    Giving back from the first block instead would give [7, 8, 8, 8] for 0.81.
    """
    def cost(rows):
        return sum(n_out for _, _, n_out in rows)

    def cap(n, r, p):
        return max(0, min(r, n - p - 1))

    rs = solve(4, 100, 1, cap, cost, fraction, "test", "tome")
    assert rs == want
    assert cost(token_counts(100, rs, 1, cap)) <= fraction * 400 + 1e-9


@pytest.mark.parametrize("kw,rs", [
    (dict(img_size=64, depth=3), [4, 3, 2]),  # 17 tokens: odd, even, odd token counts into the steps
    (dict(img_size=64, depth=3, reg_tokens=2), [5, 0, 4]),  # 3 protected tokens, a block without a step
    (dict(img_size=48, depth=2, class_token=False, global_pool="avg"), [4, 2]),  # nothing protected
])
def test_tome_flop_model_is_exact(kw, rs):
    """For ToMe every product the analytic model counts is one FlopCounterMode counts, and nothing else:
    blocks (attention on the tokens in, MLP on the tokens out) plus the A x B score matrix."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kw).eval()
    for b in m.blocks:
        b.attn.fused_attn = False
    assert schedule_flops(m, [0] * len(rs)) == count_flops(m)
    vitmerge.apply(m, "tome", r=rs)
    try:
        measured = count_flops(m)
    finally:
        vitmerge.remove(m)
    assert schedule_flops(m, rs, "tome") == measured


def test_budget_is_tight_against_brute_force():
    """On a 3-block model every schedule can be tried: the solver's is within a few tokens' cost of
    the best schedule under the budget."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=3, num_classes=4).eval()
    base = schedule_flops(m, [0, 0, 0])
    for f in (0.9, 0.7, 0.5):
        rs = solve_budget(m, f, "tome")
        got = schedule_flops(m, rs, "tome")
        best = max(
            c for rr in ((a, b, c) for a in range(19) for b in range(19) for c in range(19))
            if (c := schedule_flops(m, list(rr), "tome")) <= f * base
        )
        assert got <= f * base
        assert got >= best - 0.01 * base


def test_budget_errors(vit):
    with pytest.raises(ScheduleError, match="unreachable.*use a budget >= 0") as e:
        solve_budget(vit, 0.05, "tome")
    least = float(re.search(r">= ([0-9.]+)", str(e.value)).group(1))
    rs = solve_budget(vit, least + 1e-4, "tome")  # the reported minimum really is reachable
    assert schedule_flops(vit, rs) / schedule_flops(vit, [0] * 12) <= least + 1e-4
    # hash can remove more per step than bipartite matching: a lower floor
    hash_least = float(re.search(r">= ([0-9.]+)", _err(lambda: solve_budget(vit, 0.01, "hash"))).group(1))
    assert hash_least < least
    for bad in (0, -0.5, 1.5, float("nan"), "half"):
        with pytest.raises(ScheduleError, match=r"\(0, 1\]"):
            solve_budget(vit, bad)
    with pytest.raises(ScheduleError, match="available"):
        solve_budget(vit, 0.5, method="nope")
    assert solve_budget(vit, 1.0) == [0] * 12


def test_budget_needs_a_cost_model(vit, monkeypatch):
    """A registered method whose spec has no matching-cost model cannot get an analytic FLOP budget."""
    import dataclasses

    from vitmerge import merging

    spec = dataclasses.replace(merging.METHODS["tome"], name="unmodelled", match_flops=None)
    monkeypatch.setitem(merging.METHODS, "unmodelled", spec)
    with pytest.raises(ScheduleError, match="no FLOP model for method 'unmodelled'.*explicit r"):
        solve_budget(vit, 0.5, method="unmodelled")


def _err(fn):
    with pytest.raises(ScheduleError) as e:
        fn()
    return str(e.value)


def test_latency_budget():
    L, N, p = 12, 197, 1

    def lat(n):  # a made-up block latency: linear part plus attention's quadratic part
        return 0.01 * n + 2e-5 * n * n

    def cost(rs):  # independent re-computation of the documented latency model
        t, total = N, 0.0
        for r in rs:
            e = min(r, (t - p) // 2)
            total += lat(t) if e == 0 else 0.5 * (lat(t) + lat(t - e))
            t -= e
        return total

    base = cost([0] * L)
    for f in (0.9, 0.6):
        rs = solve_budget_latency(lat, f, L, N, p)
        assert f * base - 0.01 * base <= cost(rs) <= f * base
    # a measured table (dict) is interpolated: sampled from the same curve it gives the same answer
    table = {n: lat(n) for n in range(1, N + 1)}
    assert solve_budget_latency(table, 0.6, L, N, p) == solve_budget_latency(lat, 0.6, L, N, p)
    sparse = {n: lat(n) for n in (20, 50, 100, 150, 197)}
    rs = solve_budget_latency(sparse, 0.6, L, N, p)
    assert cost(rs) <= 0.61 * base
    with pytest.raises(ScheduleError, match="unreachable"):
        solve_budget_latency(lat, 0.01, L, N, p)
    with pytest.raises(ScheduleError, match="non-empty"):
        solve_budget_latency({}, 0.5, L, N, p)
    with pytest.raises(ScheduleError, match="latency > 0"):
        solve_budget_latency({10: -1.0, 197: 2.0}, 0.5, L, N, p)
    with pytest.raises(ScheduleError, match=r"\(0, 1\]"):
        solve_budget_latency(lat, 2, L, N, p)
