"""The CLI's shape: one-line help per command, choices from the library's own lists, -v / -q wired to logging."""
from __future__ import annotations

import logging

import pytest
import typer
from typer.testing import CliRunner

from vitmerge.cli import app
from vitmerge.merging import available_methods
from vitmerge.metadata import MERGE_OPS

runner = CliRunner()
PROFILE_TINY = ["profile", "timm:vit_tiny_patch16_224", "--img-size", "32", "--r", "1", "--batch", "1",
                "--rounds", "1", "--iters", "1", "--warmup", "0", "--no-energy"]


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def commands(group=None, prefix=""):
    """(name, click command) for every command, sub-commands included."""
    cmd = group or typer.main.get_command(app)
    for name, sub in cmd.commands.items():
        if hasattr(sub, "commands"):
            yield from commands(sub, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", sub


def test_every_command_has_a_one_line_summary():
    found = dict(commands())
    assert {"export", "check", "build", "eval", "calibrate", "profile", "package", "visualize", "demo",
            "digits train", "vocab build", "tune"} <= set(found)
    for name, cmd in found.items():
        short = cmd.short_help or ""
        assert short and "\n" not in short and short.endswith(".") and len(short) <= 100, (name, short)
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for name, cmd in found.items():
        if " " not in name:
            assert cmd.short_help in flat(res.output), f"{name}: the summary is shown whole in `vitmerge --help`"


def test_choices_come_from_the_library():
    res = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "250"})
    text = flat(res.output)
    assert "|".join(available_methods()) in text.replace(" ", "")
    assert "|".join(MERGE_OPS) in text.replace(" ", "")


MODEL_OPTIONS = ("--checkpoint", "--config", "--model-kwargs", "--num-classes", "--img-size", "--seed")
MERGE_OPTIONS = ("--method", "--r", "--schedule", "--budget", "--budget-latency", "--option", "--prop-attn")


def _params(*path):
    import typer.main

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {opt: p for p in cmd.params for opt in p.opts}


@pytest.mark.parametrize("cmd", [("export",), ("eval",), ("profile",), ("visualize",)])
def test_every_command_that_builds_a_model_takes_the_same_model_and_merge_options(cmd):
    """#21: --r was declared in five commands with three types and four defaults (16, 8, 0, none), profile had no
    --model-kwargs, eval no --num-classes; now one declaration each, the same names, types and defaults."""
    mine, ref = _params(*cmd), _params("export")
    for opt in MODEL_OPTIONS + MERGE_OPTIONS + ("--frames", "--audio-length"):
        if cmd == ("visualize",) and opt in ("--frames", "--audio-length"):
            continue  # draws image patch grids only
        assert opt in mine, f"{cmd[0]} lacks {opt}"
        a, b = mine[opt], ref[opt]
        assert (a.default, a.is_flag, a.multiple, a.help) == (b.default, b.is_flag, b.multiple, b.help), opt
    assert mine["--r"].default is None and mine["--method"].default == "tome"


def test_vocab_build_takes_the_model_options_and_calibrate_names_its_calibrator():
    vocab, cal = _params("vocab", "build"), _params("calibrate")
    for opt in ("--checkpoint", "--config", "--model-kwargs", "--img-size", "--seed"):
        assert opt in vocab, opt
    assert "--calibrator" in cal and not cal["--method"].help  # --method is only a hidden pointer to --calibrator
    for c in (("eval",), ("calibrate",)):
        assert {"--batch", "--batch-size", "-b"} <= set(_params(*c)), c


@pytest.fixture
def restore_logging():
    log = logging.getLogger("vitmerge")
    level, handlers, propagate = log.level, list(log.handlers), log.propagate
    yield
    log.setLevel(level)
    log.handlers[:] = handlers
    log.propagate = propagate
    from vitmerge.commands._common import console

    console.quiet = False


def test_verbose_logs_what_the_library_decides(restore_logging):
    res = runner.invoke(app, ["-v", *PROFILE_TINY])
    assert res.exit_code == 0, res.output
    text = flat(res.output)
    assert "vitmerge.models.apply: tome: r per block [1," in text  # INFO from the library
    assert "torch/cpu" in text  # and the normal output
    res = runner.invoke(app, PROFILE_TINY)
    assert res.exit_code == 0 and "r per block" not in res.output


def test_quiet_prints_no_tables_but_errors_still_show(restore_logging):
    res = runner.invoke(app, ["-q", *PROFILE_TINY])
    assert res.exit_code == 0, res.output
    assert "torch/cpu" not in res.output and "p50" not in res.output  # no table
    assert "warning: no --checkpoint given" in res.output  # warnings still show
    res = runner.invoke(app, ["-q", "export", "no_such_model_xyz", "-o", "x.onnx"])
    assert res.exit_code == 2 and "error:" in res.output and "no_such_model_xyz" in res.output


# ------------------------------------------------------------------ start-up: --help and argument errors stay light


def _torch_loaded_after(argv):
    """Run `vitmerge ARGV` in a fresh interpreter; (exit code, whether torch got imported, output)."""
    import subprocess
    import sys

    code = ("import sys\nfrom vitmerge.cli import app\n"
            "try:\n    app(sys.argv[1:], prog_name='vitmerge')\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH-LOADED' if 'torch' in sys.modules else 'TORCH-NOT-LOADED', code)\n")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    return p.stdout + p.stderr


@pytest.mark.parametrize("argv", [
    ["--help"], ["export", "--help"], ["eval", "--help"],
    ["export", "vit_small_patch16_224", "-o", "x.txt"],                    # a wrong output suffix
    ["export", "vit_small_patch16_224", "-o", "/tmp/x.onnx", "--r", "abc"],  # a malformed --r
    ["profile", "a.onnx", "--batch", "0"], ["check", "a.onnx", "b.onnx"], ["check", "a.onnx", "a.onnx", "--batch=-1"],
    ["build", "missing.onnx", "-o", "m.engine"], ["package", "missing.onnx", "--repo", "r"],
    ["export", "--method", "nope", "m", "-o", "m.onnx"],
    ["tune", "--help"], ["tune", "m", "--data", "d", "--max-drop", "1", "--target-ms", "2"],  # two targets
    ["tune", "m", "--data", "d", "--max-drop", "1", "--budgets", "0.5,2"],                   # a budget outside (0, 1]
])
def test_help_and_argument_errors_do_not_import_torch(argv):
    """`--help` and argument errors answer before torch (2-3 s of imports on a laptop) is loaded: every command
    module imports only light modules at the top, and commands check their arguments before the library."""
    out = _torch_loaded_after(argv)
    assert "TORCH-NOT-LOADED" in out, out[-2000:]
    if argv[-1] != "--help" and argv != ["--help"]:
        assert "Traceback" not in out and ("error" in out.lower() or "invalid" in out.lower()), out[-2000:]


def test_cli_choice_lists_are_the_librarys():
    """The choices are written out in commands/_options.py (importing the library's lists costs torch): they must
    stay equal to the lists they stand for."""
    from vitmerge.backends.base import DEVICES, RUNTIMES
    from vitmerge.calibration import CALIBRATION_METHODS
    from vitmerge.commands import _options as o
    from vitmerge.data.detection import CLASS_MAPS
    from vitmerge.data.imagenet import CLASS_ORDERS
    from vitmerge.merging import available_methods
    from vitmerge.merging.schedule import SCHEDULES
    from vitmerge.models.precision import DTYPES

    assert list(o.METHODS) == available_methods()
    assert (o.RUNTIMES, o.DEVICES, o.CALIBRATION_METHODS, o.CLASS_MAPS, o.CLASS_ORDERS, o.SCHEDULES) == \
        (tuple(RUNTIMES), tuple(DEVICES), tuple(CALIBRATION_METHODS), tuple(CLASS_MAPS), tuple(CLASS_ORDERS),
         tuple(SCHEDULES))
    assert list(o.DTYPES) == list(DTYPES)
