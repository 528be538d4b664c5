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
            "digits train", "vocab build"} <= set(found)
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


def test_profile_separates_timm_options_from_runtime_options():
    text = flat(runner.invoke(app, ["profile", "--help"], env={"COLUMNS": "250"}).output)
    panel = text.index("timm:NAME and transformers folders (PyTorch eager)")
    for opt in ("--checkpoint", "--method", "--r ", "--img-size", "--device", "--frames", "--audio-length"):
        assert text.index(opt, panel) > panel, f"{opt} belongs to the timm:NAME panel"
    for opt in ("--runtime", "--threads"):
        assert text.index(opt) < panel


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
