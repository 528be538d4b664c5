"""``vitmerge calibrate``: INT8 QDQ files that ONNX Runtime runs with FP32-level accuracy."""
from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from vitmerge.calibration.quantize import merge_nodes

from vitmerge.cli import app
from vitmerge.backends.ort import session as ort_session

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


from support.plain_digits import load_digit_pngs as test_images  # noqa: E402

test_images.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def quantized(digits_model, digits_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    rep = out / "rep"
    args = ["calibrate", str(digits_onnx["merged"]), "--config", str(digits_model.config_path), "--num", "128",
            "--calibrator", "entropy", "--baseline", str(digits_onnx["unmerged"]),
            "-o", str(out / "merged.int8.onnx"), "--report-dir", str(rep)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"merged": out / "merged.int8.onnx", "unmerged": out / "digits_unmerged.int8.onnx",
            "report": json.loads((rep / "report.json").read_text())["data"], "output": res.output}


def test_output_is_qdq_with_merge_steps_left_in_float(quantized, digits_onnx):
    fp32 = onnx.load(str(digits_onnx["merged"]))
    q = onnx.load(str(quantized["merged"]))
    onnx.checker.check_model(q)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    int8 = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 8  # the qkv/proj/fc1/fc2 weights of 4 blocks (per-channel INT8)
    # every MatMul of a merge step (the similarity that decides which tokens merge) reads float
    merge = set(merge_nodes(fp32))
    dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    merge_matmuls = [n for n in q.graph.node if n.name in merge and n.op_type == "MatMul"]
    assert len(merge_matmuls) == 8  # per step (4 steps): the scores and the one-hot sum of merged rows
    assert not any(i in dq_out for n in merge_matmuls for i in n.input)
    # and the data-dependent index ops are untouched
    assert ops.count("TopK") == [n.op_type for n in fp32.graph.node].count("TopK") == 8
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["vitmerge.quantization"] == "int8-qdq" and meta["vitmerge.r"] == "[8, 8, 8, 8]"


def test_int8_accuracy_close_to_fp32_independently_measured(quantized, digits_onnx, digits_model):
    x, y = test_images(digits_model.test_dir)
    acc, top = {}, {}
    for name, path in (("fp32", digits_onnx["merged"]), ("int8", quantized["merged"]),
                       ("fp32u", digits_onnx["unmerged"]), ("int8u", quantized["unmerged"])):
        logits = ort_session(path).run(None, {"images": x})[0]
        top[name] = logits.argmax(1)
        acc[name] = float((top[name] == y).mean())
    assert acc["fp32"] > 0.9
    assert abs(acc["int8"] - acc["fp32"]) <= 0.02, acc
    assert abs(acc["int8u"] - acc["fp32u"]) <= 0.02, acc
    assert (top["int8"] == top["fp32"]).mean() >= 0.97
    # the command's own four corners agree with this measurement
    models = quantized["report"]["accuracy"]["models"]
    assert set(models) == {"unmerged FP32", "unmerged INT8", "merged FP32", "merged INT8"}
    assert models["unmerged FP32"]["top1"] == pytest.approx(acc["fp32u"], abs=1e-9)
    assert models["merged FP32"]["top1"] == pytest.approx(acc["fp32"], abs=1e-9)
    # INT8 kernels round differently with the batch size (the command scores 32 at a time): one image
    assert models["merged INT8"]["top1"] == pytest.approx(acc["int8"], abs=1.5 / len(y))
    assert quantized["report"]["accuracy"]["images"] == len(y)  # test split; calibration used train/


def test_calibration_images_come_from_train_split(quantized):
    q = quantized["report"]["quantized"]
    assert all(v["calibration_images"] == 128 for v in q.values())
    assert "data/train" in quantized["output"].replace("\n", "")


@pytest.mark.parametrize("case", ["not_onnx_output", "missing_model", "empty_data", "bad_method", "same_path"])
def test_bad_inputs_leave_no_output(case, digits_model, digits_onnx, tmp_path):
    out = tmp_path / "out.int8.onnx"
    model = str(digits_onnx["merged"])
    args = ["--config", str(digits_model.config_path), "--num", "8"]
    if case == "not_onnx_output":
        out = tmp_path / "out.int8"
    elif case == "missing_model":
        model = str(tmp_path / "nope.onnx")
    elif case == "empty_data":
        (tmp_path / "empty").mkdir()
        args += ["--data", str(tmp_path / "empty")]
    elif case == "bad_method":
        args += ["--calibrator", "kl"]
    else:
        out = digits_onnx["merged"]
    res = runner.invoke(app, ["calibrate", model, "-o", str(out)] + args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.replace("│", " ").split())  # typer's error box wraps long lines
    expect = {"not_onnx_output": "must end in .onnx", "missing_model": "does not exist", "empty_data": "is empty",
              "bad_method": "'kl' is not one of 'entropy', 'minmax', 'percentile'", "same_path": "must differ"}[case]
    assert expect in text
    if case != "same_path":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("method,num", [("minmax", 48), ("percentile", 48), ("entropy", 50)])
def test_other_calibration_methods(method, num, digits_model, digits_onnx, tmp_path):
    """(entropy with 50 images: a count that is not a multiple of the calibration batch size)"""
    from vitmerge.data import CALIBRATION_SPLITS, data_config, eval_transform, open_dataset
    from vitmerge.calibration.quantize import quantize
    from vitmerge.data import data_config_for_onnx

    proto = onnx.load(str(digits_onnx["merged"]))
    cfg, warn = data_config_for_onnx(proto, data_config(digits_model.build()))
    assert warn is None and cfg["input_size"] == [3, 32, 32]
    calib = open_dataset(digits_model.data_dir, transform=eval_transform(cfg), prefer=CALIBRATION_SPLITS, limit=num)
    res = quantize(digits_onnx["merged"], tmp_path / "q.onnx", calib, method=method)
    assert res.images == num and res.quantized_nodes > 0 and len(res.excluded_nodes) > 0
    x, y = test_images(digits_model.test_dir)
    fp = ort_session(digits_onnx["merged"]).run(None, {"images": x})[0].argmax(1)
    q = ort_session(res.path).run(None, {"images": x})[0].argmax(1)
    assert (q == fp).mean() >= 0.95 and abs((q == y).mean() - (fp == y).mean()) <= 0.03
