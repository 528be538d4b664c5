"""``vitmerge tune``: the fastest merged model within an accuracy budget, measured on the target runtime
(the library: :func:`vitmerge.profiling.tune.tune`; docs/tune.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import console, err_console, fail, float_list, int_list, loud_warnings, model_source, user_errors
from ._options import (MEASURE_PANEL, METHODS, BatchOpt, ClassMapOpt, ClassOrderOpt, DataOpt, ItersOpt, NormalizeOpt,
                       PropAttnOpt, ReportDirOpt, Runtime, ScoredLabelsOpt, ScoredModelArg, SplitOpt, ThreadsOpt,
                       WarmupOpt, WorkersOpt, value, with_options)

TARGET_PANEL = "Target (exactly one)"
SEARCH_PANEL = "Candidates"

DEFAULT_BUDGETS = "0.9,0.8,0.7,0.6,0.5"  # profiling.tune.DEFAULT_BUDGETS (kept torch-free here)


def candidates_table(result) -> Table:
    base, chosen = result.baseline, result.chosen
    t = Table(title=f"candidates on {result.settings['runtime']}, batch {result.settings['batch']}, "
                    f"{base.images} held-out images (latency interleaved with the unmerged model)")
    for col in ("candidate", "r per block", result.metric, "vs unmerged", "p50 ms", "speed-up", "FLOPs", "front", "meets"):
        t.add_column(col, justify="left" if col in ("candidate", "r per block") else "right")
    for c in [base] + sorted(result.candidates, key=lambda c: c.p50_ms):
        mark = " [bold green](chosen)[/]" if chosen is not None and c.key == chosen.key else ""
        t.add_row(c.label + mark, ",".join(map(str, c.r)), f"{c.score:.2%}", f"{c.gain(base):+.2f}",
                  f"{c.p50_ms:.3f}", f"{c.speedup:.2f}x",
                  "—" if c.flops_fraction is None else f"{c.flops_fraction:.3f}",
                  "*" if c.key in result.front else "",
                  "yes" if result.target.meets(c, base) else "no")
    return t


def _show(result) -> None:
    console.print(candidates_table(result))
    for label, reason in result.skipped:
        console.print(f"  [dim]{label}: {reason}[/]")
    done = {k: v for k, v in result.work.items() if v}
    console.print(f"cache: {result.cache_dir} (" + (", ".join(f"{k} {v}" for k, v in done.items()) + " measured now"
                                                     if done else "everything from the cache") + ")")


def register(app: typer.Typer) -> None:
    @app.command("tune", short_help="The fastest merged model within an accuracy or latency target, measured.")
    @with_options(merge=False)
    def tune_cmd(
        model_name: ScoredModelArg = None,
        data: DataOpt = None,
        runtime: Annotated[Runtime, typer.Option(
            "--runtime", case_sensitive=False,
            help="Where latency is measured and the choice is made: ort (ONNX Runtime CPU: every candidate exported "
                 "and verified), ort-cuda, or torch (PyTorch eager, CPU); trt is refused (build the chosen file)")] = "ort",
        batch: BatchOpt = 1,
        max_drop: Annotated[Optional[float], typer.Option(
            "--max-drop", rich_help_panel=TARGET_PANEL,
            help="Top-1 points (detectors: mAP points) the model may lose against the unmerged one: the fastest "
                 "candidate within it")] = None,
        target_ms: Annotated[Optional[float], typer.Option(
            "--target-ms", rich_help_panel=TARGET_PANEL,
            help="p50 latency in ms at --batch: the most accurate candidate at or under it")] = None,
        target_speedup: Annotated[Optional[float], typer.Option(
            "--target-speedup", rich_help_panel=TARGET_PANEL,
            help="Speed-up over the unmerged model (same rounds): the most accurate candidate at or above it")] = None,
        methods: Annotated[Optional[str], typer.Option(
            "--methods", rich_help_panel=SEARCH_PANEL,
            help="Merge methods, comma-separated (default: every method that merges inside the blocks and that the "
                 "model takes: tome,hash,importance for timm ViTs)")] = None,
        budgets: Annotated[str, typer.Option(
            "--budgets", rich_help_panel=SEARCH_PANEL,
            help="Latency budgets (fractions of the unmerged model's block latency, solved from the measured "
                 "table), comma-separated; '' for none")] = DEFAULT_BUDGETS,
        flop_budgets: Annotated[Optional[str], typer.Option(
            "--flop-budgets", rich_help_panel=SEARCH_PANEL,
            help="FLOP budgets too (fractions of the unmerged model's FLOPs), comma-separated")] = None,
        limit: Annotated[Optional[int], typer.Option(
            "--limit", help="Score this many held-out images, chosen by a fixed seed (default: all)")] = None,
        output: Annotated[Optional[Path], typer.Option(
            "--output", "-o", help="Write the chosen model here (ONNX, verified; its schedule in the metadata)")] = None,
        report_dir: ReportDirOpt = None,
        cache_dir: Annotated[Optional[Path], typer.Option(
            "--cache-dir", help="Where measurements are kept between runs (default: $VITMERGE_CACHE/tune, else "
                                "<tmp>/vitmerge-cache/tune)")] = None,
        rounds: Annotated[int, typer.Option("--rounds", rich_help_panel=MEASURE_PANEL,
                                            help="Interleaved rounds per candidate (against the unmerged model)")] = 5,
        iters: ItersOpt = 5,
        warmup: WarmupOpt = 2,
        block_rounds: Annotated[int, typer.Option("--block-rounds", rich_help_panel=MEASURE_PANEL,
                                                  help="Interleaved rounds of the block latency table")] = 5,
        token_counts: Annotated[Optional[str], typer.Option(
            "--token-counts", rich_help_panel=MEASURE_PANEL,
            help="Token counts of the block latency table (default: the model's count down to an eighth of it)")] = None,
        threads: ThreadsOpt = 0,
        prop_attn: PropAttnOpt = True,
        split: SplitOpt = None,
        labels: ScoredLabelsOpt = None,
        class_order: ClassOrderOpt = "sorted",
        class_map: ClassMapOpt = "auto",
        normalize: NormalizeOpt = True,
        workers: WorkersOpt = 0,
        model_options: dict = None,
    ):
        """Measure the per-block latency on the runtime, build candidates (methods x latency / FLOP budgets), score
        each on the same held-out images and time it against the unmerged model, then choose by the target and
        write the chosen file, verified, with the report (Pareto front, plot, reusable latency table).

        Measurements are cached per candidate (--cache-dir): an interrupted run resumes, a second run measures
        nothing. Classifiers are scored by top-1 on a labelled folder; detectors (a YOLOS folder, dense:NAME) by
        mAP@[.5:.95] on a COCO-format folder, with eval's metric."""
        with user_errors():
            from ..profiling.tune import Target, check_settings  # torch-free: argument errors answer before torch loads

            target = Target.from_options(max_drop, target_ms, target_speedup)
            method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
            if method_list is not None:
                unknown = [m for m in method_list if m not in METHODS]
                if unknown or not method_list:
                    raise fail(f"--methods takes comma-separated names of {', '.join(METHODS)}; got {methods!r}")
            budget_list = float_list(budgets, "--budgets") if budgets.strip() else []
            flop_list = float_list(flop_budgets, "--flop-budgets") if flop_budgets else []
            check_settings(batch, rounds, iters, block_rounds, limit, budget_list, flop_list)
            counts = int_list(token_counts, "--token-counts", minimum=1) if token_counts else None
            if data is None and model_options["config"] is None:
                raise fail("vitmerge tune needs labelled images to measure accuracy on: give --data DIR (or --config "
                           "model.json that names its data)")
            if value(runtime) == "trt":
                raise fail("vitmerge tune does not build TensorRT engines per candidate: tune with --runtime ort-cuda "
                           "(the same GPU) or ort, then build the chosen file with `vitmerge build`")
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..profiling.tune import TargetNotMet, check_runtime, tune

        with user_errors(), loud_warnings(), Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=err_console, transient=True, disable=console.quiet) as progress:
            check_runtime(value(runtime))  # a runtime this machine lacks: refused before any work
            source = model_source(model_name, **model_options)
            try:
                result = tune(source, data, target, runtime=value(runtime), batch=batch, methods=method_list,
                              budgets=budget_list, flop_budgets=flop_list, limit=limit, output=output,
                              report_dir=report_dir, cache_dir=cache_dir, token_counts=counts, rounds=rounds,
                              iters=iters, warmup=warmup, block_rounds=block_rounds, threads=threads,
                              workers=workers, split=split, labels=labels, class_order=value(class_order),
                              class_map=value(class_map), normalize=normalize, prop_attn=prop_attn, progress=progress, on_status=lambda s: None)
            except TargetNotMet as e:
                progress.stop()
                _show(e.result)
                if e.result.report is not None:
                    err_console.print(f"report: {e.result.report.markdown}")
                raise
            progress.stop()
            _show(result)
            c, base = result.chosen, result.baseline
            if c is base:
                console.print(f"[bold yellow]chosen: the unmerged model[/] ({result.target.describe()}): no merged "
                              f"candidate that meets the target is faster than it on {result.settings['runtime']} at "
                              f"batch {batch} (p50 {base.p50_ms:.3f} ms); try smaller budgets (more merging) or a larger --batch")
            else:
                console.print(f"[bold green]chosen[/] {c.label} ({result.target.describe()}): {result.metric} "
                              f"{c.score:.2%} "
                              f"({c.gain(base):+.2f} points), p50 {c.p50_ms:.3f} ms vs {c.baseline_p50_ms:.3f} ms "
                              f"unmerged ({c.speedup:.2f}x), r per block {','.join(map(str, c.r))}")
            if result.output is not None:
                console.print(f"[bold green]wrote[/] {result.output}")
            if result.report is not None:
                console.print(f"[bold green]report[/] {result.report.markdown} ({result.report.json.name}, "
                              + ", ".join(p.name for p in result.report.plots) + ", block_latency.json)")
