"""Graphs every runtime can run (issue 10, items 10 and 11).

* No DOUBLE anywhere in an exported graph, for every registered method and graph form; the hash
  method's sort keys are exact integers and its plan is the very plan of the former float64 code.
* Every TopK in a graph has K <= TOPK_LIMIT (TensorRT's TopK takes K < 3840), also for long
  sequences: :func:`vitmerge.merging.topk.topk` sorts long rows in chunks, exactly.
"""
import math
import warnings

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto

import vitmerge
from vitmerge import merging
from vitmerge.exporter import surgery, trt_check
from vitmerge.merging import hashing
from vitmerge.merging import topk as topk_mod
from vitmerge.merging.base import MergePlan, identity_plan
from vitmerge.merging.topk import TOPK_LIMIT, sort_positions, topk

from support.aten_ops import record_ops


# ------------------------------------------------------------------ independent references


def reference_order(key: np.ndarray, largest: bool) -> np.ndarray:
    """Row-wise order by key (descending if largest), ties to the lower index: numpy's lexsort."""
    out = []
    for row in key:
        idx = np.arange(len(row))
        k = row.astype(np.float64) if row.dtype.kind == "f" else row.astype(object)
        primary = [(-v if largest else v) for v in k]
        out.append(np.array(sorted(idx, key=lambda i: (primary[i], i))))
    return np.stack(out)


def float64_hash_plan(metric, r, protected=1, bits=16, rounds=2, seed=0) -> MergePlan:
    """The hash plan as it was computed before this change: Gray ranks summed in float64, one TopK
    over all U tokens per round, one TopK for the kept order (kept here as the reference)."""
    B, N, C = metric.shape
    r = max(min(int(r), N - protected - 1), 0)
    if r <= 0:
        return identity_plan(metric)
    U = N - protected
    x = metric.contiguous()
    proj = torch.randn(C, rounds * bits, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    signs = (x @ proj > 0)[:, protected:].to(x.dtype).reshape(B, U, rounds, bits)
    c = torch.cumsum(signs, dim=-1)
    parity = (c - 2.0 * torch.floor(c * 0.5)).to(torch.float64)
    weights = torch.tensor([float(1 << (bits - 1 - i)) for i in range(bits)], dtype=torch.float64)
    rank = (parity * weights).sum(-1).to(torch.long)
    key = rank.transpose(1, 2) * U + torch.arange(U)
    orders = key.topk(U, dim=-1, largest=False, sorted=True).indices
    norm = x.norm(dim=-1)[:, protected:].clamp_min(1e-12)
    ar = torch.arange(U).expand(B, U)

    def inverse(o):
        return torch.empty(B, U, dtype=torch.long).scatter(1, o, ar)

    pos0 = inverse(orders[:, 0])
    low = torch.full((B, 1), -2.0, dtype=x.dtype)
    rows = x[:, protected:]
    cand, score = [], []
    for k in range(rounds):
        o = orders[:, k]
        xs = rows.gather(1, o[..., None].expand(B, U, C))
        ns = norm.gather(1, o)
        edge = torch.linalg.vecdot(xs[:, :-1], xs[:, 1:]) / (ns[:, :-1] * ns[:, 1:])
        pk = pos0 if k == 0 else inverse(o)
        steps = ((1, torch.cat([edge, low], 1)),) if k == 0 else \
            ((-1, torch.cat([low, edge], 1)), (1, torch.cat([edge, low], 1)))
        for step, padded in steps:
            j = o.gather(1, (pk + step).clamp(0, U - 1))
            s = padded.gather(1, pk)
            if k > 0:
                s = s.masked_fill(pos0.gather(1, j) <= pos0, -2.0)
            cand.append(j)
            score.append(s)
    best, which = torch.stack(score, -1).max(-1)
    partner = torch.stack(cand, -1).gather(-1, which[..., None])[..., 0]
    exact = best.to(torch.promote_types(best.dtype, torch.float32))
    skey = torch.floor((exact + 2.0) * hashing.score_scale(U)).to(torch.long) * U + (U - 1 - ar)
    src = skey.topk(r, dim=-1, largest=True, sorted=True).indices
    is_src = torch.zeros(B, U, dtype=torch.long).scatter(1, src, torch.ones_like(src))
    parent = torch.where(is_src > 0, partner, ar)
    for _ in range(max(math.ceil(math.log2(U)), 1)):
        parent = parent.gather(1, parent)
    keep = (is_src * U + ar).topk(U - r, dim=-1, largest=False, sorted=True).indices
    slot = torch.empty(B, U, dtype=torch.long).scatter(1, keep, torch.arange(U - r).expand(B, U - r))
    dst = slot.gather(1, parent.gather(1, src)) + protected
    keep = torch.cat([torch.arange(protected).expand(B, protected), keep + protected], dim=-1)
    return MergePlan(keep=keep, src=src + protected, dst=dst)


def assert_same_plan(a: MergePlan, b: MergePlan):
    for f in ("keep", "src", "dst"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.fixture
def small_chunks(monkeypatch):
    """The long-sequence path at small sizes: rows over 4 keys are sorted in chunks of 4 (2 with ties),
    as in a traced graph."""
    monkeypatch.setattr(topk_mod, "TOPK_LIMIT", 4)
    monkeypatch.setattr(topk_mod, "CHUNK", 4)
    monkeypatch.setattr(topk_mod, "CHUNK_TIES", 2)
    monkeypatch.setattr(topk_mod, "tracing", lambda: True)


# ------------------------------------------------------------------ the chunked sort


@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
@pytest.mark.parametrize("largest", [True, False])
def test_sort_positions_match_reference(unique, dtype, largest):
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 3, 7, 16, 33, 100):
        if unique:
            key = torch.stack([torch.randperm(4 * n, generator=g)[:n] for _ in range(3)]) - 2 * n
        else:
            key = torch.randint(-2, 3, (3, n), generator=g)  # many ties
        key = key.to(dtype)
        if dtype.is_floating_point and not unique:
            key[0, : n // 2] = -math.inf if largest else math.inf  # ties with the padding value
        ref = reference_order(key.numpy(), largest)
        for chunk in (1, 2, 4, 8, 64):
            pos = sort_positions(key, largest=largest, unique=unique, chunk=chunk)
            order = torch.empty_like(pos).scatter(1, pos, torch.arange(n).expand_as(pos))
            assert (order.numpy() == ref).all(), (n, chunk)


@pytest.mark.parametrize("chunked", [True, False])
def test_long_rows_match_reference(chunked):
    """Real sizes: rows longer than TensorRT's limit, both the traced (chunked) and the eager path."""
    g = torch.Generator().manual_seed(2)
    n = TOPK_LIMIT + 700
    distinct = torch.stack([torch.randperm(3 * n, generator=g)[:n] for _ in range(2)]) * 2 ** 20  # int64 keys
    tied = torch.randint(0, 50, (2, n), generator=g).float() / 7
    for key, unique in ((distinct, True), (tied, False)):
        for largest in (True, False):
            for k in (1, n // 3, n):
                out = topk(key, k, largest=largest, unique=unique, chunked=chunked)
                ref = reference_order(key.numpy(), largest)[:, :k]
                assert (out.indices.numpy() == ref).all()
                assert torch.equal(out.values, key.gather(1, out.indices))


def test_short_rows_are_one_plain_topk():
    key = torch.randn(2, TOPK_LIMIT)
    out = topk(key, 5, chunked=True)  # at the limit: the one TopK, whatever is asked
    ref = key.topk(5, dim=-1)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.values, ref.values)
    with pytest.raises(ValueError, match="power of two"):
        sort_positions(key, chunk=3)


# ------------------------------------------------------------------ hash: exact keys, the same plan


def _metrics(trial: int):
    g = torch.Generator().manual_seed(trial)
    N = int(torch.randint(2, 70, (1,), generator=g))
    B = int(torch.randint(1, 4, (1,), generator=g))
    C = int(torch.randint(1, 12, (1,), generator=g))
    metric = torch.randn(B, N, C, generator=g)
    if trial % 3 == 0:  # duplicated tokens: equal hash codes and equal scores (ties everywhere)
        metric = metric[:, torch.randint(0, max(N // 3, 1), (N,), generator=g)]
    if trial % 7 == 0:
        metric = metric.double()
    protected = min(int(torch.randint(0, 3, (1,), generator=g)), N - 1)
    r = int(torch.randint(0, N + 1, (1,), generator=g))
    bits = int(torch.randint(1, hashing.MAX_BITS + 1, (1,), generator=g))
    rounds = int(torch.randint(1, 4, (1,), generator=g))
    return metric, r, protected, bits, rounds, trial % 5


@pytest.mark.parametrize("trial", range(120))
def test_hash_plan_is_the_float64_plan(trial):
    metric, r, protected, bits, rounds, seed = _metrics(trial)
    ref = float64_hash_plan(metric, r, protected, bits, rounds, seed)
    assert_same_plan(hashing.hash_plan(metric, r, protected, bits, rounds, seed), ref)


@pytest.mark.parametrize("trial", range(0, 120, 3))
def test_hash_plan_in_chunks_is_the_float64_plan(trial, small_chunks):
    metric, r, protected, bits, rounds, seed = _metrics(trial)
    ref = float64_hash_plan(metric, r, protected, bits, rounds, seed)
    assert_same_plan(hashing.hash_plan(metric, r, protected, bits, rounds, seed), ref)


def test_hash_plan_at_long_sequences(monkeypatch):
    """Video/audio lengths: U > TOPK_LIMIT, the real chunk size, traced path and eager path."""
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(1, 5000, 16, generator=g)[:, torch.randint(0, 2500, (5000,), generator=g)]
    for r in (1200, 4000):
        ref = float64_hash_plan(metric, r, 1)
        assert_same_plan(hashing.hash_plan(metric, r, 1), ref)
        monkeypatch.setattr(topk_mod, "tracing", lambda: True)
        assert_same_plan(hashing.hash_plan(metric, r, 1), ref)
        monkeypatch.undo()


def test_hash_rank_keys_are_exact_integers():
    """The Gray rank is put together in int64: the key of a code with all MAX_BITS (24) bits set is exact."""
    x = torch.ones(1, 3, 1)
    bits = hashing.MAX_BITS
    orders = hashing.hash_orders(x, bits, 1, 0)
    assert orders.dtype == torch.long and orders.shape == (1, 1, 3)
    w = hashing._gray_rank_weights(bits, "cpu")
    assert w.dtype == torch.long and int(w.sum()) == 2 ** bits - 1


@pytest.mark.parametrize("method", [m for m in merging.METHODS if m != "hash"])
def test_other_methods_same_plan_in_chunks(method, small_chunks):
    """The chunked sort gives every method the plan of its eager path (ties to the lower index)."""
    g = torch.Generator().manual_seed(4)
    metric = torch.randint(-2, 3, (2, 41, 6), generator=g).float()  # many tied scores
    cls_attn = torch.randint(0, 5, (2, 41), generator=g).float() / 8  # many tied importances
    kw = {"cls_attn": cls_attn} if merging.METHODS[method].needs_cls_attn else {}
    if method == "vwt":
        kw = {"centroids": torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)}
    for r in (1, 9, 18):
        chunked = merging.plan(method, metric, r, 1, **kw)
        topk_mod.tracing = lambda: False  # (monkeypatched: restored after the test)
        topk_mod.TOPK_LIMIT = 10 ** 6  # the plain TopK path
        plain_sort = merging.plan(method, metric, r, 1, **kw)
        topk_mod.TOPK_LIMIT = 4
        stable = merging.plan(method, metric, r, 1, **kw)  # eager long-row path: stable sort
        topk_mod.tracing = lambda: True
        assert_same_plan(chunked, stable)
        assert chunked.n_out == plain_sort.n_out and chunked.r == plain_sort.r


# ------------------------------------------------------------------ exported graphs


def double_uses(model: onnx.ModelProto) -> list:
    """Every place a float64 appears: tensors (initializers, value_info, inputs, outputs), Cast /
    dtype targets and tensor-valued attributes, in the graph and its subgraphs."""
    found = []
    model = onnx.shape_inference.infer_shapes(model)

    def walk(graph):
        for t in graph.initializer:
            if t.data_type == TensorProto.DOUBLE:
                found.append(("initializer", t.name))
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
                found.append(("tensor", vi.name))
        for node in graph.node:
            for a in node.attribute:
                if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == TensorProto.DOUBLE:
                    found.append((node.op_type, node.name))
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.DOUBLE:
                    found.append((node.op_type, node.name))
                for t in a.tensors:
                    if t.data_type == TensorProto.DOUBLE:
                        found.append((node.op_type, node.name))
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def topk_ks(model: onnx.ModelProto) -> list:
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return [int(consts[n.input[1]].reshape(-1)[0]) for n in model.graph.node if n.op_type == "TopK"]


def scatter_add_nodes(model: onnx.ModelProto) -> set:
    out = set()
    for n in model.graph.node:
        red = [a.s for a in n.attribute if a.name == "reduction"]
        if n.op_type.startswith("Scatter") and red and red[0] != b"none":
            out.add(n.name)
    return out


def test_reference_walker_sees_double():
    """The walker above finds float64 where it is (so a clean result means something)."""
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE, name="c"),
                                    onnx.helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)], "g", [x], [y])
    found = double_uses(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))
    assert ("Cast", "c") in found and ("tensor", "d") in found


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=5)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def _apply(method):
    # one block (two for evo, whose first block always runs in full): the graph forms are per block
    model = _tiny(depth=2 if method == "evo" else 1)
    if method == "vwt":
        from vitmerge.models.vocabulary import Vocabulary
        from vitmerge.merging.vwt import pixel_patches, spherical_kmeans

        feats = pixel_patches(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), (8, 8))
        cent = spherical_kmeans(feats.reshape(-1, feats.shape[-1]), 4, seed=0)
        vocab = Vocabulary(cent, "pixels", {"patch_size": [8, 8], "img_size": [32, 32]})
        return vitmerge.apply(model, "vwt", r=5, vocab=vocab)
    return vitmerge.apply(model, method, r=[4, 3] if method == "evo" else 4)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every registered method exported (standard form), plus every other form that exists for it."""
    d = tmp_path_factory.mktemp("portability")
    out = {}
    hashing._PROJECTIONS.clear()
    for method, spec in merging.METHODS.items():
        path = d / f"{method}.onnx"
        vitmerge.export(_apply(method), path, check=False, merge_op="standard")
        out[(method, "standard")] = path
        if spec.form == "block":
            out[(method, "plugin")] = surgery.rewrite(path, d / f"{method}_plugin.onnx", "plugin").path
        if method in surgery.LEAN_METHODS:
            out[(method, "native")] = surgery.rewrite(path, d / f"{method}_native.onnx", "native").path
    return out


@pytest.mark.slow
def test_exports_hold_no_double_and_short_topk(exports):
    assert {m for m, _ in exports} == set(merging.METHODS)
    for (method, form), path in exports.items():
        model = onnx.load(str(path))
        assert double_uses(model) == [], (method, form)
        assert all(k <= TOPK_LIMIT for k in topk_ks(model)), (method, form)


@pytest.mark.slow
def test_exports_pass_the_tensorrt_check_but_for_known_findings(exports):
    """What stands between each export and TensorRT, exactly: the TokenMerge plugin (plugin form, not
    registered here). Nothing else: no scatter with a reduction (every form adds merged rows with a one-hot
    MatMul), no DOUBLE, no integer Clip, no TopK over the limit."""
    for (method, form), path in exports.items():
        model = onnx.load(str(path))
        report = trt_check.check_tensorrt(path)
        found = {(f.op, f.node) for f in report.findings}
        if form == "plugin":
            custom = {(f"vitmerge::{n.op_type}", n.name) for n in model.graph.node if n.domain == "vitmerge"}
            assert custom and found == custom, (method, form, report.findings)
            assert all("not registered" in f.reason or "not installed" in f.reason for f in report.findings)
        else:
            assert scatter_add_nodes(model) == set()
            assert found == set(), (method, form, [f.line() for f in report.findings])


class _Plan(torch.nn.Module):
    def __init__(self, method, r, protected):
        super().__init__()
        self.method, self.r, self.protected = method, r, protected

    def forward(self, metric):
        p = merging.plan(self.method, metric, self.r, self.protected)
        return p.keep, p.src, p.dst


@pytest.mark.slow
@pytest.mark.parametrize("method,N", [("hash", 16001), ("tome", 2 * TOPK_LIMIT + 200)])
def test_long_sequence_plan_exports_with_short_topk(tmp_path, method, N):
    """The plan of a long sequence, exported alone: every TopK under the limit, and ONNX Runtime
    computes the very plan PyTorch does (integer metrics: the scores are exact in both)."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(5)
    if method == "hash":  # small integers: products and norms are exact, the 2^-30 score grid too
        metric = torch.randint(-3, 4, (2, N, 8), generator=g).float()
    else:  # one signed unit entry per row: cosines are exactly -1, 0 or 1 (ties everywhere, all exact)
        metric = torch.nn.functional.one_hot(torch.randint(0, 8, (2, N), generator=g), 8).float()
        metric = metric * (torch.randint(0, 2, (2, N, 1), generator=g) * 2 - 1) * 3
    module = _Plan(method, N // 3, 1).eval()
    program = torch.onnx.export(module, (metric,), dynamo=True, opset_version=18, optimize=True,
                                dynamic_shapes={"metric": {0: torch.export.Dim("batch", min=1, max=64)}})
    path = tmp_path / "plan.onnx"
    program.save(str(path))
    model = onnx.load(str(path))
    ks = topk_ks(model)
    assert ks and max(ks) <= TOPK_LIMIT
    assert double_uses(model) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: metric.numpy()})
    for got, want in zip(out, module(metric)):
        np.testing.assert_array_equal(got, want.numpy())


# ------------------------------------------------------------------------------------------------
# The native (scatter-free) form of every method: what TensorRT's parser takes
# ------------------------------------------------------------------------------------------------


def test_scatter_free_merge_equals_index_add():
    """The one-hot MatMul adds exactly what index_add adds (float64 loop-free check on random plans)."""
    g = torch.Generator().manual_seed(0)
    for method, extra in (("hash", {}), ("importance", {"cls_attn": torch.rand(2, 33, generator=g).softmax(-1)})):
        metric = torch.randn(2, 33, 8, generator=g, dtype=torch.float64)
        x = torch.randn(2, 33, 5, generator=g, dtype=torch.float64)
        size = torch.randint(1, 5, (2, 33, 1), generator=g).double()
        plan = merging.plan(method, metric, 20, 1, **extra)
        a, sa = plan.merge(x, size)
        b, sb = plan.merge(x, size, scatter_free=True)
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(sb, sa, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hash"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("importance", "evo", "vwt")])
def test_native_form_of_every_method_is_tensorrt_ready(method, tmp_path):
    from vitmerge.backends.ort import session
    from vitmerge.exporter import export

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False).eval()
    vitmerge.apply(m, method=method, r=4, **({"mode": "intra"} if method == "vwt" else {}))
    std = export(m, tmp_path / "std.onnx", merge_op="standard", batch_sizes=(2,)).path
    nat = export(m, tmp_path / "nat.onnx", batch_sizes=(2,)).path  # the default form
    for path in (std, nat):
        proto = onnx.load(str(path))
        assert not [n for n in proto.graph.node if n.op_type.startswith("Scatter") and
                    any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)]
        assert trt_check.check_tensorrt(path).findings == []
    assert {e.key: e.value for e in onnx.load(str(nat)).metadata_props}["vitmerge.merge_op"] == "native"
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    a, b = session(std).run(None, {"images": x})[0], session(nat).run(None, {"images": x})[0]
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))


def test_build_refuses_scatter_add_with_the_way_out(tmp_path):
    """A file with ScatterND-add (an older vitmerge's standard form, or another tool's) is refused before any
    TensorRT call, naming the way out."""
    from vitmerge.backends.trt import BuildRequest, validate
    from vitmerge.errors import EngineBuildError
    from vitmerge.exporter.onnx_export import export_onnx_program, save_program

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False).eval()
    vitmerge.apply(m, method="hash", r=4)
    std = save_program(export_onnx_program(m, scatter_free=False), m, tmp_path, "std.onnx")
    assert scatter_add_nodes(onnx.load(str(std)))
    with pytest.raises(EngineBuildError, match="ScatterND.*export it again with `vitmerge export`"):
        validate(BuildRequest(onnx_path=std, output=tmp_path / "m.engine"))
    assert not (tmp_path / "m.engine").exists()


# ------------------------------------------------------------------ gaps found by mutation testing


def _ops(fn):
    """fn's result and (op name, input shapes) of every aten op it runs."""
    out, ops = record_ops(fn)
    return out, [(name, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]) for name, args in ops]


def test_sort_positions_defaults_and_chunk_sizes():
    """Defaults: descending, keys may tie (ties to the lower index). Distinct keys are sorted in chunks of
    CHUNK (2048) by one TopK over [B, chunks, 2048]; keys that may tie in chunks of CHUNK_TIES (512) by
    pairwise counting ([.., 512, 512] comparisons, no TopK). A row no longer than a chunk is one chunk."""
    g = torch.Generator().manual_seed(4)
    tied = torch.randint(0, 5, (2, 700), generator=g)
    pos = sort_positions(tied)
    order = torch.empty_like(pos).scatter(1, pos, torch.arange(700).expand_as(pos))
    assert (order.numpy() == reference_order(tied.numpy(), largest=True)).all()

    distinct = torch.stack([torch.randperm(5000, generator=g)[:3000] for _ in range(2)])
    _, ops = _ops(lambda: sort_positions(distinct, unique=True))
    assert [s for n, s in ops if n == "topk"] == [[(2, 2, 2048)]]
    _, ops = _ops(lambda: sort_positions(distinct[:, :1000], unique=True))
    assert [s for n, s in ops if n == "topk"] == [[(2, 1, 2048)]]
    _, ops = _ops(lambda: sort_positions(tied))
    assert not [n for n, _ in ops if n == "topk"]
    compares = [s for n, s in ops if n in ("gt", "lt") and len(s) == 2 and len(s[0]) == 4]
    assert compares and all(max(s[0][-2:] + s[1][-2:]) == 512 for s in compares)
    assert any(s[0][1] == 2 or s[1][1] == 2 for s in compares)  # 700 keys: 2 chunks of 512


def test_sort_positions_on_the_keys_device():
    key = torch.randint(0, 9, (2, 3000), device="meta")
    for unique in (True, False):
        assert sort_positions(key, unique=unique).device.type == "meta"
        out = topk(key.float(), 5, unique=unique, chunked=True)
        assert out.indices.device.type == "meta" and out.values.device.type == "meta"


def test_tracing_is_seen_by_every_tracer():
    """tracing() is True under torch.jit.trace (as under export, compile and the ONNX exporter) and False
    in eager code."""
    seen = []

    def f(x):
        seen.append(topk_mod.tracing())
        return x + 1

    f(torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, still used by tools
        torch.jit.trace(f, torch.zeros(2))
    assert seen[0] is False and seen[1] is True


def test_each_length_takes_its_path(monkeypatch):
    """Up to TOPK_LIMIT keys: the one TopK in a graph (or for distinct keys); in eager code keys that may tie
    take one stable Sort (PyTorch's topk orders ties arbitrarily). Longer: chunked TopKs (no Sort) while a
    graph is traced or when asked, one stable Sort (no TopK) in eager code or when asked not to chunk."""
    g = torch.Generator().manual_seed(5)
    at_limit = torch.randn(2, TOPK_LIMIT, generator=g)
    for chunked, unique, op in ((True, False, "topk"), (False, False, "sort"), (None, False, "sort"),
                                (None, True, "topk"), (False, True, "topk")):
        _, ops = _ops(lambda: topk(at_limit, 7, unique=unique, chunked=chunked))
        assert [(n, s) for n, s in ops if n in ("topk", "sort")] == [(op, [(2, TOPK_LIMIT)])], (chunked, unique)
    long = torch.stack([torch.randperm(TOPK_LIMIT + 10, generator=g) for _ in range(2)])

    def paths(**kw):
        _, ops = _ops(lambda: topk(long, 9, unique=True, **kw))
        return {n for n, _ in ops if n in ("topk", "sort")}

    assert paths(chunked=True) == {"topk"} and paths(chunked=False) == {"sort"} and paths() == {"sort"}
    monkeypatch.setattr(topk_mod, "tracing", lambda: True)
    assert paths() == {"topk"} and paths(chunked=False) == {"sort"}


def test_tracing_under_compile_and_export():
    seen = []

    class M(torch.nn.Module):
        def forward(self, x):
            seen.append(topk_mod.tracing())
            return x + 1

    torch.export.export(M(), (torch.zeros(2),))
    torch.compile(M(), backend="eager", fullgraph=True)(torch.zeros(2))
    M()(torch.zeros(2))
    assert seen == [True, True, False]
