"""`vitmerge selftest`: the CPU rows pass on this machine, the GPU rows skip with their reasons, a failure exits 1."""
from __future__ import annotations

import torch
from typer.testing import CliRunner

from vitmerge import selftest
from vitmerge.cli import app
from vitmerge.errors import VerificationError

runner = CliRunner()


def test_quick_selftest_passes_the_cpu_paths_and_names_what_it_skips(tmp_path):
    res = runner.invoke(app, ["selftest", "--quick", "--report-dir", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    lines = res.output.splitlines()
    for path in ("tome: ONNX Runtime CPU, standard form", "tome: PyTorch CPU", "native form", "plugin form",
                 "FP16 export, ONNX Runtime CPU"):
        assert any(line.startswith("PASS ") and path in line for line in lines), path
    if not torch.cuda.is_available():
        assert "SKIP tome: PyTorch CUDA" in text and "no CUDA device" in text
        assert "SKIP tome: Triton merge kernel (compiled, CUDA)" in text
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "SKIP tome: TensorRT engine" in text and "TensorRT not installed" in text
    assert "'vitmerge[tensorrt]'" in text  # library text is printed as written (no markup eaten)
    assert "PASSED selftest:" in text and " 0 failed" in text
    assert (tmp_path / "rep" / "report.json").is_file()


def test_a_failing_path_is_a_fail_row_and_exit_1(monkeypatch):
    def broken_export(model, path, **kw):
        raise VerificationError("ONNX Runtime output differs from PyTorch: batch 1: max|diff| 3 (tol 1e-3)")

    monkeypatch.setattr(selftest, "export", broken_export)
    seen = []
    result = selftest.run(methods=["tome"], on_row=seen.append)
    by_path = {r.path: r for r in result.rows}
    assert by_path["tome: ONNX Runtime CPU, standard form"].status == "FAIL"
    assert "max|diff| 3" in by_path["tome: ONNX Runtime CPU, standard form"].detail
    assert by_path["tome: PyTorch CPU"].status == "SKIP"  # no reference to compare with: said, not failed
    assert not result.ok and seen == result.rows
    res = runner.invoke(app, ["selftest", "--quick"])
    assert res.exit_code == 1 and "FAILED selftest" in res.output
