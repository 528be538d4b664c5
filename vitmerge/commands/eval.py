"""``vitmerge eval``: top-1/top-5 of the unmerged and the merged model on the same labelled images;
for detectors (YOLOS folders, ``dense:NAME``) mAP on a COCO-format folder."""
from __future__ import annotations

from typing import Annotated, Any, Dict, Optional

import typer
from rich.table import Table

from ._common import console, err_console, fail, log, loud_warnings, merge_request, model_source, user_errors
from ._options import (BatchOpt, ClassMapOpt, ClassOrderOpt, DataOpt, EvalRuntime, NormalizeOpt, ReportDirOpt,
                       ScoredLabelsOpt, ScoredModelArg, SplitOpt, WorkersOpt, value, with_options)


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
    @with_options()
    def eval_cmd(
        model_name: ScoredModelArg = None,
        data: DataOpt = None,
        runtime: Annotated[EvalRuntime, typer.Option(
            "--runtime", case_sensitive=False,
            help="torch (PyTorch eager) or ort (export both models to ONNX, verify, score them in ONNX Runtime)")] = "torch",
        limit: Annotated[Optional[int], typer.Option(
            "--limit", help="Score this many images, chosen by a fixed seed (default: all)")] = None,
        batch_size: BatchOpt = 64,
        split: SplitOpt = None,
        labels: ScoredLabelsOpt = None,
        class_order: ClassOrderOpt = "sorted",
        class_map: ClassMapOpt = "auto",
        normalize: NormalizeOpt = True,
        workers: WorkersOpt = 0,
        report_dir: ReportDirOpt = None,
        model_options: dict = None,
        merge_options: dict = None,
    ):
        """Score the unmerged and the merged model on the same images: top-1, top-5, agreement, FLOPs
        (--r 0: the patched model with nothing merged, which must score exactly as the unmerged one).

        Detectors (a YOLOS folder, dense:NAME with --checkpoint): mAP@[.5:.95], mAP@0.5, mAP@0.75 on a COCO-format
        folder (--data with annotations.json, or --labels instances_val2017.json), each image resized to the
        model's input size, and each model's mAP@0.5 against the unmerged model's confident detections."""
        with user_errors():
            if batch_size <= 0:
                raise fail(f"--batch must be at least 1, got {batch_size}")
            request = merge_request(**merge_options)
        from ..data.imagenet import order_mismatch_hint
        from ..profiling.compare import compare
        from ..profiling.report import prepare_dir, write_report

        with user_errors(), loud_warnings():
            if report_dir is not None:
                prepare_dir(report_dir)  # fail before the work
            source = model_source(model_name, **model_options)

            def show_data(ds):
                console.print(f"data: {ds.describe()}")
                for n in ds.notes:
                    console.print(f"  [dim]{n}[/]")
                if value(runtime) == "ort":
                    console.print("exporting each model to ONNX (verified against PyTorch) to score it in ONNX Runtime")

            cmp = compare(source, request, data, runtime=value(runtime), batch_size=batch_size, workers=workers,
                          limit=limit, split=split, labels=labels, class_order=value(class_order),
                          class_map=value(class_map), normalize=normalize, progress=not console.quiet,
                          on_data=show_data, on_export=log.info)
            result, flops, info = cmp.result, cmp.flops, cmp.info
            if info is not None:
                console.print(f"merged: {request.method}, r {cmp.r_used}, tokens {info.tokens_in[0]} -> "
                              f"{info.tokens_out[-1]}, FLOPs {flops['merged']['fraction']:.3f} of unmerged")
            console.print(detection_table(result, flops) if cmp.detector else accuracy_table(result, flops))
            hint = (cmp.source.checkpoint and not cmp.detector
                    and order_mismatch_hint(cmp.dataset.class_order, cmp.classes, result.models["unmerged"].top1,
                                            result.images))
            if hint:
                err_console.print(f"[bold yellow]warning:[/] {hint}")
            if result.unreadable:
                err_console.print(f"[bold yellow]warning:[/] {len(result.unreadable)} images could not be read and "
                                  f"were skipped, e.g. {result.unreadable[0]}")
            change = cmp.change()
            if change and cmp.detector:
                console.print(f"mAP change from merging: [bold]{change['map']:+.2f}[/] points "
                              f"(mAP@0.5 {change['map_50']:+.2f})")
            elif change:
                console.print(f"top-1 change from merging: [bold]{change['top1']:+.2f}[/] points "
                              f"({change['correct']:+d} of {change['of']} images)")
            payload = cmp.to_dict()
            if report_dir is not None:
                sections = detection_markdown_sections(payload) if cmp.detector else markdown_sections(payload)
                paths = write_report(report_dir, "vitmerge eval", payload, sections)
                console.print(f"[bold green]wrote[/] {paths.json} and {paths.markdown}")

