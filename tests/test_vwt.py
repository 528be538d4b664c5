"""The `vwt` method (Visual-Word Tokenizer) against a float64 loop reference, its vocabulary and CLI."""
import warnings
from fractions import Fraction

import numpy as np
import onnx
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import vitmerge
from vitmerge.cli import app
from vitmerge.calibration.vocabulary import build_vocabulary, find_images
from vitmerge.errors import DataError, ScheduleError, UnsupportedModelError
from vitmerge.backends.ort import session as ort_session
from vitmerge.merging.vwt import pixel_patches, spherical_kmeans, vwt_plan
from vitmerge.models.vocabulary import Vocabulary, load_vocabulary, save_vocabulary

runner = CliRunner()


# ------------------------------------------------------------------ float64 loop reference
#
# Written from the method's description only: exact scores, every tie to the lower index, and no
# quantisation. The implementation quantises its scores (so that PyTorch, ONNX Runtime and TensorRT
# break ties alike); an exact reference agrees with it wherever different scores are further apart
# than those quantisation steps, so the inputs below are grid-valued: every patch (and word) is a
# 0/1 pattern with a fixed number of ones (a perfect square), times a power of two. Cosines are then
# multiples of 1 / ones and variances exact rationals: different scores are far apart, and equal
# scores are exactly equal (in float32 as in float64), which exercises the tie-breaks.


def _unit(v):
    n = float(v.norm())
    return v / n if n > 0 else v  # an all-zero patch stays zero


def _first_best(items, score):
    """The item with the highest score; among equal scores the first one (items in ascending order)."""
    items = list(items)
    best = max(score(i) for i in items)
    return next(i for i in items if score(i) == best)


def _variance(v):
    vals = [Fraction(float(t)) for t in v]  # exact: no summation-order rounding between equal patches
    m = sum(vals) / len(vals)
    return sum((t - m) ** 2 for t in vals) / len(vals)


def vwt_groups(feats, r, protected, mode, centroids=None, thresh=None):
    """One image. feats [P, F]. Returns (order, groups) over protected + P tokens (patch j is token
    protected + j): the output tokens in order, each the list of input tokens it holds."""
    P = feats.shape[0]
    f = [_unit(feats[j].double()) for j in range(P)]
    words = [None] * P
    if mode == "inter":
        c = [_unit(cv.double()) for cv in centroids]
        sim = []
        for j in range(P):
            s = [float(f[j] @ cv) for cv in c]
            words[j] = _first_best(range(len(c)), lambda v: s[v])  # the most similar word
            sim.append(s[words[j]])
        # a word's leader in this image: its best-matching patch
        leader = {w: _first_best((j for j in range(P) if words[j] == w), lambda j: sim[j]) for w in set(words)}
        # removed first: patches whose word already has its leader, then the leaders (and, with a
        # threshold, patches too far from every word); within each, the most word-like first
        first = [leader[words[j]] != j and not (thresh is not None and 1 - sim[j] > thresh) for j in range(P)]
        order = sorted(range(P), key=lambda j: (not first[j], -sim[j], j))
    else:  # intra: lowest pixel variance first
        var = [_variance(feats[j]) for j in range(P)]
        order = sorted(range(P), key=lambda j: (var[j], j))
    away, kept = order[:r], sorted(order[r:])
    groups = {k: [k] for k in kept}
    for a in away:
        # a kept patch of its own word if there is one (inter), the most cosine-similar of those
        pool = [k for k in kept if mode == "inter" and words[k] == words[a]] or kept
        groups[_first_best(pool, lambda k: float(f[a] @ f[k]))].append(a)
    out = [[t] for t in range(protected)] + [[protected + j for j in groups[k]] for k in kept]
    return list(range(protected)) + [protected + k for k in kept], out


def grid_patterns(shape, dim, ones, gen, scales=(1.0,)):
    """Random 0/1 patterns [*shape, dim] with exactly ``ones`` ones each, times a scale from ``scales``."""
    idx = torch.rand(*shape, dim, generator=gen).argsort(-1)[..., :ones]
    x = torch.zeros(*shape, dim).scatter_(-1, idx, 1.0)
    pick = torch.randint(len(scales), (*shape, 1), generator=gen)
    return x * torch.tensor(scales)[pick]


def mean_groups(x, groups):
    return torch.stack([sum(x[i] for i in g) / len(g) for g in groups]), torch.tensor(
        [float(len(g)) for g in groups], dtype=torch.float64)


@torch.no_grad()
def vwt_forward(model, images, r, mode, centroids=None, prop_attn=True):
    m = model
    out = []
    for img in images:
        x = m.norm_pre(m._pos_embed(m.patch_embed(img[None])))[0]
        p = m.num_prefix_tokens
        feats = pixel_patches(img[None].float(), tuple(m.patch_embed.patch_size))[0]
        _, groups = vwt_groups(feats, r, p, mode, centroids)
        x, size = mean_groups(x, groups)
        for blk in m.blocks:
            a = blk.attn
            h = blk.norm1(x)
            n = h.shape[0]
            qkv = a.qkv(h).reshape(n, 3, a.num_heads, a.head_dim)
            heads = []
            for hh in range(a.num_heads):
                logits = (qkv[:, 0, hh] @ qkv[:, 1, hh].T) * a.scale
                if prop_attn:
                    logits = logits + size.log()[None, :]
                heads.append(logits.softmax(-1) @ qkv[:, 2, hh])
            x = x + a.proj(torch.cat(heads, dim=-1))
            x = x + blk.mlp(blk.norm2(x))
        out.append(m.forward_head(m.norm(x)[None])[0])
    return torch.stack(out)


def check_plan(plan, feats, r, protected, mode, centroids=None, thresh=None):
    B, P, _ = feats.shape
    x = torch.randn(B, protected + P, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out, size = plan.merge(x, None)
    assert out.shape == (B, protected + P - r, 3)
    for b in range(B):
        order, groups = vwt_groups(feats[b], r, protected, mode, centroids, thresh)
        assert plan.keep[b].tolist() == order
        ref, ref_size = mean_groups(x[b], groups)
        torch.testing.assert_close(out[b], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(size[b, :, 0], ref_size)


# ------------------------------------------------------------------ the grouping step

@pytest.mark.parametrize("P,r,protected,words,thresh", [(16, 6, 1, 5, None), (30, 25, 2, 8, None), (25, 10, 1, 40, 0.9),
                                                        (20, 19, 0, 3, None), (24, 4, 1, 6, 0.7)])
def test_inter_grouping_matches_reference(P, r, protected, words, thresh):
    g = torch.Generator().manual_seed(P + r)
    feats = grid_patterns((3, P), 48, 16, g, scales=(1.0, 2.0, 0.5))
    cent = grid_patterns((words,), 48, 16, g) / 4  # unit norm: 16 entries of 1/4
    plan = vwt_plan(feats, r, protected, mode="inter", centroids=cent, thresh=thresh)
    check_plan(plan, feats, r, protected, "inter", cent, thresh)


@pytest.mark.parametrize("mode", ["inter", "intra"])
def test_identical_patches_break_ties_by_index(mode):
    """Flat backgrounds make many patches exactly equal: the choice must still be well defined."""
    g = torch.Generator().manual_seed(4)
    base = grid_patterns((3,), 48, 16, g)
    pick = torch.randint(0, 3, (2, 20), generator=g)
    feats = base[pick] * torch.tensor([1.0, 2.0])[:, None, None]  # [2, 20, 48], only 3 distinct patches per image
    cent = grid_patterns((4,), 48, 16, g) / 4
    plan = vwt_plan(feats, 9, 1, mode=mode, centroids=cent)
    check_plan(plan, feats, 9, 1, mode, cent)


@pytest.mark.parametrize("seed", [2, 3])
def test_intra_grouping_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    feats = grid_patterns((2, 16), 48, 16, g, scales=(1.0, 2.0, 4.0))  # three variances, many ties
    check_plan(vwt_plan(feats, 7, 1, mode="intra"), feats, 7, 1, "intra")
    # continuous features: variances all differ, so the lowest-variance patches go, whatever the steps
    feats = torch.randn(2, 16, 48, generator=g) * (torch.arange(16) + 1.0)[torch.randperm(16, generator=g)][:, None]
    plan = vwt_plan(feats, 7, 1, mode="intra")
    for b in range(2):
        assert sorted(plan.src[b].tolist()) == sorted((1 + feats[b].double().var(-1).argsort()[:7]).tolist())


# ------------------------------------------------------------------ the model

def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=64, depth=2)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def blocky_images(b=2, seed=1, hw=64):
    """Random images with flat 16x16 regions (identical patches) next to textured ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, hw, hw, generator=g)
    flat = torch.rand(b, 1, hw // 16, hw // 16, generator=g) < 0.5
    levels = torch.randint(0, 2, (b, 3, hw // 16, hw // 16), generator=g).float()
    mask = flat.repeat_interleave(16, 2).repeat_interleave(16, 3)
    return torch.where(mask, levels.repeat_interleave(16, 2).repeat_interleave(16, 3), x)


def vocab_for(model, words=6, seed=0):
    feats = pixel_patches(blocky_images(8, seed=seed + 10), tuple(model.patch_embed.patch_size))
    cent = spherical_kmeans(feats.reshape(-1, feats.shape[-1]), words, seed=seed)
    return Vocabulary(cent, "pixels", {"patch_size": list(model.patch_embed.patch_size),
                                       "img_size": list(model.patch_embed.img_size)})


def grid_images(b=2, seed=1, hw=64, patch=16):
    """Images whose 16 x 16 x 3 patches are grid-valued (768 values, 256 ones, times 1 or 2; see the
    reference), a third of them copies of one of three patterns (flat regions: exactly equal patches)."""
    g = torch.Generator().manual_seed(seed)
    n = (hw // patch) ** 2
    pats = grid_patterns((b, n), 3 * patch * patch, 256, g, scales=(1.0, 2.0))
    common = grid_patterns((3,), 3 * patch * patch, 256, g)
    copy = torch.rand(b, n, generator=g) < 0.33
    pats = torch.where(copy[..., None], common[torch.randint(0, 3, (b, n), generator=g)], pats)
    gh = hw // patch  # inverse of pixel_patches: [b, gh * gw, C * ph * pw] -> [b, C, H, W]
    return pats.reshape(b, gh, gh, 3, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, hw, hw)


@pytest.mark.parametrize("mode", ["inter", "intra"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_model_matches_handwritten_reference(mode, prop_attn):
    model = tiny().double()
    words = grid_patterns((6,), 768, 256, torch.Generator().manual_seed(5)) / 16  # unit norm
    voc = Vocabulary(words, "pixels", {"patch_size": [16, 16], "img_size": [64, 64]})
    x = grid_images().double()
    assert torch.equal(pixel_patches(x, (16, 16)).sum(-1) % 256, torch.zeros(2, 16, dtype=torch.float64))
    ref = vwt_forward(model, x, 7, mode, voc.centroids, prop_attn=prop_attn)
    vitmerge.apply(model, "vwt", r=7, mode=mode, vocab=voc if mode == "inter" else None, prop_attn=prop_attn)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_static_counts_sizes_and_protected_first():
    model = tiny(reg_tokens=2, depth=3)
    vitmerge.apply(model, "vwt", r=10, vocab=vocab_for(model), trace_source=True)
    info = model.vitmerge
    assert info.pre_r == 10 and info.tokens == [(9, 0, 9)] * 3 and info.r == [0, 0, 0]
    seen = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(blocky_images(3))
    assert seen == [9, 9, 9]
    size = model._vm_state.size
    assert torch.equal(size.sum(1)[:, 0], torch.full((3,), 19.0))  # 16 patches + cls + 2 registers
    assert torch.equal(size[:, :3, 0], torch.ones(3, 3))
    src = vitmerge.models.last_source(model)
    assert torch.equal(src.sum(1), torch.ones(3, 19))
    for t in range(3):
        assert torch.equal(src[:, t, t], torch.ones(3)) and torch.equal(src[:, t].sum(-1), torch.ones(3))


def test_r0_equals_unpatched_and_deterministic():
    model = tiny()
    x = blocky_images()
    with torch.no_grad():
        ref = model(x)
        vitmerge.apply(model, "vwt", r=0, mode="intra")
        assert torch.equal(model(x), ref)
        vitmerge.apply(model, "vwt", r=6, vocab=vocab_for(model))
        a = model(x)
        assert torch.equal(model(x), a) and not torch.equal(a, ref)
        keys = list(tiny().state_dict())
        assert list(model.state_dict()) == keys  # the vocabulary is not part of the weights
        vitmerge.remove(model)
        assert torch.equal(model(x), ref) and not hasattr(model, "vwt_merge")


def test_bad_requests(tmp_path):
    model = tiny()
    with pytest.raises(ScheduleError, match="one int r"):
        vitmerge.apply(model, "vwt", r=[2, 2], mode="intra")
    with pytest.raises(ScheduleError, match="too large.*r <= 15"):
        vitmerge.apply(model, "vwt", r=16, mode="intra")
    with pytest.raises(ScheduleError, match="vocab build"):
        vitmerge.apply(model, "vwt", r=4)
    with pytest.raises(DataError, match="does not exist.*vocab build"):
        vitmerge.apply(model, "vwt", r=4, vocab=tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a vitmerge VWT vocabulary"):
        vitmerge.apply(model, "vwt", r=4, vocab=tmp_path / "other.pt")
    with pytest.raises(ScheduleError, match="unknown vwt mode"):
        vitmerge.apply(model, "vwt", r=4, mode="words")
    with pytest.raises(ScheduleError, match="unknown option"):
        vitmerge.apply(model, "vwt", r=4, mode="intra", bits=3)
    with pytest.raises(DataError, match="pixel patches of size"):
        vitmerge.apply(tiny(patch_size=8), "vwt", r=4, vocab=vocab_for(model))
    with pytest.raises(UnsupportedModelError, match="plain patch embedding"):
        vitmerge.apply(tiny(dynamic_img_size=True), "vwt", r=4, mode="intra")
    assert not hasattr(model, "vitmerge")  # nothing half-applied


def test_vocabulary_file_round_trip_and_checks(tmp_path):
    model = tiny()
    voc = vocab_for(model)
    path = save_vocabulary(voc, tmp_path / "v.pt")
    back = load_vocabulary(path)
    assert torch.allclose(back.centroids, voc.centroids) and back.space == "pixels"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        vitmerge.apply(tiny(img_size=96), "vwt", r=4, vocab=path)
    assert any("image size" in str(x.message) for x in w)


def test_spherical_kmeans_finds_separated_words():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    pts = (centres.repeat_interleave(40, 0) + 0.05 * torch.randn(200, 16, generator=g))
    found = spherical_kmeans(pts, 5, seed=1)
    best = (found @ centres.T).max(dim=0).values
    assert (best > 0.99).all()  # every true centre recovered
    assert torch.equal(found, spherical_kmeans(pts, 5, seed=1))  # deterministic
    with pytest.raises(DataError, match="cannot make"):
        spherical_kmeans(pts[:3], 5)


def write_images(folder, n=5, size=40):
    g = np.random.default_rng(0)
    (folder / "a" / "b").mkdir(parents=True)
    for i in range(n):
        arr = (g.random((size, size + 8, 3)) * 255).astype(np.uint8)
        arr[: size // 2] = 40 * i  # a flat half
        sub = folder / ("a/b" if i % 2 else "a")
        Image.fromarray(arr).save(sub / f"im{i}.{'png' if i % 3 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")


def test_embedding_space_vocabulary_fits_only_its_weights(tmp_path):
    write_images(tmp_path)
    model = tiny()
    voc = build_vocabulary(model, find_images(tmp_path), words=4, space="embeddings")
    assert voc.feature_dim == 192 and voc.meta["num_images"] == 5 and voc.space == "embeddings"
    vitmerge.apply(model, "vwt", r=5, vocab=voc)
    with torch.no_grad():
        assert model(blocky_images()).shape == (2, 1000)
    with pytest.raises(DataError, match="other patch-embedding weights"):
        vitmerge.apply(tiny(seed=1), "vwt", r=5, vocab=voc)


def test_cli_vocab_build(tmp_path):
    write_images(tmp_path / "data")
    out = tmp_path / "vocab.pt"
    res = runner.invoke(app, ["vocab", "build", "vit_tiny_patch16_224", "--data", str(tmp_path / "data"), "-o", str(out),
                              "--img-size", "64", "--words", "8"])
    assert res.exit_code == 0, res.output
    voc = load_vocabulary(out)
    assert voc.num_words == 8 and voc.feature_dim == 768 and voc.space == "pixels"
    assert voc.meta["num_images"] == 5 and voc.meta["img_size"] == [64, 64] and voc.meta["patch_size"] == [16, 16]
    assert voc.meta["model"] == "vit_tiny_patch16_224"
    model = tiny()
    vitmerge.apply(model, "vwt", r=8, vocab=out)
    with torch.no_grad():
        assert model(blocky_images()).shape == (2, 1000)
    # a model with another patch size (--model-kwargs) and a sample of the images (--num)
    res = runner.invoke(app, ["vocab", "build", "timm:vit_tiny_patch16_224", "--data", str(tmp_path / "data"), "-o",
                              str(out), "--model-kwargs", '{"img_size": 32, "patch_size": 4}',
                              "--num", "3", "--words", "4"])
    assert res.exit_code == 0, res.output
    voc = load_vocabulary(out)
    assert voc.feature_dim == 48 and voc.meta["num_images"] == 3 and voc.meta["patch_size"] == [4, 4]


@pytest.mark.parametrize("make,message", [
    (lambda p: p, "no images found"),
    (lambda p: p / "missing", "does not exist"),
])
def test_cli_vocab_bad_folder(tmp_path, make, message):
    out = tmp_path / "v.pt"
    res = runner.invoke(app, ["vocab", "build", "--data", str(make(tmp_path)), "-o", str(out)])
    assert res.exit_code == 2 and message in res.output
    assert not out.exists()


def test_cli_vocab_build_takes_the_model_first_like_every_command(tmp_path):
    """The old `--model NAME` form is refused with the new command line to type, before any work."""
    res = runner.invoke(app, ["vocab", "build", "--data", str(tmp_path), "-o", str(tmp_path / "v.pt"), "--model",
                              "vit_tiny_patch16_224"])
    assert res.exit_code == 2 and "vitmerge vocab build vit_tiny_patch16_224 --data" in res.output
    res = runner.invoke(app, ["vocab", "build", "vit_tiny_patch16_224", "-o", str(tmp_path / "v.pt")])
    assert res.exit_code == 2 and "--data DIR" in res.output


@pytest.mark.slow
def test_export_matches_onnx_runtime_on_flat_regions(tmp_path):
    model = tiny()
    vitmerge.apply(model, "vwt", r=7, vocab=vocab_for(model))
    res = vitmerge.export(model, tmp_path / "vwt.onnx", batch_sizes=(1, 3))
    assert res.verification.ok
    x = blocky_images(4, seed=3)  # identical patches: ties decided the same way in ONNX Runtime
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort_session(tmp_path / "vwt.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    proto = onnx.load(str(tmp_path / "vwt.onnx"))
    scopes = {p.value for n in proto.graph.node for p in n.metadata_props if p.key == "namespace"}
    assert any("vwt_merge" in s for s in scopes)


# ------------------------------------------------------------------ gaps found by mutation testing


def _lloyd_fixed_point(x, cent):
    """Each centroid is the normalised mean of the unit rows nearest to it (the spherical k-means
    fixed point), checked in float64."""
    u = F.normalize(x.double(), dim=-1)
    lab = (u @ cent.double().T).argmax(-1)
    for c in range(cent.shape[0]):
        members = u[lab == c]
        assert len(members), f"word {c} serves no point"
        torch.testing.assert_close(cent[c].double(), F.normalize(members.sum(0), dim=0), rtol=0, atol=1e-5)


def test_spherical_kmeans_converges_to_a_fixed_point_and_reports_progress():
    g = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(6, 12, generator=g), dim=-1)
    pts = (centres.repeat_interleave(50, 0) + 0.3 * torch.randn(300, 12, generator=g)) * 7.0  # not unit norm
    calls = []
    cent = spherical_kmeans(pts, 6, iters=100, progress=calls.append)
    torch.testing.assert_close(cent.norm(dim=-1), torch.ones(6))
    _lloyd_fixed_point(pts, cent)
    assert 2 <= len(calls) < 100 and calls == list(range(len(calls)))  # stops once nothing moves
    assert torch.equal(spherical_kmeans(pts, 6), spherical_kmeans(pts, 6, seed=0))  # the default seed is 0
    # hard data (uniform on the sphere, 64 words) is still moving after 30 iterations: the default stops there
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    spherical_kmeans(x, 64, progress=calls.append)
    assert calls == list(range(30))


def test_spherical_kmeans_plusplus_seeding():
    """With no Lloyd iteration the result is the k-means++ seeds: after the first seed, the next is drawn
    with probability proportional to 1 - cosine to the nearest seed. 500 copies of one direction and a
    single point at cosine 0.5 (distance 0.5, the only positive one once a copy is the first seed): the
    two seeds are the two directions, whichever comes first."""
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.5, 0.75 ** 0.5, 0.0])
    pts = torch.cat([a.expand(500, 3), b[None]])
    for seed in range(5):
        seeds = spherical_kmeans(pts, 2, iters=0, seed=seed)
        cos = seeds @ torch.stack([a, b]).T
        assert sorted(cos.argmax(-1).tolist()) == [0, 1] and (cos.max(-1).values > 1 - 1e-6).all()


def test_spherical_kmeans_degenerate_data():
    """As many points as words: each point is a word. All points identical: every distance is 0, so the
    seeding draws uniformly, and emptied words are re-seeded with a point (never a zero vector)."""
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(5, 8, generator=g)
    cent = spherical_kmeans(pts, 5)
    assert sorted((cent @ F.normalize(pts, dim=-1).T).argmax(-1).tolist()) == [0, 1, 2, 3, 4]
    same = torch.randn(8, generator=g).expand(10, 8)
    cent = spherical_kmeans(same, 3)
    torch.testing.assert_close(cent, F.normalize(same[:3], dim=-1))
    # two directions and three words: one word empties in the first iteration and is re-seeded
    two = torch.cat([torch.eye(4)[0].expand(6, 4), torch.eye(4)[1].expand(6, 4)])
    cent = spherical_kmeans(two, 3, seed=2)
    torch.testing.assert_close(cent.norm(dim=-1), torch.ones(3))
    assert ((cent @ torch.eye(4)[:2].T).max(0).values > 1 - 1e-6).all()


def test_intra_rank_is_per_image():
    """The variance ranking of one image does not depend on the others in the batch, nor on its scale:
    a dim copy (x 0.001: variances 1e-6 of the original, all far below 1) merges the same patches."""
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(1, 16, 48, generator=g) * (torch.arange(16) + 1.0)[torch.randperm(16, generator=g)][:, None]
    plan = vwt_plan(torch.cat([feats, 0.001 * feats]), 7, 1, mode="intra")
    want = sorted((1 + feats[0].double().var(-1).argsort()[:7]).tolist())
    assert sorted(plan.src[0].tolist()) == want and sorted(plan.src[1].tolist()) == want


def signed_patterns(shape, dim, gen, scales=(1.0,)):
    """Random +-1 patterns [*shape, dim] times a scale from ``scales``: cosines of two are multiples of
    2 / dim (exact), and negative ones occur (embedding-space features)."""
    x = torch.randint(0, 2, (*shape, dim), generator=gen).float() * 2 - 1
    pick = torch.randint(len(scales), (*shape, 1), generator=gen)
    return x * torch.tensor(scales)[pick]


@pytest.mark.parametrize("P,r,protected,words,thresh,cdtype", [
    (20, 8, 1, 40, None, torch.float32),  # more words than feature channels (16)
    (20, 12, 1, 40, 0.5, torch.float32),  # a threshold that leaves some patches unmatched, hit exactly (1 - 0.5)
    (24, 10, 2, 6, 0.75, torch.float64),  # a float64 vocabulary with float32 patches
    (12, 11, 1, 1, None, torch.float32),  # one word: patches opposite to it (cosine -1) still go before its leader
])
def test_inter_grouping_signed_features(P, r, protected, words, thresh, cdtype):
    g = torch.Generator().manual_seed(P * words + r)
    cent = signed_patterns((words,), 16, g) / 4  # unit norm
    feats = signed_patterns((3, P), 16, g, scales=(1.0, 2.0, 0.5))
    feats[:, ::3] = cent[torch.randint(words, (3, feats[:, ::3].shape[1]), generator=g)] * 2  # exact word matches
    feats[:, 1::4] = -feats[:, 1::4]  # and opposites
    cent = cent.to(cdtype)
    plan = vwt_plan(feats, r, protected, mode="inter", centroids=cent, thresh=thresh)
    check_plan(plan, feats, r, protected, "inter", cent, thresh)
    if thresh is not None:  # the threshold changed something here
        assert plan.keep.tolist() != vwt_plan(feats, r, protected, mode="inter", centroids=cent).keep.tolist()


@pytest.mark.parametrize("r", [0, -3])
def test_nothing_to_remove_is_the_identity_plan(r):
    feats = torch.randn(2, 9, 12)
    for plan in (vwt_plan(feats, r, 2, mode="intra"), vwt_plan(feats, r, 2, mode="inter", centroids=F.normalize(feats[0, :4]))):
        assert plan.identity and plan.n_out == 11 and torch.equal(plan.keep, torch.arange(11).expand(2, 11))
        x = torch.randn(2, 11, 3)
        assert torch.equal(plan.merge(x)[0], x)
    one = vwt_plan(feats, 1, 2, mode="intra")  # r = 1 removes one patch
    assert not one.identity and one.n_out == 10 and one.src.shape == (2, 1)


def test_destination_steps_keep_keys_exact():
    """The destination key q * n_keep + position must stay an exact float32 integer (below 2^24), with q at
    most (2 + bonus) * steps: steps is the largest count up to 512 for which that holds (at least 1)."""
    from vitmerge.merging.vwt import SAME_WORD_BONUS, dst_levels

    top = 2 + int(SAME_WORD_BONUS)
    for n in [1, 2, 7, 100, *range(5440, 5700), 10_000, 65_536, 1 << 20, 2_000_000, 1 << 23]:  # 512 steps up to ~5460
        want = max([s for s in range(1, 513) if (top * s + 1) * n <= 2 ** 24] or [1])
        got = dst_levels(n)
        assert got == want and isinstance(got, int), n


@pytest.mark.parametrize("opts,message", [
    (dict(mode="words"), "unknown vwt mode 'words'; use one of inter, intra"),
    (dict(space="patches"), "unknown vwt space 'patches'; use one of pixels, embeddings"),
    (dict(thresh=2.5), "thresh is a cosine distance in [0, 2], got 2.5"),
    (dict(thresh=-0.1), "thresh is a cosine distance in [0, 2], got -0.1"),
    (dict(thresh=True), "thresh is a cosine distance in [0, 2], got True"),
    (dict(thresh="0.5"), "thresh is a cosine distance in [0, 2], got '0.5'"),
])
def test_option_errors(opts, message):
    from vitmerge.merging.vwt import check_options

    with pytest.raises(ScheduleError) as e:
        check_options(**opts)
    assert str(e.value) == message


def test_valid_options_pass():
    from vitmerge.merging.vwt import check_options

    for opts in (dict(), dict(mode="intra"), dict(space="pixels"), dict(space="embeddings"), dict(thresh=0),
                 dict(thresh=2), dict(thresh=0.3), dict(space=None, thresh=None)):
        check_options(**opts)


def test_plan_errors_and_defaults():
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(2, 10, 6, generator=g)
    cent = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    with pytest.raises(ScheduleError) as e:
        vwt_plan(feats, 3)
    assert str(e.value) == "vwt mode 'inter' needs a vocabulary (centroids); build one with `vitmerge vocab build`"
    with pytest.raises(ScheduleError) as e:
        vwt_plan(feats, 3, centroids=torch.randn(4, 7))
    assert str(e.value) == "vocabulary words have 7 features but the patches have 6"
    with pytest.raises(ScheduleError) as e:
        vwt_plan(feats, 3, mode="words")
    assert str(e.value) == "unknown vwt mode 'words'; use one of inter, intra"
    # defaults: mode inter, one protected token
    plan = vwt_plan(feats, 3, centroids=cent)
    ref = vwt_plan(feats, 3, 1, mode="inter", centroids=cent)
    assert torch.equal(plan.keep, ref.keep) and torch.equal(plan.src, ref.src) and torch.equal(plan.dst, ref.dst)
    assert plan.n_out == 8 and plan.keep[:, 0].tolist() == [0, 0]


def test_intra_ranks_by_the_pixels_it_is_given():
    """intra: the variance comes from ``pixels`` when given (the features only choose destinations)."""
    g = torch.Generator().manual_seed(13)
    feats = torch.randn(1, 12, 8, generator=g)
    pixels = torch.randn(1, 12, 48, generator=g) * torch.linspace(3.0, 0.5, 12)[:, None]  # variance falls with index
    plan = vwt_plan(feats, 4, 1, mode="intra", pixels=pixels)
    assert sorted(plan.src[0].tolist()) == sorted(1 + j for j in pixels[0].var(-1).argsort()[:4].tolist()) == [9, 10, 11, 12]


def test_max_r():
    from vitmerge.merging.vwt import max_r

    assert [max_r(n, 1) for n in (0, 1, 2, 3, 17)] == [0, 0, 0, 1, 15]
    assert max_r(5, 0) == 4


def test_score_steps_keep_ranks_exact():
    """A rank (tier, quantised score, index) over 2 tiers is exact in float32 when (2 L + 2) P <= 2^24 for
    L steps. levels is one step below the largest such L, at most 1024, and at least 8 (else an error that
    names the largest patch count that works)."""
    from vitmerge.merging.vwt import quant_levels

    def largest(P):
        lo, hi = 0, 2 ** 24
        while lo < hi:  # binary search for the largest L with exact ranks
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if (2 * mid + 2) * P <= 2 ** 24 else (lo, mid - 1)
        return lo

    for P in [1, 16, 196, 1000, 4096, 8190, 8191, 8192, 8193, 20_000, 100_003, 838_860]:
        got = quant_levels(P)
        assert got == min(1024, largest(P) - 1) and isinstance(got, int), P
    assert quant_levels(838_860) == 8
    with pytest.raises(ScheduleError) as e:
        quant_levels(838_861)
    assert str(e.value) == "vwt supports at most 838860 patches per image, got 838861"


def test_plan_is_built_on_the_features_device():
    """Every tensor the plan creates follows the features' device (checked on PyTorch's meta device)."""
    feats = torch.randn(2, 16, 12, device="meta")
    cent = torch.randn(5, 12, device="meta")
    for plan in (vwt_plan(feats, 6, 2, mode="inter", centroids=cent, thresh=0.5), vwt_plan(feats, 6, 2, mode="intra"),
                 vwt_plan(feats, 0, 2, mode="intra")):
        assert {plan.keep.device.type, plan.src.device.type, plan.dst.device.type} == {"meta"}
