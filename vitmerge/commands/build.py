"""``vitmerge build MODEL.onnx --output model.engine``: a TensorRT engine with a batch optimisation profile."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import console, loud_warnings, user_errors


def register(app: typer.Typer) -> None:
    @app.command("build", short_help="TensorRT engine from an exported ONNX file (needs TensorRT and an NVIDIA GPU).")
    def build_cmd(
        model: Path = typer.Argument(..., metavar="MODEL.onnx", exists=True, dir_okay=False, help="ONNX file from `vitmerge export` (any graph form) or `vitmerge calibrate` (INT8 Q/DQ)"),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the engine (.engine); metadata goes to <name>.json"),
        fp16: bool = typer.Option(False, "--fp16", help="Let TensorRT 10.x pick FP16 kernels for a float32 file (weakly typed build); files that already carry FP16 are built as they are"),
        int8: bool = typer.Option(False, "--int8", help="Require INT8: the file must carry Q/DQ nodes (vitmerge calibrate)"),
        calib_dir: Optional[Path] = typer.Option(None, "--calib-dir", hidden=True, help="Removed: TensorRT's implicit INT8 calibration (use vitmerge calibrate)"),
        min_batch: int = typer.Option(1, "--min-batch", help="Smallest batch the engine accepts"),
        opt_batch: int = typer.Option(8, "--opt-batch", help="Batch TensorRT tunes kernels for"),
        max_batch: int = typer.Option(32, "--max-batch", help="Largest batch the engine accepts"),
        workspace_gb: float = typer.Option(4.0, "--workspace-gb", help="Builder workspace limit in GiB"),
    ):
        """Build a TensorRT engine (needs TensorRT 10.16 to 11.x and an NVIDIA GPU). Precision follows the file:
        FP16/BF16 or Q/DQ files are built strongly typed. Graphs with vitmerge::TokenMerge nodes use the
        TokenMerge plugin (JIT: the engine then runs only where Python and vitmerge are)."""
        from ..backends.trt import BuildRequest, build_engine

        req = BuildRequest(onnx_path=model, output=output, fp16=fp16, int8=int8, calib_dir=calib_dir,
                           min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_gb=workspace_gb)
        with user_errors(), loud_warnings():
            with console.status("building") as status:
                result = build_engine(req, on_step=lambda s: status.update(s))
            info = result.info
            console.print(f"TensorRT {info['tensorrt_version']} on {info['gpu']}: {info['precision']} "
                          f"({info['typing']}ly typed), batch {min_batch}..{max_batch} (opt {opt_batch}), built in "
                          f"{info['build_seconds']} s")
            if info["token_merge_plugin"]:
                console.print("the engine uses the Python (JIT) TokenMerge plugin: it runs in vitmerge (profile, eval), "
                              "not in trtexec or Triton's TensorRT backend")
            console.print(f"[bold green]wrote[/] {result.engine} and {result.metadata}")
