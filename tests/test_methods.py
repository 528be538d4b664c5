"""One property test for every method in the registry (tests/test_layers.py keeps the layout honest; this
keeps the method contract honest): a method added to ``merging/registry.py`` is tested here with no edit.

For each registered method, random inputs and several r:
* the token count is static: exactly N - clamp_r(N, r) slots, whatever the data;
* sizes are conserved (every input token's size lands in exactly one slot);
* protected tokens are untouched (first slots, same values, same sizes);
* every slot is the size x weight-weighted mean of the tokens the plan assigns to it (a float64 loop);
* the invariance the spec promises: permuting the unprotected tokens (``any``) or the unprotected even
  and odd positions separately (``alternating``, ToMe's A/B sets) leaves the merged multiset unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitmerge import merging
from vitmerge.merging import METHODS

B, U, C, D = 2, 29, 12, 6
# options that make every score distinct (the invariances hold for distinct scores / hash codes)
TEST_OPTIONS = {"hash": {"bits": 40, "rounds": 2}, "vwt": {"mode": "intra"}}


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
