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
    with pytest.raises(ScheduleError, match="no FLOP model for method 'unmodelled': budgets can be solved for tome, hash, importance; "
                                            "give 'unmodelled' an explicit r per block instead"):
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


# ---------------------------------------------------------------------------------------------
# Budgets for any method (one r, FLOPs counted by running the model) and the CLI's options
# ---------------------------------------------------------------------------------------------


def small_vit(**kw):
    """17 tokens (16 patches + class token), 2 narrow blocks: every r can be tried by brute force."""
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    cfg.update(kw)
    m = timm.create_model("vit_tiny_patch16_224", **cfg).eval()
    for b in m.blocks:
        b.attn.fused_attn = False
    return m


_COUNTS = {}


def memo_count_flops(model, shape=None):
    """count_flops, once per model structure and static schedule (all a model's FLOPs depend on): the
    brute force below and the solver under test share the counts instead of each running the model."""
    info = getattr(model, "vitmerge", None)
    key = (len(model.blocks), model.embed_dim, tuple(model.patch_embed.img_size), shape,
           None if info is None else (info.method, repr(info.tokens), info.pre_r, repr(sorted(info.options.items()))))
    if key not in _COUNTS:
        _COUNTS[key] = count_flops(model, shape)
    return _COUNTS[key]


@pytest.fixture
def memo_flops(monkeypatch):
    from vitmerge.models import budget

    monkeypatch.setattr(budget, "count_flops", memo_count_flops)


def counted_fractions(model, method, single=False, **options):
    """{r: FLOPs of a patched copy with one r / FLOPs of the model} for every r the method accepts
    (r from 0 up to the first it refuses)."""
    import copy

    base = memo_count_flops(model)
    out = {}
    for r in range(0, 17):
        m = copy.deepcopy(model)
        try:
            vitmerge.apply(m, method, r=r if single else [r] * len(m.blocks), **options)
        except ScheduleError:
            break
        out[r] = memo_count_flops(m) / base
    return out


def smallest_r(fractions, f, n_blocks=None):
    r = min((r for r, got in fractions.items() if got <= f), default=None)
    return r if r is None or n_blocks is None else [r] * n_blocks


@pytest.mark.parametrize("method,options,single", [
    ("evo", {}, False),  # no FLOP model: the counted fallback, one r per block; refuses r > 14 of 15
    ("tome", {}, False),  # refuses r > 8: the largest accepted r is searched for
    ("vwt", {"mode": "intra"}, True),  # groups once before the encoder: a single r; takes r = 15
])
def test_constant_r_for_budget_is_the_smallest_r_that_fits(method, options, single, memo_flops):
    from vitmerge.models.budget import constant_r_for_budget

    m = small_vit()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fr = counted_fractions(m, method, single, **options)
    n = None if single else 2
    # 1.0: evo's r = 0 still computes the class attention it tracks (a little over 1.0), so it takes r = 1;
    # fr[3] exactly: "at most" the budget; below the least fraction any accepted r gives: a clear error
    # and the fraction of the largest accepted r exactly: reachable, so no error
    for f in ((1.0,) if method == "evo" else ()) + (fr[3], fr[max(fr)], 0.9 * min(fr.values())):
        want = smallest_r(fr, f, n)
        if want is None:
            with pytest.raises(ScheduleError, match=f"{method}: a FLOP budget of {f} cannot be met with one r "
                                                    rf"\(r={max(fr)} gives {fr[max(fr)]:.3f}\)"):
                constant_r_for_budget(m, f, method, **options)
        else:
            assert constant_r_for_budget(m, f, method, **options) == want, f
    assert getattr(m, "vitmerge", None) is None  # the model itself is never patched
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # a patched model is measured from its unmerged form, and stays patched as it was
    vitmerge.apply(m, method, r=2 if single else [2, 2], **options)
    assert constant_r_for_budget(m, fr[5], method, **options) == smallest_r(fr, fr[5], n)
    assert m.vitmerge.method == method
    assert count_flops(m) == pytest.approx(fr[2] * memo_count_flops(small_vit()), rel=1e-12)  # still merging


def test_constant_r_for_budget_errors(memo_flops):
    from vitmerge.models.budget import constant_r_for_budget

    m = small_vit()
    for bad in (0, -0.1, 1.01, "half", None, float("nan")):
        with pytest.raises(ScheduleError, match=r"FLOP budget must be a fraction in \(0, 1\]"):
            constant_r_for_budget(m, bad, "tome")
    assert constant_r_for_budget(m, 1.0, "tome") == [0, 0]
    assert constant_r_for_budget(m, "0.8", "tome") == constant_r_for_budget(m, 0.8, "tome")
    assert constant_r_for_budget(m, 0.8) == constant_r_for_budget(m, 0.8, "tome")  # tome is the default


def test_budget_schedule_picks_the_solver_by_method(memo_flops):
    from vitmerge.models.budget import budget_schedule, constant_r_for_budget

    m = small_vit()
    # tome merges inside the blocks and has a FLOP model: the analytic per-block solver
    assert budget_schedule(m, 0.7, "tome") == solve_budget(m, 0.7, "tome")
    assert budget_schedule(m, 0.7) == solve_budget(m, 0.7, "tome")  # tome is the default method
    assert budget_schedule(m, 0.7, "hash", bits=3) == solve_budget(m, 0.7, "hash", bits=3)
    # no FLOP model (evo) or a pre-encoder method (vwt): one r, counted
    assert budget_schedule(m, 0.7, "evo") == constant_r_for_budget(m, 0.7, "evo")
    assert budget_schedule(m, 0.7, "vwt", mode="intra") == smallest_r(counted_fractions(m, "vwt", True, mode="intra"), 0.7)


def test_achieved_fraction_counts_both_models():
    from vitmerge.models.budget import achieved_fraction

    m = small_vit()
    base = count_flops(m)
    vitmerge.apply(m, "tome", r=[4, 3])
    merged = count_flops(m)
    assert merged < base
    assert achieved_fraction(m) == merged / base
    vitmerge.remove(m)
    assert achieved_fraction(m) == 1.0


def test_latency_table_file(tmp_path):
    import json

    from vitmerge.models.budget import load_latency_table

    good = tmp_path / "lat.json"
    good.write_text(json.dumps({"17": 1.5, "9": "0.75"}))
    table = load_latency_table(good)
    assert table == {17: 1.5, 9: 0.75} and all(type(k) is int and type(v) is float for k, v in table.items())
    assert load_latency_table(str(good)) == table
    missing = tmp_path / "none.json"
    with pytest.raises(ScheduleError, match=f"--budget-latency table '{missing}' does not exist"):
        load_latency_table(missing)
    for text in ("[1, 2]", '{"a": 1}', '{"5": "fast"}', "{5: 1}", '{"5": null}'):
        good.write_text(text)
        with pytest.raises(ScheduleError, match=f"table '{good}' must be a JSON object .\"token count\": millis"):
            load_latency_table(good)
    good.write_text('{"17": 1.0}')
    with pytest.raises(ScheduleError, match=f"table '{good}' needs at least two token counts"):
        load_latency_table(good)


def test_resolve_schedule(tmp_path, memo_flops):
    import json

    from vitmerge.models.budget import budget_schedule, resolve_schedule

    m = small_vit(depth=4)  # 17 tokens, 1 prefix token, 4 blocks
    assert resolve_schedule(m, "tome", 3) == 3  # constant: as given
    assert resolve_schedule(m, "tome", [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert resolve_schedule(m, "tome", 4, schedule="decreasing") == [8, 5, 2, 0]  # 2r down to 0, truncated
    assert resolve_schedule(m, "tome", 0, budget=0.7) == solve_budget(m, 0.7, "tome")
    assert resolve_schedule(m, "evo", 0, budget=0.8) == budget_schedule(m, 0.8, "evo")  # tested above
    table = tmp_path / "lat.json"
    table.write_text(json.dumps({"1": 1.0, "17": 17.0}))  # block latency linear in the tokens

    def cost(rs):  # the documented latency model, by hand: mean latency at tokens in and out
        t, total = 17, 0.0
        for r in rs:
            e = min(r, (t - 1) // 2)
            total += t if e == 0 else 0.5 * (t + t - e)
            t -= e
        return total

    for method in ("tome", "importance"):
        rs = resolve_schedule(m, method, 0, budget=0.6, budget_latency=table)
        assert rs == solve_budget_latency({1: 1.0, 17: 17.0}, 0.6, 4, 17, 1, method)
    rs = resolve_schedule(m, "tome", 0, budget=0.6, budget_latency=str(table))
    assert 0.55 * cost([0] * 4) <= cost(rs) <= 0.6 * cost([0] * 4)
    with pytest.raises(ScheduleError, match=r"--budget-latency TABLE needs --budget F"):
        resolve_schedule(m, "tome", 0, budget_latency=table)


def test_named_schedule_edges():
    assert decreasing(3, 4, inflection=-1) == [8, 4, 0] and decreasing(3, 4, inflection=1) == [0, 4, 8]
    for bad in (-1.5, -1.0001, 1.0001, 2.0):
        with pytest.raises(ScheduleError, match=rf"inflection must be in \[-1, 1\], got {bad}"):
            decreasing(3, 4, bad)
    assert parse_schedule(4, 0, "decreasing") == [0, 0, 0, 0]  # r = 0 is valid: no merging
    with pytest.raises(ScheduleError, match="r must be >= 0, got -1"):
        parse_schedule(4, -1, "decreasing")
    with pytest.raises(ScheduleError, match=r"unknown schedule 'zigzag': choose one of constant, decreasing "
                                            r"\(or a budget: solve_budget / --budget F\)$"):
        parse_schedule(4, 4, "zigzag")


def test_latency_table_interpolation():
    """The interpolated block latency against a direct reading of the documented rule: linear between
    measured counts (numpy.interp), proportional to the count below the smallest, the last segment
    extended above the largest; one point: proportional everywhere."""
    import numpy as np

    from vitmerge.merging.schedule import _interpolator

    table = {20: 1.2, 50: 2.5, "100": "4.0", 197: 9.0}
    f = _interpolator(table)
    xs, ys = [20, 50, 100, 197], [1.2, 2.5, 4.0, 9.0]
    for n in range(20, 198):
        assert f(n) == pytest.approx(float(np.interp(n, xs, ys)), rel=1e-12)
    for n in (1, 5, 19):
        assert f(n) == pytest.approx(1.2 * n / 20, rel=1e-12)
    for n in (198, 250):
        assert f(n) == pytest.approx(9.0 + (9.0 - 4.0) * (n - 197) / 97, rel=1e-12)
    three = _interpolator({10: 1.0, 20: 3.0, 40: 4.0})  # the last segment, whatever the number of points
    assert [three(n) for n in (40, 60, 80)] == pytest.approx([4.0, 5.0, 6.0], rel=1e-12)
    one = _interpolator({10: 2.0})
    assert [one(n) for n in (5, 10, 30)] == pytest.approx([1.0, 2.0, 6.0], rel=1e-12)
    assert _interpolator(lambda n: n * 2)(3) == 6.0 and type(_interpolator(lambda n: 6)(3)) is float
    with pytest.raises(ScheduleError, match=r"^the latency table must be a non-empty \{token count: latency\} "
                                            r"mapping or a callable$"):
        _interpolator({})
    with pytest.raises(ScheduleError, match="non-empty"):
        _interpolator([(10, 1.0)])
    with pytest.raises(ScheduleError, match=r"^latency table entry 'ten': 1.0 is not \(token count: latency\)$"):
        _interpolator({"ten": 1.0})
    for k, v in ((10, 0.0), (10, -1.0), (0, 1.0), (10, float("inf")), (10, float("nan"))):
        with pytest.raises(ScheduleError, match=rf"^latency table entry {k!r}: {v!r} needs a token count >= 1 "
                                                r"and a latency > 0$"):
            _interpolator({k: v, 197: 2.0})


def test_latency_budget_arguments_and_one_token_steps():
    def lat(n):
        return float(n)  # linear: a block costs its token count

    assert solve_budget_latency(lat, 0.9, 1, 3) == [1]  # protected defaults to 1 (with 2, nothing could merge)
    # one block, 3 tokens, ToMe removes at most one: cost 3 unmerged, (3 + 2) / 2 = 2.5 with r = 1
    assert solve_budget_latency(lat, 2.5 / 3, 1, 3, 1) == [1]
    assert solve_budget_latency(lat, 0.99, 1, 3, 1) == [1]
    assert solve_budget_latency(lat, 1.0, 1, 3, 1) == [0]
    with pytest.raises(ScheduleError, match=r"^a latency budget of 0.8 of the unmerged model is unreachable with "
                                            r"method 'tome': merging as much as it can in every block still costs "
                                            r"0\.8333; use a budget >= 0\.8333$"):
        solve_budget_latency(lat, 0.8, 1, 3, 1)
    # the edges of the valid arguments
    assert solve_budget_latency(lat, 1.0, 1, 1, 0) == [0]
    assert solve_budget_latency(lat, 1.0, 2, 5, 5) == [0, 0]
    assert solve_budget_latency(lat, 0.9, 1, 3, 0) == [1]
    for L, N, p in ((0, 17, 1), (2, 0, 0), (2, 17, -1), (2, 17, 18)):
        with pytest.raises(ScheduleError, match=rf"^need num_layers >= 1, n_tokens >= 1 and 0 <= protected <= "
                                                rf"n_tokens, got {L}, {N}, {p}$"):
            solve_budget_latency(lat, 0.5, L, N, p)


def test_flop_model_parts_and_protected(memo_flops):
    import sys
    from pathlib import Path

    from vitmerge.errors import UnsupportedModelError
    from vitmerge.models.budget import model_flops_parts

    sys.path.insert(0, str(Path(__file__).parent))
    from support import hf_models

    hf = hf_models.make("vit")  # the transformers family reads its own structure
    assert schedule_flops(hf, [0, 0]) == count_flops(hf)
    odd = small_vit()
    odd.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match=r"^cannot solve a FLOP budget for this model: block 1 uses "
                                                    r"Identity, not timm's standard Attention$"):
        model_flops_parts(odd)
    m = small_vit()
    # protected given explicitly overrides the model's prefix tokens (1 here): with none protected,
    # importance can remove 16 of the 17 tokens in block 0 instead of 15
    assert schedule_flops(m, [16, 0], "importance", protected=1) == schedule_flops(m, [16, 0], "importance")
    assert schedule_flops(m, [16, 0], "importance", protected=0) < schedule_flops(m, [16, 0], "importance")
    msg = _err(lambda: solve_budget(m, 0.05, "importance", protected=1))
    least = float(re.search(r">= ([0-9.]+)", msg).group(1))
    with pytest.raises(ScheduleError, match="unreachable"):
        solve_budget(m, least - 0.002, "importance", protected=1)
    rs = solve_budget(m, least - 0.002, "importance", protected=0)  # reachable with no token protected
    assert schedule_flops(m, rs, "importance", protected=0) <= (least - 0.002) * schedule_flops(m, [0, 0])


def test_importance_flop_model_against_count_flops():
    """The importance cost model counts every product FlopCounterMode sees but the class-attention row
    the method computes in each merging block (q_cls . K^T: 2 * N * dim), which the block model leaves out."""
    m = small_vit(depth=3)
    rs = [4, 0, 3]
    vitmerge.apply(m, "importance", r=rs)
    measured = count_flops(m)
    tokens = m.vitmerge.tokens
    vitmerge.remove(m)
    cls_rows = sum(2 * n_in * m.embed_dim for n_in, e, _ in tokens if e)
    assert schedule_flops(m, rs, "importance") + cls_rows == measured


def test_budget_messages_and_options(vit, memo_flops, caplog, monkeypatch):
    import dataclasses
    import logging

    from vitmerge import merging
    from vitmerge.models.budget import budget_schedule, resolve_schedule

    with pytest.raises(ScheduleError, match=r"^a FLOP budget of 0.05 of the unmerged model is unreachable with "
                                            r"method 'tome': "):
        solve_budget(vit, 0.05, "tome")
    with caplog.at_level(logging.INFO, logger="vitmerge.models.budget"):
        rs = solve_budget(vit, 0.7, "tome")
    assert [r.getMessage() for r in caplog.records] == [f"FLOP budget 0.7 with tome: r per block {rs} (analytic block model)"]
    m = small_vit()
    with pytest.raises(ScheduleError, match=r"^--budget-latency TABLE needs --budget F \(the latency fraction to meet\)$"):
        resolve_schedule(m, "tome", 0, budget_latency="lat.json")
    # the method's options reach the solver (vwt's default mode needs a vocabulary)
    want = smallest_r(counted_fractions(m, "vwt", True, mode="intra"), 0.8)
    assert resolve_schedule(m, "vwt", 0, budget=0.8, mode="intra") == want
    # a method that groups before the encoder takes the counted single r even if it had a matching-cost model
    spec = dataclasses.replace(merging.METHODS["vwt"], match_flops=merging.METHODS["importance"].match_flops)
    monkeypatch.setitem(merging.METHODS, "vwt", spec)
    assert budget_schedule(m, 0.8, "vwt", mode="intra") == want


def test_merge_cost_defaults_and_options():
    from vitmerge.models.budget import merge_flops

    assert merge_flops("importance", 17, 1, 64) == 0  # r defaults to 0: nothing merged, nothing matched
    m = small_vit()
    rows = token_counts(17, [4, 4], 1, tome_cap)
    # hash's projections cost 2 * n * dim * bits * rounds per merging block: the options reach the model
    extra = sum(2 * n_in * 16 * (6 - 4) * 3 for n_in, e, _ in rows if e)  # head_dim 16, 3 rounds
    assert schedule_flops(m, [4, 4], "hash", bits=6, rounds=3) - schedule_flops(m, [4, 4], "hash", bits=4,
                                                                                  rounds=3) == extra


def _reference_solve(L, N, p, eff, cost, fraction):
    """The solver as its docstring describes it, written plainly: the smallest constant r that fits by a
    linear scan, then passes from the last block to the first, each giving one token back in a block
    wherever the budget still holds, until a pass changes nothing."""
    def run(rs):
        rows = token_counts(N, rs, p, eff)
        return [e for _, e, _ in rows], cost(rows)

    base = run([0] * L)[1]
    budget = fraction * base * (1 + 1e-12)
    if base <= budget:
        return [0] * L
    r = next(r for r in range(N + 1) if run([r] * L)[1] <= budget)
    rs = run([r] * L)[0]
    while True:
        before = list(rs)
        for i in range(L - 1, -1, -1):
            if rs[i] > 0:
                trial = rs[:i] + [rs[i] - 1] + rs[i + 1:]
                eff_trial, c = run(trial)
                if c <= budget:
                    rs = eff_trial
        if rs == before:
            return rs


def test_solver_against_a_plain_reference():
    """Random block counts, token counts, protected tokens, methods (their own r limits) and costs (tokens
    in and out, attention-like quadratic term): the solver returns what the plain reference does."""
    import random

    from vitmerge import merging

    rng = random.Random(0)
    checked = 0
    while checked < 150:
        method = rng.choice(["tome", "hash", "importance"])
        L, N, p = rng.randint(1, 7), rng.randint(3, 80), rng.randint(0, 2)
        a, b = rng.random(), rng.random()

        def cost(rows, a=a, b=b):
            return sum(a * t_in + b * t_out + 0.001 * t_in * t_in for t_in, _, t_out in rows)

        def eff(n, r, pr, m=method):
            return merging.effective_r(m, n, r, pr)

        f = rng.uniform(0.05, 1.0)
        cap = eff(N, N, p)
        if cost(token_counts(N, [cap] * L, p, eff)) > f * cost(token_counts(N, [0] * L, p, eff)):
            continue  # unreachable: test_budget_errors covers the message
        assert solve(L, N, p, eff, cost, f, "test", method) == _reference_solve(L, N, p, eff, cost, f), (method, L, N, p, f)
        checked += 1


def test_parse_r_forms_and_messages():
    """Only a 2-tuple whose second item is a float is (r, inflection); other tuples and lists are one r per
    block, whatever their items' types."""
    assert parse_r(4, (4, 0.0)) == [4, 4, 4, 4]  # inflection 0: constant (not the default -1)
    assert parse_r(4, (4, -1.0)) == decreasing(4, 4, -1.0) == [8, 5, 2, 0]
    assert parse_r(2, [4, 2.0]) == [4, 2]
    assert parse_r(2, (4, 1)) == [4, 1] and parse_r(3, (3, 2, 1)) == [3, 2, 1]
    for bad, message in ((True, "r must be an int, a list of ints or an (r, inflection) tuple, not bool"),
                         ([2, -1], "every r must be >= 0, got [2, -1]"), (-2, "r must be >= 0, got -2")):
        with pytest.raises(ScheduleError) as e:
            parse_r(2, bad)
        assert str(e.value) == message


def test_budget_fraction_messages():
    def cap(n, r, p):
        return max(0, min(r, n - p - 1))

    def cost(rows):
        return sum(n_out for _, _, n_out in rows)

    with pytest.raises(ScheduleError) as e:
        solve(4, 100, 1, cap, cost, 1.5, "FLOP", "tome")
    assert str(e.value) == ("the FLOP budget must be a fraction of the unmerged model in (0, 1], got 1.5 "
                            "(e.g. 0.5 for half the cost)")
    with pytest.raises(ScheduleError) as e:
        solve(4, 100, 1, cap, cost, "half", "latency", "tome")
    assert str(e.value) == "the latency budget must be a number in (0, 1], got 'half'"
