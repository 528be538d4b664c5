"""``vitmerge profile``: latency percentiles, throughput and energy per image, interleaved across models."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ._common import console, err_console, fail, int_list, loud_warnings, parse_r_option, user_errors


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.3f}"


def latency_table(result) -> Table:
    from rich import box

    t = Table(title="latency (ms) and throughput, interleaved", box=box.SIMPLE_HEAD, padding=(0, 1))
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
    @app.command("profile")
    def profile_cmd(
        models: List[str] = typer.Argument(..., metavar="MODEL...", help="MODEL.onnx, MODEL.engine or timm:NAME; several are interleaved and compared with the first"),
        batch: str = typer.Option("1,8", "--batch", "-b", help="Batch sizes, comma-separated"),
        runtime: Optional[str] = typer.Option(None, "--runtime", help="torch | ort | ort-cuda | trt, or several comma-separated (default: ort for .onnx, trt for engines, torch for timm:NAME)"),
        iters: int = typer.Option(5, "--iters", help="Timed calls per model in each round"),
        warmup: int = typer.Option(3, "--warmup", help="Untimed calls per model before timing"),
        rounds: int = typer.Option(10, "--rounds", help="Interleaved rounds (models take turns each round)"),
        report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Write report.json, report.md and plots here"),
        energy: bool = typer.Option(True, "--energy/--no-energy", help="Energy per image from NVML (GPU) or RAPL (CPU) where readable"),
        energy_seconds: Optional[float] = typer.Option(None, "--energy-seconds", help="Length of each energy window and idle window (default: the counter's, 10 s on NVML, 2 s on RAPL)"),
        energy_windows: int = typer.Option(3, "--energy-windows", help="Energy windows per model and batch size, interleaved; the median and min-max are reported"),
        threads: int = typer.Option(0, "--threads", help="CPU threads for ORT/PyTorch (0: the runtime's default)"),
        device: str = typer.Option("auto", "--device", help="PyTorch device for timm:NAME: auto | cpu | cuda"),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for timm:NAME (random without)"),
        method: str = typer.Option("tome", "--method", "-m", help="Merge method for timm:NAME"),
        r: str = typer.Option("0", "--r", help="Tokens merged per block for timm:NAME (0 = unmerged)"),
        img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution for timm:NAME"),
    ):
        """Latency p50/p90/p99, throughput and energy per image for each batch size; models interleaved so ratios are fair."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..backends import open_runner as open_target
        from ..profiling.profile import profile_targets, write_profile_report

        batches = int_list(batch, "--batch")
        runtimes = [s.strip() for s in runtime.split(",") if s.strip()] if runtime else [None]
        r_spec = parse_r_option(r)
        if device not in ("auto", "cpu", "cuda"):
            raise fail(f"--device must be auto, cpu or cuda; got {device!r}")
        if energy_seconds is not None and energy_seconds <= 0:
            raise fail("--energy-seconds must be > 0")
        if energy_windows < 1:
            raise fail("--energy-windows must be >= 1")
        with user_errors(), loud_warnings():
            if report_dir is not None:
                from ..profiling.report import prepare_dir

                prepare_dir(report_dir)  # fail before minutes of measuring
            targets = []
            with console.status("loading models") as st:
                for spec in models:
                    for rt in runtimes:
                        st.update(f"loading {spec}" + (f" ({rt})" if rt else ""))
                        targets.append(open_target(spec, rt, checkpoint=checkpoint, method=method, r=r_spec,
                                                   img_size=img_size, device=device, threads=threads))
            total = rounds * len(batches)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err_console, transient=True) as progress:
                task = progress.add_task("profiling", total=total)
                result = profile_targets(
                    targets, batches, rounds=rounds, iters=iters, warmup=warmup, energy=energy,
                    energy_seconds=energy_seconds, energy_windows=energy_windows, on_round=lambda: progress.advance(task),
                    on_status=lambda s: progress.update(task, description=s),
                )
            console.print(latency_table(result))
            for line in energy_lines(result):
                console.print(line)
            if report_dir is not None:
                paths = write_profile_report(result, report_dir)
                console.print(f"[bold green]report[/] {paths.markdown} ({paths.json.name}"
                              + "".join(f", {p.name}" for p in paths.plots) + ")")
