"""``vitmerge build MODEL.onnx --output model.engine``: a TensorRT engine with a batch optimisation profile."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import console, loud_warnings, user_errors


def register(app: typer.Typer) -> None:
    @app.command("build", short_help="TensorRT engine from an exported ONNX file (needs TensorRT and an NVIDIA GPU).")
    def build_cmd(
        model: Path = typer.Argument(..., metavar="MODEL.onnx", help="ONNX file from `vitmerge export` (any graph form)"),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the engine (.engine); metadata goes to <name>.json"),
        fp16: bool = typer.Option(False, "--fp16", help="Allow FP16 kernels"),
        int8: bool = typer.Option(False, "--int8", help="Allow INT8 kernels (Q/DQ graph, or calibrate with --calib-dir)"),
        calib_dir: Optional[Path] = typer.Option(None, "--calib-dir", help="Local folder of calibration images for --int8 (ImageNet mean/std)"),
        min_batch: int = typer.Option(1, "--min-batch", help="Smallest batch the engine accepts"),
        opt_batch: int = typer.Option(8, "--opt-batch", help="Batch TensorRT tunes kernels for"),
        max_batch: int = typer.Option(32, "--max-batch", help="Largest batch the engine accepts"),
        workspace_gb: float = typer.Option(4.0, "--workspace-gb", help="Builder workspace limit in GiB"),
    ):
        """Build a TensorRT engine (needs TensorRT 10 and an NVIDIA GPU). Graphs with vitmerge::TokenMerge
        nodes load the TokenMerge plugin (Triton kernel)."""
        from ..backends.trt import BuildRequest, build_engine

        req = BuildRequest(onnx_path=model, output=output, fp16=fp16, int8=int8, calib_dir=calib_dir,
                           min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_gb=workspace_gb)
        with user_errors(), loud_warnings():
            with console.status("building") as status:
                result = build_engine(req, on_step=lambda s: status.update(s))
            info = result.info
            console.print(f"TensorRT {info['tensorrt_version']} on {info['gpu']}: {info['precision']}, batch "
                          f"{min_batch}..{max_batch} (opt {opt_batch}), built in {info['build_seconds']} s")
            console.print(f"[bold green]wrote[/] {result.engine} and {result.metadata}")
