"""``vitmerge eval``: top-1/top-5 of the unmerged and the merged model on the same labelled images;
for detectors (YOLOS folders, ``dense:NAME``) mAP on a COCO-format folder."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import typer
from rich.table import Table

from ._common import (console, err_console, log, loud_warnings, parse_json_option, parse_options, parse_r_option,
                      user_errors)
from ._options import (MERGE_PANEL, AudioLengthOpt, BudgetOpt, CheckpointOpt, ClassMap, ClassOrder, ConfigOpt, DataOpt,
                       EvalRuntime, FramesOpt, ImgSizeOpt, MethodOpt, ModelKwargsOpt, NumClassesOpt, OptionOpt,
                       PropAttnOpt, ReportDirOpt, ScheduleOpt, value)


def counted(n: int, dataset: str = "") -> str:
    """'12 images', '1 image', '12 clips' (video and audio data are clips)."""
    what = "clip" if str(dataset).startswith(("video", "audio")) else "image"
    return f"{n} {what}{'' if n == 1 else 's'}"


def accuracy_table(result, flops: Dict[str, Dict[str, float]]) -> Table:
    first = next(iter(result.models.values()))
    t = Table(title=f"accuracy on the same {counted(result.images, result.dataset)}")
    for col in ("model", "top-1", f"top-{first.k}", "top-1 agreement", "GFLOPs/image", "FLOPs vs unmerged"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, a in result.models.items():
        f = flops.get(name, {})
        t.add_row(name, f"{a.top1:.2%}", f"{a.top5:.2%}", f"{a.agreement:.2%}",
                  f"{f['flops'] / 1e9:.4f}" if "flops" in f else "—",
                  f"{f['fraction']:.3f}" if "fraction" in f else "—")
    return t


def detection_table(result, flops: Dict[str, Dict[str, float]]) -> Table:
    t = Table(title=f"detection on the same {counted(result.images)}",
              caption=f"mAP = mAP@[.5:.95]; vs {result.reference}: mAP@.5 of the k most confident detections per image "
                      f"against {result.reference}'s k (k = the image's ground-truth boxes)")
    cols = ("model", "mAP", "mAP@.5", "mAP@.75", f"vs {result.reference}", "dets/img", "GFLOPs/img", "FLOPs ratio")
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, a in result.models.items():
        f = flops.get(name, {})
        t.add_row(name, f"{a.map:.4f}", f"{a.map_50:.4f}", f"{a.map_75:.4f}", f"{a.fidelity_50:.4f}",
                  f"{a.detections:.1f}", f"{f['flops'] / 1e9:.4f}" if "flops" in f else "—",
                  f"{f['fraction']:.3f}" if "fraction" in f else "—")
    return t


def _setup_lines(data: Dict[str, Any], ev: Dict[str, Any]) -> list:
    return [
        f"- model: `{data['model']}` ({data['weights']})",
        f"- data: {ev['dataset']}; {ev['images']} images scored, {ev['unreadable_count']} unreadable",
        f"- runtime: {data['runtime']}",
        f"- merge: {data['method']} r {data['r']}; tokens out of each block {data['tokens_out']}" if data.get("method") else "- merge: none",
    ] + [f"- note: {n}" for n in ev["notes"]]


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
        ("Setup", "\n".join(_setup_lines(data, ev))),
        ("Accuracy", md_table(["model", "top-1", "top-5", "top-1 agreement with unmerged", "GFLOPs/image", "FLOPs vs unmerged"],
                              rows, formats=[None, ".4f", ".4f", ".4f", ".4f", ".3f"])),
    ]
    if ev["unreadable"]:
        sections.append(("Unreadable images", "\n".join(f"- `{p}`" for p in ev["unreadable"])))
    return sections


def detection_markdown_sections(data: Dict[str, Any]) -> list:
    from ..profiling.report import md_table

    ev = data["eval"]
    rows = []
    for name, m in ev["models"].items():
        f = data["flops"].get(name, {})
        g = f.get("flops")
        rows.append([name, m["map"], m["map_50"], m["map_75"], m["fidelity_map_50"], m["detections_per_image"],
                     None if g is None else g / 1e9, f.get("fraction")])
    sections = [
        ("Setup", "\n".join(_setup_lines(data, ev))),
        ("Detection", md_table(["model", "mAP@[.5:.95]", "mAP@0.5", "mAP@0.75",
                                f"mAP@0.5 of top-k vs {ev['reference']}'s top-k (k = ground-truth boxes per image)",
                                "detections/image", "GFLOPs/image", "FLOPs vs unmerged"],
                               rows, formats=[None, ".4f", ".4f", ".4f", ".4f", ".1f", ".4f", ".3f"])),
    ]
    if ev["unreadable"]:
        sections.append(("Unreadable images", "\n".join(f"- `{p}`" for p in ev["unreadable"])))
    return sections


def register(app: typer.Typer) -> None:
    @app.command("eval", short_help="Top-1/top-5 (detectors: mAP) of the unmerged vs the merged model on the same images.")
    def eval_cmd(
        model_name: Annotated[Optional[str], typer.Argument(
            metavar="[MODEL]", help="timm model name, transformers model folder (YOLOS too) or dense:NAME (optional "
                                    "with --config)")] = None,
        data: DataOpt = None,
        config: ConfigOpt = None,
        checkpoint: CheckpointOpt = None,
        model_kwargs: ModelKwargsOpt = None,
        num_classes_opt: NumClassesOpt = None,
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
                             "ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz or its folder); detectors: the COCO "
                             "annotations JSON (default: DATA/annotations.json)")] = None,
        class_order: Annotated[ClassOrder, typer.Option(
            "--class-order", case_sensitive=False,
            help="ImageNet class indices: sorted (sorted WordNet ids, as timm/torchvision checkpoints) or devkit "
                 "(ILSVRC2012_ID order; needs the devkit)")] = "sorted",
        class_map: Annotated[ClassMap, typer.Option(
            "--class-map", case_sensitive=False,
            help="Detectors: COCO category -> model class. auto: by name when the model names its classes, else id "
                 "when the ids fit, else order; id: category id = class (COCO-trained YOLOS); order: 0..K-1 in id "
                 "order; name: by class name")] = "auto",
        normalize: Annotated[bool, typer.Option(
            "--normalize/--no-normalize",
            help="Detectors: normalise pixels with the model's mean/std (YOLOS: preprocessor_config.json; dense: "
                 "the backbone's), or feed them in [0, 1] (--no-normalize: vitmerge's demo detectors)")] = True,
        workers: Annotated[int, typer.Option("--workers", help="Image decoding processes (0: in the main process)")] = 0,
        report_dir: ReportDirOpt = None,
    ):
        """Score the unmerged and the merged model on the same images: top-1, top-5, agreement, FLOPs.

        Detectors (a YOLOS folder, dense:NAME with --checkpoint): mAP@[.5:.95], mAP@0.5, mAP@0.75 on a COCO-format
        folder (--data with annotations.json, or --labels instances_val2017.json), each image resized to the
        model's input size, and each model's mAP@0.5 against the unmerged model's confident detections."""
        from ..data import open_dataset, transform_for
        from ..data.imagenet import order_mismatch_hint
        from ..data.detection import CocoFolder, detector_input
        from ..errors import DataError, ScheduleError, UsageError
        from ..models import apply
        from ..models.budget import resolve_schedule
        from ..models.build import build_model, is_model_folder, resolve_model
        from ..models.family import family
        from ..models.shapes import num_classes
        from ..profiling.accuracy import check_classes, class_mismatch, score_models
        from ..profiling.detection import score_detectors
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
            if num_classes_opt is not None:
                kwargs["num_classes"] = num_classes_opt
            model = build_model(name, ckpt, **kwargs)
            detector = family(model).output_names(model) != ("logits",)
            weights = "checkpoint " + str(ckpt) if ckpt else "its folder's weights" if hf_folder else "random weights"
            if detector:
                if split is not None or value(class_order) != "sorted":
                    raise UsageError("--split and --class-order apply to classification folders; a detector reads "
                                     "a COCO-format folder (--data, and --labels for its annotations JSON)")
                spec = detector_input(model, normalize=normalize)
                ds = CocoFolder(data, annotations=labels, size=spec.size, mean=spec.mean, std=spec.std,
                                class_map=value(class_map), num_classes=spec.num_classes,
                                class_names=spec.class_names, limit=limit)
            else:
                if value(class_map) != "auto" or not normalize:
                    raise UsageError("--class-map and --no-normalize apply to detectors; a classifier is "
                                     "preprocessed by its own data config")
                ds = open_dataset(data, split=split, labels=labels, transform=transform_for(model), limit=limit,
                                  class_order=value(class_order))
                check_classes(ds, num_classes(model), f"{name} ({weights})")
                off = class_mismatch(ds, num_classes(model), f"{name} ({weights})")
                if off:
                    warnings.warn(off, stacklevel=1)
            console.print(f"data: {ds.describe()}")
            for n in ds.notes:
                console.print(f"  [dim]{n}[/]")

            models = {"unmerged": model}
            info, opts, r_used = None, {}, None
            if r is not None or budget is not None:
                opts = parse_options(option)
                merged = copy.deepcopy(model)
                r_used = resolve_schedule(merged, value(method), None if r is None else parse_r_option(r),
                                          value(schedule), budget, **opts)
                apply(merged, method=value(method), r=r_used, prop_attn=prop_attn, **opts)
                info = merged.vitmerge
                models["merged"] = merged
            if value(runtime) == "ort":
                console.print("exporting each model to ONNX (verified against PyTorch) to score it in ONNX Runtime")
            score = score_detectors if detector else score_models
            result, flops = score(models, ds, *((spec,) if detector else ()), runtime=value(runtime),
                                  batch_size=batch_size, workers=workers, progress=not console.quiet,
                                  on_export=log.info)
            if info is not None:
                console.print(f"merged: {value(method)}, r {r_used}, tokens {info.tokens_in[0]} -> "
                              f"{info.tokens_out[-1]}, FLOPs {flops['merged']['fraction']:.3f} of unmerged")
            console.print(detection_table(result, flops) if detector else accuracy_table(result, flops))
            hint = not detector and ckpt and order_mismatch_hint(ds.class_order, num_classes(model),
                                                                 result.models["unmerged"].top1, result.images)
            if hint:
                err_console.print(f"[bold yellow]warning:[/] {hint}")
            if result.unreadable:
                err_console.print(f"[bold yellow]warning:[/] {len(result.unreadable)} images could not be read and "
                                  f"were skipped, e.g. {result.unreadable[0]}")
            if detector and "merged" in result.models:
                a, b = result.models["unmerged"], result.models["merged"]
                console.print(f"mAP change from merging: [bold]{(b.map - a.map) * 100:+.2f}[/] points "
                              f"(mAP@0.5 {(b.map_50 - a.map_50) * 100:+.2f})")
            elif "merged" in result.models:
                a, b = result.models["unmerged"], result.models["merged"]
                console.print(f"top-1 change from merging: [bold]{(b.top1 - a.top1) * 100:+.2f}[/] points "
                              f"({b.correct1 - a.correct1:+d} of {a.n} images)")
            payload = {
                "model": name,
                "task": "detection" if detector else "classification",
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
                sections = detection_markdown_sections(payload) if detector else markdown_sections(payload)
                paths = write_report(report_dir, "vitmerge eval", payload, sections)
                console.print(f"[bold green]wrote[/] {paths.json} and {paths.markdown}")
