"""``vitmerge eval``: top-1/top-5 of the unmerged and the merged model on the same labelled images."""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer
from rich.table import Table

from ._common import console, err_console, loud_warnings, user_errors

RUNTIMES = ("torch", "ort")


def resolve_model(model_name: Optional[str], checkpoint: Optional[Path], config: Optional[Path],
                  model_kwargs: Optional[str]) -> tuple[str, Optional[Path], Dict[str, Any], Optional[Path]]:
    """(timm name, checkpoint, create_model kwargs, default data folder) from the options.

    ``--config model.json`` (written by ``vitmerge digits train``) supplies all of them; explicit
    options win over it.
    """
    from ..errors import VitmergeError
    from ._common import parse_json_option

    kwargs: Dict[str, Any] = {}
    data_dir = None
    if config is not None:
        from ..demo import digits

        cfg = digits.load(config)
        model_name = model_name or cfg.model_name
        checkpoint = checkpoint or cfg.checkpoint
        kwargs.update(json.loads(json.dumps(cfg.kwargs)))
        data_dir = cfg.data_dir if cfg.data_dir.is_dir() else None
    kwargs.update(parse_json_option(model_kwargs, "--model-kwargs"))
    if not model_name:
        raise VitmergeError("give a timm MODEL name (e.g. vit_small_patch16_224) or --config model.json")
    return model_name, checkpoint, kwargs, data_dir


def _schedule(model, method: str, r: Optional[str], schedule: str, budget: Optional[float], options: dict):
    from ._common import parse_r_option
    from ..models.budget import resolve_schedule

    return resolve_schedule(model, method, parse_r_option(r) if budget is None else 0, schedule, budget, **options)


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
    @app.command("eval")
    def eval_cmd(
        model_name: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="timm model name (optional with --config)"),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights (.pth/.pt/.safetensors); the classifier size follows them"),
        data: Optional[Path] = typer.Option(None, "--data", "-d", help="Labelled image folder: ImageFolder, ImageNet val, CIFAR-100 pickles or Oxford-IIIT Pet (default: the --config model's test images)"),
        config: Optional[Path] = typer.Option(None, "--config", help="model.json from `vitmerge digits train` (model name, kwargs, checkpoint, data)"),
        model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="Extra timm.create_model arguments as JSON or a .json file"),
        method: str = typer.Option("tome", "--method", "-m", help="Merge method"),
        option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="Method option KEY=VALUE, repeatable (e.g. -O bits=8, -O mode=intra, -O vocab=vocab.pt)"),
        r: Optional[str] = typer.Option(None, "--r", help="Tokens merged per block: one int or one per block; without --r/--budget only the unmerged model is scored"),
        schedule: str = typer.Option("constant", "--schedule", help="constant | decreasing (with --r)"),
        budget: Optional[float] = typer.Option(None, "--budget", help="Target FLOP fraction of the unmerged model (e.g. 0.75); solves per-block r"),
        runtime: str = typer.Option("torch", "--runtime", help="torch (PyTorch eager) or ort (export both models to ONNX and score them in ONNX Runtime)"),
        limit: Optional[int] = typer.Option(None, "--limit", help="Score this many images, chosen by a fixed seed (default: all)"),
        batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per batch"),
        split: Optional[str] = typer.Option(None, "--split", help="Which split of a multi-split folder (default: val, then test)"),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file for a flat folder of images (val.txt or LOC_val_solution.csv), or the ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz or its folder)"),
        class_order: str = typer.Option("sorted", "--class-order", help="ImageNet class indices: sorted (sorted WordNet ids, as timm/torchvision checkpoints) or devkit (ILSVRC2012_ID order; needs the devkit)"),
        img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (default: the model's)"),
        prop_attn: bool = typer.Option(True, "--prop-attn/--no-prop-attn", help="Proportional attention in the merged model"),
        workers: int = typer.Option(0, "--workers", help="Image decoding processes (0: in the main process)"),
        report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Write report.json and report.md here"),
    ):
        """Score the unmerged and the merged model on the same images: top-1, top-5, agreement, FLOPs."""
        from ..backends import OrtRunner, TorchRunner
        from ..data import open_dataset, transform_for
        from ..data.imagenet import order_mismatch_hint
        from ..errors import DataError, ScheduleError, VitmergeError
        from ..models.build import build_model
        from ..exporter import export
        from ..models import apply
        from ..models.flops import count_flops
        from ..profiling.accuracy import check_classes, evaluate

        with user_errors(), loud_warnings():
            if runtime not in RUNTIMES:
                raise VitmergeError(f"unknown --runtime {runtime!r}; eval supports {', '.join(RUNTIMES)} "
                                    "(TensorRT engines: profile them with `vitmerge profile`)")
            if r is not None and budget is not None:
                raise ScheduleError("give either --r or --budget, not both")
            if batch_size <= 0:
                raise DataError(f"--batch-size must be positive, got {batch_size}")
            if report_dir is not None:
                from ..profiling.report import prepare_dir

                prepare_dir(report_dir)  # fail before the work
            name, ckpt, kwargs, default_data = resolve_model(model_name, checkpoint, config, model_kwargs)
            data = data or default_data
            if data is None:
                raise DataError("give the labelled images with --data DIR")
            if img_size is not None:
                kwargs["img_size"] = img_size
            model = build_model(name, ckpt, **kwargs)
            ds = open_dataset(data, split=split, labels=labels, transform=transform_for(model), limit=limit,
                              class_order=class_order)
            check_classes(ds, int(model.num_classes), f"{name} ({'checkpoint ' + str(ckpt) if ckpt else 'random weights'})")
            console.print(f"data: {ds.describe()}")
            for n in ds.notes:
                console.print(f"  [dim]{n}[/]")

            models = {"unmerged": model}
            flops = {"unmerged": {"flops": count_flops(model), "fraction": 1.0}}
            info, opts, r_used = None, {}, None
            if r is not None or budget is not None:
                from ._common import parse_options

                opts = parse_options(option)
                merged = copy.deepcopy(model)
                rs = _schedule(merged, method, r, schedule, budget, opts)
                apply(merged, method=method, r=rs, prop_attn=prop_attn, **opts)
                info, r_used = merged.vitmerge, rs
                f = count_flops(merged)
                flops["merged"] = {"flops": f, "fraction": f / flops["unmerged"]["flops"]}
                models["merged"] = merged
                console.print(f"merged: {method}, r {r_used}, tokens {info.tokens_in[0]} -> "
                              f"{info.tokens_out[-1]}, FLOPs {flops['merged']['fraction']:.3f} of unmerged")

            with tempfile.TemporaryDirectory(prefix="vitmerge-eval-") as tmp:
                if runtime == "ort":
                    runners = {}
                    for key, m in models.items():
                        with console.status(f"exporting {key} to ONNX") as st:
                            res = export(m, Path(tmp) / f"{key}.onnx",
                                                  on_step=lambda s, k=key: st.update(f"{k}: {s}"))
                        runners[key] = OrtRunner(res.path)
                else:
                    runners = {k: TorchRunner(m, label=k, device="cpu") for k, m in models.items()}
                result = evaluate(runners, ds, batch_size=batch_size, progress=True, workers=workers,
                                  description=f"scoring ({runtime})")
            console.print(accuracy_table(result, flops))
            hint = ckpt and order_mismatch_hint(ds.class_order, int(model.num_classes),
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
                "weights": str(ckpt) if ckpt else "random (no --checkpoint)",
                "model_kwargs": kwargs,
                "data": str(data),
                "runtime": runtime,
                "method": method if info else None,
                "options": {k: str(v) for k, v in opts.items()} if info else None,
                "r": r_used,
                "tokens_out": info.tokens_out if info else None,
                "budget": budget,
                "flops": flops,
                "eval": result.to_dict(),
            }
            if report_dir is not None:
                from ..profiling.report import write_report

                paths = write_report(report_dir, "vitmerge eval", payload, markdown_sections(payload))
                console.print(f"[bold green]wrote[/] {paths.json} and {paths.markdown}")
