"""One property test for every method in the registry (tests/test_layers.py keeps the layout honest; this
keeps the method contract honest): a method added to ``merging/registry.py`` is tested here with no edit.

For each registered method, random inputs and several r:
* the token count is static: exactly N - clamp_r(N, r) slots, whatever the data;
* sizes are conserved (every input token's size lands in exactly one slot);
* protected tokens are untouched (first slots, same values, same sizes);
* every slot is the size x weight-weighted mean of the tokens the plan assigns to it (a float64 loop);
* the invariance the spec promises: permuting the unprotected tokens (``any``) or the unprotected even
  and odd positions separately (``alternating``, ToMe's A/B sets) leaves the merged multiset unchanged;
* unmerge is the exact inverse map: after merge then unmerge every input position holds the value of the
  slot the plan sent it to (read off keep/src/dst in a loop), protected positions their own values; over
  several steps the composed assignment is the map merge_source tracks, and unmerging once by it equals
  unmerging step by step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitmerge import merging
from vitmerge.merging import METHODS

B, U, C, D = 2, 29, 12, 6
# options that make every score distinct (the invariances hold for distinct scores / hash codes)
TEST_OPTIONS = {"hash": {"bits": 24, "rounds": 2}, "vwt": {"mode": "intra"}}


def make_inputs(spec, protected, seed):
    g = torch.Generator().manual_seed(seed)
    n = protected + U
    metric = torch.randn(B, n, C, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, D, generator=g, dtype=torch.float64)
    size = torch.randint(1, 6, (B, n, 1), generator=g).to(torch.float64)
    extra = dict(TEST_OPTIONS.get(spec.name, {}))
    if spec.needs_cls_attn:
        extra["cls_attn"] = torch.randn(B, n, generator=g, dtype=torch.float64).softmax(-1)
    return metric, x, size, extra


def plan_for(spec, metric, r, protected, extra):
    if spec.form == "pre_encoder":  # vwt: features of the patch tokens only, plan over protected + patches
        return spec.plan(metric[:, protected:], r, protected, **extra)
    return merging.plan(spec.name, metric, r, protected, **extra)


def reference_merge(plan, x, size):
    """Slot j = sum(w_i x_i) / sum(w_i) over the tokens with assign == j, w = size (x weight), in a loop."""
    assign = plan.assign
    w = size if plan.weight is None else size * plan.weight
    out_x = torch.zeros(x.shape[0], plan.n_out, x.shape[2], dtype=torch.float64)
    out_s = torch.zeros(x.shape[0], plan.n_out, 1, dtype=torch.float64)
    for b in range(x.shape[0]):
        for j in range(plan.n_out):
            members = (assign[b] == j).nonzero().flatten().tolist()
            assert members, f"slot {j} of image {b} holds no token"
            ws = sum(float(w[b, i, 0]) for i in members)
            out_x[b, j] = sum(w[b, i, 0] * x[b, i] for i in members) / ws
            out_s[b, j, 0] = sum(float(size[b, i, 0]) for i in members)
    return out_x, out_s


def multiset(x_out, size_out):
    rows = torch.cat([x_out, size_out], -1).numpy().round(9)
    return [sorted(map(tuple, img)) for img in rows]


def permutation(spec, n, protected, seed):
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    if spec.invariance == "any":
        perm[protected:] = protected + rng.permutation(n - protected)
    elif spec.invariance == "alternating":
        for parity in (0, 1):
            idx = np.array([i for i in range(protected, n) if i % 2 == parity])
            perm[idx] = rng.permutation(idx)
    return torch.from_numpy(perm)


@pytest.fixture(params=sorted(METHODS), ids=str)
def spec(request):
    return METHODS[request.param]


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_contract(spec, protected, seed):
    if spec.needs_cls_attn and protected == 0:
        pytest.skip(f"{spec.name} ranks by the class token's attention: it needs a protected class token")
    metric, x, size, extra = make_inputs(spec, protected, seed)
    n = protected + U
    cap = spec.max_r(n, protected)
    assert cap >= 1
    for r in sorted({0, 1, cap // 2, cap, cap + 5}):
        want = spec.clamp_r(n, r, protected)
        assert want == min(r, cap)
        plan = plan_for(spec, metric, r, protected, extra)
        assert plan.n_out == n - want and plan.r == want and plan.n_in == n
        x_out, s_out = plan.merge(x, size)
        assert x_out.shape == (B, n - want, D) and s_out.shape == (B, n - want, 1)
        torch.testing.assert_close(s_out.sum(1), size.sum(1), rtol=0, atol=1e-9)  # sizes conserved
        # untouched up to the (x * w) / w rounding of the shared merge
        torch.testing.assert_close(x_out[:, :protected], x[:, :protected], rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(s_out[:, :protected], size[:, :protected], rtol=0, atol=0)
        ref_x, ref_s = reference_merge(plan, x, size)
        torch.testing.assert_close(x_out, ref_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_out, ref_s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("protected", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_promised_invariance(spec, protected, seed):
    if spec.invariance == "none":
        pytest.skip(f"{spec.name} promises no invariance to token order (spec.invariance = 'none')")
    metric, x, size, extra = make_inputs(spec, protected, seed)
    n = protected + U
    r = max(1, spec.max_r(n, protected) // 2)
    base = plan_for(spec, metric, r, protected, extra).merge(x, size)
    perm = permutation(spec, n, protected, seed + 100)
    assert not torch.equal(perm, torch.arange(n))
    px = {k: (v[:, perm] if k == "cls_attn" else v) for k, v in extra.items()}
    moved = plan_for(spec, metric[:, perm], r, protected, px).merge(x[:, perm], size[:, perm])
    assert multiset(*moved) == multiset(*base)


def test_every_spec_is_complete():
    for name, s in METHODS.items():
        assert s.name == name and s.summary and callable(s.plan) and callable(s.max_r)
        s.check_options(**{k: v for k, v in s.options.items() if v is not None})  # defaults are valid
        if s.match_flops is not None:
            assert s.match_flops(197, 1, 64, r=16) > 0


def slot_loop(plan):
    """[B][N] slot of every input token, read off keep / src / dst one entry at a time."""
    out = []
    for b in range(plan.keep.shape[0]):
        slot = [None] * plan.n_in
        for j, k in enumerate(plan.keep[b].tolist()):
            slot[k] = j
        for s_, d in zip(plan.src[b].tolist(), plan.dst[b].tolist()):
            assert slot[s_] is None, "a token is both kept and merged away"
            slot[s_] = d
        assert None not in slot, "a token is neither kept nor merged away"
        out.append(slot)
    return out


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_unmerge_is_the_inverse_map(spec, protected, seed):
    if spec.needs_cls_attn and protected == 0:
        pytest.skip(f"{spec.name} ranks by the class token's attention: it needs a protected class token")
    metric, x, size, extra = make_inputs(spec, protected, seed)
    n = protected + U
    for r in sorted({0, 1, spec.max_r(n, protected) // 2, spec.max_r(n, protected)}):
        plan = plan_for(spec, metric, r, protected, extra)
        merged, _ = plan.merge(x, size)
        back = plan.unmerge(merged)
        assert back.shape == x.shape
        slots = slot_loop(plan)
        for b in range(B):
            for i in range(n):
                assert torch.equal(back[b, i], merged[b, slots[b][i]]), (b, i)
        assert plan.assign.tolist() == slots
        # protected positions come back as they went in (up to the shared (x * w) / w rounding)
        torch.testing.assert_close(back[:, :protected], x[:, :protected], rtol=1e-15, atol=1e-15)
        # and every position's slot holds it (merge_source: an independent 0/1 bookkeeping)
        src = plan.merge_source()
        for b in range(B):
            assert all(src[b, slots[b][i], i] == 1 for i in range(n))
        wrong = x if plan.r else x[:, :-1]
        with pytest.raises(ValueError) as e:
            plan.unmerge(wrong)
        assert str(e.value) == f"unmerge takes the {plan.n_out} merged tokens of this plan, got {wrong.shape[1]}"


@pytest.mark.parametrize("protected", [0, 1])
def test_unmerge_composes_over_steps(spec, protected):
    if spec.needs_cls_attn and protected == 0:
        pytest.skip(f"{spec.name} ranks by the class token's attention: it needs a protected class token")
    if spec.form == "pre_encoder":
        pytest.skip("vwt groups patches once, before the encoder: there is one step, nothing to compose")
    metric, x, size, extra = make_inputs(spec, protected, 7)
    assign, source, plans = None, None, []
    cur_m, cur_x, cur_s, cur_extra = metric, x, size, extra
    for _ in range(3):
        r = max(1, spec.max_r(cur_m.shape[1], protected) // 3)
        p = plan_for(spec, cur_m, r, protected, cur_extra)
        plans.append(p)
        assign = merging.compose(assign, p.assign)
        source = p.merge_source(source)
        cur_x, new_s = p.merge(cur_x, cur_s)
        cur_m, _ = p.merge(cur_m, cur_s)
        cur_extra = {k: (p.merge(v[..., None], cur_s)[0][..., 0] if k == "cls_attn" else v)
                     for k, v in cur_extra.items()}
        cur_s = new_s
    n0 = x.shape[1]
    assert assign.shape == (B, n0)
    # merge_source's 0/1 map: each original position sits in exactly one final token, the composed one
    assert torch.equal(source.sum(1), torch.ones(B, n0, dtype=source.dtype))
    assert torch.equal(source.argmax(1), assign)
    # one gather by the composed map == unmerging step by step, last step first
    step = cur_x
    for p in reversed(plans):
        step = p.unmerge(step)
    assert torch.equal(merging.unmerge(cur_x, assign), step)
    assert merging.unmerge(x, None) is x
