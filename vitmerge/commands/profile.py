"""``vitmerge profile``: latency percentiles, throughput and energy per image, interleaved across models."""
from __future__ import annotations

from typing import Annotated, List, Optional

import typer
from rich.table import Table

from ._common import batch_list, console, err_console, fail, loud_warnings, merge_request, model_source, user_errors
from ._options import (MEASURE_PANEL, Device, ItersOpt, ReportDirOpt, Runtime, ThreadsOpt, WarmupOpt, value,
                       with_options)

TIMM_PANEL = "Model"


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.3f}"


def latency_table(result) -> Table:
    from rich import box

    how = result.settings.get("interleaving", "as created")
    t = Table(title="latency (ms) and throughput, interleaved" + ("" if how == "as created" else f" ({how})"),
              box=box.SIMPLE_HEAD, padding=(0, 1))
    width = min(max((len(r.label) for r in result.rows), default=5), 28)
    t.add_column("model", min_width=width, overflow="fold")
    for col in ("runtime", "batch", "p50", "p90", "p99", "img/s", "vs 1st"):
        t.add_column(col, justify="left" if col == "runtime" else "right", no_wrap=True)
    for r in result.rows:
        t.add_row(r.label, f"{r.runtime}/{r.device}", str(r.batch), _ms(r.stats.p50), _ms(r.stats.p90),
                  _ms(r.stats.p99), f"{r.stats.throughput(r.batch):,.1f}", f"{r.speedup:.2f}x")
    return t


def energy_lines(result) -> List[str]:
    lines = []
    for r in result.rows:
        if r.energy is not None and r.energy.measured:
            lines.append(f"{r.label}, batch {r.batch}: {r.energy.describe()}")
    if result.energy_note:
        lines.append(result.energy_note)
    return lines


def register(app: typer.Typer) -> None:
    @app.command("profile", short_help="Latency percentiles, throughput and energy per image, models interleaved.")
    @with_options()
    def profile_cmd(
        models: Annotated[List[str], typer.Argument(
            metavar="MODEL...", help="MODEL.onnx, MODEL.engine, a timm name (or timm:NAME), dense:NAME or a transformers model "
                                     "folder; several are interleaved and compared with the first")],
        runtime: Annotated[Optional[List[Runtime]], typer.Option(
            "--runtime", case_sensitive=False,
            help="Runtime(s) to run every model in, repeatable (--runtime ort --runtime ort-cuda); default: ort for "
                 ".onnx, trt for engines, torch for models built in PyTorch")] = None,
        threads: ThreadsOpt = 0,
        batch: Annotated[str, typer.Option("--batch", "-b", rich_help_panel=MEASURE_PANEL,
                                           help="Batch sizes, comma-separated")] = "1,8",
        iters: ItersOpt = 5,
        warmup: WarmupOpt = 3,
        rounds: Annotated[int, typer.Option("--rounds", rich_help_panel=MEASURE_PANEL,
                                            help="Interleaved rounds (models take turns each round)")] = 10,
        energy: Annotated[bool, typer.Option("--energy/--no-energy", rich_help_panel=MEASURE_PANEL,
                                             help="Energy per image from NVML (GPU) or RAPL (CPU) where readable")] = True,
        energy_seconds: Annotated[Optional[float], typer.Option(
            "--energy-seconds", rich_help_panel=MEASURE_PANEL,
            help="Length of each energy window and idle window (default: the counter's, 10 s on NVML, 2 s on RAPL)")] = None,
        energy_windows: Annotated[int, typer.Option(
            "--energy-windows", rich_help_panel=MEASURE_PANEL,
            help="Energy windows per model and batch size, interleaved; the median and min-max are reported")] = 3,
        memory: Annotated[bool, typer.Option(
            "--memory/--no-memory", rich_help_panel=MEASURE_PANEL,
            help="Peak memory of each ONNX file (ONNX Runtime CPU) at each batch size, each in a process of its own")] = True,
        report_dir: ReportDirOpt = None,
        device: Annotated[Device, typer.Option("--device", rich_help_panel=TIMM_PANEL, case_sensitive=False,
                                               help="PyTorch device for models built in PyTorch")] = "auto",
        model_options: dict = None,
        merge_options: dict = None,
    ):
        """Latency p50/p90/p99, throughput and energy per image for each batch size; models interleaved so
        ratios are fair. Model and merge options apply to the models built in PyTorch (timm names, dense:NAME,
        transformers folders); .onnx files and engines carry their own."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        batches = batch_list(batch, "--batch")
        runtimes = [value(rt) for rt in runtime] if runtime else [None]
        if energy_seconds is not None and energy_seconds <= 0:
            raise fail("--energy-seconds must be > 0")
        if energy_windows < 1:
            raise fail("--energy-windows must be >= 1")

        with user_errors():
            from ..request import ModelRef

            refs = [ModelRef.parse(m) for m in models]
            pytorch = [ref for ref in refs if ref.is_pytorch]
            given = [("--" + k.replace("_", "-"), v) for k, v in {**model_options, **merge_options}.items()
                     if k not in ("seed", "method", "schedule", "prop_attn")]
            if not pytorch and any(v for _, v in given):
                named = ", ".join(k for k, v in given if v)
                raise fail(f"{named} apply to models built in PyTorch (timm names, dense:NAME, transformers folders); "
                           "every MODEL here is an .onnx file or an engine, which carry their own weights and merge")
            request = merge_request(**merge_options) if pytorch else None  # a malformed --r: refused before torch
        from ..backends import open_runner
        from ..profiling.profile import profile_targets, write_profile_report
        from ..profiling.report import prepare_dir
        with user_errors(), loud_warnings():
            if report_dir is not None:
                prepare_dir(report_dir)  # fail before minutes of measuring
            targets = []
            with console.status("loading models") as st:
                for ref in refs:
                    for rt in runtimes:
                        st.update(f"loading {ref.text}" + (f" ({rt})" if rt else ""))
                        if ref.is_pytorch:
                            source = model_source(ref.text, **model_options)
                            targets.append(open_runner(source, rt, request=request, device=value(device),
                                                       threads=threads))
                        else:
                            targets.append(open_runner(ref, rt, threads=threads))
            total = rounds * len(batches)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err_console, transient=True, disable=console.quiet) as progress:
                task = progress.add_task("profiling", total=total)
                result = profile_targets(
                    targets, batches, rounds=rounds, iters=iters, warmup=warmup, energy=energy,
                    energy_seconds=energy_seconds, energy_windows=energy_windows, on_round=lambda: progress.advance(task),
                    on_status=lambda s: progress.update(task, description=s), memory=memory,
                )
            console.print(latency_table(result))
            for r in result.rows:
                if r.peak_mb is not None:
                    console.print(f"{r.label}, batch {r.batch}: peak memory {r.peak_mb:,.0f} MB above the loaded model "
                                  "(own process, default ONNX Runtime options)")
            for line in energy_lines(result):
                console.print(line)
            if report_dir is not None:
                paths = write_profile_report(result, report_dir)
                console.print(f"[bold green]report[/] {paths.markdown} ({paths.json.name}"
                              + "".join(f", {p.name}" for p in paths.plots) + ")")
