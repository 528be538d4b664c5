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


def test_num_classes_in_model_kwargs_is_taken_and_a_contradiction_is_one_line(tiny_checkpoint, tmp_path):
    """The digits model's model_kwargs.json (written "for --model-kwargs") carries num_classes: export raised
    TypeError (num_classes given twice). It is one value: taken from either place; two different ones refused."""
    kw = '{"patch_size": 8, "depth": 12, "num_classes": 3}'
    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint), "--img-size", "32",
                              "--model-kwargs", kw, "--r", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3
    out.unlink()
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint), "--img-size", "32",
                              "--model-kwargs", kw, "--num-classes", "5", "-o", str(out)])
    one_line_error(res, "--num-classes 5 contradicts num_classes 3 in --model-kwargs")
    assert [p for p in tmp_path.iterdir()] == []


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
                              "--calibrator", "minmax"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = " ".join(res.output.split())
    assert "names no preprocessing" in text and "ImageNet defaults" in text
    assert out.is_file() and any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)


# ------------------------------------------------------------------ nothing left behind after a kill


def _export_process(out: Path):
    args = [sys.executable, "-m", "vitmerge.cli", "export", "vit_tiny_patch16_224", "--img-size", "32",
            "--model-kwargs", '{"patch_size": 8, "depth": 2}', "--r", "2", "-o", str(out)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_partial(folder: Path, name: str, proc, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = [p for p in folder.iterdir() if p.name.startswith(f".{name}.partial-")]
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError("export ended before writing: " + proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("no staging folder appeared")


def test_sigterm_during_export_leaves_nothing(tmp_path):
    out = tmp_path / "m.onnx"
    proc = _export_process(out)
    _wait_for_partial(tmp_path, "m.onnx", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # no .m.onnx.partial-*, no m.onnx


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exception, on purpose
def test_a_swallowed_sigterm_still_publishes_nothing(tmp_path, monkeypatch):
    """The handler's KeyboardInterrupt is lost when the signal lands while a finaliser runs (Python prints
    "Exception ignored in ..." and goes on): the full suite once saw an export exit 0 after SIGTERM. The signal is
    remembered, and staged() refuses to move outputs into place once one arrived."""
    from vitmerge import _io

    monkeypatch.setattr(_io, "_TERMINATED", [])
    out = tmp_path / "m.onnx"
    out.write_text("old")

    class Finaliser:
        def __del__(self):  # what the signal handler does, raised where Python cannot propagate it
            _io.note_termination(signal.SIGTERM)
            raise KeyboardInterrupt("terminated")

    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with _io.staged(out) as stage:
            (stage / "m.onnx").write_text("new")
            f = Finaliser()
            del f  # the exception inside __del__ is swallowed: the block carries on to its end
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    """SIGKILL cannot be caught: the staging folder stays, named with the dead process's id; the next write of
    the same output removes it (and leaves other processes' folders alone)."""
    from vitmerge._io import clean_stale, scratch, staged

    out = tmp_path / "m.onnx"
    proc = _export_process(out)
    (partial,) = _wait_for_partial(tmp_path, "m.onnx", proc)
    proc.kill()
    proc.wait(timeout=60)
    assert partial.exists() and f"-{proc.pid}-" in partial.name
    alive = tmp_path / f".m.onnx.partial-{os.getpid()}-keep"  # a live process's: not touched
    alive.mkdir()
    with staged(out) as stage:
        (stage / "m.onnx").write_bytes(b"x")
    assert not partial.exists() and alive.exists() and out.read_bytes() == b"x"
    # scratch folders in the temporary directory: the same rule
    import tempfile

    dead = Path(tempfile.gettempdir()) / f"vitmerge-test-scratch-{proc.pid}-abc"
    dead.mkdir(exist_ok=True)
    with scratch("vitmerge-test-scratch-") as d:
        assert d.is_dir() and f"-{os.getpid()}-" in d.name and not dead.exists()
    assert not d.exists()
    assert clean_stale(tmp_path, ".m.onnx.partial-") == 0  # nothing stale left


# ------------------------------------------------------------------ random weights: seeded, and check names them


def test_exports_without_a_checkpoint_are_one_model_and_check_says_when_weights_differ(tmp_path):
    """Two exports without --checkpoint (say, two graph forms) are the same model: the random weights come from
    --seed (default 0, printed). Files of two different seeds: `check` says the weights differ, not only that the
    outputs do."""
    base = ["export", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", '{"patch_size": 8, "depth": 2}',
            "--r", "2", "--verify-batch", "1"]
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    res = runner.invoke(app, base + ["-o", str(a)])
    assert res.exit_code == 0, res.output
    assert "RANDOM weights (seed 0; --seed draws others)" in " ".join(res.output.split())
    assert runner.invoke(app, base + ["--merge-op", "standard", "-o", str(b)]).exit_code == 0
    assert runner.invoke(app, base + ["--seed", "1", "-o", str(c)]).exit_code == 0
    same = runner.invoke(app, ["check", str(a), str(b), "--atol", "0", "--rtol", "0"])
    assert same.exit_code == 0, same.output
    assert "weight tensors both files hold are identical" in " ".join(same.output.split())
    other = runner.invoke(app, ["check", str(a), str(c)])
    text = " ".join(other.output.split())
    assert other.exit_code == 1 and "the two files have different weights" in text and "same --seed" in text


# ------------------------------------------------------------------ eval: the model's classes against the data's


def test_eval_warns_when_the_model_has_more_outputs_than_the_data_has_classes(tiny_checkpoint, image_folder, tmp_path):
    base = ["eval", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", '{"patch_size": 8, "depth": 1}',
            "--r", "2", "--data"]
    res = runner.invoke(app, base + [str(image_folder)])  # 1000 outputs, 3 classes
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "has 1000 outputs but the data has 3 classes (imagefolder)" in text and "--num-classes 3" in text
    res = runner.invoke(app, base + [str(image_folder), "--num-classes", "3"])  # eval takes export's model options
    assert res.exit_code == 0, res.output
    assert "outputs but the data has" not in " ".join(res.output.split())
    two = tmp_path / "two"  # a 3-class checkpoint on a 2-class folder
    for c in ("c0", "c1"):
        (two / c).mkdir(parents=True)
        for f in (image_folder / c).iterdir():
            (two / c / f.name).write_bytes(f.read_bytes())
    res = runner.invoke(app, ["eval", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint), "--img-size", "32",
                              "--model-kwargs", '{"patch_size": 8}', "--r", "2", "--data", str(two)])
    assert res.exit_code == 0, res.output
    assert "has 3 outputs but the data has 2 classes" in " ".join(res.output.split())


# ------------------------------------------------------------------ contradictory options, -v / -q anywhere


@pytest.mark.parametrize("extra,needle", [
    (["--budget", "0.8", "--r", "4"], "--r 4 and --budget 0.8 contradict each other"),
    (["--budget", "0.8", "--schedule", "decreasing"], "--schedule decreasing applies to --r; with --budget"),
])
def test_export_refuses_contradictory_options(extra, needle, tmp_path):
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", "--img-size", "32", "-o", str(tmp_path / "m.onnx"),
                              *extra])
    one_line_error(res, needle)
    assert list(tmp_path.iterdir()) == []


def test_verbosity_flags_work_after_the_command_name(tmp_path):
    """-q / -v are the group's options; they used to work only before the command name."""
    from vitmerge.cli import _Group

    assert _Group.parse_args.__qualname__.startswith("_Group")
    src = tmp_path / "foreign.onnx"
    _foreign_onnx(src)
    loud = runner.invoke(app, ["check", str(src), "--target", "tensorrt"])
    quiet = runner.invoke(app, ["check", str(src), "--target", "tensorrt", "-q"])
    assert loud.exit_code == quiet.exit_code == 0, quiet.output
    assert "PASSED" in loud.output and quiet.output.strip() == ""
    # anything after `--` is left where it is
    res = runner.invoke(app, ["check", "--", str(src), "-q"])
    assert res.exit_code == 2  # "-q" was taken as the second file, not moved
