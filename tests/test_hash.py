"""The ``hash`` method (LSH neighbours in ToMe's match step) against a simple float64 reference."""
import math

import onnx
import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st

import vitmerge
from vitmerge import merging
from vitmerge.errors import ScheduleError
from vitmerge.merging import hashing

from support.aten_ops import record_ops
from support.reference_tome import merge_rows


# ---------------------------------------------------------------- independent float64 reference


def reference_hash_groups(metric, r, protected, bits=16, rounds=2, seed=0, orders_only=False):
    """One image, written from the method's description with plain loops over float64 numbers.

    Returns the output tokens in order, each a list of input indices (the first one stays); with
    ``orders_only``, the hash orders (lists of token indices, one per round)."""
    N, C = metric.shape
    toks = list(range(protected, N))
    U = len(toks)
    r = max(0, min(r, U - 1))
    P = torch.randn(C, rounds * bits, generator=torch.Generator().manual_seed(seed)).double()

    def gray_rank(i, k):
        parity, value = 0, 0
        for j in range(bits):
            bit = 1 if float(metric[i] @ P[:, k * bits + j]) > 0 else 0
            parity ^= bit  # reflected Gray code -> rank: running parity of the code bits
            value = 2 * value + parity
        return value

    orders = [sorted(toks, key=lambda i: (gray_rank(i, k), i)) for k in range(rounds)]
    if orders_only:
        return orders
    pos0 = {t: n for n, t in enumerate(orders[0])}

    def cos(a, b):
        na, nb = float(metric[a].norm()), float(metric[b].norm())
        return float(metric[a] @ metric[b]) / (na * nb) if na * nb > 0 else 0.0  # a zero token: similar to nothing

    best = {}
    for i in toks:
        top = (-math.inf, None)
        for k, order in enumerate(orders):
            p = order.index(i)
            for q in ([p + 1] if k == 0 else [p - 1, p + 1]):
                if 0 <= q < U and pos0[order[q]] > pos0[i]:  # only partners later in round 0's order
                    s = cos(i, order[q])
                    if s > top[0]:
                        top = (s, order[q])
        best[i] = top
    sources = sorted(toks, key=lambda i: (-best[i][0], i))[:r]

    def root(i):
        while i in sources:
            i = best[i][1]
        return i

    kept = list(range(protected)) + [t for t in toks if t not in sources]
    groups = {t: [t] for t in kept}
    for s in sources:
        groups[root(s)].append(s)
    return [groups[t] for t in kept]


def _random(B, N, C, D, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (B, N, 1), generator=g).double()
    return metric, x, size


def _check_against(plan, x, size, groups_per_image):
    x_out, s_out = plan.merge(x, size)
    for b, groups in enumerate(groups_per_image):
        want = torch.empty(x.shape[1], dtype=torch.long)
        for slot, g in enumerate(groups):
            want[g] = slot
        assert torch.equal(plan.assign[b], want)
        ref_x, ref_s = merge_rows(x[b], size[b, :, 0], groups)
        torch.testing.assert_close(x_out[b], ref_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_out[b, :, 0], ref_s, rtol=0, atol=0)


@pytest.mark.parametrize("N,r,protected,bits,rounds,seed", [
    (9, 3, 1, 16, 2, 0), (17, 8, 1, 16, 2, 1), (17, 15, 1, 16, 2, 2),  # r up to N - protected - 1
    (30, 20, 2, 4, 3, 3), (12, 5, 0, 1, 1, 4), (25, 11, 3, 8, 4, 5), (40, 39, 0, 16, 2, 6),
])
def test_matches_loop_reference(N, r, protected, bits, rounds, seed):
    B, C, D = 2, 8, 5
    metric, x, size = _random(B, N, C, D, seed=N * 100 + r)
    plan = merging.plan("hash", metric, r, protected=protected, bits=bits, rounds=rounds, seed=seed)
    assert plan.n_out == N - r
    _check_against(plan, x, size,
                   [reference_hash_groups(metric[b], r, protected, bits, rounds, seed) for b in range(B)])


@settings(max_examples=60, deadline=None)
@given(N=st.integers(2, 70), r=st.integers(0, 80), protected=st.integers(0, 3), B=st.integers(1, 3),
       bits=st.integers(1, 20), rounds=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_properties(N, r, protected, B, bits, rounds, seed):
    protected = min(protected, N)
    metric, x, size = _random(B, N, 6, 4, seed)
    plan = merging.plan("hash", metric, r, protected=protected, bits=bits, rounds=rounds, seed=seed)
    r_eff = max(0, min(r, N - protected - 1))
    assert r_eff == merging.effective_r("hash", N, r, protected) == plan.r
    x_out, s_out = plan.merge(x, size)
    assert x_out.shape == (B, N - r_eff, 4) and s_out.shape == (B, N - r_eff, 1)  # static count
    torch.testing.assert_close(s_out.sum(1), size.sum(1))  # every patch accounted for once
    torch.testing.assert_close((x_out * s_out).sum(1), (x * size).sum(1))
    # protected tokens first, untouched (x * size / size: equal up to rounding), never merged into
    torch.testing.assert_close(x_out[:, :protected], x[:, :protected], rtol=1e-15, atol=0)
    assert torch.equal(s_out[:, :protected], size[:, :protected])
    assert not torch.isin(plan.src, torch.arange(protected)).any()
    assert (plan.dst >= protected).all()
    # no chains in the plan: a destination slot holds a kept token, never a merged-away one
    for b in range(B):
        assert not set(plan.keep[b].tolist()) & set(plan.src[b].tolist())
        assert sorted(plan.keep[b].tolist() + plan.src[b].tolist()) == list(range(N))
        assert torch.equal(plan.keep[b, protected:], plan.keep[b, protected:].sort().values)  # original order


def test_exact_duplicates_pairs_merge_exactly():
    """Tokens in identical pairs: hashing must find every pair; outputs are the pair averages."""
    B, K, C, D, p = 2, 20, 16, 6, 1
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, K, C, generator=g, dtype=torch.float64)
    metric = torch.cat([torch.randn(B, p, C, generator=g, dtype=torch.float64),
                        base.repeat_interleave(2, dim=1)], dim=1)  # tokens 1+2k and 2+2k identical
    x = torch.randn(B, p + 2 * K, D, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (B, p + 2 * K, 1), generator=g).double()
    plan = merging.plan("hash", metric, K, protected=p)
    x_out, s_out = plan.merge(x, size)
    for b in range(B):
        for k in range(K):
            i, j = p + 2 * k, p + 2 * k + 1
            want = (x[b, i] * size[b, i] + x[b, j] * size[b, j]) / (size[b, i] + size[b, j])
            torch.testing.assert_close(x_out[b, p + k], want, rtol=1e-12, atol=1e-12)
            assert s_out[b, p + k, 0] == size[b, i, 0] + size[b, j, 0]
    torch.testing.assert_close(x_out[:, :p], x[:, :p], rtol=1e-15, atol=0)


def test_more_than_half_collapses_groups_of_four():
    """r = 3/4 of the tokens in one step (beyond bipartite's limit): many sources per destination."""
    K, C, p = 12, 16, 1
    g = torch.Generator().manual_seed(1)
    metric = torch.cat([torch.randn(1, p, C, generator=g, dtype=torch.float64),
                        torch.randn(1, K, C, generator=g, dtype=torch.float64).repeat_interleave(4, dim=1)], 1)
    x = torch.randn(1, p + 4 * K, 3, generator=g, dtype=torch.float64)
    plan = merging.plan("hash", metric, 3 * K, protected=p)
    assert plan.n_out == p + K
    x_out, s_out = plan.merge(x)
    want = x[0, p:].reshape(K, 4, 3).mean(1)
    torch.testing.assert_close(x_out[0, p:], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(s_out[0, p:, 0], torch.full((K,), 4.0, dtype=torch.float64))


def test_determinism_and_seed():
    metric, _, _ = _random(2, 50, 8, 3, 7)
    a = merging.plan("hash", metric, 20, seed=3)
    b = merging.plan("hash", metric.clone(), 20, seed=3)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.src, b.src) and torch.equal(a.dst, b.dst)
    # another seed gives other hash orders (and, on this input, another plan)
    o3 = hashing.hash_orders(metric, 16, 2, 3, protected=1)
    o4 = hashing.hash_orders(metric, 16, 2, 4, protected=1)
    assert not torch.equal(o3, o4)
    c = merging.plan("hash", metric, 20, seed=4)
    assert not torch.equal(a.assign, c.assign)


def test_projection_is_a_fixed_gaussian_draw():
    """What the method needs of its projection, checked without redrawing it the way the code does:
    a pure function of (channels, bits, rounds, seed), the same numbers in every dtype, and
    independent standard normal entries (Kolmogorov-Smirnov against N(0, 1), no correlated columns)."""
    from scipy import stats

    p = hashing.projection(64, 32, 16, 5)
    assert p.shape == (64, 512) and p.dtype == torch.float32
    hashing._PROJECTIONS.clear()  # a fresh draw, not the cached tensor
    assert torch.equal(hashing.projection(64, 32, 16, 5), p)
    assert torch.equal(hashing.projection(64, 32, 16, 5, dtype=torch.float64), p.double())
    assert not torch.equal(hashing.projection(64, 32, 16, 6), p)
    assert stats.kstest(p.double().flatten().numpy(), "norm").pvalue > 1e-3
    corr = torch.corrcoef(p.double().T)
    off = corr[~torch.eye(512, dtype=torch.bool)]
    # independent columns: sample correlations over 64 rows average sqrt(2 / (pi * 63)) ~ 0.10 in size,
    # and none is close to +-1 (no repeated or mirrored column)
    assert off.abs().mean() == pytest.approx(math.sqrt(2 / (math.pi * 63)), rel=0.05)
    assert off.abs().max() < 0.9


def test_simhash_bits_disagree_in_proportion_to_the_angle():
    """Charikar's SimHash property, which makes hash neighbours similar tokens: two vectors at angle
    theta get different sign bits with probability theta / pi (checked over 4000 projections)."""
    C, bits, rounds = 16, 40, 100
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(C, generator=g, dtype=torch.float64), dim=0)
    w = torch.randn(C, generator=g, dtype=torch.float64)
    w = torch.nn.functional.normalize(w - (w @ u) * u, dim=0)  # orthogonal to u
    proj = hashing.projection(C, bits, rounds, seed=1, dtype=torch.float64)
    n = bits * rounds
    for degrees in (10, 45, 90, 135, 170):
        t = math.radians(degrees)
        v = math.cos(t) * u + math.sin(t) * w
        differ = float(((u @ proj > 0) != (v @ proj > 0)).double().mean())
        p = t / math.pi
        assert abs(differ - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("r,sources", [(1, [1]), (2, [1, 3]), (3, [1, 3, 5])])
def test_equal_scores_merge_the_lower_index_first(dtype, r, sources):
    """Documented tie-break: tokens whose best partner scores are equal merge away lower index first.

    Four pairs of identical tokens (1, 2), (3, 4), (5, 6), (7, 8) (basis vectors: cosine exactly 1 in
    any arithmetic); identical tokens share every hash code, so each pair is adjacent in every order
    and its first token's best forward partner is its twin. The other tokens are random (cosines far
    below 1). With r < 4 only the tie-break decides which of the tied pairs merge."""
    B, N, C, p = 2, 40, 32, 1
    g = torch.Generator().manual_seed(11)
    metric = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    for k in range(4):
        metric[:, 1 + 2 * k] = metric[:, 2 + 2 * k] = torch.eye(C, dtype=torch.float64)[k]
    metric = metric.to(dtype)
    unit = torch.nn.functional.normalize(metric[:, 9:].double(), dim=-1)
    sims = unit @ torch.nn.functional.normalize(metric[:, 1:].double(), dim=-1).transpose(1, 2)
    assert (sims - 2 * torch.eye(N - 1, dtype=torch.float64)[8:]).max() < 0.9  # nothing else near 1
    x = torch.randn(B, N, 5, generator=g, dtype=torch.float64)
    plan = merging.plan("hash", metric, r, protected=p)
    x_out, s_out = plan.merge(x)
    for b in range(B):
        assert sorted(plan.src[b].tolist()) == sources
        kept = [t for t in range(N) if t not in sources]
        assert plan.keep[b].tolist() == kept
        for s in sources:  # each merged into its twin: the pair's average sits in the twin's slot
            j = kept.index(s + 1)
            torch.testing.assert_close(x_out[b, j], (x[b, s] + x[b, s + 1]) / 2, rtol=1e-12, atol=1e-12)
            assert s_out[b, j, 0] == 2


def test_blocked_cpu_scoring_equals_single_gather():
    """Eager CPU scores neighbours in blocks of rows; export uses one gather: same numbers."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1001, 384, generator=g)
    order = torch.stack([torch.randperm(1000, generator=g) for _ in range(3)])
    rows = x[:, 1:].gather(1, order[..., None].expand(-1, -1, 384))
    want = (rows[:, :-1].double() * rows[:, 1:].double()).sum(-1)
    got = hashing._neighbour_dots(x, order, offset=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got, torch.linalg.vecdot(rows[:, :-1], rows[:, 1:]))


def test_finds_similar_tokens_on_clustered_data():
    """The hash neighbours are nearly as good as ToMe's exhaustive A x B scores, far above chance."""
    g = torch.Generator().manual_seed(0)
    N, C, r = 197, 64, 48
    centres = torch.randn(1, 25, C, generator=g)
    metric = centres[:, torch.randint(0, 25, (N,), generator=g)] + 0.5 * torch.randn(1, N, C, generator=g)
    unit = metric / metric.norm(dim=-1, keepdim=True)

    def merged_sim(plan):
        dst_tok = plan.keep.gather(1, plan.dst)
        return float((unit[0, plan.src[0]] * unit[0, dst_tok[0]]).sum(-1).mean())

    sim_hash = merged_sim(merging.plan("hash", metric, r, 1))
    sim_tome = merged_sim(merging.plan("tome", metric, r, 1))
    random_pairs = float((unit[0, 1:-1] * unit[0, 2:]).sum(-1).mean())
    assert sim_hash > 0.95 * sim_tome
    assert sim_hash > random_pairs + 0.5


@pytest.mark.parametrize("opts,match", [
    (dict(bits=0), "bits=0 is out of range"), (dict(bits=-3), "bits=-3"), (dict(bits=99), "bits <= 24"),
    (dict(rounds=0), "rounds=0 is out of range"), (dict(rounds=-1), "rounds >= 1"),
    (dict(bits=2.5), "must be an integer"), (dict(seed=-1), "seed"),
])
def test_bad_options(opts, match):
    with pytest.raises(ScheduleError, match=match):
        merging.plan("hash", torch.randn(1, 10, 4), 3, **opts)
    with pytest.raises(ScheduleError, match=match):
        hashing.check_options(**opts)


def test_model_level_errors_and_identity():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        vitmerge.apply(model, "hash", r=0)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # r=0: the unpatched model
        vitmerge.remove(model)
        # 17 tokens, 1 protected: hash removes up to 15 in one step (bipartite: 8)
        vitmerge.apply(model, "hash", r=[15, 3])
        assert model.vitmerge.tokens == [(17, 15, 2), (2, 0, 2)]
        assert model(x).shape == (2, 5)
        vitmerge.remove(model)
    with pytest.raises(ScheduleError, match="at most 15"):
        vitmerge.apply(model, "hash", r=16)
    with pytest.raises(ScheduleError, match="bits"):
        vitmerge.apply(model, "hash", r=4, bits=0)
        model(x)  # options reach the method at the first forward if apply does not check them


@pytest.mark.slow
def test_export_verifies_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    # 50 tokens (49 unprotected) and head_dim 32: sizes at which a Python comparison involving the
    # symbolic batch inside the method would make torch.export fail (a fractional batch bound)
    model = timm.create_model("vit_tiny_patch16_224", img_size=56, patch_size=8, depth=2, embed_dim=96,
                              num_heads=3, num_classes=10).eval()
    vitmerge.apply(model, "hash", r=[30, 8])  # the first step removes more than half the tokens
    assert model.vitmerge.tokens_out == [20, 12]
    hashing._PROJECTIONS.clear()  # the projection is first drawn while torch.export traces
    res = vitmerge.export(model, tmp_path / "h.onnx", batch_sizes=(1, 3))
    assert res.verification.ok and res.verification.top1_agreement == 1.0
    proto = onnx.load(str(tmp_path / "h.onnx"))
    # the projection travels in the file as a constant, identical to the one PyTorch uses
    proj = hashing.projection(model.blocks[0].attn.head_dim).numpy()
    found = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if tuple(t.dims) == proj.shape]
    assert any((f == proj).all() for f in found)
    ops = {n.op_type for n in proto.graph.node}
    assert "TopK" in ops and not ops & {"RandomNormal", "RandomNormalLike", "RandomUniform", "NonZero", "Loop"}


# ---------------------------------------------------------------- gaps found by mutation testing


def test_plan_is_built_on_the_metrics_device():
    """Every tensor the plan creates follows the metric's device (on a GPU, a CPU-made index would fail
    or force a copy). PyTorch's meta device runs the same code without data, and any tensor made on
    the CPU instead makes an op fail there."""
    hashing.projection(8, 16, 2, 0)  # a CPU projection in the cache must not be handed out for meta
    for protected in (0, 1, 2):
        metric = torch.randn(2, 30, 8, device="meta")
        plan = hashing.hash_plan(metric, 10, protected=protected)
        assert {plan.keep.device.type, plan.src.device.type, plan.dst.device.type} == {"meta"}
        assert plan.keep.shape == (2, 20) and plan.src.shape == (2, 10)
    assert hashing.projection(8, 16, 2, 0, device="meta").device.type == "meta"
    assert hashing.hash_orders(torch.randn(1, 12, 8, device="meta"), 16, 2, 0).device.type == "meta"


def test_projection_is_cached_and_ignores_the_default_dtype():
    """One draw per (channels, bits, rounds, seed, device, dtype), reused; always drawn in float32, so a
    user's ``torch.set_default_dtype(torch.float64)`` does not change the numbers (the exported file's
    constant must equal what PyTorch uses)."""
    hashing._PROJECTIONS.clear()
    p = hashing.projection(16, 8, 3, 2)
    assert hashing.projection(16, 8, 3, 2) is p
    hashing._PROJECTIONS.clear()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        q = hashing.projection(16, 8, 3, 2)
    finally:
        torch.set_default_dtype(old)
    hashing._PROJECTIONS.clear()
    assert q.dtype == torch.float32 and torch.equal(q, p)


@pytest.mark.parametrize("opts,message", [
    (dict(bits=2.5), "hash option bits must be an integer, got 2.5"),
    (dict(rounds="2"), "hash option rounds must be an integer, got '2'"),
    (dict(seed=True), "hash option seed must be an integer, got True"),
    (dict(bits=25), "hash option bits=25 is out of range: use 1 <= bits <= 24 (default 16); bits is the number of "
                    "random-projection sign bits per hash round"),
    (dict(rounds=0), "hash option rounds=0 is out of range: use rounds >= 1 (default 2); rounds is the number of "
                     "independent hash orders whose neighbours are scored"),
])
def test_option_errors_say_which_option_and_why(opts, message):
    with pytest.raises(ScheduleError) as e:
        hashing.check_options(**opts)
    assert str(e.value) == message


def test_max_bits_is_allowed():
    metric, x, size = _random(1, 20, 8, 3, 0)
    plan = merging.plan("hash", metric, 6, protected=1, bits=24, rounds=1)
    _check_against(plan, x, size, [reference_hash_groups(metric[0], 6, 1, bits=24, rounds=1)])


def test_keys_that_would_leave_int32_are_refused():
    """rank (< 2^bits) x U + index must fit int32 (TensorRT computes INT64 as INT32): 24 bits take U <= 128
    unprotected tokens, 16 bits (the default) U <= 32768; beyond, a clear refusal naming the bits that fit."""
    hashing.check_key_range(24, 128)
    hashing.check_key_range(16, 32768)
    with pytest.raises(ScheduleError) as e:
        hashing.check_key_range(24, 129)
    assert str(e.value) == ("hash option bits=24 with 129 unprotected tokens: the sort keys rank (< 2^24) x 129 + "
                            "index would leave the int32 range that TensorRT computes integers in; use -O bits=23 "
                            "or fewer (or fewer tokens)")
    metric = torch.randn(1, 131, 4)
    with pytest.raises(ScheduleError, match="bits=24 with 130 unprotected tokens"):
        merging.plan("hash", metric, 6, protected=1, bits=24)
    # the merge-score key: level (< 3 * scale) * U + U - 1 stays inside int32 at every U, finest grid 2^-22
    for U in (2, 64, 196, 1567, 4095, 16383, 100_000):
        q = hashing.score_scale(U)
        assert 3 * q * U + U - 1 <= 2 ** 31 - 1 and (q == 2 ** 22 or 3 * 2 * q * U + U - 1 > 2 ** 31 - 1)


def test_defaults_protect_one_token_in_a_plan_and_none_in_the_orders():
    metric, _, _ = _random(2, 25, 8, 3, 4)
    orders = hashing.hash_orders(metric, 16, 2, 0)
    assert orders.shape == (2, 2, 25)
    assert torch.equal(orders, hashing.hash_orders(metric, 16, 2, 0, protected=0))
    plan = hashing.hash_plan(metric, 8)
    ref = hashing.hash_plan(metric, 8, protected=1)
    assert torch.equal(plan.keep, ref.keep) and torch.equal(plan.src, ref.src) and torch.equal(plan.dst, ref.dst)
    assert not torch.equal(plan.keep, hashing.hash_plan(metric, 8, protected=2).keep)


def test_zero_tokens_and_tiny_norms():
    """A zero token (padding, a dead feature) projects to exactly 0: its SimHash bits are 0 (the sign
    test is strict) and its cosine with anything is 0. And the plan depends on directions only: scaling
    tokens by positive powers of two (exact) down to 2^-30 changes nothing (norms are clamped only below
    1e-12, where a token counts as zero)."""
    B, N, C = 2, 24, 8
    metric, x, size = _random(B, N, C, 4, 21)
    metric[:, [3, 4, 10, 17]] = 0.0
    orders = hashing.hash_orders(metric, 16, 2, 0, protected=1) + 1  # token indices
    assert orders.tolist() == [reference_hash_groups(metric[b], 9, 1, orders_only=True) for b in range(B)]
    plan = merging.plan("hash", metric, 9, protected=1)
    _check_against(plan, x, size, [reference_hash_groups(metric[b], 9, 1) for b in range(B)])
    scale = 2.0 ** -torch.randint(0, 30, (B, N, 1), generator=torch.Generator().manual_seed(2)).double()
    small = merging.plan("hash", metric * scale, 9, protected=1)
    assert torch.equal(small.assign, plan.assign)


def test_long_sequence_merges_the_best_scored_tokens():
    """At 3000 tokens (scores closer together than at 40), the r sources are exactly the tokens whose best
    forward partner is most similar, recomputed here in float64 numpy from the hash orders (which
    test_matches_loop_reference checks on short sequences)."""
    import numpy as np

    N, C, r, p = 3001, 8, 1400, 1
    metric, _, _ = _random(1, N, C, 1, 5)
    orders = hashing.hash_orders(metric, 16, 2, 0, protected=p)[0].numpy()  # [R, U]
    U = N - p
    unit = metric[0, p:].numpy()
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    pos = np.argsort(orders, axis=1)  # pos[k, i]: where token i sits in order k
    best = np.full(U, -np.inf)
    for k, order in enumerate(orders):
        for shift in ((1,) if k == 0 else (-1, 1)):
            q = pos[k] + shift
            ok = (q >= 0) & (q < U)
            j = np.where(ok, order[np.clip(q, 0, U - 1)], 0)
            ok &= pos[0, j] > pos[0]  # forward in round 0's order
            best = np.maximum(best, np.where(ok, (unit * unit[j]).sum(1), -np.inf))
    want = np.argsort(-best, kind="stable")[:r]
    assert best[want[-1]] - np.delete(best, want).max() > 1e-9  # the cut is not a near-tie
    plan = merging.plan("hash", metric, r, protected=p)
    assert sorted(plan.src[0].tolist()) == sorted((want + p).tolist())


def test_graph_friendly_ops():
    """What the exported graph needs of the eager code, checked on the ops PyTorch runs: every sort key is
    int64 (exact, no ties left to the runtime), every CumSum runs on floats (TensorRT's CumSum takes no
    integers) and every scatter writes each position once (ONNX leaves the order of repeated writes
    undefined, so a permutation is the only portable form)."""
    metric, _, _ = _random(3, 40, 8, 1, 8)
    _, seen = record_ops(lambda: merging.plan("hash", metric.float(), 25, protected=1, rounds=3))
    names = [n for n, _ in seen]
    assert "topk" in names and "cumsum" in names and "scatter" in names
    for name, args in seen:
        if name in ("topk", "sort"):
            assert args[0].dtype == torch.long, name
        if name == "cumsum":
            assert args[0].dtype.is_floating_point
        if name == "scatter":
            index = args[2]
            assert all(len(set(row)) == len(row) for row in index.tolist())


@pytest.mark.parametrize("n,protected,C,bits,rounds", [(30, 1, 8, 4, 3), (17, 0, 12, 16, 2), (9, 2, 5, 1, 1)])
def test_match_flops(n, protected, C, bits, rounds):
    """The projection MatMul as torch's FlopCounterMode counts it, plus one C-long dot product (2 C FLOPs)
    per neighbour pair in each of the ``rounds`` orders of the U = n - protected tokens, which the counter
    does not see (a row-wise vecdot, not a matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        merging.plan("hash", torch.randn(1, n, C), 3, protected=protected, bits=bits, rounds=rounds)
    dots = 2 * C * rounds * (n - protected - 1)
    got = hashing.match_flops(n, protected, C, r=3, bits=bits, rounds=rounds)
    assert got == fc.get_total_flops() + dots and isinstance(got, int)
    assert hashing.match_flops(n, protected, C, r=5, bits=bits, rounds=rounds) == got  # r does not matter
    # one unprotected token: no neighbour pair, only the projection
    assert hashing.match_flops(4, 3, C, bits=bits, rounds=rounds) == 2 * 4 * C * bits * rounds
    assert hashing.match_flops(3, 3, C, bits=bits, rounds=rounds) == 2 * 3 * C * bits * rounds


def _gathered_rows(fn):
    """fn's result and the number of rows of every index_select (row gather) it ran."""
    out, ops = record_ops(fn)
    return out, [args[2].numel() for name, args in ops if name == "index_select"]


@pytest.mark.parametrize("B,U,C", [
    (2, 683, 384),  # B * U - 2 is a multiple of the step (682): the last pair starts a block
    (3, 1000, 384), (1, 129, 8192),  # a step of 64 rows (wide tokens): 2 blocks just above 2 steps
    (1, 300_000, 1),  # C = 1: 2^18 rows per step
    (2, 682, 384), (1, 40, 8),  # 2 steps or fewer: one gather
])
def test_neighbour_dots_blocks(B, U, C, monkeypatch):
    """Eager CPU scoring gathers at most ``step + 1`` rows at a time, step = max(64, 2^18 // C) (1 MiB of
    float32), as soon as B * U exceeds 2 steps; below that, or while a graph is traced, one gather of all
    B * U rows. The numbers are the same either way (a float64 reference)."""
    g = torch.Generator().manual_seed(B + U)
    x = torch.randn(B, U + 1, C, generator=g)
    order = torch.stack([torch.randperm(U, generator=g) for _ in range(B)])
    step = max(64, (1 << 18) // C)
    got, rows = _gathered_rows(lambda: hashing._neighbour_dots(x, order, offset=1))
    if B * U > 2 * step:
        assert len(rows) == math.ceil((B * U - 1) / step) and max(rows) == step + 1
        assert sum(rows) == B * U + len(rows) - 1  # blocks overlap by the one row they share
    else:
        assert rows == [B * U]
    if U < 10_000:
        xs = x[:, 1:].double().gather(1, order[..., None].expand(-1, -1, C))
        torch.testing.assert_close(got.double(), (xs[:, :-1] * xs[:, 1:]).sum(-1), rtol=1e-5, atol=1e-4)
    else:  # C = 1: products of neighbours
        xs = x[:, 1:, 0].double().gather(1, order)
        torch.testing.assert_close(got.double(), xs[:, :-1] * xs[:, 1:], rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(hashing, "tracing", lambda: True)
    traced, rows = _gathered_rows(lambda: hashing._neighbour_dots(x, order, offset=1))
    assert rows == [B * U] and torch.equal(traced, got)
