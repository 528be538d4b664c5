"""``vitmerge eval`` and the accuracy module, on the digits ViT (numbers checked independently)."""
from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image
import pytest
import torch
from typer.testing import CliRunner

from vitmerge.data import open_dataset, transform_for

from vitmerge.cli import app
from vitmerge.backends import OrtRunner, TorchRunner
from vitmerge.profiling.accuracy import evaluate

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plain_top1_top5(model, test_dir):
    """Reference: PNGs read with PIL, scaled by hand, top-k counted with numpy."""
    from support.plain_digits import load_digit_pngs

    x, y = load_digit_pngs(test_dir)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    order = np.argsort(-logits, axis=1)
    return float((order[:, 0] == y).mean()), float((order[:, :5] == y[:, None]).any(1).mean()), len(y)


@pytest.fixture(scope="module")
def reference(digits_model):
    return plain_top1_top5(digits_model.build(), digits_model.test_dir)


def run_ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_eval_cli_budget_report(digits_model, reference, tmp_path):
    rep = tmp_path / "rep"
    res = run_ok(["eval", "--config", str(digits_model.config_path), "--budget", "0.75", "--report-dir", str(rep)])
    assert "top-1 change from merging" in res.output
    doc = json.loads((rep / "report.json").read_text())
    data = doc["data"]
    ev = data["eval"]
    ref_top1, ref_top5, n = reference
    assert ev["images"] == n == 449 and ev["unreadable_count"] == 0
    un, me = ev["models"]["unmerged"], ev["models"]["merged"]
    assert un["top1"] == pytest.approx(ref_top1, abs=1e-9) and un["top5"] == pytest.approx(ref_top5, abs=1e-9)
    assert 0.70 <= data["flops"]["merged"]["fraction"] <= 0.7501
    assert me["top1"] >= un["top1"] - 0.03
    assert data["r"] and len(data["r"]) == 4 and data["tokens_out"][-1] < 65
    md = (rep / "report.md").read_text()
    assert "## Accuracy" in md and "| merged |" in md


def test_eval_cli_r0_equals_unmerged(digits_model):
    res = run_ok(["eval", "--config", str(digits_model.config_path), "--r", "0", "--limit", "100"])
    assert "+0.00 points (+0 of 100 images)" in res.output
    assert "100.00%" in res.output  # agreement column of the merged row


def test_eval_counts_unreadable_images_and_limit(digits_model, tmp_path, reference):
    data = tmp_path / "digits_test"
    shutil.copytree(digits_model.test_dir, data)
    (data / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rep = tmp_path / "rep"
    run_ok(["eval", "vit_tiny_patch16_224", "--checkpoint", str(digits_model.checkpoint),
            "--model-kwargs", str(digits_model.dir / "model_kwargs.json"), "--data", str(data),
            "--report-dir", str(rep)])
    ev = json.loads((rep / "report.json").read_text())["data"]["eval"]
    assert ev["unreadable_count"] == 1 and ev["unreadable"][0].endswith("corrupt.png")
    assert ev["images"] == 449
    assert ev["models"]["unmerged"]["top1"] == pytest.approx(reference[0], abs=1e-9)
    run_ok(["eval", "--config", str(digits_model.config_path), "--data", str(data), "--limit", "50",
            "--report-dir", str(rep)])
    assert json.loads((rep / "report.json").read_text())["data"]["eval"]["images"] in (49, 50)


@pytest.mark.parametrize("case", ["empty", "missing", "too_many_classes", "bad_runtime", "r_and_budget"])
def test_eval_cli_bad_inputs(digits_model, tmp_path, case):
    args = ["eval", "--config", str(digits_model.config_path)]
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
        args += ["--data", str(data)]
    elif case == "missing":
        args += ["--data", str(data)]
    elif case == "too_many_classes":
        for c in range(12):  # labels 0..11, the digits head has 10 outputs
            (data / f"c{c:02d}").mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(data / f"c{c:02d}" / "x.png")
        args += ["--data", str(data)]
    elif case == "bad_runtime":
        args += ["--runtime", "tensorflow"]
    else:
        args += ["--r", "4", "--budget", "0.5"]
    rep = tmp_path / "rep"
    res = runner.invoke(app, args + ["--report-dir", str(rep)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.replace("│", " ").split())  # typer's error box wraps long lines
    expect = {"empty": "is empty", "missing": "does not exist", "too_many_classes": "10 outputs",
              "bad_runtime": "'tensorflow' is not one of 'torch', 'ort'", "r_and_budget": "contradict each other"}[case]
    assert expect in out
    if case in ("empty", "missing"):
        assert "Supported layouts" in out and "CIFAR-100" in out
    assert not (rep / "report.json").exists()


def test_ort_runner_scores_like_pytorch(digits_model, digits_onnx, reference):
    import vitmerge

    model = digits_model.build()
    merged = vitmerge.apply(digits_model.build(), method="tome", r=digits_onnx["r"])
    ds = open_dataset(digits_model.data_dir, transform=transform_for(model))
    res = evaluate({"torch unmerged": TorchRunner(model, device="cpu"), "ort unmerged": OrtRunner(digits_onnx["unmerged"]),
                    "torch merged": TorchRunner(merged, device="cpu"), "ort merged": OrtRunner(digits_onnx["merged"])},
                   ds, batch_size=128, progress=False)
    m = res.models
    assert m["torch unmerged"].top1 == pytest.approx(reference[0], abs=1e-9)
    assert m["ort unmerged"].correct1 == m["torch unmerged"].correct1
    assert abs(m["ort merged"].correct1 - m["torch merged"].correct1) <= 1  # float ties in matching
    assert m["ort merged"].agreement >= 0.97


@pytest.mark.slow
def test_eval_cli_onnx_runtime(digits_model, tmp_path, reference):
    """--runtime ort exports both models (verified against PyTorch) and scores them in ONNX Runtime."""
    rep = tmp_path / "rep"
    run_ok(["eval", "--config", str(digits_model.config_path), "--r", "8", "--runtime", "ort",
            "--report-dir", str(rep)])
    data = json.loads((rep / "report.json").read_text())["data"]
    assert data["runtime"] == "ort"
    un, me = data["eval"]["models"]["unmerged"], data["eval"]["models"]["merged"]
    assert un["top1"] == pytest.approx(reference[0], abs=1e-9)
    assert me["top1"] >= un["top1"] - 0.03 and me["top1_agreement_with_reference"] >= 0.95
