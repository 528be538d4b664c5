"""bench/gpu.sh, the one call for the day a GPU is lent, run here in its --dry-run mode (CPU, tiny sizes).

The GPU session is short and rare: the script must not fail there for a reason the CPU could have shown.
The dry run goes through the same code (environment, latency rows, the JSON and Markdown written), and every
CUDA part is reported as skipped with its reason instead of being left out.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", str(out)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def test_dry_run_writes_both_files_with_every_part(dry_run):
    out, stdout = dry_run
    res = json.loads((out / "gpu.json").read_text())
    assert res["dry_run"] is True and res["environment"]["torch"]
    assert {"selftest", "latency", "triton", "energy", "seconds"} <= set(res)
    # latency: every variant at both dry-run batches, measured eagerly on the CPU with a positive median
    eager = [r for r in res["latency"] if r.get("mode") == "eager"]
    assert {(r["variant"], r["batch"]) for r in eager} == {(v, b) for v in ("unmerged", "tome r=16", "hash r=16")
                                                          for b in (1, 2)}
    assert all(r["p50_ms"] > 0 and r["device"] == "cpu" for r in eager)
    assert all("speedup" in r for r in eager if r["variant"] != "unmerged")
    # the CUDA parts: present, each skipped with a reason
    graphs = [r for r in res["latency"] if r.get("mode") == "cuda graph"]
    assert graphs and all(r["status"] == "skipped" and r["reason"] for r in graphs)
    for part in ("triton", "energy"):
        assert res[part] and all(r["status"] == "skipped" and r["reason"] for r in res[part])
    md = (out / "gpu.md").read_text()
    assert "dry run" in md and "| ViT-Ti" in md and "skipped" in md
    assert "wrote" in stdout and str(out / "gpu.json") in stdout


def test_usage_error_without_outdir():
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True)
    assert p.returncode != 0 and "usage: bash bench/gpu.sh" in p.stderr
