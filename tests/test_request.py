"""#21: a request is read once. ModelRef parses every way to name a model; MergeRequest validates the merge
options once; every command and the library take them (profile read a bare timm name as an .onnx path and
dense:NAME only as timm:dense:NAME)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitmerge.cli import app
from vitmerge.errors import ModelNotFoundError, ScheduleError, UsageError
from vitmerge.request import DEFAULT_R, MergeRequest, ModelRef, parse_r

runner = CliRunner()


@pytest.mark.parametrize("text,kind,name,runtime,spec", [
    ("vit_small_patch16_224", "timm", "vit_small_patch16_224", "torch", "timm:vit_small_patch16_224"),
    ("timm:vit_small_patch16_224", "timm", "vit_small_patch16_224", "torch", "timm:vit_small_patch16_224"),
    ("dense:vit_tiny_patch16_224", "dense", "vit_tiny_patch16_224", "torch", "dense:vit_tiny_patch16_224"),
    ("timm:dense:vit_tiny_patch16_224", "dense", "vit_tiny_patch16_224", "torch", "dense:vit_tiny_patch16_224"),
    ("model.onnx", "onnx", "model.onnx", "ort", "model.onnx"),
    ("out/m.ONNX", "onnx", "out/m.ONNX", "ort", "out/m.ONNX"),
    ("m.engine", "engine", "m.engine", "trt", "m.engine"),
    ("m.plan", "engine", "m.plan", "trt", "m.plan"),
    ("./hf_vit", "folder", "./hf_vit", "torch", "./hf_vit"),
    ("models/yolos", "folder", "models/yolos", "torch", "models/yolos"),
])
def test_model_ref_parses_every_form_once(text, kind, name, runtime, spec):
    ref = ModelRef.parse(text)
    assert (ref.kind, ref.name, ref.runtime, ref.spec, ref.text) == (kind, name, runtime, spec, text)
    assert ModelRef.parse(ref) is ref
    assert ModelRef.parse(ref.spec).kind == kind  # the canonical text reads back as the same kind


def test_an_existing_folder_without_a_slash_is_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myvit").mkdir()
    assert ModelRef.parse("myvit").kind == "folder"
    assert ModelRef.parse("timm:myvit").kind == "timm"  # timm: says it is a name


@pytest.mark.parametrize("text,message", [("", "give a model"), ("timm:", "needs a model name"),
                                          ("dense:", "needs a timm backbone")])
def test_model_ref_refuses_empty_names(text, message):
    with pytest.raises(ModelNotFoundError, match=message):
        ModelRef.parse(text)


def test_a_file_is_refused_where_a_pytorch_model_is_built():
    with pytest.raises(UsageError, match="is an ONNX file"):
        ModelRef.parse("m.onnx").require_pytorch("export")
    from vitmerge.models.build import build_model

    with pytest.raises(UsageError, match="TensorRT engine"):
        build_model("m.engine")


@pytest.mark.parametrize("text,want", [("16", 16), ("0", 0), ("8,8,4", [8, 8, 4]), (" 4, 2 ", [4, 2]), (None, None),
                                       (3, 3), ([1, 2], [1, 2])])
def test_parse_r(text, want):
    assert parse_r(text) == want


@pytest.mark.parametrize("text,message", [("abc", "integer"), ("-1", ">= 0"), ("4,-2", ">= 0"), (",", "integer"),
                                          (True, "bool")])
def test_parse_r_refuses(text, message):
    with pytest.raises(ScheduleError, match=message):
        parse_r(text)


def test_merge_request_defaults_and_description():
    req = MergeRequest()
    assert (req.method, req.r, req.r_value, req.merges) == ("tome", None, DEFAULT_R, True)
    assert req.describe() == "tome r=16"
    assert MergeRequest(r=0).merges is False and MergeRequest(r=[0, 0]).merges is False
    assert MergeRequest(r="8,4").r == [8, 4] and MergeRequest(r="8,4").describe() == "tome r=8,4"
    assert MergeRequest("hash", budget=0.5).describe() == "hash budget=0.5"
    assert MergeRequest(options=["bits=8"], method="hash").options == {"bits": 8}
    assert json.loads(json.dumps(MergeRequest("tome", r=4).to_dict()))["r"] == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=4, budget=0.5), "contradict each other"),
    (dict(schedule="decreasing", budget=0.5), "drop --schedule"),
    (dict(budget_latency="t.json"), "needs --budget"),
    (dict(budget=0.0), r"in \(0, 1\]"),
    (dict(budget=1.5), r"in \(0, 1\]"),
    (dict(budget=float("nan")), r"in \(0, 1\]"),
    (dict(method="nope"), "unknown merge method"),
    (dict(method="tome", options={"bits": 8}), "unknown option"),
    (dict(schedule="wavy"), "unknown schedule"),
    (dict(schedule="decreasing", r=[4, 4]), "one integer r"),
    (dict(r=-3), ">= 0"),
])
def test_merge_request_refuses_what_it_cannot_do_when_made(kwargs, message):
    with pytest.raises(ScheduleError, match=message):
        MergeRequest(**kwargs)


def test_profile_takes_a_bare_timm_name_and_dense_name_like_export(tmp_path):
    """profile read `vit_tiny_patch16_224` as an .onnx path ("ONNX model does not exist") and took dense:NAME
    only as timm:dense:NAME; now the same references as export and eval."""
    base = ["--img-size", "32", "--r", "1", "--batch", "1", "--rounds", "1", "--iters", "1", "--warmup", "0",
            "--no-energy", "--no-memory"]
    res = runner.invoke(app, ["profile", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 1}', *base])
    assert res.exit_code == 0, res.output
    assert "tome r=1" in res.output and "torch/cpu" in res.output
    res = runner.invoke(app, ["profile", "dense:vit_tiny_patch16_224", "--num-classes", "3", "--model-kwargs",
                              '{"depth": 1}', *base])
    assert res.exit_code == 0, res.output
    assert "dense:vit_tiny_patch16_224" in res.output


def test_profile_refuses_model_options_when_every_model_is_a_file(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read")
    res = runner.invoke(app, ["profile", str(onnx_file), "--checkpoint", "w.pth", "--r", "4"])
    assert res.exit_code == 2
    assert "--checkpoint, --r apply to models built in PyTorch" in " ".join(res.output.split())


def test_eval_and_export_agree_on_a_model_json_and_its_num_classes(digits_model, tmp_path):
    """One resolution of model.json + options: export and eval build the same model from --config."""
    from vitmerge.models.build import resolve_model

    src = resolve_model(None, config=digits_model.config_path)
    assert src.ref.kind == "timm" and src.kwargs["num_classes"] == 10 and src.checkpoint is not None
    with pytest.raises(UsageError, match="contradicts num_classes"):
        resolve_model(None, config=digits_model.config_path, num_classes=3)
    model = src.build()
    assert model.num_classes == 10
    assert Path(src.data_dir).is_dir()


def test_the_torch_free_defaults_are_the_registrys():
    """request.py cannot import the registry (torch) at import time: its default method must still be the registry's."""
    from vitmerge import request
    from vitmerge.merging import DEFAULT_METHOD

    assert request.DEFAULT_METHOD == DEFAULT_METHOD
