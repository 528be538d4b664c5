"""`vitmerge package`: Triton model repositories, config.pbtxt parsed as protobuf text and checked against the graph."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import vitmerge
from vitmerge.cli import app
from vitmerge.errors import ModelNotFoundError, OutputPathError, PackagingError, RuntimeMissingError
from vitmerge.backends.ort import session as ort_session
from vitmerge.packaging import package

runner = CliRunner()


# ------------------------------------------------------------------------------------ a parser


SCHEMA = Path(__file__).parent / "data" / "triton_model_config.txtpb"


def _model_config_class():
    """Triton's real ModelConfig message (inference/model_config.proto, as tritonclient ships it compiled;
    see tests/data/update_triton_schema.py), so text_format.Parse rejects any field, nesting or enum
    value Triton would reject."""
    fdp = text_format.Parse(SCHEMA.read_text(), descriptor_pb2.FileDescriptorProto())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = _model_config_class()


def parse_config(path):
    return text_format.Parse(path.read_text(), ModelConfig())


def dtype_name(cfg_tensor):
    return ModelConfig.DESCRIPTOR.file.pool.FindEnumTypeByName("inference.DataType").values_by_number[
        cfg_tensor.data_type].name


# ------------------------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def vit_onnx(tmp_path_factory):
    """2-block ViT-Tiny at 64 px, r=4, shared with test_profile through the session's base temp."""
    root = tmp_path_factory.getbasetemp() / "vitmerge-tiny-onnx"
    root.mkdir(exist_ok=True)
    path = root / "vit_tiny64_d2_r4.onnx"
    if not path.exists():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False).eval()
        vitmerge.apply(m, r=4)
        vitmerge.export(m, path, batch_sizes=(1, 2))
    return path


def small_model(path, batch="N", in_type=TensorProto.FLOAT16, custom=False, external=False):
    """images [batch, 2, 3] (fp16) -> flat [batch, 6] (fp32) and argmax [batch] (int64), optional TokenMerge."""
    x = helper.make_tensor_value_info("pixels", in_type, [batch, 2, 3])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 6])
    z = helper.make_tensor_value_info("best", TensorProto.INT64, [batch])
    shape = numpy_helper.from_array(np.array([0, 6], dtype=np.int64), "shape")
    w = numpy_helper.from_array(np.arange(36, dtype=np.float32).reshape(6, 6) / 10, "w")
    nodes = [helper.make_node("Cast", ["pixels"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["xf", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["mm"])]
    if custom:
        nodes.append(helper.make_node("TokenMerge", ["mm"], ["scores"], domain="vitmerge", r=1))
    else:
        nodes.append(helper.make_node("Identity", ["mm"], ["scores"]))
    nodes.append(helper.make_node("ArgMax", ["scores"], ["best"], axis=1, keepdims=0))
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("vitmerge", 1)] if custom else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z], initializer=[shape, w]),
                              opset_imports=opsets)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="weights.bin", size_threshold=64)  # w (144 B) out, shape in
    else:
        onnx.save(model, str(path))
    return path


def repo_entries(repo):
    return sorted(p.name for p in repo.iterdir()) if repo.exists() else []


# ------------------------------------------------------------------------------------ tests


def test_vit_repository_matches_graph_and_runs(vit_onnx, tmp_path):
    repo = tmp_path / "models"
    res = package(vit_onnx, repo, name="vit", max_batch=16)
    assert res.model_dir == repo / "vit" and repo_entries(repo) == ["vit"]
    assert sorted(p.name for p in (repo / "vit").iterdir()) == ["1", "config.pbtxt"]
    assert (repo / "vit" / "1" / "model.onnx").read_bytes() == vit_onnx.read_bytes()
    cfg = parse_config(repo / "vit" / "config.pbtxt")
    assert cfg.name == "vit" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert cfg.HasField("dynamic_batching") and not cfg.HasField("model_operations")
    graph = onnx.load(str(vit_onnx)).graph
    for cfg_list, onnx_list, names in ((cfg.input, graph.input, ["images"]), (cfg.output, graph.output, ["logits"])):
        assert [t.name for t in cfg_list] == [v.name for v in onnx_list] == names
        for t, v in zip(cfg_list, onnx_list):
            assert dtype_name(t) == "TYPE_FP32" and v.type.tensor_type.elem_type == TensorProto.FLOAT
            onnx_dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
            assert list(t.dims) == onnx_dims[1:]  # without the batch axis
    assert list(cfg.input[0].dims) == [3, 64, 64] and list(cfg.output[0].dims) == [1000]
    # Independently: run the packaged file at a batch size: shapes are [batch] + dims from the config.
    sess = ort_session(repo / "vit" / "1" / "model.onnx")
    x = np.random.default_rng(0).standard_normal((3, *cfg.input[0].dims)).astype(np.float32)
    out = sess.run(None, {cfg.input[0].name: x})[0]
    assert list(out.shape) == [3, *cfg.output[0].dims]


def test_types_and_scalar_outputs_from_a_handmade_graph(tmp_path):
    src = small_model(tmp_path / "small.onnx")
    res = package(src, tmp_path / "repo", max_batch=8, version=3, instance_kind="cpu", instances=2,
                  queue_delay_us=500)
    cfg = parse_config(res.config_path)
    assert res.model_file == tmp_path / "repo" / "small" / "3" / "model.onnx"
    assert [(t.name, dtype_name(t), list(t.dims)) for t in cfg.input] == [("pixels", "TYPE_FP16", [2, 3])]
    assert [(t.name, dtype_name(t), list(t.dims)) for t in cfg.output] == [
        ("scores", "TYPE_FP32", [6]), ("best", "TYPE_INT64", [1])]
    assert cfg.output[1].HasField("reshape") and list(cfg.output[1].reshape.shape) == []
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 2
    assert cfg.instance_group[0].kind == ModelConfig.DESCRIPTOR.fields_by_name["instance_group"].message_type \
        .enum_types_by_name["Kind"].values_by_name["KIND_CPU"].number


def test_fixed_batch_graph_gets_full_shapes(tmp_path):
    src = small_model(tmp_path / "fixed.onnx", batch=4)
    res = package(src, tmp_path / "repo")
    cfg = parse_config(res.config_path)
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [4, 2, 3] and list(cfg.output[1].dims) == [4]
    assert any("fixed batch" in n for n in res.notes)


def test_external_weights_travel_with_the_model(tmp_path):
    src = small_model(tmp_path / "ext.onnx", in_type=TensorProto.FLOAT, external=True)
    res = package(src, tmp_path / "repo")
    vdir = res.model_file.parent
    assert sorted(p.name for p in vdir.iterdir()) == ["model.onnx", "weights.bin"]
    x = np.ones((2, 2, 3), dtype=np.float32)
    ref = ort_session(src).run(None, {"pixels": x})
    got = ort_session(res.model_file).run(None, {"pixels": x})
    np.testing.assert_array_equal(ref[0], got[0])


def test_custom_nodes_need_a_library(tmp_path, monkeypatch):
    import vitmerge.plugins as plugins

    monkeypatch.delattr(plugins, "ort_library_path", raising=False)
    src = small_model(tmp_path / "tm.onnx", custom=True)
    repo = tmp_path / "repo"
    with pytest.raises(RuntimeMissingError, match="op_library_filename.*calls back into Python"):
        package(src, repo)
    assert repo_entries(repo) == []  # nothing half-written
    lib = tmp_path / "libvitmerge_ort.so"
    lib.write_bytes(b"\x7fELF fake")
    res = package(src, repo, plugin_lib=lib, server_repo="/models/")
    cfg = parse_config(res.config_path)
    assert list(cfg.model_operations.op_library_filename) == ["/models/tm/plugins/libvitmerge_ort.so"]
    assert (repo / "tm" / "plugins" / "libvitmerge_ort.so").read_bytes() == lib.read_bytes()
    res2 = package(src, tmp_path / "repo2", plugin_lib=lib)  # default: the repository's own absolute path
    lib_path = list(parse_config(res2.config_path).model_operations.op_library_filename)[0]
    assert lib_path == str((tmp_path / "repo2").resolve() / "tm" / "plugins" / "libvitmerge_ort.so")
    assert os.path.isfile(lib_path)


def write_engine(tmp_path, meta=None, name="vit.engine"):
    eng = tmp_path / name
    eng.write_bytes(b"serialized-engine-bytes")
    if meta is not None:
        (tmp_path / (name + ".json")).write_text(json.dumps(meta))
    return eng


ENGINE_META = {
    "tensorrt_version": "10.9.0", "precision": "fp16", "profile": {"min": 1, "opt": 8, "max": 64},
    "inputs": [{"name": "images", "dtype": "float16", "shape": [-1, 3, 224, 224]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 1000]}],
}


def test_engine_repository_from_metadata(tmp_path):
    eng = write_engine(tmp_path, ENGINE_META)
    res = package(eng, tmp_path / "repo", max_batch=32)
    assert res.model_file.name == "model.plan" and res.model_file.read_bytes() == eng.read_bytes()
    cfg = parse_config(res.config_path)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32
    assert [(t.name, dtype_name(t), list(t.dims)) for t in cfg.input] == [("images", "TYPE_FP16", [3, 224, 224])]
    assert [(t.name, dtype_name(t), list(t.dims)) for t in cfg.output] == [("logits", "TYPE_FP32", [1000])]
    assert cfg.instance_group[0].kind == 1  # KIND_GPU
    with pytest.raises(PackagingError, match="max batch 64"):
        package(eng, tmp_path / "repo", name="big", max_batch=128)


def test_engine_with_plugin_library_documents_the_launch(tmp_path):
    lib = tmp_path / "libtokenmerge_trt.so"
    lib.write_bytes(b"\x7fELF")
    eng = write_engine(tmp_path, {**ENGINE_META, "merge_op": "plugin", "plugin_library": str(lib)})
    res = package(eng, tmp_path / "repo", server_repo="/models")
    text = res.config_path.read_text()
    parse_config(res.config_path)  # the comments keep it valid protobuf text
    assert 'tritonserver --model-repository=/models --backend-config=tensorrt,plugins="/models/vit/plugins/libtokenmerge_trt.so"' in text
    assert "LD_PRELOAD=/models/vit/plugins/libtokenmerge_trt.so" in text
    assert (tmp_path / "repo" / "vit" / "plugins" / lib.name).is_file()
    assert "--backend-config=tensorrt,plugins=" in res.launch


def test_engine_metadata_as_vitmerge_build_writes_it(tmp_path, vit_onnx):
    """build's JSON (model.json) records the source ONNX and the batch profile, not the outputs."""
    meta = {"engine": "vit.engine", "onnx": str(vit_onnx), "tensorrt_version": "10.9.0", "precision": "fp16",
            "batch_profile": {"min": 1, "opt": 8, "max": 16}, "input": {"name": "images", "shape": ["batch", 3, 64, 64]},
            "token_merge_plugin": False, "schedule": {"method": "tome", "r": [4, 4]}}
    eng = tmp_path / "vit.engine"
    eng.write_bytes(b"engine")
    (tmp_path / "vit.json").write_text(json.dumps(meta))
    with pytest.raises(PackagingError, match="max batch 16"):
        package(eng, tmp_path / "repo", max_batch=32)
    res = package(eng, tmp_path / "repo", max_batch=16)
    cfg = parse_config(res.config_path)
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("images", [3, 64, 64])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [1000])]
    # the recorded ONNX moved: --onnx points at it
    (tmp_path / "vit.json").write_text(json.dumps({**meta, "onnx": str(tmp_path / "gone.onnx")}))
    with pytest.raises(ModelNotFoundError, match="--onnx"):
        package(eng, tmp_path / "repo2")
    res = package(eng, tmp_path / "repo2", max_batch=16, onnx_source=vit_onnx)
    assert parse_config(res.config_path).max_batch_size == 16


def test_engine_with_the_python_plugin_cannot_be_served(tmp_path):
    eng = write_engine(tmp_path, {**ENGINE_META, "token_merge_plugin": True})
    with pytest.raises(RuntimeMissingError, match="Python"):
        package(eng, tmp_path / "repo")
    assert repo_entries(tmp_path / "repo") == []
    eng = write_engine(tmp_path, {**ENGINE_META, "token_merge_plugin": True, "plugin_aot": True}, name="aot.engine")
    res = package(eng, tmp_path / "repo")
    assert any("ahead of time" in n for n in res.notes)


def test_engine_without_metadata_is_a_clear_error(tmp_path):
    eng = write_engine(tmp_path, None)
    with pytest.raises(ModelNotFoundError, match="vit.engine.json"):
        package(eng, tmp_path / "repo")


def test_existing_model_overwrite_and_atomicity(tmp_path, monkeypatch):
    src = small_model(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    package(src, repo, max_batch=4)
    with pytest.raises(OutputPathError, match="--overwrite"):
        package(src, repo, max_batch=8)
    assert parse_config(repo / "m" / "config.pbtxt").max_batch_size == 4
    # a failure half-way leaves the old model in place and no staging folder behind
    real_copy = shutil.copyfile

    def failing_copy(a, b, *args, **kw):
        if str(b).endswith("model.onnx"):
            real_copy(a, b)
            raise OSError("disk full")
        return real_copy(a, b, *args, **kw)

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        package(src, repo, max_batch=8, overwrite=True)
    monkeypatch.undo()
    assert repo_entries(repo) == ["m"] and parse_config(repo / "m" / "config.pbtxt").max_batch_size == 4
    package(src, repo, max_batch=8, overwrite=True)
    assert repo_entries(repo) == ["m"] and parse_config(repo / "m" / "config.pbtxt").max_batch_size == 8


def test_cli_package(vit_onnx, tmp_path):
    repo = tmp_path / "repo"
    res = runner.invoke(app, ["package", str(vit_onnx), "--repo", str(repo), "--name", "vit_r4", "--max-batch", "8"])
    assert res.exit_code == 0, res.output
    cfg = parse_config(repo / "vit_r4" / "config.pbtxt")
    assert cfg.max_batch_size == 8 and cfg.name == "vit_r4"
    assert "tritonserver --model-repository=" in " ".join(res.output.split())


@pytest.mark.parametrize("args,needle", [
    (["{tmp}/missing.onnx"], "does not exist"),
    (["{src}", "--version", "0"], "--version must be >= 1"),
    (["{src}", "--name", "a/b"], "may only use letters"),
    (["{txt}"], "give an .onnx file or a TensorRT engine"),
    (["{src}", "--instance-kind", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'gpu'"),
])
def test_cli_bad_input(tmp_path, args, needle):
    src = small_model(tmp_path / "m.onnx")
    txt = tmp_path / "m.txt"
    txt.write_text("x")
    repo = tmp_path / "repo"
    args = [a.format(tmp=tmp_path, src=src, txt=txt) for a in args]
    res = runner.invoke(app, ["package", *args, "--repo", str(repo)])
    assert res.exit_code == 2, res.output
    assert needle in " ".join(res.output.replace("│", " ").split())  # typer's error box wraps long lines
    assert repo_entries(repo) == []


def test_default_name_is_the_stem_so_int8_and_fp32_do_not_collide(vit_onnx, tmp_path):
    """`package x.int8.onnx` is model `x.int8` (the stem: only the last suffix goes), beside `x` from x.onnx."""
    import shutil

    repo = tmp_path / "repo"
    fp32, int8 = tmp_path / "vit.onnx", tmp_path / "vit.int8.onnx"
    shutil.copyfile(vit_onnx, fp32)
    shutil.copyfile(vit_onnx, int8)
    assert package(fp32, repo, max_batch=4).model_dir.name == "vit"
    assert package(int8, repo, max_batch=4).model_dir.name == "vit.int8"
    assert repo_entries(repo) == ["vit", "vit.int8"]
    assert parse_config(repo / "vit.int8" / "config.pbtxt").name == "vit.int8"
