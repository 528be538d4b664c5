"""Graph surgery: finding the merge steps of exported models and rewriting them (native / plugin form).

Every rewritten graph is run in ONNX Runtime and compared with the graph as exported and with the
PyTorch model; each merge step cut out of the graph is compared with a float64 loop reference.
"""
import os

import numpy as np
import onnx
import pytest
import timm
import torch
from typer.testing import CliRunner

import vitmerge
from vitmerge.cli import app
from vitmerge.backends.ort import session as ort_session
from vitmerge.exporter import surgery
from vitmerge.errors import ModelNotFoundError, OutputPathError, SurgeryError
from vitmerge.exporter.surgery import find_merges, load, rewrite

from support.reference_tome import bipartite_groups, merge_rows

runner = CliRunner()
# The plugin form's ORT kernel needs onnxruntime-extensions, a core dependency of vitmerge: if it is
# missing that is a broken install, and these tests fail (at session creation) instead of skipping.

# (timm kwargs, r per block): small models, real token counts for their resolution.
MODELS = {
    # class token + 1 register = 2 protected tokens; block 2 does not merge (but reads the sizes)
    "p2": (dict(img_size=64, depth=3, reg_tokens=1), [4, 3, 0]),
    # no class token (global average pool): nothing protected
    "p0": (dict(img_size=48, depth=2, class_token=False, global_pool="avg"), [2, 2]),
    # the common case: one class token (A's first token protected, nothing in B)
    "p1": (dict(img_size=48, depth=2), [3, 2]),
    "r0": (dict(img_size=32, depth=2), 0),
}


def _model(key):
    kw, r = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    return vitmerge.apply(model, r=r)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("surgery")
    out = {}
    for key in MODELS:
        model = _model(key)
        path = d / f"{key}.onnx"
        vitmerge.export(model, path, check=False, merge_op="standard")  # ORT comparisons below do the checking
        out[key] = (model, path)
    return out


def _images(model, b, seed=0):
    return torch.randn(b, *model.patch_embed.proj.weight.shape[1:2], *model.patch_embed.img_size,
                       generator=torch.Generator().manual_seed(seed))


def test_one_subgraph_per_merging_block(exported):
    model, path = exported["p2"]
    merges = find_merges(load(path))
    info = model.vitmerge
    assert [m.block for m in merges] == [i for i, (_, removed, _) in enumerate(info.tokens) if removed > 0] == [0, 1]
    for m in merges:
        n_in, removed, n_out = info.tokens[m.block]
        assert (m.n_in, m.n_out, m.r, m.dim) == (n_in, n_out, removed, model.embed_dim)
        assert m.method == "tome" and m.protected == 2
        assert m.metric.shape[-1] == model.blocks[0].attn.head_dim  # keys averaged over heads
        assert m.metric.inputs[0].op == "ReduceMean"
        assert m.x.inputs[0].op == "Add"  # the residual after attention
        assert all(f"blocks.{m.block}.token_merge" in n.metadata["namespace"] for n in m.nodes)
    first, second = merges
    assert first.size is None  # sizes start as ones inside the first step
    assert second.size is first.size_out  # ... and flow from one step to the next
    assert second.size_out is not None  # block 2's proportional attention reads them
    # no node belongs to two steps
    ids = [id(n) for m in merges for n in m.nodes]
    assert len(ids) == len(set(ids))
    # without a later block, nothing reads the last step's sizes
    assert find_merges(load(exported["p0"][1]))[-1].size_out is None


def test_no_merge_steps_at_r0(exported, tmp_path):
    _, path = exported["r0"]
    assert find_merges(load(path)) == []
    for form in ("native", "plugin"):
        res = rewrite(path, tmp_path / f"{form}.onnx", form)
        assert res.merges == 0
        assert (tmp_path / f"{form}.onnx").read_bytes() == path.read_bytes()  # passed through unchanged


@pytest.mark.parametrize("key", ["p2", "p1", "p0"])
@pytest.mark.parametrize("form", ["native", "plugin"])
def test_rewritten_graph_matches_original(exported, tmp_path, key, form):
    model, path = exported[key]
    out = tmp_path / f"{form}.onnx"
    res = rewrite(path, out, form)
    n_merges = sum(1 for t in model.vitmerge.tokens if t[1] > 0)
    assert res.merges == n_merges and res.form == form and res.path == out
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    if form == "native":
        # the lean step: row gathers (GatherND) and one-hot MatMuls, no scatter of any kind
        assert not {"ScatterND", "GatherElements", "ScatterElements"} & set(ops)
        assert {e.key: e.value for e in proto.metadata_props}["vitmerge.merge_op"] == "native"
    else:
        nodes = [n for n in proto.graph.node if n.domain == "vitmerge"]
        assert [n.op_type for n in nodes] == ["TokenMerge"] * n_merges
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        # every attribute a STRING (r and protected as decimal text: plugins/tensorrt_plugin.py says why)
        assert [int(a["r"]) for a in attrs] == [t[1] for t in model.vitmerge.tokens if t[1] > 0]
        assert all(isinstance(a["r"], bytes) and int(a["protected"]) == model.vitmerge.protected
                   and a["method"] == b"tome" for a in attrs)
        assert ("vitmerge", 1) in [(o.domain, o.version) for o in proto.opset_import]
    # the untouched rest of the graph keeps its exporter metadata
    assert sum(1 for n in proto.graph.node if any(e.key == "namespace" for e in n.metadata_props)) == len(ops)

    ref_sess, sess = ort_session(path), ort_session(out)
    for b in (1, 3):
        x = _images(model, b, seed=b)
        want = ref_sess.run(None, {"images": x.numpy()})[0]
        got = sess.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            torch_out = model(x).numpy()
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(got, torch_out, rtol=0, atol=1e-4 * scale)
        assert (got.argmax(-1) == want.argmax(-1)).all()


def _step_model(path, block, form, tmp_path):
    """Cut one merge step out of a (rewritten) file as a model (x, metric[, size]) -> (x', size')."""
    graph = load(path)
    m = next(mm for mm in find_merges(graph) if mm.block == block)
    graph.inputs = [m.x, m.metric] + ([m.size] if m.size is not None else [])
    graph.outputs = [m.x_out, m.size_out]
    graph.cleanup().toposort()
    for t in graph.inputs + graph.outputs:
        t.dtype = np.float32
    out = tmp_path / f"step_{form}.onnx"
    onnx.save(surgery.export_graph(graph), str(out))
    return out, m


@pytest.mark.parametrize("key,block", [("p2", 1), ("p0", 0)], ids=["protected-with-size", "unprotected-first"])
@pytest.mark.parametrize("form", ["native", "plugin"])
def test_merge_step_matches_loop_reference(exported, tmp_path, form, key, block):
    """One rewritten step on its own, on random inputs, against a float64 loop implementation of ToMe:
    same groups, same averages, same output order (it decides the next step's A/B split)."""
    _, path = exported[key]
    full = rewrite(path, tmp_path / f"{form}_full.onnx", form).path
    step, m = _step_model(full, block, form, tmp_path)
    assert m.size_out is not None
    sess = ort_session(step)
    g = torch.Generator().manual_seed(7)
    B, N, C, D = 3, m.n_in, m.metric.shape[-1], m.dim
    x = torch.randn(B, N, D, generator=g)
    metric = torch.randn(B, N, C, generator=g)
    size = torch.randint(1, 6, (B, N, 1), generator=g).float() if m.size is not None else torch.ones(B, N, 1)
    feed = {m.x.name: x.numpy(), m.metric.name: metric.numpy()}
    if m.size is not None:
        feed[m.size.name] = size.numpy()
    x_out, s_out = sess.run(None, feed)
    assert x_out.shape == (B, m.n_out, D) and s_out.shape == (B, m.n_out, 1)
    for b in range(B):
        _, groups = bipartite_groups(metric[b].double(), m.r, m.protected)
        ref_x, ref_s = merge_rows(x[b].double(), size[b, :, 0].double(), groups)
        np.testing.assert_allclose(x_out[b], ref_x.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s_out[b, :, 0], ref_s.numpy())


def test_forms_convert_into_each_other(exported, tmp_path):
    model, path = exported["p2"]
    native = rewrite(path, tmp_path / "n.onnx", "native").path
    plugin = rewrite(native, tmp_path / "np.onnx", "plugin").path  # native -> plugin
    back = rewrite(plugin, tmp_path / "npn.onnx", "native").path  # plugin -> native
    x = _images(model, 2).numpy()
    want = ort_session(path).run(None, {"images": x})[0]
    for p in (plugin, back):
        np.testing.assert_allclose(ort_session(p).run(None, {"images": x})[0], want, rtol=0, atol=1e-5 * np.abs(want).max())
    with pytest.raises(SurgeryError, match="standard form cannot be rebuilt"):
        rewrite(native, tmp_path / "s.onnx", "standard")


def test_rewrite_in_place_standard_copy_and_failures(exported, tmp_path, monkeypatch):
    model, path = exported["p2"]
    work = tmp_path / "m.onnx"
    assert rewrite(path, work, "standard").merges == 0 and work.read_bytes() == path.read_bytes()
    assert rewrite(work, work, "native").merges == 2  # in place
    assert surgery.graph_form(work) == "native"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no staging leftovers

    with pytest.raises(SurgeryError, match="unknown graph form"):
        rewrite(path, tmp_path / "x.onnx", "fused")
    # a bad output path is an output-path problem, a missing input a missing model (not a graph problem)
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        rewrite(path, tmp_path / "afile" / "x.onnx", "native")
    (tmp_path / "afile").unlink()
    with pytest.raises(OutputPathError, match="must end in .onnx"):
        rewrite(path, tmp_path / "x.txt", "native")
    with pytest.raises(ModelNotFoundError, match="no ONNX file"):
        rewrite(tmp_path / "missing.onnx", tmp_path / "x.onnx", "native")

    # a pass that fails half-way leaves neither a new file nor a changed old one
    def broken(graph):
        raise SurgeryError("boom")

    monkeypatch.setitem(surgery.PASSES, "plugin", broken)
    before = work.read_bytes()
    with pytest.raises(SurgeryError, match="boom"):
        rewrite(work, work, "plugin")
    with pytest.raises(SurgeryError, match="boom"):
        rewrite(path, tmp_path / "y.onnx", "plugin")
    assert work.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_native_and_plugin_refuse_what_they_cannot_do(exported, tmp_path):
    _, path = exported["p2"]
    graph = load(path)
    graph.model_metadata["vitmerge.method"] = "hash"
    graph.model_metadata.pop("vitmerge.options", None)  # as written by an exporter that did not record them
    m = find_merges(graph)[0]
    # surgery writes the lean step for tome and importance only: for other methods the native form is the
    # exporter's own (scatter-free) graph, so the step is left exactly as it is
    before = len(graph.nodes)
    assert surgery.native_merge(graph, m) is False and len(graph.nodes) == before
    assert surgery.lean_reason(m) == "method 'hash' has no hand-written step"
    with pytest.raises(SurgeryError, match="vitmerge.options"):  # other methods need their options recorded
        surgery.plugin_merge(graph, m)


def test_check_command(exported, tmp_path):
    _, path = exported["p2"]
    native = rewrite(path, tmp_path / "n.onnx", "native").path
    plugin = rewrite(path, tmp_path / "p.onnx", "plugin").path
    res = runner.invoke(app, ["check", str(path), str(plugin), "--batch", "1,2"])
    assert res.exit_code == 0, res.output
    assert "same outputs" in res.output and "100%" in res.output
    # the lean native step adds the same rows in the same order as the exporter's one-hot MatMul: bit for bit
    res = runner.invoke(app, ["check", str(path), str(native), "--atol", "0", "--rtol", "0"])
    assert res.exit_code == 0, res.output
    # a file whose outputs differ (one head weight nudged): over a zero tolerance, the command says so and fails
    proto = onnx.load(str(native))
    w = next(t for t in proto.graph.initializer if t.name.endswith("head.weight"))
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0, 0] += 1e-3
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    nudged = tmp_path / "nudged.onnx"
    onnx.save(proto, str(nudged))
    res = runner.invoke(app, ["check", str(path), str(nudged), "--atol", "0", "--rtol", "0"])
    assert res.exit_code == 1 and "over" in res.output
    res = runner.invoke(app, ["check", str(path), str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2 and "no ONNX file" in res.output
    res = runner.invoke(app, ["check", str(path), str(exported["r0"][1])])
    assert res.exit_code == 2 and "different inputs" in res.output


def test_standard_copy_takes_external_weights_along(exported, tmp_path):
    """A file whose weights sit in an external-data file is copied with its weights (here small enough
    to go inline), not as a graph that points at a file left behind."""
    model, path = exported["r0"]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "ext.onnx"
    onnx.save(onnx.load(str(path)), str(src), save_as_external_data=True, location="ext.onnx.data")
    assert (src_dir / "ext.onnx.data").exists()
    out = tmp_path / "copy.onnx"
    res = rewrite(src, out, "standard")
    assert res.merges == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "src"]
    x = _images(model, 2).numpy()
    want = ort_session(src).run(None, {"images": x})[0]
    (src_dir / "ext.onnx.data").unlink()  # the copy must not need it
    np.testing.assert_array_equal(ort_session(out).run(None, {"images": x})[0], want)


def test_merging_file_without_steps_is_refused_with_its_method(exported, tmp_path):
    """A file whose metadata says it merges (r > 0) but whose merge steps cannot be found (an optimiser or
    another tool dropped the node scopes) is refused, naming the method; nothing is written."""
    _, path = exported["p2"]
    proto = onnx.load(str(path))
    for n in proto.graph.node:
        del n.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(proto, str(stripped))
    out = tmp_path / "native.onnx"
    with pytest.raises(SurgeryError) as e:
        rewrite(stripped, out, "native")
    assert str(e.value) == (f"{stripped} merges tokens (method tome) but has no blocks.N.token_merge steps to rewrite: "
                            "the native form does not exist for this method; use the standard form")
    assert not out.exists()


@pytest.mark.parametrize("form", ["native", "plugin"])
def test_file_without_method_metadata_is_refused(exported, tmp_path, form):
    """The rewritten forms need the method and protected count from the file's metadata: without them, a
    clear refusal that names the form and the missing keys, and nothing is written."""
    _, path = exported["p2"]
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in ("vitmerge.method", "vitmerge.protected")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    out = tmp_path / f"{form}.onnx"
    with pytest.raises(SurgeryError) as e:
        rewrite(bare, out, form)
    assert str(e.value) == (f"the {form} form needs the merge method and protected-token count, which this file's "
                            "metadata lacks (keys vitmerge.method, vitmerge.protected): export it with `vitmerge export`")
    assert not out.exists()


def test_rewrite_runs_the_checker_by_default(exported, tmp_path, monkeypatch):
    _, path = exported["p2"]

    def reject(*a, **k):
        raise onnx.checker.ValidationError("stand-in finding")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    out = tmp_path / "native.onnx"
    with pytest.raises(SurgeryError, match="fails the ONNX checker: stand-in finding"):
        rewrite(path, out, "native")
    assert not out.exists()
    assert rewrite(path, out, "native", check=False).merges == 2  # check=False skips it
