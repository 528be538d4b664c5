"""``vitmerge package``: a Triton Inference Server model repository from an .onnx file or a TensorRT engine."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import console, user_errors
from ._options import InstanceKind, value


def register(app: typer.Typer) -> None:
    @app.command("package", short_help="Triton Inference Server model repository from an .onnx file or an engine.")
    def package_cmd(
        model: Path = typer.Argument(..., metavar="MODEL", exists=True, help="MODEL.onnx, or a TensorRT engine (.engine/.plan) with its metadata JSON next to it"),
        repo: Path = typer.Option(..., "--repo", help="Model repository folder (created if missing)"),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in the repository (default: the file's stem)"),
        max_batch: int = typer.Option(32, "--max-batch", help="max_batch_size; 0 disables batching"),
        version: int = typer.Option(1, "--version", help="Version folder to write the model into"),
        plugin_lib: Optional[Path] = typer.Option(None, "--plugin-lib", help="Custom-op / plugin shared library for graphs with vitmerge::TokenMerge nodes"),
        server_repo: Optional[str] = typer.Option(None, "--server-repo", help="Where the server sees --repo (e.g. /models in a container); used for library paths"),
        instance_kind: InstanceKind = typer.Option("auto", "--instance-kind", case_sensitive=False, help="instance_group kind (auto: gpu for engines, cpu for ONNX)"),
        instances: int = typer.Option(1, "--instances", help="Model instances (per GPU for gpu)"),
        queue_delay_us: int = typer.Option(0, "--queue-delay-us", help="Dynamic batching: max microseconds a request waits for a fuller batch"),
        no_dynamic_batching: bool = typer.Option(False, "--no-dynamic-batching", help="Do not enable dynamic batching"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder of the same name"),
        onnx_source: Optional[Path] = typer.Option(None, "--onnx", help="For an engine: the ONNX file it was built from, when its metadata does not list inputs/outputs and the recorded path moved"),
    ):
        """Write REPO/NAME/config.pbtxt and REPO/NAME/VERSION/model.(onnx|plan) for Triton Inference Server."""
        from ..packaging.triton import package

        with user_errors():
            res = package(model, repo, name=name, max_batch=max_batch, version=version, plugin_lib=plugin_lib,
                          server_repo=server_repo, instance_kind=value(instance_kind), instances=instances,
                          queue_delay_us=queue_delay_us, dynamic_batching=not no_dynamic_batching, overwrite=overwrite,
                          onnx_source=onnx_source)
            console.print(f"[bold green]wrote[/] {res.model_dir} ({res.platform}, max_batch_size {res.max_batch_size})")
            console.print(f"  {res.config_path}")
            console.print(f"  {res.model_file}")
            for note in res.notes:
                console.print(f"[yellow]note:[/] {note}")
            console.print(f"serve with: {res.launch}")
