"""`vitmerge build` and TrtRunner against a stand-in for TensorRT 10.x and 11.x (tests/support/trt_standin.py).

No GPU and no TensorRT here, so these tests check what vitmerge asks of TensorRT: which network
typing and builder flags follow from a file and a TensorRT version, which files are written (and that
a failure writes none), what the engine metadata says (read back by packaging without the ONNX file),
and that TrtRunner keeps one execution context per prepared batch size. The stand-in refuses what
TensorRT refuses that matters here: precision flags on a strongly typed network, flags a version does
not have, shapes outside the optimisation profile, and engines of another version.
"""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from support import trt_standin
from vitmerge.backends import trt as trt_backend
from vitmerge.backends import trt_build
from vitmerge.backends.trt import BuildRequest, FileTypes, TrtRunner, build_engine, file_types, precision_plan
from vitmerge.cli import app
from vitmerge.errors import EngineBuildError, UsageError

runner = CliRunner()
V10, V11 = "10.16.1.11", "11.4.0.106"


@pytest.fixture(params=[V10, V11], ids=["trt10", "trt11"])
def fake_trt(request, monkeypatch):
    with trt_standin.fake_tensorrt(request.param) as m:
        monkeypatch.setattr(trt_build, "gpu_name", lambda: "Stand-in GPU")
        yield m


def _images_model(path, elem=TensorProto.FLOAT, qdq=False, cast_to=None):
    """images [batch, 3, 8, 8] -> (optional Q/DQ, Cast) -> ReduceMean over H, W -> logits [batch, 3]."""
    nodes, inits, x = [], [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])], "images"
    if qdq:
        inits += [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        x = "dq"
    if cast_to is not None:
        nodes.append(helper.make_node("Cast", [x], ["c"], to=cast_to))
        nodes.append(helper.make_node("Cast", ["c"], ["cb"], to=elem))
        x = "cb"
    nodes.append(helper.make_node("ReduceMean", [x, "axes"], ["logits"], keepdims=0))
    inp = helper.make_tensor_value_info("images", elem, ["batch", 3, 8, 8])
    out = helper.make_tensor_value_info("logits", elem, ["batch", 3])
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [inp], [out], inits),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


# ---------------------------------------------------------------------------------------------
# What the file carries, and the build that follows
# ---------------------------------------------------------------------------------------------


def test_file_types_read_from_the_graph(tmp_path):
    assert file_types(onnx.load(_images_model(tmp_path / "a.onnx"))) == FileTypes()
    assert file_types(onnx.load(_images_model(tmp_path / "b.onnx", elem=TensorProto.FLOAT16))) == FileTypes(fp16=True)
    assert file_types(onnx.load(_images_model(tmp_path / "c.onnx", qdq=True))) == FileTypes(qdq=True)
    assert file_types(onnx.load(_images_model(tmp_path / "d.onnx", cast_to=TensorProto.BFLOAT16))) == FileTypes(bf16=True)
    assert file_types(onnx.load(_images_model(tmp_path / "e.onnx", cast_to=TensorProto.DOUBLE))).fp64


STRONG, WEAK = "strong", "weak"
# file, --fp16, --int8 -> TensorRT 10.x, TensorRT 11.x: (typing, builder flags, precision) or the error's text
PLANS = [
    (FileTypes(), False, False, (STRONG, (), "fp32"), (STRONG, (), "fp32")),
    (FileTypes(), True, False, (WEAK, ("FP16",), "fp16"), "BuilderFlag.FP16 was removed"),
    (FileTypes(fp16=True), False, False, (STRONG, (), "fp16"), (STRONG, (), "fp16")),
    (FileTypes(fp16=True), True, False, (STRONG, (), "fp16"), (STRONG, (), "fp16")),
    (FileTypes(bf16=True), False, False, (STRONG, (), "bf16"), (STRONG, (), "bf16")),
    (FileTypes(qdq=True), False, False, (STRONG, (), "int8+fp32"), (STRONG, (), "int8+fp32")),
    (FileTypes(qdq=True), False, True, (STRONG, (), "int8+fp32"), (STRONG, (), "int8+fp32")),
    (FileTypes(qdq=True), True, True, (WEAK, ("FP16", "INT8"), "int8+fp16"), "BuilderFlag.FP16 was removed"),
    (FileTypes(qdq=True, fp16=True), True, True, (STRONG, (), "int8+fp16"), (STRONG, (), "int8+fp16")),
    (FileTypes(), False, True, "vitmerge calibrate", "vitmerge calibrate"),
    (FileTypes(fp16=True), False, True, "vitmerge calibrate", "vitmerge calibrate"),
]


@pytest.mark.parametrize("types,fp16,int8,want10,want11", PLANS)
@pytest.mark.parametrize("version", [V10, "10.8.0.43", V11])
def test_precision_plan_per_tensorrt_version(tmp_path, version, types, fp16, int8, want10, want11):
    want = want11 if version.startswith("11.") else want10
    req = BuildRequest(onnx_path=tmp_path / "m.onnx", output=tmp_path / "m.engine", fp16=fp16, int8=int8)
    with trt_standin.fake_tensorrt(version) as m:
        if isinstance(want, str):
            with pytest.raises(UsageError, match=want.replace(".", r"\.")):
                precision_plan(req, types, m)
            return
        plan = precision_plan(req, types, m)
        assert (STRONG if plan.strongly_typed else WEAK, plan.flags, plan.precision) == want
        for name in plan.flags:  # every flag the plan sets exists in this TensorRT
            assert hasattr(m.BuilderFlag, name)


# ---------------------------------------------------------------------------------------------
# build_engine through the stand-in builder
# ---------------------------------------------------------------------------------------------


def _spec(engine_path):
    return json.loads(engine_path.read_bytes())


def test_build_writes_engine_and_metadata_packaging_can_read(fake_trt, tmp_path):
    from vitmerge.packaging.triton import engine_signature

    model = _images_model(tmp_path / "m.onnx")
    req = BuildRequest(onnx_path=model, output=tmp_path / "m.engine", min_batch=1, opt_batch=4, max_batch=16)
    steps = []
    res = build_engine(req, on_step=steps.append)
    assert sorted(os.listdir(tmp_path)) == ["m.engine", "m.engine.json", "m.onnx"]
    spec = _spec(res.engine)  # what the builder was given
    assert spec["strongly_typed"] and spec["flags"] == []
    assert spec["profile"]["images"] == [[1, 3, 8, 8], [4, 3, 8, 8], [16, 3, 8, 8]]
    meta = json.loads(res.metadata.read_text())
    assert meta["tensorrt_version"] == fake_trt.__version__ and meta["gpu"] == "Stand-in GPU"
    assert (meta["precision"], meta["typing"], meta["builder_flags"]) == ("fp32", "strong", [])
    # TF32 is on in every new TensorRT builder config: cleared, so "fp32" is float32 math (spec["flags"] above is
    # what the builder was left with: TF32 not among them) and the metadata says so
    assert meta["tf32"] is False and meta["cleared_builder_flags"] == ["TF32"]
    assert meta["inputs"] == [{"name": "images", "dtype": "float32", "shape": [-1, 3, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [-1, 3]}]
    assert meta["token_merge_plugin"] is False and meta["plugin_aot"] is False
    assert meta["batch_profile"] == {"min": 1, "opt": 4, "max": 16}
    os.remove(model)  # packaging reads names, types and shapes from the metadata alone
    sig = engine_signature(res.engine)
    assert [(t.name, t.data_type, t.dims) for t in sig.inputs] == [("images", "TYPE_FP32", [-1, 3, 8, 8])]
    assert [(t.name, t.data_type, t.dims) for t in sig.outputs] == [("logits", "TYPE_FP32", [-1, 3])]
    assert sig.batch_limit == 16 and sig.custom_nodes == 0


def test_fp16_request_per_version(fake_trt, tmp_path):
    """--fp16 on a float32 file: a weakly typed build with BuilderFlag.FP16 on 10.x; refused on 11.x
    (no such flag) before any file is written. An FP16 file is built strongly typed on both."""
    model = _images_model(tmp_path / "m.onnx")
    req = BuildRequest(onnx_path=model, output=tmp_path / "m.engine", fp16=True)
    if fake_trt.__version__.startswith("10."):
        res = build_engine(req)
        spec = _spec(res.engine)
        assert not spec["strongly_typed"] and spec["flags"] == ["FP16"]
        assert json.loads(res.metadata.read_text())["precision"] == "fp16"
    else:
        with pytest.raises(UsageError, match="FP16 ONNX file"):
            build_engine(req)
        assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    half = _images_model(tmp_path / "h.onnx", elem=TensorProto.FLOAT16)
    res = build_engine(BuildRequest(onnx_path=half, output=tmp_path / "h.engine", fp16=True))
    spec = _spec(res.engine)
    assert spec["strongly_typed"] and spec["flags"] == []
    meta = json.loads(res.metadata.read_text())
    assert meta["inputs"][0]["dtype"] == "float16" and meta["precision"] == "fp16"


def test_qdq_file_is_built_strongly_typed(fake_trt, tmp_path):
    model = _images_model(tmp_path / "q.onnx", qdq=True)
    res = build_engine(BuildRequest(onnx_path=model, output=tmp_path / "q.engine", int8=True))
    spec = _spec(res.engine)
    assert spec["strongly_typed"] and spec["flags"] == []
    assert json.loads(res.metadata.read_text())["precision"] == "int8+fp32"


def test_failed_build_writes_nothing(fake_trt, tmp_path, monkeypatch):
    model = _images_model(tmp_path / "m.onnx")
    monkeypatch.setattr(fake_trt.Builder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(EngineBuildError, match="failed to build"):
        build_engine(BuildRequest(onnx_path=model, output=tmp_path / "m.engine"))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]

    def boom(self, network, config):
        raise RuntimeError("out of\nmemory")

    monkeypatch.setattr(fake_trt.Builder, "build_serialized_network", boom)
    with pytest.raises(EngineBuildError, match="out of memory"):
        build_engine(BuildRequest(onnx_path=model, output=tmp_path / "m.engine"))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_standin_refuses_precision_flags_on_strongly_typed_networks(fake_trt):
    """The stand-in's own rule (TensorRT's): a plan that broke it would fail the builds above."""
    b = fake_trt.Builder(fake_trt.Logger())
    net = b.create_network(1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    net.inputs.append(fake_trt.ITensor("images", [-1, 3, 8, 8], fake_trt.float32))
    cfg = b.create_builder_config()
    prof = b.create_optimization_profile()
    prof.set_shape("images", (1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))
    cfg.add_optimization_profile(prof)
    assert b.build_serialized_network(net, cfg) is not None
    if hasattr(fake_trt.BuilderFlag, "FP16"):
        cfg.set_flag(fake_trt.BuilderFlag.FP16)
        assert b.build_serialized_network(net, cfg) is None


@pytest.mark.parametrize("args,message", [
    (["--calib-dir", "."], "vitmerge calibrate"),
    (["--int8"], "Q/DQ"),
    (["--workspace-gb", "0"], "--workspace-gb"),
], ids=["calib-dir-removed", "int8-without-qdq", "workspace"])
def test_build_cli_refuses_before_any_work(tmp_path, args, message):
    model = _images_model(tmp_path / "m.onnx")
    res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "m.engine"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_build_cli_on_tensorrt11_explains_fp16(tmp_path, monkeypatch):
    model = _images_model(tmp_path / "m.onnx")
    with trt_standin.fake_tensorrt(V11):
        monkeypatch.setattr(trt_build, "gpu_name", lambda: "Stand-in GPU")
        res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "m.engine"), "--fp16"])
        assert res.exit_code == 2 and "BuilderFlag.FP16 was removed in TensorRT 11" in " ".join(res.output.split())
        assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
        res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "m.engine")])
        assert res.exit_code == 0, res.output
        assert "fp32 (strongly typed)" in res.output
    assert sorted(os.listdir(tmp_path)) == ["m.engine", "m.engine.json", "m.onnx"]


# ---------------------------------------------------------------------------------------------
# The TokenMerge plugin through a build (TensorRT's real tensorrt.plugin sources)
# ---------------------------------------------------------------------------------------------


def _plugin_images_model(path, r=3):
    """images [batch, 3, 4, 4] -> tokens [batch, 16, 3] -> TokenMerge(r) -> mean over tokens -> logits [batch, 3]."""
    n = 16
    nodes = [helper.make_node("Reshape", ["images", "shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["x"], perm=[0, 2, 1]),
             helper.make_node("ReduceSum", ["x", "last"], ["size"], keepdims=1),
             helper.make_node("TokenMerge", ["x", "x", "size"], ["x_out", "size_out"], name="merge0",
                              domain="vitmerge", r=str(r), protected="1", method="tome", options="{}"),
             helper.make_node("ReduceMean", ["x_out", "tokens"], ["logits"], keepdims=0)]
    inits = [helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3, n]),
             helper.make_tensor("last", TensorProto.INT64, [1], [2]),
             helper.make_tensor("tokens", TensorProto.INT64, [1], [1])]
    vi = [helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", n - r, 3]),
          helper.make_tensor_value_info("size_out", TensorProto.FLOAT, ["batch", n - r, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits, value_info=vi)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("vitmerge", 1)]),
              str(path))
    return path


SOURCES = trt_standin.available_sources()


@pytest.mark.skipif(not SOURCES, reason="TensorRT's Python sources not found: `make install` fetches them into "
                                         ".venv/trt-bindings/ (or set VITMERGE_TRT_BINDINGS)")
@pytest.mark.parametrize("version", sorted((v for v in SOURCES if trt_standin.version_tuple(v) >= (10, 16)),
                                           key=trt_standin.version_tuple))
def test_build_cli_with_the_token_merge_plugin(tmp_path, monkeypatch, version):
    """`vitmerge build` on a TokenMerge graph: the plugin is registered through tensorrt.plugin, the
    parser emulation creates it from the node, the builder walks its type combinations; the metadata
    says the engine needs the Python (JIT) plugin. A definition tensorrt.plugin rejects is one line."""
    from vitmerge.plugins import tensorrt_plugin

    model = _plugin_images_model(tmp_path / "p.onnx")
    with trt_standin.loaded(SOURCES[version]) as (trt_mod, _):
        monkeypatch.setattr(trt_build, "gpu_name", lambda: "Stand-in GPU")
        res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "p.engine"), "--opt-batch", "2", "--max-batch", "4"])
        assert res.exit_code == 0, res.output
        assert "JIT" in res.output
        meta = json.loads((tmp_path / "p.engine.json").read_text())
        assert meta["token_merge_plugin"] is True and meta["token_merge_nodes"] == 1 and meta["plugin_aot"] is False
        assert _spec(tmp_path / "p.engine")["plugins"] == ["TokenMerge"]

        def rejected(trtp):  # what the old module handed over: string annotations
            @trtp.register("vitmerge::TokenMerge")
            def _desc(x: "trtp.TensorDesc", r: "int") -> "trtp.TensorDesc":
                return x.like()

    with trt_standin.loaded(SOURCES[version]):
        monkeypatch.setattr(tensorrt_plugin, "_define_token_merge", rejected)
        res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "q.engine")])
        assert res.exit_code == 2
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert "rejected the vitmerge::TokenMerge plugin" in " ".join(res.output.split()) and "Traceback" not in res.output
        assert not (tmp_path / "q.engine").exists() and not (tmp_path / "q.engine.json").exists()
        assert len(lines) <= 3  # one error message (wrapped by the console at most)


# ---------------------------------------------------------------------------------------------
# TrtRunner: one execution context per prepared batch (issue item 4)
# ---------------------------------------------------------------------------------------------


class _Stream:
    cuda_stream = 7

    def synchronize(self):
        pass


@pytest.fixture
def engine_runner(fake_trt, tmp_path, monkeypatch):
    """A TrtRunner on a stand-in engine (built by build_engine) whose buffers are host memory."""
    model = _images_model(tmp_path / "m.onnx")
    res = build_engine(BuildRequest(onnx_path=model, output=tmp_path / "m.engine", min_batch=1, opt_batch=2, max_batch=8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(TrtRunner, "_buffer_device", "cpu")
    return TrtRunner(res.engine)


def _mean_hw(x):
    return np.asarray(x, dtype=np.float64).reshape(x.shape[0], x.shape[1], -1).mean(axis=2)


def test_runner_reads_the_engine(engine_runner):
    r = engine_runner
    assert r.batch_range == (1, 8) and r.input_shape == (3, 8, 8) and r.runtime == "trt"
    assert r.info["precision"] == "fp32"


def test_runner_prepared_batches_keep_their_own_shapes_and_buffers(engine_runner):
    """Latency prepares every batch size, then energy runs them again, interleaved. TensorRT keeps shapes
    and buffer addresses in the execution context: with one shared context every run would execute the
    shape and buffers bound last. Each run must compute on its own input into its own outputs."""
    r = engine_runner
    runs = {b: r.timed(b) for b in (1, 4, 2)}
    for b in (1, 4, 2, 1, 4):  # the energy phase re-runs them in another order
        ctx, x, outs = runs[b]()
        assert ctx.executions[-1]["shape"] == (b, 3, 8, 8)
        assert outs[0].shape == (b, 3)
        np.testing.assert_allclose(outs[0].numpy(), _mean_hw(r.example(b)), rtol=1e-5, atol=1e-6)
    contexts = {id(runs[b]()[0]) for b in runs}
    assert len(contexts) == 3
    # host calls (accuracy, verification) in between do not disturb the prepared runs
    images = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(r(images).numpy(), _mean_hw(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r(images[:3]).numpy(), _mean_hw(images[:3]), rtol=1e-5, atol=1e-6)
    ctx, x, outs = runs[4]()
    np.testing.assert_allclose(outs[0].numpy(), _mean_hw(r.example(4)), rtol=1e-5, atol=1e-6)


def test_runner_refuses_batches_outside_the_profile(engine_runner):
    with pytest.raises(UsageError, match="outside"):
        engine_runner.timed(9)


def _exported(path, **meta):
    """:func:`_images_model` with the ``vitmerge.*`` metadata an export writes (merged when ``meta`` says so)."""
    from vitmerge import metadata as md

    _images_model(path)
    proto = onnx.load(str(path))
    md.write(proto, {md.INPUT_SHAPE: [3, 8, 8], md.DTYPE: "fp32", **meta})
    onnx.save(proto, str(path))
    return path


def test_every_runtime_reports_one_schedule_record_and_profile_plots_the_engine_baseline(fake_trt, tmp_path,
                                                                                         monkeypatch):
    """One typed record (ScheduleInfo) from every runner. An engine built from an unmerged export is unmerged
    (r_mean 0.0) as its ONNX file and the PyTorch model are: it used to report no r_mean at all, so profile left
    the TensorRT baseline out of latency vs r (with one merged engine beside it: no plot)."""
    from vitmerge import metadata as md
    from vitmerge.backends.base import ScheduleInfo
    from vitmerge.backends.ort import OrtRunner
    from vitmerge.backends.torch import model_schedule
    from vitmerge.profiling.profile import profile_targets, write_profile_report

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(TrtRunner, "_buffer_device", "cpu")
    plain = _exported(tmp_path / "plain.onnx", **{md.MERGE_OP: "native"})  # as an unmerged export records it
    merged = _exported(tmp_path / "merged.onnx", **{md.METHOD: "tome", md.R: [2, 4], md.TOKENS_IN: [17, 15],
                                                    md.TOKENS_OUT: [15, 11], md.MERGE_OP: "native"})
    engines = {}
    for path in (plain, merged):
        engines[path] = TrtRunner(build_engine(BuildRequest(onnx_path=path, output=path.with_suffix(".engine"),
                                                            opt_batch=1, max_batch=2)).engine)
        assert engines[path].schedule == OrtRunner(path).schedule  # the same record from both runtimes
    unmerged = ScheduleInfo(r_mean=0.0, dtype="fp32")
    assert engines[plain].schedule == unmerged == model_schedule(torch.nn.Linear(2, 2))  # PyTorch: the same
    assert engines[plain].info["r_mean"] == 0.0 and engines[plain].info["precision"] == "fp32"
    assert engines[merged].schedule == ScheduleInfo(method="tome", r=(2, 4), r_mean=3.0, tokens_in=(17, 15),
                                                    tokens_out=(15, 11), merge_op="native", dtype="fp32")
    assert engines[merged].info["r"] == [2, 4]

    res = profile_targets([engines[plain], engines[merged]], [1], rounds=1, iters=1, warmup=0)
    write_profile_report(res, tmp_path / "report")
    assert (tmp_path / "report" / "latency_vs_r.png").is_file()  # both engines on the TensorRT line, r = 0 and 3
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["plots"] == ["latency_vs_r.png"] and [r["r_mean"] for r in doc["data"]["results"]] == [0.0, 3.0]


def test_engine_of_another_tensorrt_is_a_clear_error(tmp_path, monkeypatch):
    from vitmerge.errors import RuntimeMissingError

    with trt_standin.fake_tensorrt(V10):
        monkeypatch.setattr(trt_build, "gpu_name", lambda: "Stand-in GPU")
        res = build_engine(BuildRequest(onnx_path=_images_model(tmp_path / "m.onnx"), output=tmp_path / "m.engine"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with trt_standin.fake_tensorrt(V11):
        with pytest.raises(RuntimeMissingError, match=r"could not load m\.engine \(built with TensorRT 10\.16"):
            TrtRunner(res.engine)


def test_engine_without_its_metadata_says_what_is_missing(tmp_path, monkeypatch):
    """An engine whose metadata file was not copied along: the error names the missing file (not a version or GPU
    mismatch) and the two ways out."""
    from vitmerge.errors import ModelFileError

    with trt_standin.fake_tensorrt(V10):
        monkeypatch.setattr(trt_build, "gpu_name", lambda: "Stand-in GPU")
        res = build_engine(BuildRequest(onnx_path=_images_model(tmp_path / "m.onnx"), output=tmp_path / "m.engine"))
    res.metadata.unlink()
    (tmp_path / "m.engine").write_bytes(b"not an engine any TensorRT loads")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with trt_standin.fake_tensorrt(V10):
        with pytest.raises(ModelFileError) as e:
            TrtRunner(tmp_path / "m.engine")
    text = str(e.value)
    assert "its metadata file m.engine.json (written by vitmerge build" in text and "is missing" in text
    assert "Put the metadata file back, or rebuild: vitmerge build MODEL.onnx --output m.engine" in text


def test_every_tensorrt_type_has_its_buffer_type_or_a_clear_error():
    """Engine I/O buffers are allocated by type: INT64, BOOL, UINT8, FP8 get theirs (a float32 buffer would have the
    wrong byte size); a type PyTorch cannot hold (INT4) is refused by name."""
    from vitmerge.errors import ModelFileError

    with trt_standin.fake_tensorrt(V10) as m:
        table = trt_backend.torch_dtypes(m, torch)
        want = {m.float32: torch.float32, m.float16: torch.float16, m.bfloat16: torch.bfloat16, m.int8: torch.int8,
                m.int32: torch.int32, m.int64: torch.int64, m.bool: torch.bool, m.uint8: torch.uint8,
                m.fp8: torch.float8_e4m3fn}
        assert table == want
        for t, d in want.items():
            assert trt_backend.engine_dtype(table, t, "x") is d
        with pytest.raises(ModelFileError) as e:
            trt_backend.engine_dtype(table, m.int4, "logits", "m.engine")
    assert str(e.value) == ("m.engine: tensor 'logits' has TensorRT type int4, which vitmerge cannot give a buffer for; "
                            "build the engine from a file whose inputs and outputs are float32 (vitmerge export "
                            "writes such files)")
