"""``vitmerge demo``: the embedded default run: a real export, verification and latency, offline."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, batch_list, loud_warnings, user_errors


def terminal_copy(md: str) -> str:
    """The report's Markdown for a terminal: an image line ``![name](file.png)`` becomes ``plot: file.png`` (as
    console markup, ``[name]`` would be eaten and ``!(file.png)`` printed)."""
    import re

    return re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r"plot: \2", md)


def register(app: typer.Typer) -> None:
    @app.command("demo", short_help="The embedded default job: offline, end to end, report with plots.")
    def demo_cmd(
        out_dir: Path = typer.Option(Path("vitmerge-demo"), "--out-dir", "-o", help="Folder for the ONNX files and the report"),
        latency_only: bool = typer.Option(False, "--latency-only", help="Only the ViT latency part: export MODEL unmerged and with ToMe, verify, time"),
        methods: str = typer.Option("tome,hash", "--methods", help="Merge methods compared on the digits model"),
        budgets: str = typer.Option("0.75,0.5", "--budgets", help="FLOP fractions of the unmerged model"),
        no_vit_s: bool = typer.Option(False, "--no-vit-s", help="Skip the ViT-S/16 latency part of the full demo"),
        clips: bool = typer.Option(False, "--clips/--no-clips",
                                   help="Add the video and audio transformers rows (VideoMAE and AST trained here on "
                                        "generated data: several CPU minutes on first use, then cached); off by "
                                        "default to keep the first run short"),
        model_name: str = typer.Option("vit_small_patch16_224", "--model", help="timm model (random weights unless --checkpoint)"),
        checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="Local weights for the model"),
        r: int = typer.Option(16, "--r", help="Tokens merged per block (ToMe)"),
        batches: str = typer.Option("1,8", "--batch", help="Batch sizes timed in ONNX Runtime"),
        rounds: int = typer.Option(8, "--rounds", help="Interleaved timing rounds"),
        iters: int = typer.Option(5, "--iters", help="Timed calls per round and model"),
        model_kwargs: str = typer.Option(None, "--model-kwargs", help="Extra timm.create_model arguments as JSON"),
    ):
        """End to end, offline: digits ViT -> two methods x two budgets -> verified ONNX -> INT8 -> accuracy and
        latency in ONNX Runtime -> report with plots; plus ViT-S/16 (random weights) ToMe r=16 latency vs the FLOP bound;
        with --clips also one video (VideoMAE) and one audio (AST) row on models trained here on generated data."""
        if not latency_only:
            return _full_demo(out_dir, methods, budgets, batches, rounds, iters, not no_vit_s, model_name, r,
                              clips=clips)

        from .. import demo
        from .._io import atomic_write
        from ._common import parse_json_option

        bs = batch_list(batches, "--batch")
        with user_errors(), loud_warnings():
            kw = parse_json_option(model_kwargs, "--model-kwargs")
            out_dir.mkdir(parents=True, exist_ok=True)
            with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
                task = prog.add_task("ONNX Runtime CPU, interleaved", total=rounds * len(bs))
                lat = demo.vit_latency(model_name, r, bs, out_dir, rounds=rounds, iters=iters, checkpoint=checkpoint,
                                       model_kwargs=kw, say=console.print, on_round=lambda: prog.advance(task))
            t = Table(title=f"{model_name}: ToMe r={r} vs unmerged, ONNX Runtime CPU (medians, interleaved)")
            for col in ("batch", "unmerged p50 ms", f"r={r} p50 ms", "speed-up", "FLOP bound", "of bound"):
                t.add_column(col, justify="right")
            for row in lat["latency"]:
                t.add_row(str(row["batch"]), f"{row['unmerged_p50_ms']:.1f}", f"{row['merged_p50_ms']:.1f}",
                          f"{row['speedup']:.2f}x", f"{lat['flop_ratio']:.2f}x", f"{row['fraction_of_bound']:.0%}")
            console.print(t)
            atomic_write(out_dir / "demo.json", json.dumps(lat, indent=2))
            console.print(f"report: {out_dir / 'demo.json'}")


def _full_demo(out_dir: Path, methods: str, budgets: str, batches: str, rounds: int, iters: int, vit_s: bool,
               vit_s_model: str, r: int, clips: bool = False) -> None:
    from rich.progress import MofNCompleteColumn

    from .. import demo
    from ._common import fail

    try:
        budget_list = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise fail(f"--budgets must be comma-separated fractions like 0.75,0.5; got {budgets!r}") from None
    settings = demo.DemoSettings(out_dir=out_dir, methods=[m.strip() for m in methods.split(",") if m.strip()],
                                 budgets=budget_list, batches=batch_list(batches, "--batch"), rounds=rounds, iters=iters,
                                 vit_s=vit_s, vit_s_model=vit_s_model, vit_s_r=r,
                                 clips=demo.CLIP_ROWS if clips else ())
    with user_errors(), loud_warnings():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            result = demo.run(settings, say=console.print, progress=prog)
    md = result.report_md.read_text()
    console.print(terminal_copy(md[md.find("## Digits"):] if "## Digits" in md else md), markup=False)
    console.print(f"[bold green]report:[/] {result.report_md}  (+ {result.report_json.name}, "
                  f"{len(result.plots)} plots in {result.report_md.parent})")
