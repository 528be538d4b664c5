"""``vitmerge eval``: top-1/top-5 of the unmerged and the merged model on the same labelled images."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import typer
from rich.table import Table

from ._common import (console, err_console, log, loud_warnings, parse_json_option, parse_options, parse_r_option,
                      user_errors)
from ._options import (MERGE_PANEL, AudioLengthOpt, BudgetOpt, CheckpointOpt, ClassOrder, ConfigOpt, DataOpt,
                       EvalRuntime, FramesOpt, ImgSizeOpt, MethodOpt, ModelKwargsOpt, OptionOpt, PropAttnOpt,
                       ReportDirOpt, ScheduleOpt, value)


def accuracy_table(result, flops: Dict[str, Dict[str, float]]) -> Table:
    first = next(iter(result.models.values()))
    t = Table(title=f"accuracy on the same {result.images} images")
    for col in ("model", "top-1", f"top-{first.k}", "top-1 agreement", "GFLOPs/image", "FLOPs vs unmerged"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, a in result.models.items():
        f = flops.get(name, {})
        t.add_row(name, f"{a.top1:.2%}", f"{a.top5:.2%}", f"{a.agreement:.2%}",
                  f"{f['flops'] / 1e9:.4f}" if "flops" in f else "—",
                  f"{f['fraction']:.3f}" if "fraction" in f else "—")
    return t


def markdown_sections(data: Dict[str, Any]) -> list:
    from ..profiling.report import md_table

    ev = data["eval"]
    rows = []
    for name, m in ev["models"].items():
        k = next(key for key in m if key.startswith("top") and key != "top1" and not key.startswith("top1_"))
        f = data["flops"].get(name, {})
        g = f.get("flops")
        rows.append([name, m["top1"], m[k], m["top1_agreement_with_reference"], None if g is None else g / 1e9,
                     f.get("fraction")])
    sections = [
        ("Setup", "\n".join([
            f"- model: `{data['model']}` ({data['weights']})",
            f"- data: {ev['dataset']}; {ev['images']} images scored, {ev['unreadable_count']} unreadable",
            f"- runtime: {data['runtime']}",
            f"- merge: {data['method']} r {data['r']}; tokens out of each block {data['tokens_out']}" if data.get("method") else "- merge: none",
        ] + [f"- note: {n}" for n in ev["notes"]])),
        ("Accuracy", md_table(["model", "top-1", "top-5", "top-1 agreement with unmerged", "GFLOPs/image", "FLOPs vs unmerged"],
                              rows, formats=[None, ".4f", ".4f", ".4f", ".4f", ".3f"])),
    ]
    if ev["unreadable"]:
        sections.append(("Unreadable images", "\n".join(f"- `{p}`" for p in ev["unreadable"])))
    return sections


def register(app: typer.Typer) -> None:
    @app.command("eval", short_help="Top-1/top-5 of the unmerged vs the merged model on the same labelled images.")
    def eval_cmd(
        model_name: Annotated[Optional[str], typer.Argument(
            metavar="[MODEL]", help="timm model name or transformers model folder (optional with --config)")] = None,
        data: DataOpt = None,
        config: ConfigOpt = None,
        checkpoint: CheckpointOpt = None,
        model_kwargs: ModelKwargsOpt = None,
        img_size: ImgSizeOpt = None,
        frames: FramesOpt = None,
        audio_length: AudioLengthOpt = None,
        method: MethodOpt = "tome",
        option: OptionOpt = None,
        r: Annotated[Optional[str], typer.Option(
            "--r", rich_help_panel=MERGE_PANEL,
            help="Tokens merged per block: one int or one per block; without --r/--budget only the unmerged "
                 "model is scored")] = None,
        schedule: ScheduleOpt = "constant",
        budget: BudgetOpt = None,
        prop_attn: PropAttnOpt = True,
        runtime: Annotated[EvalRuntime, typer.Option(
            "--runtime", case_sensitive=False,
            help="torch (PyTorch eager) or ort (export both models to ONNX, verify, score them in ONNX Runtime)")] = "torch",
        limit: Annotated[Optional[int], typer.Option(
            "--limit", help="Score this many images, chosen by a fixed seed (default: all)")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch")] = 64,
        split: Annotated[Optional[str], typer.Option(
            "--split", help="Which split of a multi-split folder (default: val, then test)")] = None,
        labels: Annotated[Optional[Path], typer.Option(
            "--labels", help="Labels file for a flat folder of images (val.txt or LOC_val_solution.csv), or the "
                             "ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz or its folder)")] = None,
        class_order: Annotated[ClassOrder, typer.Option(
            "--class-order", case_sensitive=False,
            help="ImageNet class indices: sorted (sorted WordNet ids, as timm/torchvision checkpoints) or devkit "
                 "(ILSVRC2012_ID order; needs the devkit)")] = "sorted",
        workers: Annotated[int, typer.Option("--workers", help="Image decoding processes (0: in the main process)")] = 0,
        report_dir: ReportDirOpt = None,
    ):
        """Score the unmerged and the merged model on the same images: top-1, top-5, agreement, FLOPs."""
        from ..data import open_dataset, transform_for
        from ..data.imagenet import order_mismatch_hint
        from ..errors import DataError, ScheduleError, UnsupportedModelError
        from ..models import apply
        from ..models.budget import resolve_schedule
        from ..models.build import build_model, is_model_folder, resolve_model
        from ..models.family import family
        from ..models.shapes import num_classes
        from ..profiling.accuracy import check_classes, score_models
        from ..profiling.report import prepare_dir, write_report

        with user_errors(), loud_warnings():
            if r is not None and budget is not None:
                raise ScheduleError("give either --r or --budget, not both")
            if batch_size <= 0:
                raise DataError(f"--batch-size must be positive, got {batch_size}")
            if report_dir is not None:
                prepare_dir(report_dir)  # fail before the work
            name, ckpt, kwargs, default_data = resolve_model(model_name, checkpoint, config,
                                                             parse_json_option(model_kwargs, "--model-kwargs"))
            hf_folder = is_model_folder(name)
            data = data or default_data
            if data is None:
                raise DataError("give the labelled images with --data DIR")
            for key, v in (("img_size", img_size), ("frames", frames), ("audio_length", audio_length)):
                if v is not None:
                    kwargs[key] = v
            model = build_model(name, ckpt, **kwargs)
            outputs = family(model).output_names(model)
            if outputs != ("logits",):
                raise UnsupportedModelError(
                    f"vitmerge eval scores classifiers (top-1 / top-5); {name} is a detector (outputs: "
                    f"{', '.join(outputs)}). Detection mAP is not in eval yet: from Python, decode its outputs with "
                    "vitmerge.data.detection.decode_dense / decode_yolos and score them with mean_average_precision")
            ds = open_dataset(data, split=split, labels=labels, transform=transform_for(model), limit=limit,
                              class_order=value(class_order))
            weights = "checkpoint " + str(ckpt) if ckpt else "its folder's weights" if hf_folder else "random weights"
            check_classes(ds, num_classes(model), f"{name} ({weights})")
            console.print(f"data: {ds.describe()}")
            for n in ds.notes:
                console.print(f"  [dim]{n}[/]")

            models = {"unmerged": model}
            info, opts, r_used = None, {}, None
            if r is not None or budget is not None:
                opts = parse_options(option)
                merged = copy.deepcopy(model)
                r_used = resolve_schedule(merged, value(method), parse_r_option(r) if budget is None else 0,
                                          value(schedule), budget, **opts)
                apply(merged, method=value(method), r=r_used, prop_attn=prop_attn, **opts)
                info = merged.vitmerge
                models["merged"] = merged
            if value(runtime) == "ort":
                console.print("exporting each model to ONNX (verified against PyTorch) to score it in ONNX Runtime")
            result, flops = score_models(models, ds, value(runtime), batch_size=batch_size, workers=workers,
                                         progress=not console.quiet, on_export=log.info)
            if info is not None:
                console.print(f"merged: {value(method)}, r {r_used}, tokens {info.tokens_in[0]} -> "
                              f"{info.tokens_out[-1]}, FLOPs {flops['merged']['fraction']:.3f} of unmerged")
            console.print(accuracy_table(result, flops))
            hint = ckpt and order_mismatch_hint(ds.class_order, num_classes(model),
                                                result.models["unmerged"].top1, result.images)
            if hint:
                err_console.print(f"[bold yellow]warning:[/] {hint}")
            if result.unreadable:
                err_console.print(f"[bold yellow]warning:[/] {len(result.unreadable)} images could not be read and "
                                  f"were skipped, e.g. {result.unreadable[0]}")
            if "merged" in result.models:
                a, b = result.models["unmerged"], result.models["merged"]
                console.print(f"top-1 change from merging: [bold]{(b.top1 - a.top1) * 100:+.2f}[/] points "
                              f"({b.correct1 - a.correct1:+d} of {a.n} images)")
            payload = {
                "model": name,
                "weights": str(ckpt) if ckpt else "the folder's own" if hf_folder else "random (no --checkpoint)",
                "model_kwargs": kwargs,
                "data": str(data),
                "runtime": value(runtime),
                "method": value(method) if info else None,
                "options": {k: str(v) for k, v in opts.items()} if info else None,
                "r": r_used,
                "tokens_out": info.tokens_out if info else None,
                "budget": budget,
                "flops": flops,
                "eval": result.to_dict(),
            }
            if report_dir is not None:
                paths = write_report(report_dir, "vitmerge eval", payload, markdown_sections(payload))
                console.print(f"[bold green]wrote[/] {paths.json} and {paths.markdown}")
