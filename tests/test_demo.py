"""The README's main job (`vitmerge demo`), end to end on a small setting."""
import json

import pytest

from vitmerge import demo


@pytest.mark.slow
def test_full_demo_small(digits_model, tmp_path):
    settings = demo.DemoSettings(out_dir=tmp_path / "report", methods=["tome"], budgets=[0.75], batches=[1, 2],
                                 rounds=1, iters=1, calib_images=40, vit_s=False, clips=(),
                                 cache_root=digits_model.dir.parent)
    res = demo.run(settings, say=lambda s: None)
    data = json.loads(res.report_json.read_text())["data"]
    rows = data["digits"]
    assert set(rows) == {"unmerged", "tome@0.75", "unmerged fp16", "tome@0.75 fp16", "unmerged int8", "tome@0.75 int8"}
    # ONNX Runtime scores the exported unmerged model exactly as PyTorch scored it after training
    assert rows["unmerged"]["top1"] == pytest.approx(digits_model.test_top1, abs=1 / 449 + 1e-9)
    assert rows["unmerged"]["agreement"] == 1.0
    assert rows["tome@0.75"]["flop_fraction"] <= 0.75 + 1e-6
    assert rows["tome@0.75"]["top1"] >= rows["unmerged"]["top1"] - 0.05
    for k in ("unmerged int8", "tome@0.75 int8"):
        assert abs(rows[k]["top1"] - rows[k.replace(" int8", "")]["top1"]) <= 0.03
        assert rows[k]["quantized_nodes"] > 0
    for k in ("unmerged fp16", "tome@0.75 fp16"):  # FP16 next to FP32 and INT8, scored on the same images
        assert rows[k]["precision"] == "fp16" and rows[k]["r"] == rows[k.replace(" fp16", "")]["r"]
        assert abs(rows[k]["top1"] - rows[k.replace(" fp16", "")]["top1"]) <= 0.01
    for row in rows.values():
        assert set(map(str, row["p50_ms"])) == {"1", "2"} and all(v > 0 for v in row["p50_ms"].values())
    md = res.report_md.read_text()
    assert "energy: not measured" in md
    assert "not run: `vitmerge demo --clips`" in md  # the video / audio rows are behind a flag, and it says so
    # the run time of every phase is in the report (wall and CPU seconds, the digits model came from the cache)
    phases = [p["phase"] for p in data["phases"]]
    assert phases[0] == "digits model (cached)" and "INT8 calibration" in phases and "## Run time" in md
    assert all(p["wall_s"] >= 0 and p["cpu_s"] >= 0 for p in data["phases"])
    assert len(res.plots) == 2
    for p in res.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_cli_demo_clips_flag(monkeypatch, tmp_path):
    """`vitmerge demo` leaves the video / audio rows out (their first-run training would more than double the
    README's few minutes); `--clips` adds demo.CLIP_ROWS; `--no-clips` (the old spelling) still works."""
    from typer.testing import CliRunner

    from vitmerge.cli import app

    seen = []

    def fake_run(settings, say=print, progress=None):
        seen.append(settings)
        md = tmp_path / "report.md"
        md.write_text("## Digits\n")
        return demo.DemoResult(report_md=md, report_json=tmp_path / "report.json", plots=[])

    monkeypatch.setattr(demo, "run", fake_run)
    runner = CliRunner()
    for args in ([], ["--clips"], ["--no-clips"]):
        res = runner.invoke(app, ["demo", "--out-dir", str(tmp_path / "out"), *args])
        assert res.exit_code == 0, res.output
    assert [tuple(s.clips) for s in seen] == [(), demo.CLIP_ROWS, ()]
    assert demo.DemoSettings(out_dir=tmp_path).clips == ()  # the library default matches the command's
    assert {task for task, _, _ in demo.CLIP_ROWS} == {"video", "audio"}


@pytest.mark.slow
def test_demo_video_and_audio_rows(digits_model, tmp_path):
    """The demo's transformers part: trains (or reuses) the VideoMAE and AST demo models next to the digits
    model, exports them unmerged and merged, and scores and times both in ONNX Runtime."""
    from vitmerge.demo import clipmodels

    settings = demo.DemoSettings(out_dir=tmp_path / "report", methods=["tome"], budgets=[0.75], batches=[1],
                                 rounds=1, iters=1, calib_images=20, vit_s=False,
                                 clips=demo.CLIP_ROWS, cache_root=digits_model.dir.parent)
    res = demo.run(settings, say=lambda s: None)
    rows = json.loads(res.report_json.read_text())["data"]["clips"]
    assert [(r["task"], r["model"], r["method"]) for r in rows] == [
        ("video", "VideoMAEForVideoClassification", "tome"), ("audio", "ASTForAudioClassification", "hash")]
    for row in rows:
        cm = clipmodels.cached(row["task"], root=digits_model.dir.parent)  # the cached model, no retraining
        assert cm.cached
        # ONNX Runtime scores the exported unmerged model as PyTorch scored it after training (one clip of slack)
        assert row["top1_unmerged"] == pytest.approx(cm.test_top1, abs=1 / row["clips"] + 1e-9)
        assert row["flop_fraction"] <= 0.5 + 1e-6 and row["tokens_out"] < row["tokens_in"]
        assert row["top1_merged"] >= row["top1_unmerged"] - 0.1
        assert all(v > 0 for v in row["p50_ms"]["merged"].values())
    assert "Video and audio transformers" in res.report_md.read_text()
    phases = [p["phase"] for p in json.loads(res.report_json.read_text())["data"]["phases"]]
    assert any(p.startswith("video + audio models (audio ") for p in phases)  # trained or cached, it says which
