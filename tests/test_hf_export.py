"""`vitmerge export FOLDER` for transformers folders (save_pretrained): round trips in ONNX Runtime, graph
forms, and the bad inputs (unsupported model type, wrong frame count, no config.json, corrupt weights)."""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

import vitmerge  # noqa: E402
from vitmerge.backends.ort import session as ort_session  # noqa: E402
from vitmerge.cli import app  # noqa: E402
from vitmerge.models.build import build_model  # noqa: E402

from support.hf_models import inputs, make  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_torch_thread):
    """Tiny VideoMAE, AST and ViT classifiers saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in ("videomae", "ast", "vit"):
        out[kind] = root / kind
        make(kind).save_pretrained(out[kind])
    return out


def _text(res) -> str:
    return " ".join(res.output.replace("│", " ").split())


def _ort_vs_torch(path, model, seed=7, batch=3):
    """ONNX Runtime on a batch the exporter never saw vs the PyTorch model."""
    x = inputs(model, batch=batch, seed=seed)
    with torch.no_grad():
        ref = model(x).logits.numpy()
    out = ort_session(path).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-5)
    return out


@pytest.mark.parametrize("kind,method,r,tokens_out", [
    # 32 tubelets, no protected token: 24 of them in one step (hash exports take ~50 s here: slow)
    pytest.param("videomae", "hash", "24,6", [8, 2], marks=pytest.mark.slow),
    ("ast", "tome", "12,5", [14, 9]),  # 24 patches + 2 protected: half of the patches in one step
])
def test_cli_export_at_large_r(folders, tmp_path, kind, method, r, tokens_out):
    out = tmp_path / f"{kind}.onnx"
    res = runner.invoke(app, ["export", str(folders[kind]), "--method", method, "--r", r, "-o", str(out),
                              "--verify-batch", "2"])
    assert res.exit_code == 0, res.output
    text = _text(res)
    assert "batch 2:" in text and "top-1 agreement 100%" in text
    assert sorted(os.listdir(tmp_path)) == [out.name]
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["vitmerge.tokens_out"]) == tokens_out and meta["vitmerge.method"] == method
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    model = build_model(str(folders[kind]))
    assert dims == ["batch", *vitmerge.models.input_shape(model)]
    vitmerge.apply(model, method, r=[int(v) for v in r.split(",")])
    _ort_vs_torch(out, model)


@pytest.mark.slow
@pytest.mark.parametrize("kind,method,r", [("videomae", "tome", "16,8"), ("ast", "hash", "20,4"),
                                           ("vit", "importance", "10,4")])
def test_python_export_other_methods(folders, tmp_path, kind, method, r):
    model = build_model(str(folders[kind]))
    vitmerge.apply(model, method, r=[int(v) for v in r.split(",")])
    res = vitmerge.export(model, tmp_path / "m.onnx", batch_sizes=(1, 3))
    assert res.verification.ok
    _ort_vs_torch(res.path, model)


@pytest.mark.slow
def test_r0_file_is_the_transformers_model(folders, tmp_path):
    """--r 0: the file computes what transformers' own model (sdpa, unpatched) computes."""
    import transformers

    out = tmp_path / "plain.onnx"
    res = runner.invoke(app, ["export", str(folders["videomae"]), "--r", "0", "-o", str(out), "--verify-batch", "1"])
    assert res.exit_code == 0, res.output
    plain = transformers.VideoMAEForVideoClassification.from_pretrained(str(folders["videomae"])).eval()
    assert not hasattr(plain, "vitmerge")
    _ort_vs_torch(out, plain)


@pytest.mark.slow
def test_graph_forms_on_a_transformers_export(folders, tmp_path):
    from vitmerge.exporter.surgery import find_merges, load, rewrite
    from vitmerge.exporter.verify import compare_files

    model = build_model(str(folders["videomae"]))
    vitmerge.apply(model, "tome", r=[10, 6])
    src = vitmerge.export(model, tmp_path / "std.onnx", batch_sizes=(2,), merge_op="standard").path  # native is the default
    merges = find_merges(load(src))
    assert [(m.block, m.n_in, m.n_out) for m in merges] == [(0, 32, 22), (1, 22, 16)]
    assert all("videomae.encoder.layer" in m.scope for m in merges)
    for form in ("native", "plugin"):
        out = rewrite(src, tmp_path / f"{form}.onnx", form)
        assert out.merges == 2
        checks = compare_files(src, out.path, batch_sizes=(1, 3))
        assert all(c.ok and c.top1_agreement == 1.0 for c in checks), (form, checks)


# ------------------------------------------------------------------------------------------- bad inputs


def _bad_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _corrupt(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])


def _bert(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="bert", architectures=["BertForSequenceClassification"])
    (folder / "config.json").write_text(json.dumps(cfg))


def _wider(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case,kind,edit,extra,needle", [
    ("unsupported model type", "vit", _bert, [], "model_type 'bert', which vitmerge cannot merge. Supported:"),
    ("no config.json", "vit", lambda f: (f / "config.json").unlink(), [], "has no config.json"),
    ("corrupt weights", "ast", _corrupt, [], "could not read the weights"),
    ("weights of another size", "vit", _wider, [], "could not load the weights"),
    ("no weights", "vit", lambda f: (f / "model.safetensors").unlink(), [], "no weights"),
    ("wrong frame count", "videomae", None, ["--frames", "5"], "--frames 5 is not a multiple of the tubelet size 2"),
    ("frames for an image model", "vit", None, ["--frames", "4"], "--frames applies to video models"),
    ("length for a video model", "videomae", None, ["--audio-length", "64"], "--audio-length applies to audio"),
    ("checkpoint with a folder", "ast", None, ["-c", "x.pth"], "--checkpoint applies to timm models"),
    ("r too large", "videomae", None, ["--r", "17"], "r <= 16"),
    ("method needing a class token", "videomae", None, ["--method", "importance"], "no class token"),
])
def test_cli_bad_folders_write_nothing(folders, tmp_path, case, kind, edit, extra, needle):
    src = folders[kind] if edit is None else _bad_copy(folders[kind], tmp_path / "bad", edit)
    outdir = tmp_path / "out"
    outdir.mkdir()
    res = runner.invoke(app, ["export", str(src), "-o", str(outdir / "m.onnx"), *extra])
    assert res.exit_code == 2, (case, res.output)
    text = _text(res)
    assert "error:" in text and needle in text, (case, text)
    assert "Traceback" not in res.output
    assert os.listdir(outdir) == []


def test_cli_missing_folder_and_file(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"x")
    for arg, needle in ((str(tmp_path / "nowhere"), "does not exist"), (str(tmp_path / "file.bin"), "is a file")):
        res = runner.invoke(app, ["export", arg, "-o", str(tmp_path / "m.onnx")])
        assert res.exit_code == 2 and needle in _text(res), res.output
    assert os.listdir(tmp_path) == ["file.bin"]


def test_input_size_options_resample(folders):
    """--img-size / --audio-length / --frames give the model those input sizes; learned position
    embeddings are resampled (the prefix tokens' rows kept), VideoMAE's sin/cos table is recomputed."""
    vit = build_model(str(folders["vit"]), img_size=48)
    ast = build_model(str(folders["ast"]), audio_length=64)
    vm = build_model(str(folders["videomae"]), frames=8, img_size=48)
    shapes = [vitmerge.models.input_shape(m) for m in (vit, ast, vm)]
    assert shapes == [(3, 48, 48), (64, 32), (8, 3, 48, 48)]
    assert [vitmerge.models.num_tokens(m) for m in (vit, ast, vm)] == [37, 4 * 8 + 2, 4 * 6 * 6]
    orig = build_model(str(folders["vit"]))
    pe0 = orig.vit.embeddings.position_embeddings
    pe1 = vit.vit.embeddings.position_embeddings
    assert torch.equal(pe0[:, :1], pe1[:, :1])  # the class token's position is kept
    # a bilinear-ish resample keeps the mean of the patch positions close
    assert torch.allclose(pe0[:, 1:].mean(1), pe1[:, 1:].mean(1), atol=0.1)
    for m in (vit, ast, vm):
        with torch.no_grad():
            assert m(inputs(m)).logits.shape == (2, 5)


def test_large_topk_finds_sorts_over_tensorrts_limit():
    """TensorRT's TopK takes k <= 3840: long sequences exceed it (ToMe's sort of the N/2 A tokens at N > 7680)."""
    from onnx import TensorProto, helper, numpy_helper

    from vitmerge.exporter import TENSORRT_TOPK_MAX, large_topk

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    outs = [helper.make_tensor_value_info(f"{n}{i}", TensorProto.FLOAT if n == "v" else TensorProto.INT64, None)
            for i in range(3) for n in ("v", "i")]
    nodes = [helper.make_node("Constant", [], ["k0"], value=numpy_helper.from_array(np.array([4096], np.int64))),
             helper.make_node("TopK", ["x", "k0"], ["v0", "i0"], axis=-1),
             helper.make_node("TopK", ["x", "k1"], ["v1", "i1"], axis=-1),
             helper.make_node("TopK", ["x", "k2"], ["v2", "i2"], axis=-1)]
    inits = [numpy_helper.from_array(np.array([TENSORRT_TOPK_MAX], np.int64), "k1"),
             numpy_helper.from_array(np.array([TENSORRT_TOPK_MAX + 1], np.int64), "k2")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits))
    assert large_topk(proto) == [4096, TENSORRT_TOPK_MAX + 1]


@pytest.mark.parametrize("kind,method,merge_op", [("videomae", "hash", "native"), ("ast", "importance", "standard")])
def test_fp16_export_of_transformers_models(tmp_path, one_torch_thread, kind, method, merge_op):
    """--dtype fp16 on a transformers model: the float32 sizes (proportional attention bias, VideoMAE's
    size-weighted mean pooling) meet float16 activations; the file must load, run in ONNX Runtime CPU
    and track the float32 model (decision rule: merge decisions identical, same top-1)."""
    from vitmerge.exporter import export

    model = make(kind, attn="eager")
    vitmerge.apply(model, method=method, r=6)
    res = export(model, tmp_path / "m.onnx", merge_op=merge_op, dtype="fp16")
    v = res.verification
    assert v.ok and v.dtype == "fp16"
    assert all(c.decisions_identical is not None and c.decisions_identical >= 0.99 for c in v.checks)
    assert v.vs_fp32["top1_agreement"] >= 0.75
    proto = onnx.load(str(res.path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    # independent of the verifier: the fp16 file against the float32 PyTorch model on fresh inputs
    x = inputs(model, batch=3, seed=11)
    with torch.no_grad():
        ref = model(x).logits.numpy()
    sess = ort_session(res.path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-2
