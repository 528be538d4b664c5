"""The merge contract and ToMe's bipartite matching against a simple float64 reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vitmerge import merging
from vitmerge.errors import ScheduleError
from vitmerge.merging.bipartite import max_r

from support.reference_tome import bipartite_groups, merge_rows


def _random(B, N, C, D, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (B, N, 1), generator=g).double()
    return metric, x, size


@pytest.mark.parametrize("N,r,protected", [(9, 3, 1), (16, 5, 1), (17, 8, 1), (30, 7, 2), (11, 4, 3), (197, 16, 1),
                                            # nothing protected (global-average-pool models): odd and even N
                                            (12, 6, 0), (13, 5, 0), (13, 6, 0), (2, 1, 0), (3, 1, 0), (40, 3, 0)])
def test_tome_matches_loop_reference(N, r, protected):
    B, C, D = 3, 8, 5
    metric, x, size = _random(B, N, C, D, seed=N * 100 + r)
    plan = merging.plan("tome", metric, r, protected=protected)
    x_out, s_out = plan.merge(x, size)
    for b in range(B):
        order, groups = bipartite_groups(metric[b], r, protected)
        # same assignment: every input token lands in the reference's output slot
        want = torch.empty(N, dtype=torch.long)
        for slot, g in enumerate(groups):
            want[g] = slot
        assert torch.equal(plan.assign[b], want)
        ref_x, ref_s = merge_rows(x[b], size[b, :, 0], groups)
        torch.testing.assert_close(x_out[b], ref_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_out[b, :, 0], ref_s, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    N=st.integers(2, 70),
    r=st.integers(0, 40),
    protected=st.integers(0, 3),
    B=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_tome_properties(N, r, protected, B, seed):
    protected = min(protected, N)
    metric, x, size = _random(B, N, 6, 4, seed)
    plan = merging.plan("tome", metric, r, protected=protected)
    x_out, s_out = plan.merge(x, size)
    r_eff = min(r, max_r(N, protected))
    assert r_eff == merging.effective_r("tome", N, r, protected)
    # static count: exactly N - r
    assert x_out.shape == (B, N - r_eff, 4) and s_out.shape == (B, N - r_eff, 1)
    # every patch is accounted for once
    torch.testing.assert_close(s_out.sum(1), size.sum(1))
    # and the weighted sum of values is conserved
    torch.testing.assert_close((x_out * s_out).sum(1), (x * size).sum(1))
    # protected tokens stay first and untouched
    torch.testing.assert_close(x_out[:, :protected], x[:, :protected], rtol=1e-15, atol=0)
    assert torch.equal(s_out[:, :protected], size[:, :protected])
    assert not torch.isin(plan.src, torch.arange(protected)).any()
    # every input token is in exactly one output slot
    a = plan.assign
    assert a.min() >= 0 and a.max() < N - r_eff
    for b in range(B):
        assert torch.bincount(a[b], minlength=N - r_eff).min() >= 1


@settings(max_examples=40, deadline=None)
@given(N=st.integers(6, 60), r=st.integers(1, 20), protected=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_tome_invariant_to_token_order_within_sets(N, r, protected, seed):
    """Reordering the unprotected tokens within set A and within set B (ToMe's alternating split)
    changes neither which tokens merge together nor the merged values: only their order."""
    metric, x, size = _random(1, N, 6, 4, seed)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.arange(N)
    for parity in (0, 1):
        pos = torch.arange(N)[(torch.arange(N) % 2 == parity) & (torch.arange(N) >= protected)]
        perm[pos] = pos[torch.randperm(len(pos), generator=g)]
    out1, s1 = merging.plan("tome", metric, r, protected).merge(x, size)
    out2, s2 = merging.plan("tome", metric[:, perm], r, protected).merge(x[:, perm], size[:, perm])

    def canon(o, s):
        rows = torch.cat([o[0], s[0]], dim=-1)
        return rows[torch.argsort(rows[:, 0])]

    torch.testing.assert_close(canon(out1, s1), canon(out2, s2), rtol=1e-12, atol=1e-12)


def _loop_weighted_merge(x, size, weight, keep, src, dst):
    """float64 loops over one image: slot j averages its kept token and every src with dst == j,
    weighted by weight * size; its size is the plain sum of sizes."""
    xs, ss = [], []
    for j, k in enumerate(keep):
        members = [k] + [s for s, d in zip(src, dst) if d == j]
        w = [float(weight[i]) * float(size[i]) for i in members]
        xs.append(sum(x[i] * wi for i, wi in zip(members, w)) / sum(w))
        ss.append(sum(float(size[i]) for i in members))
    return torch.stack(xs), torch.tensor(ss, dtype=torch.float64)


@pytest.mark.parametrize("with_size", [True, False])
def test_weighted_merge_matches_loop_reference(with_size):
    """Plans with an extra averaging weight (importance): x' = sum(x w s) / sum(w s), s' = sum(s).
    Sizes and weights both vary, so dropping either from the average changes the result."""
    g = torch.Generator().manual_seed(5)
    B, N, D = 2, 10, 4
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    size = torch.randint(1, 6, (B, N, 1), generator=g).double() if with_size else None
    weight = torch.rand(B, N, 1, generator=g, dtype=torch.float64) + 0.05
    keep = torch.tensor([[0, 2, 3, 5, 7, 9], [0, 1, 4, 6, 8, 9]])
    src = torch.tensor([[1, 4, 6, 8], [2, 3, 5, 7]])
    dst = torch.tensor([[1, 1, 5, 2], [3, 3, 0, 5]])  # two sources into one slot, slots with none
    x_out, s_out = merging.MergePlan(keep=keep, src=src, dst=dst, weight=weight).merge(x, size)
    sz = size if with_size else torch.ones(B, N, 1, dtype=torch.float64)
    for b in range(B):
        ref_x, ref_s = _loop_weighted_merge(x[b], sz[b, :, 0], weight[b, :, 0], keep[b].tolist(), src[b].tolist(),
                                            dst[b].tolist())
        torch.testing.assert_close(x_out[b], ref_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_out[b, :, 0], ref_s, rtol=0, atol=0)


def test_unweighted_plan_with_explicit_indices():
    """The same hand-made plan without a weight: the size-weighted average, checked by the same loop."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 7, 3, generator=g, dtype=torch.float64)
    size = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0]]], dtype=torch.float64)
    keep, src, dst = [[6, 0, 3]], [[1, 2, 4, 5]], [[0, 0, 2, 1]]  # output order need not follow input order
    plan = merging.MergePlan(keep=torch.tensor(keep), src=torch.tensor(src), dst=torch.tensor(dst))
    x_out, s_out = plan.merge(x, size)
    ref_x, ref_s = _loop_weighted_merge(x[0], size[0, :, 0], torch.ones(7), keep[0], src[0], dst[0])
    torch.testing.assert_close(x_out[0], ref_x, rtol=1e-12, atol=1e-12)
    assert s_out[0, :, 0].tolist() == ref_s.tolist() == [7.0 + 2.0 + 3.0, 1.0 + 6.0, 4.0 + 5.0]
    assert plan.assign[0].tolist() == [1, 0, 0, 2, 2, 1, 0]
    assert (plan.n_in, plan.n_out, plan.r) == (7, 3, 4)
    src_map = plan.merge_source()
    assert src_map[0].tolist() == [[0, 1, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 0, 0]]


def test_r_zero_is_identity():
    metric, x, size = _random(2, 11, 4, 3, 0)
    plan = merging.plan("tome", metric, 0)
    xo, so = plan.merge(x, size)
    assert torch.equal(xo, x) and torch.equal(so, size)


def test_size_defaults_to_ones_and_float32_path():
    metric, x, _ = _random(2, 20, 4, 3, 1)
    plan = merging.plan("tome", metric.float(), 6)
    xo, so = plan.merge(x.float())
    assert xo.dtype == torch.float32 and so.sum().item() == 2 * 20


def test_merge_source_tracks_original_patches():
    metric, x, size = _random(1, 15, 4, 3, 2)
    plan = merging.plan("tome", metric, 5)
    src = plan.merge_source()
    assert src.shape == (1, 10, 15)
    assert torch.equal(src.sum(1), torch.ones(1, 15))  # each patch in exactly one token
    assert torch.equal(src.argmax(1)[0], plan.assign[0])


def test_bad_arguments():
    with pytest.raises(ScheduleError, match="available: .*tome"):
        merging.plan("nope", torch.randn(1, 4, 2), 1)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        merging.plan("tome", torch.randn(4, 2), 1)
    with pytest.raises(ValueError, match="protected"):
        merging.plan("tome", torch.randn(1, 4, 2), 1, protected=5)


def test_method_spec_rejects_unknown_form_and_invariance():
    import dataclasses

    tome = merging.METHODS["tome"]
    with pytest.raises(ValueError, match=r"x: form must be one of \('block', 'slow_fast', 'pre_encoder'\), got 'side'"):
        dataclasses.replace(tome, name="x", form="side")
    with pytest.raises(ValueError, match=r"y: invariance must be one of \('any', 'alternating', 'none'\), got 'some'"):
        dataclasses.replace(tome, name="y", invariance="some")


@pytest.mark.parametrize("r", [0, 3])
def test_plans_stay_on_the_metric_device(r):
    """Every tensor a plan makes (its identity indices, the source map) lives where the metric lives: on a
    GPU a CPU-made index would fail at the first gather. The meta device shows the same mistake on a CPU."""
    metric = torch.randn(2, 9, 4, device="meta")
    p = merging.plan("tome", metric, r, 1)
    assert p.keep.device.type == "meta" and p.src.device.type == "meta"
    src = p.merge_source()
    assert src.device.type == "meta" and tuple(src.shape) == (2, 9 - r, 9)


def test_bad_arguments_full_messages():
    """The errors as the user reads them: every method listed, every unknown option named with what the method
    takes, N (not C) in the protected range even when C > N."""
    with pytest.raises(ScheduleError, match=r"^unknown merge method 'nope'; available: tome, hash, importance, evo, "
                                            r"vwt$"):
        merging.plan("nope", torch.randn(1, 4, 2), 1)
    with pytest.raises(ScheduleError, match=r"^method 'tome' got unknown option\(s\) bits, zeta; it takes no options "
                                            r"\(see docs/methods/tome.md\)$"):
        merging.METHODS["tome"].check_options(zeta=1, bits=2)
    with pytest.raises(ScheduleError, match=r"^method 'hash' got unknown option\(s\) mode; it takes bits, rounds, "
                                            r"seed \(see docs/methods/hash.md\)$"):
        merging.METHODS["hash"].check_options(mode="x", bits=8)
    merging.METHODS["hash"].check_options(bits=8, rounds=1)  # known options pass
    metric = torch.randn(1, 6, 32)  # C = 32 > N = 6: the range is [0, N]
    with pytest.raises(ValueError, match=r"^protected=7 is outside \[0, N=6\]$"):
        merging.plan("tome", metric, 1, protected=7)
    assert merging.plan("tome", metric, 1, protected=6).r == 0  # all protected: valid, nothing merges


def test_plan_protects_the_class_token_by_default():
    """protected defaults to 1 (the class token), in merging.plan and in the method's own function: tokens may
    merge into token 1 (B's first), never into token 0."""
    from vitmerge.merging.bipartite import bipartite_plan

    g = torch.Generator().manual_seed(0)
    moved = 0
    for _ in range(20):
        metric = torch.randn(1, 9, 4, generator=g)
        p = merging.plan("tome", metric, 4)
        assert torch.equal(bipartite_plan(metric, 4).keep, p.keep) and torch.equal(bipartite_plan(metric, 4).dst, p.dst)
        assert torch.equal(p.keep, merging.plan("tome", metric, 4, protected=1).keep)
        assert 0 not in p.src.tolist()[0] and p.keep[0, 0] == 0
        a = p.assign[0]
        assert int((a == a[0]).sum()) == 1  # the class token's slot holds it alone
        moved += int((a == a[1]).sum()) > 1  # with protected=2 nothing could merge into token 1
    assert moved > 0


def _scatter_add_loop(out, idx, rows):
    res = out.double().clone()
    for b in range(out.shape[0]):
        for k in range(idx.shape[1]):
            res[b, idx[b, k]] += rows[b, k].double()
    return res


def test_batch_scatter_add_both_forms_against_a_loop():
    """Index-add and the one-hot MatMul (native graph form) add the same rows, duplicates accumulating, as a
    float64 loop; the default is the index-add (what eager merging and the standard export use)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vitmerge.merging.base import batch_scatter_add

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(1)
    out = torch.randn(2, 5, 3, generator=g)
    idx = torch.tensor([[4, 0, 4, 2], [1, 1, 1, 3]])
    rows = torch.randn(2, 4, 3, generator=g)
    want = _scatter_add_loop(out, idx, rows)
    for free in (False, True):
        got = batch_scatter_add(out, idx, rows, scatter_free=free)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-6)
    with Ops() as ops:
        batch_scatter_add(out, idx, rows)
    assert "index_add" in ops.seen and "bmm" not in ops.seen
    with Ops() as ops:
        batch_scatter_add(out, idx, rows, scatter_free=True)
    assert "index_add" not in ops.seen
    meta = batch_scatter_add(out.to("meta"), idx.to("meta"), rows.to("meta"), scatter_free=True)
    assert meta.device.type == "meta" and tuple(meta.shape) == (2, 5, 3)
    plan = merging.plan("tome", torch.randn(2, 9, 4, generator=g), 3)  # and MergePlan.merge's default
    with Ops() as ops:
        plan.merge(torch.randn(2, 9, 3, generator=g))
    assert "index_add" in ops.seen and "bmm" not in ops.seen


@pytest.mark.parametrize("free", [False, True])
def test_merge_uses_the_form_it_is_asked_for(free):
    """MergePlan.merge(scatter_free=True) adds merged rows without an index-add (TensorRT's parser refuses the
    ScatterND it exports as); both forms give the loop reference's size-weighted average."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    metric, x, size = _random(2, 11, 4, 6, seed=3)
    plan = merging.plan("tome", metric, 3)
    Ops.seen = set()
    with Ops():
        xm, sm = plan.merge(x, size, scatter_free=free)
    assert ("index_add" in Ops.seen) != free
    for b in range(2):
        ref_x, ref_s = _loop_weighted_merge(x[b], size[b, :, 0], torch.ones(11), plan.keep[b].tolist(),
                                            plan.src[b].tolist(), plan.dst[b].tolist())
        torch.testing.assert_close(xm[b], ref_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sm[b, :, 0], ref_s, rtol=0, atol=0)


@pytest.mark.parametrize("n", [9, 10, 17])
def test_tome_match_flops_counts_the_score_matrix(n):
    """match_flops = the FLOPs torch's FlopCounterMode sees in a tome plan (the A x B score MatMul), odd and even
    token counts alike."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitmerge.merging.bipartite import match_flops

    metric = torch.randn(1, n, 8)
    with FlopCounterMode(display=False) as fc:
        merging.plan("tome", metric, 2)
    assert match_flops(n, 1, 8) == fc.get_total_flops() and isinstance(match_flops(n, 1, 8), int)
    assert match_flops(n, 1, 8, r=3) == match_flops(n, 1, 8)  # r does not change the score matrix
