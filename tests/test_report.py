"""Report files and plots: JSON parses, Markdown has the tables, PNGs are real images, Pareto is right."""
import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitmerge.errors import OutputPathError

from vitmerge.profiling import plots
from vitmerge.profiling.energy import EnergyResult
from vitmerge._io import atomic_write
from vitmerge.profiling.report import md_table, machine_info, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes
    from matplotlib.image import imread

    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.01  # something was drawn, not a blank canvas


@dataclass
class Row:
    x: float
    y: float


def test_write_report_json_and_markdown(tmp_path):
    d = tmp_path / "rep" / "sub"  # parents created
    data = {"rows": [Row(1.0, float("nan")), Row(2.5, 3.0)], "path": tmp_path, "arr": np.arange(3),
            "inf": float("inf"), "n": np.float32(1.5)}
    table = md_table(["model", "batch", "p50 ms"], [("a.onnx", 1, 1.23456), ("b.onnx", 8, None)])
    paths = write_report(d, "my report", data, [("Latency", "intro\n\n" + table)], plots=[])
    doc = json.loads(paths.json.read_text())  # strict JSON: NaN/inf became null
    assert doc["name"] == "my report"
    assert doc["data"]["rows"] == [{"x": 1.0, "y": None}, {"x": 2.5, "y": 3.0}]
    assert doc["data"]["arr"] == [0, 1, 2] and doc["data"]["inf"] is None and doc["data"]["n"] == 1.5
    assert doc["data"]["path"] == str(tmp_path)
    m = doc["machine"]
    assert m["logical_cores"] == os.cpu_count() and isinstance(m["gpus"], list) and m["cpu"]
    assert m["onnxruntime"] and m["torch"]
    md = paths.markdown.read_text()
    assert md.startswith("# my report\n")
    assert "## Machine" in md and "| CPU |" in md and "| GPU |" in md and "## Latency" in md
    lines = md.splitlines()
    i = lines.index("| model | batch | p50 ms |")
    assert lines[i + 1] == "|:---|---:|---:|"
    assert lines[i + 2] == "| a.onnx | 1 | 1.235 |" and lines[i + 3] == "| b.onnx | 8 | — |"
    assert sorted(p.name for p in d.iterdir()) == ["report.json", "report.md"]  # no temp files left


def test_md_table_formats_and_escapes():
    t = md_table(["a|b", "x"], [("p|q", 1234.5678)], formats=[None, ",.1f"])
    assert t.splitlines() == ["| a\\|b | x |", "|:---|---:|", "| p\\|q | 1,234.6 |"]


def test_machine_info_matches_torch():
    import torch

    info = machine_info()
    assert info["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert info["gpus"] == []


def test_report_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        write_report(f, "r", {})


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "report.json"
    atomic_write(p, "old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write(p, "new")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


# ------------------------------------------------------------------------------------- Pareto


def brute_force_front(points):
    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return {i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)}


def test_pareto_front_example():
    pts = [(10.0, 0.80), (5.0, 0.70), (7.0, 0.70), (5.0, 0.60), (12.0, 0.85), (12.0, 0.85), (3.0, 0.50)]
    front = plots.pareto_front(pts)
    assert front == [6, 1, 0, 4, 5]  # fastest first; both copies of the (12, 0.85) point kept
    assert set(front) == brute_force_front(pts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_pareto_front_matches_brute_force(raw):
    pts = [(float(a), float(b) / 10) for a, b in raw]  # small ranges force ties
    front = plots.pareto_front(pts)
    assert set(front) == brute_force_front(pts)
    assert len(front) == len(set(front))
    lat = [pts[i][0] for i in front]
    assert lat == sorted(lat)


# ------------------------------------------------------------------------------------- plots


def test_plots_are_valid_pngs(tmp_path):
    rows = [{"runtime": rt, "batch": b, "r": r, "p50_ms": 10 - r / 4 + b, "p90_ms": 11 - r / 4 + b}
            for rt, b, r in itertools.product(["ort", "torch"], [1, 8], [0, 8, 16])]
    assert_png(plots.plot_latency_vs_r(rows, tmp_path / "lat.png"))

    pts = [{"label": f"{m} r={r}", "method": m, "latency_ms": 10 - r / 3 + k, "accuracy": 0.8 - r / 100 - k / 50}
           for k, m in enumerate(["tome", "hashing"]) for r in (0, 8, 16)]
    base = {"label": "MobileViT-S", "method": "baseline", "latency_ms": 7.0, "accuracy": 0.78}
    assert_png(plots.plot_pareto(pts, tmp_path / "pareto.png", baseline=base))

    measured = [{"runtime": "ort", "r": r, "energy": EnergyResult(True, source="rapl:package-0", seconds=2.0,
                                                                  images=100, joules=20.0 - r / 2, idle_watts=3.0)}
                for r in (0, 8, 16)]
    path, note = plots.plot_energy_vs_r(measured, tmp_path / "energy.png")
    assert note is None
    assert_png(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["energy.png", "lat.png", "pareto.png"]


def test_energy_plot_skipped_with_reason(tmp_path):
    rows = [{"runtime": "ort", "r": r, "energy": EnergyResult(False, reason="RAPL not available: no zones")}
            for r in (0, 8)]
    path, note = plots.plot_energy_vs_r(rows, tmp_path / "energy.png")
    assert path is None and not (tmp_path / "energy.png").exists()
    assert note == "energy per image vs r: not plotted, energy not measured (RAPL not available: no zones)"


def test_energy_result_above_idle_arithmetic():
    e = EnergyResult(True, source="x", seconds=2.0, images=50, joules=30.0, idle_watts=5.0, idle_seconds=2.0)
    assert e.joules_per_image == pytest.approx(0.6)
    assert e.watts == pytest.approx(15.0)
    assert e.joules_per_image_above_idle == pytest.approx((30.0 - 10.0) / 50)
    assert "idle baseline 5.0 W" in e.describe()
    assert math.isclose(e.to_dict()["joules_per_image"], 0.6)
