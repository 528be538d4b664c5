"""The lean merge steps (vitmerge/exporter/lean.py), cut out as one-step ONNX models and run in ONNX Runtime.

Each step is compared with the method's PyTorch plan + MergePlan.merge computed in float64: the merged
tokens to float32 rounding and the token sizes exactly (a wrong decision changes a size). Metrics come
in two kinds: random (no ties) and tie-heavy (one signed unit entry per row: every cosine is exactly
-1, 0 or 1 in both runtimes, so equal scores are everywhere and the tie rules decide). The default
export of every method is then checked for what the file must be: TensorRT-ready, integers inside
int32, deterministic over repeated multi-threaded runs, independent of the other images in a batch.
"""
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import timm
import torch

import vitmerge
from vitmerge import merging
from vitmerge.backends.ort import session as ort_session
from vitmerge.exporter import lean, surgery, trt_check
from vitmerge.merging.importance import MIN_WEIGHT


def step_model(method, N, D, C, r, p, with_size):
    """One merge step as an ONNX model: (x, metric[, size][, cls]) -> (x', size')."""
    graph = gs.Graph(opset=18)
    x = gs.Variable("x", np.float32, ["B", N, D])
    metric = gs.Variable("metric", np.float32, ["B", N, C])
    size = gs.Variable("size", np.float32, ["B", N, 1]) if with_size else None
    cls = gs.Variable("cls", np.float32, ["B", N]) if method == "importance" else None
    e = surgery._Emitter(graph, SimpleNamespace(block=0, scope="blocks.0.token_merge"), "native")
    if method == "tome":
        xo, so = lean.tome_step(e, x, metric, size, N, r, p, D)
    else:
        xo, so = lean.importance_step(e, x, metric, size, cls, N, r, p, D, C, MIN_WEIGHT)
    xo.dtype, xo.shape, so.dtype, so.shape = np.float32, ["B", N - r, D], np.float32, ["B", N - r, 1]
    graph.inputs = [t for t in (x, metric, size, cls) if t is not None]
    graph.outputs = [xo, so]
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    return model


def metrics(kind, B, N, C, g):
    if kind == "random":
        return torch.randn(B, N, C, generator=g, dtype=torch.float64)
    hot = torch.nn.functional.one_hot(torch.randint(0, C, (B, N), generator=g), C).double()
    return hot * (torch.randint(0, 2, (B, N, 1), generator=g) * 2 - 1) * 3


def reference(method, metric, x, size, r, p, cls):
    extra = {"cls_attn": cls} if cls is not None else {}
    plan = merging.plan(method, metric, r, p, **extra)
    return plan.merge(x, size)


def run_step(model, feeds, path):
    onnx.save(model, str(path))
    return ort_session(path).run(None, feeds), path


CASES = [(N, p, r) for N in (9, 10, 33) for p in (0, 1, 2, 3) for r in ("one", "max")]


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("N,p,r", CASES)
@pytest.mark.parametrize("method", ["tome", "importance"])
def test_lean_step_is_the_pytorch_plan(method, N, p, r, kind, tmp_path):
    g = torch.Generator().manual_seed(N * 100 + p * 10 + (r == "max"))
    D, C = 6, 4
    cap = merging.method_spec(method).max_r(N, p)
    r = 1 if r == "one" else cap
    for B, with_size in ((1, False), (3, True)):
        metric = metrics(kind, B, N, C, g)
        x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
        size = torch.randint(1, 5, (B, N, 1), generator=g).double() if with_size else None
        cls = None
        if method == "importance":
            cls = torch.rand(B, N, generator=g, dtype=torch.float64).softmax(-1)
            if kind == "ties":
                cls = torch.randint(0, 4, (B, N), generator=g).double() / 8  # many tied importances
        want_x, want_s = reference(method, metric, x, size, r, p, cls)
        model = step_model(method, N, D, C, r, p, with_size)
        feeds = {"x": x.float().numpy(), "metric": metric.float().numpy()}
        if with_size:
            feeds["size"] = size.float().numpy()
        if cls is not None:
            feeds["cls"] = cls.float().numpy()
        (got_x, got_s), path = run_step(model, feeds, tmp_path / f"step_{B}.onnx")
        np.testing.assert_array_equal(got_s, want_s.float().numpy())  # sizes: integers, a wrong merge shows
        np.testing.assert_allclose(got_x, want_x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "importance"])
def test_lean_step_integers_and_ops(method, tmp_path):
    """Every integer a lean step computes is a position, a slot or an exact key (< 2^24); no scatter, no
    double, and every op TensorRT's parser takes natively."""
    N, D, C, r, p = 197, 8, 4, 16, 1
    model = step_model(method, N, D, C, r, p, True)
    path = tmp_path / "step.onnx"
    onnx.save(model, str(path))
    g = np.random.default_rng(0)
    feeds = {"x": g.standard_normal((2, N, D), dtype=np.float32), "metric": g.standard_normal((2, N, C), dtype=np.float32),
             "size": np.ones((2, N, 1), np.float32)}
    if method == "importance":
        feeds["cls"] = g.random((2, N), dtype=np.float32)
    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    ranges = _ranges_multi(path, feeds, names, tmp_path)
    assert ranges and max(max(abs(v.lo), abs(v.hi)) for v in ranges) < N
    ops = {n.op_type for n in model.graph.node}
    assert not {o for o in ops if o.startswith("Scatter")} and "Cast" not in ops
    assert trt_check.check_tensorrt(path).findings == []


def _ranges_multi(path, feeds, names, tmp_path):
    """integer_ranges for a model with several inputs: expose the integers, run once."""
    from vitmerge.exporter.intrange import _integer_outputs

    model = onnx.load(str(path))
    ints = _integer_outputs(model)
    for _, _, t, vi in ints:
        model.graph.output.append(vi)
    probe = tmp_path / "probe.onnx"
    onnx.save(model, str(probe))
    outs = ort_session(probe).run(None, {n: feeds[n] for n in names})
    got = dict(zip([o.name for o in model.graph.output], outs))
    return [SimpleNamespace(lo=int(got[t].min()), hi=int(got[t].max())) for _, _, t, _ in ints]


# ------------------------------------------------------------------ the default export of every method


def _tiny(depth=2):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=depth, embed_dim=48,
                             num_heads=2, num_classes=7, pretrained=False).eval()


@pytest.fixture(scope="module")
def default_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lean")
    out = {}
    for method in ("tome", "importance", "hash", "evo", "vwt"):
        opts = {"mode": "intra"} if method == "vwt" else {}
        model = vitmerge.apply(_tiny(), method, r=[0, 6] if method == "evo" else 6, **opts)
        out[method] = (model, vitmerge.export(model, d / f"{method}.onnx", batch_sizes=(1, 4)))
    return out


@pytest.mark.parametrize("method", ["tome", "importance", "hash", "evo", "vwt"])
def test_default_file_is_portable_and_lean(default_files, method):
    model, res = default_files[method]
    path = res.path
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["vitmerge.merge_op"] == "native"
    assert trt_check.check_tensorrt(path).findings == []
    # the verification recorded the widest integer: inside int32 with a wide margin
    assert res.verification.int_extent is not None and res.verification.int_extent[0] < 2 ** 31
    assert not res.verification.int_violations
    import json

    nodes = json.loads(meta["vitmerge.step_nodes"])
    if method in ("tome", "importance", "hash"):  # one step per merging block (evo: the slow-fast step, vwt: none)
        assert sorted(int(k) for k in nodes) == [i for i, t in enumerate(model.vitmerge.tokens) if t[1] > 0]
    limit = {"tome": 22, "importance": 22, "hash": 170, "evo": 200, "vwt": 200}[method]
    assert not nodes or max(nodes.values()) <= limit, nodes


@pytest.mark.parametrize("method", ["tome", "importance", "hash", "evo", "vwt"])
def test_default_file_is_deterministic_and_batch_independent(default_files, method):
    """Bit-identical outputs over repeated runs with 2 threads; each image's outputs at batch 4 equal its
    outputs alone (to float rounding: the matrix products block differently by batch)."""
    model, res = default_files[method]
    sess = ort_session(res.path, threads=2)
    x = np.random.default_rng(7).standard_normal((4, 3, 48, 48), dtype=np.float32)
    first = sess.run(None, {"images": x})[0]
    for _ in range(9):
        np.testing.assert_array_equal(sess.run(None, {"images": x})[0], first)
    for i in range(4):
        alone = sess.run(None, {"images": x[i: i + 1]})[0]
        np.testing.assert_allclose(alone[0], first[i], rtol=1e-4, atol=1e-5 * float(np.abs(first).max()))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_overflowing_key_scale_fails_the_export(monkeypatch, tmp_path):
    """A hash score grid too fine for int32 (the keys of the previous export) is refused, naming the node."""
    from vitmerge.errors import VerificationError
    from vitmerge.merging import hashing

    monkeypatch.setattr(hashing, "score_scale", lambda U: float(2 ** 30))
    model = vitmerge.apply(_tiny(depth=1), "hash", r=6)
    with pytest.raises(VerificationError, match=r"integers outside the int32 range: \w+ node \S+ computes"):
        vitmerge.export(model, tmp_path / "h.onnx", batch_sizes=(1,))
    assert not (tmp_path / "h.onnx").exists()
