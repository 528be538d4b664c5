"""``vitmerge calibrate``: static INT8 QDQ quantization from real images, with FP32 vs INT8 accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import typer
from rich.table import Table

from ._common import console, err_console, loud_warnings, parse_json_option, user_errors
from ._options import CalibrationMethod, ConfigOpt, DataOpt, LabelsOpt, ModelKwargsOpt, ReportDirOpt, value


def _default_baseline_output(output: Path, baseline: Path) -> Path:
    stem = baseline.name[: -len(".onnx")] if baseline.name.endswith(".onnx") else baseline.stem
    return output.parent / f"{stem}.int8.onnx"


def register(app: typer.Typer) -> None:
    @app.command("calibrate", short_help="INT8 Q/DQ quantization from real images; FP32 vs INT8 accuracy.")
    def calibrate_cmd(
        model: Annotated[Path, typer.Argument(metavar="MODEL.onnx", exists=True, dir_okay=False, help="FP32 ONNX file from `vitmerge export` (merged or not)")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the INT8 QDQ .onnx file")],
        data: DataOpt = None,
        num: Annotated[int, typer.Option("--num", "-n", help="Calibration images (a train/ split is used when there is one)")] = 256,
        method: Annotated[CalibrationMethod, typer.Option("--method", case_sensitive=False, help="ONNX Runtime's calibrator")] = "entropy",
        baseline: Annotated[Optional[Path], typer.Option(
            "--baseline", help="The unmerged model's FP32 .onnx: also quantized, giving the four corners "
                               "(merged/unmerged x FP32/INT8)")] = None,
        baseline_output: Annotated[Optional[Path], typer.Option(
            "--baseline-output", help="Where the baseline's INT8 file goes (default: next to --output, NAME.int8.onnx)")] = None,
        config: ConfigOpt = None,
        model_name: Annotated[Optional[str], typer.Option(
            "--model", help="timm model name the file came from (its preprocessing: mean/std, resize, crop), when the "
                            "file does not record it")] = None,
        model_kwargs: ModelKwargsOpt = None,
        labels: LabelsOpt = None,
        eval_limit: Annotated[Optional[int], typer.Option(
            "--eval-limit", help="Images scored for FP32 vs INT8 accuracy (default: all not used for calibration)")] = None,
        no_eval: Annotated[bool, typer.Option("--no-eval", help="Only quantize; skip the accuracy comparison")] = False,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per calibration / scoring batch")] = 16,
        per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel")] = True,
        keep_merge_float: Annotated[bool, typer.Option(
            "--keep-merge-float/--quantize-merge",
            help="Leave the token-merge subgraphs in float (their MatMul decides which tokens merge)")] = True,
        report_dir: ReportDirOpt = None,
    ):
        """Quantize MODEL.onnx to INT8 (static, QDQ) from real images; report FP32 vs INT8 top-1 on held-out images."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .. import metadata as md
        from ..backends import OrtRunner
        from ..calibration.quantize import calibration_and_eval_sets, check_output, is_merged, quantize
        from ..data import CALIBRATION_SPLITS, EVAL_SPLITS, data_config_for_onnx, eval_transform, open_dataset
        from ..data.transforms import data_config_for_name
        from ..errors import DataError, UsageError
        from ..models.build import resolve_model
        from ..profiling.accuracy import evaluate

        with user_errors(), loud_warnings():
            method = value(method)
            if batch_size <= 0:
                raise DataError(f"--batch-size must be positive, got {batch_size}")
            proto = md.load_proto(model)
            check_output(output, model)
            base_out = None
            if baseline is not None:
                md.load_proto(baseline)
                base_out = baseline_output or _default_baseline_output(output, baseline)
                check_output(base_out, baseline)
                paths = [p.resolve() for p in (model, baseline, output, base_out)]
                if len(set(paths)) != 4:
                    raise UsageError("MODEL, --baseline, --output and --baseline-output must be four different "
                                        "files (the FP32 files are kept for the comparison)")
            if report_dir is not None:
                from ..profiling.report import prepare_dir

                prepare_dir(report_dir)
            given, default_data = None, None
            if config is not None or model_name is not None:  # the preprocessing of the model the file came from
                name, _, kwargs, default_data = resolve_model(model_name, None, config,
                                                              parse_json_option(model_kwargs, "--model-kwargs"))
                given = data_config_for_name(name, **kwargs)
            cfg, warn = data_config_for_onnx(proto, given)
            if warn:
                err_console.print(f"[bold yellow]warning:[/] {warn}")
            data = data or default_data
            if data is None:
                raise DataError("give calibration images with --data DIR")
            tf = eval_transform(cfg)
            calib_all = open_dataset(data, labels=labels, transform=tf, prefer=CALIBRATION_SPLITS)
            eval_all = None if no_eval else open_dataset(data, labels=labels, transform=tf, prefer=EVAL_SPLITS)
            same = eval_all is None or (eval_all.root.resolve() == calib_all.root.resolve()
                                        and eval_all.layout == calib_all.layout)  # CIFAR/Pets: split in layout
            calib, ev = calibration_and_eval_sets(calib_all, None if same else eval_all, num, eval_limit)
            if no_eval:
                ev = None
            console.print(f"calibration: {len(calib)} images from {calib_all.describe()}; preprocessing "
                          f"{cfg['input_size']}, mean {cfg.get('mean')}, std {cfg.get('std')}, crop {cfg.get('crop_pct')}")
            if len(calib) < num:
                console.print(f"  [yellow]only {len(calib)} images available (asked for {num})[/]")

            jobs = [(model, output)] + ([(baseline, base_out)] if baseline is not None else [])
            results = {}
            for src, dst in jobs:
                with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console) as prog:
                    task = prog.add_task(f"calibrating {src.name} ({method})", total=len(calib))
                    res = quantize(src, dst, calib, method=method, per_channel=per_channel,
                                   exclude_merge=keep_merge_float, batch_size=batch_size,
                                   on_batch=lambda n: prog.advance(task, n))
                results[str(src)] = res
                console.print(f"[bold green]wrote[/] {res.path}: {res.quantized_nodes} INT8 nodes, "
                              f"{len(res.excluded_nodes)} merge-step nodes kept in float ({res.seconds:.1f} s)")
                for n in res.notes:
                    console.print(f"  [dim]{n}[/]")

            acc = None
            if ev is not None and len(ev):
                runners = {}
                if baseline is not None:
                    runners["unmerged FP32"] = OrtRunner(baseline)
                    runners["unmerged INT8"] = OrtRunner(base_out)
                    tag = "merged " if is_merged(proto) else "model "
                else:
                    tag = ""
                runners[f"{tag}FP32"] = OrtRunner(model)
                runners[f"{tag}INT8"] = OrtRunner(output)
                acc = evaluate(runners, ev, batch_size=max(batch_size, 32), description="scoring FP32 vs INT8")
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
                from ..profiling.report import md_table, write_report

                payload: Dict[str, Any] = {"model": str(model), "baseline": str(baseline) if baseline else None,
                                           "data": str(data), "data_config": cfg,
                                           "quantized": {k: v.to_dict() for k, v in results.items()},
                                           "accuracy": acc.to_dict() if acc else None}
                sections = [("Quantization", md_table(
                    ["source", "INT8 file", "calibration", "images", "INT8 nodes", "merge nodes kept float"],
                    [[Path(k).name, v.path.name, v.method, v.images, v.quantized_nodes, len(v.excluded_nodes)]
                     for k, v in results.items()]))]
                if acc:
                    sections.append(("Accuracy (ONNX Runtime CPU)", md_table(
                        ["model", "top-1", "top-5", "top-1 agreement"],
                        [[k, a.top1, a.top5, a.agreement] for k, a in acc.models.items()],
                        formats=[None, ".4f", ".4f", ".4f"]) + f"\n\n{acc.images} images: {acc.dataset}"))
                paths = write_report(report_dir, "vitmerge calibrate", payload, sections)
                console.print(f"[bold green]wrote[/] {paths.json} and {paths.markdown}")
