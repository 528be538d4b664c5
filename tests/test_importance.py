"""The `importance` method against a float64 loop reference written from the method's description."""
import math

import numpy as np
import onnx
import pytest
import timm
import torch

import vitmerge
from vitmerge import merging
from vitmerge.errors import ScheduleError, UnsupportedModelError
from vitmerge.backends.ort import session as ort_session
from vitmerge.merging.importance import importance_plan


# ------------------------------------------------------------------ float64 loop reference

def importance_groups(metric, imp, r, protected):
    """One image: (output order, groups). Keep the most important unprotected tokens (original
    order, after the protected ones); every other token joins its most cosine-similar kept one."""
    N = metric.shape[0]
    free = list(range(protected, N))
    ranked = sorted(free, key=lambda i: -float(imp[i]))
    n_keep = len(free) - r
    kept = sorted(ranked[:n_keep])
    away = ranked[n_keep:]
    unit = [metric[i] / metric[i].norm() for i in range(N)]
    groups = {i: [i] for i in list(range(protected)) + kept}
    for a in away:
        best, best_s = None, -math.inf
        for k in kept:
            s = float(unit[a] @ unit[k])
            if s > best_s:
                best, best_s = k, s
        groups[best].append(a)
    order = list(range(protected)) + kept
    return order, [groups[i] for i in order]


def weighted_merge(x, size, w, groups):
    """m = sum(w size x) / sum(w size) per group; size' = sum(size)."""
    xs, ss = [], []
    for g in groups:
        den = sum(float(w[i]) * float(size[i]) for i in g)
        xs.append(sum(x[i] * float(w[i]) * float(size[i]) for i in g) / den)
        ss.append(sum(float(size[i]) for i in g))
    return torch.stack(xs), torch.tensor(ss, dtype=torch.float64)


@torch.no_grad()
def importance_forward(model, images, rs, prop_attn=True):
    """timm ViT forward with importance merging written out image by image, head by head."""
    m = model
    out = []
    for img in images:
        x = m.norm_pre(m._pos_embed(m.patch_embed(img[None].double())))[0]
        size = torch.ones(x.shape[0], dtype=torch.float64)
        p = m.num_prefix_tokens
        for blk, r in zip(m.blocks, rs):
            a = blk.attn
            h = blk.norm1(x)
            N = h.shape[0]
            qkv = a.qkv(h).reshape(N, 3, a.num_heads, a.head_dim)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            heads, cls_rows = [], []
            for hh in range(a.num_heads):
                logits = (q[:, hh] @ k[:, hh].T) * a.scale
                if prop_attn:
                    logits = logits + size.log()[None, :]
                probs = logits.softmax(-1)
                cls_rows.append(probs[0])
                heads.append(probs @ v[:, hh])
            x = x + a.proj(torch.cat(heads, dim=-1))
            if r > 0:
                imp = torch.stack(cls_rows).mean(0)
                _, groups = importance_groups(k.mean(1), imp, r, p)
                x, size = weighted_merge(x, size, imp, groups)
            x = x + blk.mlp(blk.norm2(x))
        out.append(m.forward_head(m.norm(x)[None])[0])
    return torch.stack(out)


# ------------------------------------------------------------------ plan level

@pytest.mark.parametrize("N,r,protected", [(17, 5, 1), (26, 20, 2), (10, 8, 1), (9, 3, 0), (11, 1, 1)])
def test_plan_matches_loop_reference(N, r, protected):
    g = torch.Generator().manual_seed(N * 31 + r)
    B, C, D = 3, 8, 5
    metric = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    imp = torch.rand(B, N, generator=g, dtype=torch.float64).softmax(-1)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1), generator=g).double()
    p = importance_plan(metric, r, protected, cls_attn=imp)
    out, out_size = p.merge(x, size)
    assert p.n_out == N - r and out.shape == (B, N - r, D)  # static count
    for b in range(B):
        _, groups = importance_groups(metric[b], imp[b], r, protected)
        ref, ref_size = weighted_merge(x[b], size[b, :, 0], imp[b], groups)
        torch.testing.assert_close(out[b], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_size[b, :, 0], ref_size)
    # protected tokens stay first, untouched
    torch.testing.assert_close(out[:, :protected], x[:, :protected], rtol=1e-12, atol=1e-12)


def test_plan_is_deterministic_and_clamped():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 12, 4, generator=g)
    imp = torch.rand(2, 12, generator=g)
    a, b = importance_plan(metric, 4, 1, cls_attn=imp), importance_plan(metric, 4, 1, cls_attn=imp)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.src, b.src) and torch.equal(a.dst, b.dst)
    assert importance_plan(metric, 100, 1, cls_attn=imp).n_out == 2  # class token + one kept token
    assert merging.effective_r("importance", 12, 100, 1) == 10
    assert importance_plan(metric, 0, 1, cls_attn=imp).n_out == 12


def test_plan_defaults_and_r0():
    """protected defaults to the one class token; r = 0 is the identity plan (merge returns its inputs
    bit for bit, not a weighted average of one-token groups)."""
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 12, 4, generator=g)
    imp = torch.rand(2, 12, generator=g)
    default, one = importance_plan(metric, 4, cls_attn=imp), importance_plan(metric, 4, 1, cls_attn=imp)
    assert torch.equal(default.keep, one.keep) and torch.equal(default.src, one.src)
    assert torch.equal(default.dst, one.dst)
    x = torch.randn(2, 12, 64, generator=g)
    size = torch.randint(1, 5, (2, 12, 1), generator=g).float()
    out, out_size = importance_plan(metric, 0, 1, cls_attn=imp).merge(x, size)
    assert torch.equal(out, x) and torch.equal(out_size, size)


@pytest.mark.parametrize("N,r,protected", [(17, 4, 1), (13, 6, 1), (19, 5, 3), (9, 2, 0)])
def test_match_flops_counts_the_plans_products(N, r, protected):
    """match_flops (the budget solver's cost of one step) = the FLOPs FlopCounterMode measures while the
    plan is computed; no merge (r = 0, the default) costs nothing."""
    from torch.utils.flop_counter import FlopCounterMode
    from vitmerge.merging.importance import match_flops

    C = 24
    metric = torch.randn(2, N, C, generator=torch.Generator().manual_seed(N))
    for rr in (r, 0):
        with FlopCounterMode(display=False) as counter:
            importance_plan(metric, rr, protected, cls_attn=torch.rand(2, N))
        measured = counter.get_total_flops() // 2  # per image
        assert match_flops(N, protected, C, r=rr) == measured
    assert match_flops(N, protected, C) == 0


def test_plan_needs_class_attention():
    metric = torch.randn(1, 5, 3)
    with pytest.raises(ScheduleError, match=r"the 'importance' method needs the class-token attention of the block "
                                            r"\(cls_attn=\[B, N\]\); apply it with vitmerge\.apply\(model, method"):
        merging.plan("importance", metric, 2, 1)
    with pytest.raises(ScheduleError, match=r"cls_attn must be \[B, N\] = \(1, 5\), got \(1, 4\)"):
        merging.plan("importance", metric, 2, 1, cls_attn=torch.rand(1, 4))


def test_nothing_to_merge_into():
    """With no unprotected token left to keep (N <= protected + 1) nothing merges, whatever r asks."""
    from vitmerge.merging.importance import max_r

    for n, p in ((2, 1), (1, 1), (3, 2), (1, 0)):
        assert max_r(n, p) == 0 and merging.effective_r("importance", n, 5, p) == 0
        plan = importance_plan(torch.randn(2, n, 3), 5, p, cls_attn=torch.rand(2, n))
        assert plan.n_out == n and plan.r == 0
    assert max_r(3, 1) == 1 and max_r(17, 1) == 15


def test_plan_follows_the_metric_device_and_dtype():
    """Every index tensor is made on the metric's device (a stray CPU arange breaks GPU runs: the meta
    device stands in for one here), and half-precision tokens merge to half precision even with a
    float32 attention."""
    plan = importance_plan(torch.randn(2, 12, 4, device="meta"), 4, 2, cls_attn=torch.rand(2, 12, device="meta"))
    assert {plan.keep.device.type, plan.src.device.type, plan.dst.device.type} == {"meta"}
    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(2, 12, 4, generator=g).half(), torch.randn(2, 12, 8, generator=g).half()
    out, size = importance_plan(metric, 4, 1, cls_attn=torch.rand(2, 12, generator=g)).merge(x)
    assert out.dtype == size.dtype == torch.float16


# ------------------------------------------------------------------ model level

def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=64, depth=3)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def images(model, b=2, seed=1):
    h, w = model.patch_embed.img_size
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("kw,rs", [({}, [3, 5, 2]), (dict(reg_tokens=2), [6, 0, 4])])
def test_model_matches_handwritten_reference(prop_attn, kw, rs):
    model = tiny(**kw).double()
    x = images(model).double()
    ref = importance_forward(model, x, rs, prop_attn=prop_attn)
    vitmerge.apply(model, "importance", r=rs, prop_attn=prop_attn)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_static_schedule_and_protected_first():
    model = tiny(reg_tokens=2)
    vitmerge.apply(model, "importance", r=[10, 3, 2], trace_source=True)
    info = model.vitmerge
    assert info.tokens == [(19, 10, 9), (9, 3, 6), (6, 2, 4)] and info.protected == 3
    seen = []
    for blk in model.blocks:
        blk.mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(images(model, b=3))
    assert seen == info.tokens_out
    src = vitmerge.models.last_source(model)
    assert torch.equal(src.sum(1), torch.ones(3, 19))  # every patch in exactly one final token
    for t in range(3):  # class and register tokens: alone in the first slots, in order
        assert torch.equal(src[:, t, t], torch.ones(3)) and torch.equal(src[:, t].sum(-1), torch.ones(3))


def test_r0_equals_unpatched_and_tome_untouched():
    model = tiny()
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        tome = vitmerge.apply(tiny(), "tome", r=4)(x)
        vitmerge.apply(model, "importance", r=0)
        assert torch.equal(model(x), ref)
        vitmerge.apply(model, "importance", r=4)  # re-applying replaces, does not stack
        out1 = model(x)
        assert torch.equal(model(x), out1)  # deterministic
        vitmerge.apply(model, "tome", r=4)
        assert torch.equal(model(x), tome)  # tome after importance: the plain tome numbers
        vitmerge.remove(model)
        assert torch.equal(model(x), ref)


def test_bad_requests():
    model = vitmerge.apply(tiny(), "tome", r=2)
    with pytest.raises(ScheduleError, match="too large.*r <= 15"):
        vitmerge.apply(model, "importance", r=16)
    assert model.vitmerge.method == "tome" and model.blocks[0].token_merge.r == 2  # a failed request changes nothing
    with pytest.raises(ScheduleError, match="takes no options"):
        vitmerge.apply(tiny(), "importance", r=2, bits=4)
    with pytest.raises(UnsupportedModelError, match="no class token"):
        vitmerge.apply(tiny(class_token=False, global_pool="avg"), "importance", r=2)


@pytest.mark.slow
def test_export_matches_onnx_runtime(tmp_path):
    model = tiny(depth=2)
    vitmerge.apply(model, "importance", r=[6, 4])
    res = vitmerge.export(model, tmp_path / "imp.onnx", batch_sizes=(1, 3))
    assert res.verification.ok
    x = images(model, b=2, seed=7)
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort_session(tmp_path / "imp.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    proto = onnx.load(str(tmp_path / "imp.onnx"))
    scopes = {p.value for n in proto.graph.node for p in n.metadata_props if p.key == "namespace"}
    for i in range(2):
        assert any(f"blocks.{i}.token_merge" in s for s in scopes)
