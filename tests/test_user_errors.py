"""Bad inputs a new user hit (issue 23): each is one line saying what is wrong and what to do, never a traceback,
and nothing is left behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper
from PIL import Image
from typer.testing import CliRunner

from vitmerge.cli import app

runner = CliRunner()


def one_line_error(res, *needles):
    out = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (RuntimeError, AssertionError, ValueError)), \
        res.output
    for n in needles:
        assert n in out, out
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A ViT-Ti state dict with a 3-class head."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "ti3.pth"
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(4):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("command", ["export", "eval", "visualize"])
def test_checkpoint_of_another_model_size_is_one_line(command, tiny_checkpoint, image_folder, tmp_path):
    """A ViT-Ti checkpoint into vit_small (names match, shapes do not): one line naming a tensor and the fix."""
    base = ["vit_small_patch16_224", "--checkpoint", str(tiny_checkpoint), "--img-size", "32",
            "--model-kwargs", '{"patch_size": 8}']
    args = {"export": ["export", *base, "-o", str(tmp_path / "m.onnx")],
            "eval": ["eval", *base, "--data", str(image_folder), "--r", "2"],
            "visualize": ["visualize", *base, "--image", str(image_folder / "c0" / "0.png"), "-o", str(tmp_path / "v.png")]}
    res = runner.invoke(app, args[command])
    one_line_error(res, "checkpoint does not fit vit_small_patch16_224", "checkpoint [1, 1, 192] vs model [1, 1, 384]",
                   "another model size", "vit_tiny_patch16_224")
    assert list(tmp_path.iterdir()) == []


def test_num_classes_that_contradict_the_checkpoint_is_one_line(tiny_checkpoint, tmp_path):
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint), "--img-size", "32",
                              "--model-kwargs", '{"patch_size": 8}', "--num-classes", "5", "-o", str(tmp_path / "m.onnx")])
    one_line_error(res, "head.weight: checkpoint [3, 192] vs model [5, 192]",
                   "--num-classes 5 does not match the checkpoint's head: drop --num-classes")
    assert list(tmp_path.iterdir()) == []


def _foreign_onnx(path):
    """An image classifier exported by someone else: no vitmerge metadata (Flatten -> MatMul -> logits)."""
    w = np.random.default_rng(0).standard_normal((3 * 32 * 32, 3)).astype(np.float32) * 0.01
    g = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "foreign", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])],
        [onnx.numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_calibrate_a_file_not_written_by_vitmerge_falls_back_and_says_so(image_folder, tmp_path):
    """The docs promise ImageNet's preprocessing for a file that names none, "and says so": it did raise an
    AssertionError from timm instead."""
    src = _foreign_onnx(tmp_path / "foreign.onnx")
    out = tmp_path / "foreign.int8.onnx"
    res = runner.invoke(app, ["calibrate", str(src), "--data", str(image_folder), "-o", str(out), "--num", "6",
                              "--method", "minmax"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = " ".join(res.output.split())
    assert "names no preprocessing" in text and "ImageNet defaults" in text
    assert out.is_file() and any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
