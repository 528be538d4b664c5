"""The `evo` slow-fast method against a float64 loop reference written from its description."""
import numpy as np
import onnx
import pytest
import timm
import torch

import vitmerge
from vitmerge import merging
from vitmerge.errors import ScheduleError, UnsupportedModelError
from vitmerge.backends.ort import session as ort_session


# ------------------------------------------------------------------ float64 loop reference

def full_block(blk, x, size, prop_attn):
    """One timm block on x [n, D] (head by head); returns (y, class-token attention row averaged over heads)."""
    a = blk.attn
    h = blk.norm1(x)
    n = h.shape[0]
    qkv = a.qkv(h).reshape(n, 3, a.num_heads, a.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    heads, rows = [], []
    for hh in range(a.num_heads):
        logits = (q[:, hh] @ k[:, hh].T) * a.scale
        if prop_attn and size is not None:
            logits = logits + torch.log(size)[None, :]
        probs = logits.softmax(-1)
        rows.append(probs[0])
        heads.append(probs @ v[:, hh])
    x = x + a.proj(torch.cat(heads, dim=-1))
    return x + blk.mlp(blk.norm2(x)), torch.stack(rows).mean(0)


@torch.no_grad()
def evo_forward(model, images, rs, prop_attn=True, tradeoff=0.5):
    m = model
    out = []
    for img in images:
        x = m.norm_pre(m._pos_embed(m.patch_embed(img[None].double())))[0]
        p = m.num_prefix_tokens
        N = x.shape[0]
        g = None
        for blk, r in zip(m.blocks, rs):
            if r == 0 or g is None:  # full block; its class attention becomes the global one
                x, g = full_block(blk, x, None, prop_attn)
                continue
            ranked = sorted(range(p, N), key=lambda i: -float(g[i]))
            K = N - p - r - 1
            informative = sorted(ranked[:K])
            placeholders = ranked[K:]  # r + 1 of them
            wsum = sum(float(g[j]) for j in placeholders)
            rep = sum(x[j] * float(g[j]) for j in placeholders) / wsum
            slow = torch.cat([x[:p], x[informative], rep[None]])
            size = torch.tensor([1.0] * (p + K) + [float(r + 1)], dtype=torch.float64)
            y, a = full_block(blk, slow, size, prop_attn)
            new = x.clone()
            new_g = g.clone()
            for slot, tok in enumerate(list(range(p)) + informative):
                new[tok] = y[slot]
                new_g[tok] = (1 - tradeoff) * g[tok] + tradeoff * a[slot]
            for j in placeholders:
                new[j] = x[j] + (y[-1] - rep)
            x, g = new, new_g
        out.append(m.forward_head(m.norm(x)[None])[0])
    return torch.stack(out)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=64, depth=3)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def images(model, b=2, seed=1):
    h, w = model.patch_embed.img_size
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("kw,rs,tradeoff", [
    ({}, [0, 6, 9], 0.5),
    (dict(reg_tokens=2, depth=4), [5, 3, 0, 12], 0.25),  # block 0 full whatever r; a full block mid-way
])
def test_model_matches_handwritten_reference(prop_attn, kw, rs, tradeoff):
    model = tiny(**kw).double()
    x = images(model).double()
    ref = evo_forward(model, x, rs, prop_attn=prop_attn, tradeoff=tradeoff)
    vitmerge.apply(model, "evo", r=rs, prop_attn=prop_attn, tradeoff=tradeoff)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_schedule_keeps_all_tokens_and_slow_path_is_static():
    model = tiny(depth=4)
    vitmerge.apply(model, "evo", r=8)
    info = model.vitmerge
    assert info.slow_fast and info.r == [8, 8, 8, 8]
    assert info.tokens == [(17, 0, 17), (17, 8, 17), (17, 8, 17), (17, 8, 17)]  # block 0 runs in full
    mlp_tokens, out_tokens = [], []
    for blk in model.blocks:
        blk.mlp.register_forward_hook(lambda m, i, o: mlp_tokens.append(o.shape[1]))
        blk.register_forward_hook(lambda m, i, o: out_tokens.append(o.shape[1]))
    with torch.no_grad():
        model(images(model, b=3))
    assert mlp_tokens == [17, 9, 9, 9]  # the slow path: N - r tokens (protected + informative + 1)
    assert out_tokens == [17] * 4


def test_plan_layout_and_spread():
    g = torch.Generator().manual_seed(3)
    B, N, D, p, r = 2, 12, 4, 2, 5
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    att = torch.rand(B, N, generator=g, dtype=torch.float64)
    plan = merging.plan("evo", x, r, p, cls_attn=att)
    assert plan.n_out == N - r
    slow, size = plan.merge(x, None)
    assert torch.equal(size[:, :, 0], torch.tensor([[1.0] * (N - r - 1) + [r + 1.0]] * B, dtype=torch.float64))
    for b in range(B):
        ranked = sorted(range(p, N), key=lambda i: -float(att[b, i]))
        K = N - p - r - 1
        assert plan.keep[b, :p].tolist() == list(range(p))
        assert plan.keep[b, p:p + K].tolist() == sorted(ranked[:K])
        ph = ranked[K:]
        rep = sum(x[b, j] * att[b, j] for j in ph) / sum(att[b, j] for j in ph)
        torch.testing.assert_close(slow[b, -1], rep, rtol=1e-12, atol=1e-12)
    y = slow + 1.0  # pretend the block added 1 to every slot
    from vitmerge.merging.evo import spread

    torch.testing.assert_close(spread(x, slow, y, plan.assign), x + 1.0, rtol=1e-12, atol=1e-12)


def test_r0_equals_unpatched_and_deterministic():
    model = tiny()
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        vitmerge.apply(model, "evo", r=0)
        assert torch.equal(model(x), ref)
        vitmerge.apply(model, "evo", r=5)
        a = model(x)
        assert torch.equal(model(x), a)
        assert not torch.equal(a, ref)
        vitmerge.remove(model)
        assert torch.equal(model(x), ref)


def test_bad_requests():
    with pytest.raises(ScheduleError, match="too large.*r <= 14"):
        vitmerge.apply(tiny(), "evo", r=[0, 15, 3])
    with pytest.raises(ScheduleError, match="tradeoff"):
        vitmerge.apply(tiny(), "evo", r=2, tradeoff=1.5)
    with pytest.raises(ScheduleError, match="unknown option"):
        vitmerge.apply(tiny(), "evo", r=2, bits=3)
    with pytest.raises(UnsupportedModelError, match="no class token"):
        vitmerge.apply(tiny(class_token=False, global_pool="avg"), "evo", r=2)


@pytest.mark.slow
def test_export_matches_onnx_runtime(tmp_path):
    model = tiny(depth=2)
    vitmerge.apply(model, "evo", r=[0, 9])
    res = vitmerge.export(model, tmp_path / "evo.onnx", batch_sizes=(1, 3))
    assert res.verification.ok
    x = images(model, b=2, seed=7)
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort_session(tmp_path / "evo.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    proto = onnx.load(str(tmp_path / "evo.onnx"))
    scopes = {p.value for n in proto.graph.node for p in n.metadata_props if p.key == "namespace"}
    assert any("blocks.1.token_merge" in s for s in scopes)
    assert any("blocks.1.token_merge.spread" in s for s in scopes)


def test_tradeoff_bounds_and_types():
    from vitmerge.merging.evo import check_options

    for ok in (0, 0.0, 1, 1.0, 0.25):
        check_options(ok)  # both ends of [0, 1] are valid: 0 keeps g, 1 replaces it
        check_options(tradeoff=ok)
    for bad in (-0.01, 1.01, True, False, "0.5", None, float("nan")):
        with pytest.raises(ScheduleError, match=r"tradeoff must be a number in \[0, 1\], got "):
            check_options(bad)


def test_plan_defaults_errors_and_r0():
    from vitmerge.merging.evo import evo_plan

    g = torch.Generator().manual_seed(5)
    metric = torch.randn(2, 12, 4, generator=g)
    att = torch.rand(2, 12, generator=g)
    default, one = evo_plan(metric, 4, cls_attn=att), evo_plan(metric, 4, 1, cls_attn=att)  # protected: 1
    assert all(torch.equal(getattr(default, k), getattr(one, k)) for k in ("keep", "src", "dst"))
    with pytest.raises(ScheduleError, match=r"the 'evo' method needs the class-token attention"):
        evo_plan(metric, 4, 1)
    # r = 0 and r = 1 are different plans: 0 is the identity (inputs returned bit for bit), 1 merges two
    # placeholders into one representative
    x = torch.randn(2, 12, 64, generator=g)
    out, size = evo_plan(metric, 0, 1, cls_attn=att).merge(x)
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 12, 1))
    assert evo_plan(metric, 1, 1, cls_attn=att).n_out == 11


def test_plan_follows_the_metric_device_and_dtype():
    """Index tensors on the metric's device (meta stands in for a GPU); fp16 tokens merge to fp16."""
    from vitmerge.merging.evo import evo_plan

    plan = evo_plan(torch.randn(2, 12, 4, device="meta"), 4, 2, cls_attn=torch.rand(2, 12, device="meta"))
    assert {plan.keep.device.type, plan.src.device.type, plan.dst.device.type} == {"meta"}
    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(2, 12, 4, generator=g).half(), torch.randn(2, 12, 8, generator=g).half()
    out, size = evo_plan(metric, 4, 1, cls_attn=torch.rand(2, 12, generator=g)).merge(x)
    assert out.dtype == size.dtype == torch.float16


def test_at_least_one_informative_token():
    """r + 1 placeholders and at least one informative token must fit in the unprotected tokens:
    with N <= protected + 2 nothing can be summarised, whatever r asks."""
    from vitmerge.merging.evo import evo_plan, max_r

    for n, p in ((3, 1), (2, 1), (4, 2), (2, 0)):
        assert max_r(n, p) == 0 and merging.effective_r("evo", n, 5, p) == 0
        plan = evo_plan(torch.randn(2, n, 3), 5, p, cls_attn=torch.rand(2, n))
        assert plan.n_out == n and plan.r == 0
    assert max_r(4, 1) == 1 and max_r(17, 1) == 14
