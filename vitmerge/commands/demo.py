"""``vitmerge demo``: the embedded default run: a real export, verification and latency, offline."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, int_list, loud_warnings, user_errors


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out_dir: Path = typer.Option(Path("vitmerge-demo"), "--out-dir", "-o", help="Folder for the ONNX files and the report"),
        latency_only: bool = typer.Option(False, "--latency-only", help="Only the ViT latency part: export MODEL unmerged and with ToMe, verify, time"),
        methods: str = typer.Option("tome,hash", "--methods", help="Merge methods compared on the digits model"),
        budgets: str = typer.Option("0.75,0.5", "--budgets", help="FLOP fractions of the unmerged model"),
        no_vit_s: bool = typer.Option(False, "--no-vit-s", help="Skip the ViT-S/16 latency part of the full demo"),
        model_name: str = typer.Option("vit_small_patch16_224", "--model", help="timm model (random weights unless --checkpoint)"),
        checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="Local weights for the model"),
        r: int = typer.Option(16, "--r", help="Tokens merged per block (ToMe)"),
        batches: str = typer.Option("1,8", "--batch", help="Batch sizes timed in ONNX Runtime"),
        rounds: int = typer.Option(8, "--rounds", help="Interleaved timing rounds"),
        iters: int = typer.Option(5, "--iters", help="Timed calls per round and model"),
        model_kwargs: str = typer.Option(None, "--model-kwargs", help="Extra timm.create_model arguments as JSON"),
    ):
        """End to end, offline: digits ViT -> two methods x two budgets -> verified ONNX -> INT8 -> accuracy and
        latency in ONNX Runtime -> report with plots; plus ViT-S/16 (random weights) ToMe r=16 latency vs the FLOP bound."""
        if not latency_only:
            return _full_demo(out_dir, methods, budgets, batches, rounds, iters, not no_vit_s, model_name, r)
        import numpy as np

        import vitmerge
        from ..exporter.verify import ort_session
        from ..models.build import build_model
        from ..profiling.flops import flop_ratio, input_shape
        from ..profiling.latency import interleaved

        from .export import parse_json_option

        bs = int_list(batches, "--batch")
        with user_errors(), loud_warnings():
            kw = parse_json_option(model_kwargs, "--model-kwargs")
            out_dir.mkdir(parents=True, exist_ok=True)
            paths, ratio = {}, 1.0
            for name, rr in (("unmerged", 0), (f"tome_r{r}", r)):
                model = build_model(model_name, checkpoint, **kw)
                vitmerge.apply(model, method="tome", r=rr)
                if rr:
                    _, _, ratio = flop_ratio(model)
                with console.status(f"exporting {name}") as st:
                    res = vitmerge.export(model, out_dir / f"{model_name}_{name}.onnx",
                                          on_step=lambda s: st.update(f"{name}: {s}"))
                v = res.verification
                console.print(f"[green]✓[/] {res.path}  tokens {model.vitmerge.tokens_in[0]} -> "
                              f"{model.vitmerge.tokens_out[-1]}, ORT vs PyTorch max|diff| {v.max_abs_diff:.1e}, "
                              f"top-1 agreement {v.top1_agreement:.0%}")
                paths[name] = res.path
            shape = input_shape(model)
            sessions = {k: ort_session(p) for k, p in paths.items()}
            rows = []
            with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
                for b in bs:
                    x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
                    task = prog.add_task(f"ONNX Runtime CPU, batch {b}", total=rounds)
                    stats = interleaved({k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()},
                                        rounds=rounds, iters=iters, progress=lambda: prog.advance(task))
                    base, merged = stats["unmerged"], stats[f"tome_r{r}"]
                    rows.append({"batch": b, "unmerged_p50_ms": base.p50, "merged_p50_ms": merged.p50,
                                 "speedup": base.p50 / merged.p50, "flop_ratio": ratio,
                                 "fraction_of_bound": base.p50 / merged.p50 / ratio})
            t = Table(title=f"{model_name}: ToMe r={r} vs unmerged, ONNX Runtime CPU (medians, interleaved)")
            for col in ("batch", "unmerged p50 ms", f"r={r} p50 ms", "speed-up", "FLOP bound", "of bound"):
                t.add_column(col, justify="right")
            for row in rows:
                t.add_row(str(row["batch"]), f"{row['unmerged_p50_ms']:.1f}", f"{row['merged_p50_ms']:.1f}",
                          f"{row['speedup']:.2f}x", f"{ratio:.2f}x", f"{row['fraction_of_bound']:.0%}")
            console.print(t)
            report = {"model": model_name, "weights": str(checkpoint) if checkpoint else "random (no --checkpoint)",
                      "r": r, "flop_ratio": ratio, "machine": platform.processor() or platform.machine(),
                      "onnx": {k: str(p) for k, p in paths.items()}, "latency": rows}
            tmp = out_dir / ".demo.json.tmp"
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(out_dir / "demo.json")
            console.print(f"report: {out_dir / 'demo.json'}")


def _full_demo(out_dir: Path, methods: str, budgets: str, batches: str, rounds: int, iters: int, vit_s: bool,
               vit_s_model: str, r: int) -> None:
    from rich.progress import MofNCompleteColumn

    from .. import demo
    from ._common import fail

    try:
        budget_list = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise fail(f"--budgets must be comma-separated fractions like 0.75,0.5; got {budgets!r}") from None
    settings = demo.DemoSettings(out_dir=out_dir, methods=[m.strip() for m in methods.split(",") if m.strip()],
                                 budgets=budget_list, batches=int_list(batches, "--batch"), rounds=rounds, iters=iters,
                                 vit_s=vit_s, vit_s_model=vit_s_model, vit_s_r=r)
    with user_errors(), loud_warnings():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            result = demo.run(settings, say=console.print, progress=prog)
    md = result.report_md.read_text()
    console.print(md[md.find("## Digits"):] if "## Digits" in md else md)
    console.print(f"[bold green]report:[/] {result.report_md}  (+ {result.report_json.name}, "
                  f"{len(result.plots)} plots in {result.report_md.parent})")
