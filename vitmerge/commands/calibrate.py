"""``vitmerge calibrate``: static INT8 QDQ quantization from real images, with FP32 vs INT8 accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import typer
from rich.table import Table

from ._common import console, err_console, fail, loud_warnings, model_source, user_errors
from ._options import (BatchOpt, CalibrationMethod, ConfigOpt, DataOpt, ImgSizeOpt, LabelsOpt, ModelKwargsOpt,
                       ReportDirOpt, value)


def register(app: typer.Typer) -> None:
    @app.command("calibrate", short_help="INT8 Q/DQ quantization from real images; FP32 vs INT8 accuracy.")
    def calibrate_cmd(
        model: Annotated[Path, typer.Argument(metavar="MODEL.onnx", exists=True, dir_okay=False, help="FP32 ONNX file from `vitmerge export` (merged or not)")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the INT8 QDQ .onnx file")],
        data: DataOpt = None,
        num: Annotated[int, typer.Option("--num", "-n", help="Calibration images (a train/ split is used when there is one)")] = 256,
        calibrator: Annotated[CalibrationMethod, typer.Option(
            "--calibrator", case_sensitive=False, help="ONNX Runtime's calibrator")] = "entropy",
        baseline: Annotated[Optional[Path], typer.Option(
            "--baseline", help="The unmerged model's FP32 .onnx: also quantized, giving the four corners "
                               "(merged/unmerged x FP32/INT8)")] = None,
        baseline_output: Annotated[Optional[Path], typer.Option(
            "--baseline-output", help="Where the baseline's INT8 file goes (default: next to --output, NAME.int8.onnx)")] = None,
        config: ConfigOpt = None,
        model_name: Annotated[Optional[str], typer.Option(
            "--model", help="The model the file came from (a timm name, timm:NAME, dense:NAME or a transformers "
                            "folder), for its preprocessing (mean/std, resize, crop) when the file does not record it")] = None,
        model_kwargs: ModelKwargsOpt = None,
        img_size: ImgSizeOpt = None,
        labels: LabelsOpt = None,
        eval_limit: Annotated[Optional[int], typer.Option(
            "--eval-limit", help="Images scored for FP32 vs INT8 accuracy (default: all not used for calibration)")] = None,
        no_eval: Annotated[bool, typer.Option("--no-eval", help="Only quantize; skip the accuracy comparison")] = False,
        batch_size: BatchOpt = 16,
        per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel")] = True,
        keep_merge_float: Annotated[bool, typer.Option(
            "--keep-merge-float/--quantize-merge",
            help="Leave the token-merge subgraphs in float (their MatMul decides which tokens merge)")] = True,
        report_dir: ReportDirOpt = None,
        method_opt: Annotated[Optional[str], typer.Option("--method", hidden=True)] = None,
    ):
        """Quantize MODEL.onnx to INT8 (static, QDQ) from real images; report FP32 vs INT8 top-1 on held-out images."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with user_errors():
            if method_opt is not None:
                raise fail(f"calibrate's calibrator is --calibrator {method_opt} (--method is the merge method in every "
                           "command)")
            if batch_size <= 0:
                raise fail(f"--batch must be at least 1, got {batch_size}")
        from ..calibration.workflow import calibrate_files, plan_outputs
        from ..profiling.report import md_table, prepare_dir, write_report

        with user_errors(), loud_warnings():
            jobs = plan_outputs(model, output, baseline, baseline_output)
            if report_dir is not None:
                prepare_dir(report_dir)
            source = None
            if config is not None or model_name is not None:
                source = model_source(model_name, None, config, model_kwargs, img_size)

            def on_sets(run):
                for w in run.warnings:
                    err_console.print(f"[bold yellow]warning:[/] {w}")
                cfg = run.data_config
                console.print(f"calibration: {len(run.calibration_set)} images from "
                              f"{run.source}; "
                              f"preprocessing {cfg['input_size']}, mean {cfg.get('mean')}, std {cfg.get('std')}, "
                              f"crop {cfg.get('crop_pct')}")
                if len(run.calibration_set) < num:
                    console.print(f"  [yellow]only {len(run.calibration_set)} images available (asked for {num})[/]")

            def on_file(res):
                for b in bars:
                    b.stop()
                console.print(f"[bold green]wrote[/] {res.path}: {res.quantized_nodes} INT8 nodes, "
                              f"{len(res.excluded_nodes)} merge-step nodes kept in float ({res.seconds:.1f} s)")
                for n in res.notes:
                    console.print(f"  [dim]{n}[/]")

            bars = []

            def progress(description, total):
                prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=True, disable=console.quiet)
                prog.start()
                bars.append(prog)
                task = prog.add_task(description, total=total)
                return lambda n: prog.advance(task, n)

            try:
                run = calibrate_files(jobs, data, source=source, num=num, calibrator=value(calibrator), labels=labels,
                                      eval_limit=eval_limit, evaluate_accuracy=not no_eval, batch_size=batch_size,
                                      per_channel=per_channel, keep_merge_float=keep_merge_float, on_sets=on_sets,
                                      progress=progress, on_file=on_file)
            finally:
                for b in bars:
                    b.stop()
            acc = run.accuracy
            if acc is not None:
                ev = run.eval_set
                t = Table(title=f"ONNX Runtime CPU, {acc.images} held-out images ({ev.describe()})")
                for col in ("model", "top-1", f"top-{next(iter(acc.models.values())).k}", "top-1 agreement with first row"):
                    t.add_column(col, justify="left" if col == "model" else "right")
                for k, a in acc.models.items():
                    t.add_row(k, f"{a.top1:.2%}", f"{a.top5:.2%}", f"{a.agreement:.2%}")
                console.print(t)
                if acc.unreadable:
                    err_console.print(f"[bold yellow]warning:[/] {len(acc.unreadable)} images could not be read")
            elif not no_eval:
                console.print("[yellow]no images left for the accuracy comparison (all used for calibration)[/]")
            if report_dir is not None:
                payload: Dict[str, Any] = run.to_dict(model, baseline)
                sections = [("Quantization", md_table(
                    ["source", "INT8 file", "calibration", "images", "INT8 nodes", "merge nodes kept float"],
                    [[Path(k).name, v.path.name, v.method, v.images, v.quantized_nodes, len(v.excluded_nodes)]
                     for k, v in run.quantized.items()]))]
                if acc:
                    sections.append(("Accuracy (ONNX Runtime CPU)", md_table(
                        ["model", "top-1", "top-5", "top-1 agreement"],
                        [[k, a.top1, a.top5, a.agreement] for k, a in acc.models.items()],
                        formats=[None, ".4f", ".4f", ".4f"]) + f"\n\n{acc.images} images: {acc.dataset}"))
                paths = write_report(report_dir, "vitmerge calibrate", payload, sections)
                console.print(f"[bold green]wrote[/] {paths.json} and {paths.markdown}")
