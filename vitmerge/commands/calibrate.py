"""``vitmerge calibrate``: static INT8 QDQ quantization from real images, with FP32 vs INT8 accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import typer
from rich.table import Table

from ._common import console, err_console, loud_warnings, user_errors


def _is_merged(proto) -> bool:
    from ..calibration.quantize import is_merged

    return is_merged(proto)


def _default_baseline_output(output: Path, baseline: Path) -> Path:
    stem = baseline.name[: -len(".onnx")] if baseline.name.endswith(".onnx") else baseline.stem
    return output.parent / f"{stem}.int8.onnx"


def _preprocessing(config: Optional[Path], model_name: Optional[str], model_kwargs: Optional[str]):
    """The timm data config of the model the ONNX file came from, when the user names it."""
    if config is None and model_name is None:
        return None, None
    from ..data import data_config
    from ..models.build import build_model
    from .eval import resolve_model

    import warnings

    name, _, kwargs, data_dir = resolve_model(model_name, None, config, model_kwargs)
    with warnings.catch_warnings():  # random weights are fine: only the data config is read
        warnings.simplefilter("ignore")
        model = build_model(name, None, **kwargs)
    return data_config(model), data_dir


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        model: Path = typer.Argument(..., metavar="MODEL.onnx", help="FP32 ONNX file from `vitmerge export` (merged or not)"),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the INT8 QDQ .onnx file"),
        data: Optional[Path] = typer.Option(None, "--data", "-d", help="Labelled image folder (layouts as for `vitmerge eval`); a train/ split is used for calibration, val/ or test/ for accuracy"),
        num: int = typer.Option(256, "--num", "-n", help="Calibration images"),
        method: str = typer.Option("entropy", "--method", help="Calibration: entropy | minmax | percentile"),
        baseline: Optional[Path] = typer.Option(None, "--baseline", help="The unmerged model's FP32 .onnx: also quantized, giving the four corners (merged/unmerged x FP32/INT8)"),
        baseline_output: Optional[Path] = typer.Option(None, "--baseline-output", help="Where the baseline's INT8 file goes (default: next to --output, NAME.int8.onnx)"),
        config: Optional[Path] = typer.Option(None, "--config", help="model.json from `vitmerge digits train`: preprocessing and default --data"),
        model_name: Optional[str] = typer.Option(None, "--model", help="timm model name the file came from (its preprocessing: mean/std, resize, crop)"),
        model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="timm.create_model arguments for --model (JSON or .json file)"),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file for a flat folder of images"),
        eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Images scored for FP32 vs INT8 accuracy (default: all not used for calibration)"),
        no_eval: bool = typer.Option(False, "--no-eval", help="Only quantize; skip the accuracy comparison"),
        batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per calibration / scoring batch"),
        per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Weight scales per output channel"),
        keep_merge_float: bool = typer.Option(True, "--keep-merge-float/--quantize-merge", help="Leave the token-merge subgraphs in float (their MatMul decides which tokens merge)"),
        report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Write report.json and report.md here"),
    ):
        """Quantize MODEL.onnx to INT8 (static, QDQ) from real images; report FP32 vs INT8 top-1 on held-out images."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .. import metadata as md
        from ..backends import OrtRunner
        from ..calibration.quantize import CALIBRATION_METHODS, calibration_and_eval_sets, check_output, quantize
        from ..data import CALIBRATION_SPLITS, EVAL_SPLITS, data_config_for_onnx, eval_transform, open_dataset
        from ..errors import DataError, VitmergeError
        from ..profiling.accuracy import evaluate

        with user_errors(), loud_warnings():
            if method not in CALIBRATION_METHODS:
                raise VitmergeError(f"unknown --method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
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
                    raise VitmergeError("MODEL, --baseline, --output and --baseline-output must be four different "
                                        "files (the FP32 files are kept for the comparison)")
            if report_dir is not None:
                from ..profiling.report import prepare_dir

                prepare_dir(report_dir)
            given, default_data = _preprocessing(config, model_name, model_kwargs)
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
                    tag = "merged " if _is_merged(proto) else "model "
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
