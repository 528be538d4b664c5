"""``vitmerge selftest``: every path this machine offers on a tiny model, PASS / FAIL / SKIP per row."""
from __future__ import annotations

from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ._common import EXIT_FAILED, console, user_errors
from ._options import Method, ReportDirOpt, value

STYLE = {"PASS": "bold green", "FAIL": "bold red", "SKIP": "yellow"}


def register(app: typer.Typer) -> None:
    @app.command("selftest", short_help="Run every path this machine offers on a tiny model: PASS / FAIL / SKIP.")
    def selftest_cmd(
        method: Annotated[Optional[List[Method]], typer.Option(
            "--method", "-m", case_sensitive=False, help="Only these methods (repeatable); default: all")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="tome only (about a minute on a CPU)")] = False,
        report_dir: ReportDirOpt = None,
    ):
        """The first command to run on a new machine. Builds a tiny random-weight ViT, merges it with each method,
        exports each graph form, and runs it in PyTorch, ONNX Runtime CPU (with the TokenMerge kernel), FP16,
        ONNX Runtime CUDA, the Triton kernel, TensorRT and the energy counters, comparing each with ONNX Runtime
        CPU. Exits 1 if any row FAILs; SKIP rows name what is missing."""
        from ..profiling.report import md_table, prepare_dir, write_report
        from ..selftest import run

        with user_errors():
            if report_dir is not None:
                prepare_dir(report_dir)

            def show(r):
                console.print(f"[{STYLE[r.status]}]{r.status}[/] {escape(r.path)} [dim]({r.seconds:.1f} s)[/]: "
                              f"{escape(r.detail)}", soft_wrap=True, highlight=False)

            result = run(methods=[value(m) for m in method] if method else None, quick=quick, on_row=show)
            t = Table(title="vitmerge selftest")
            for col in ("path", "result", "detail"):
                t.add_column(col, overflow="fold")
            for r in result.rows:
                t.add_row(escape(r.path), f"[{STYLE[r.status]}]{r.status}[/]", escape(r.detail))
            console.print(t)
            s = result.to_dict()
            summary = f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped"
            console.print(escape(", ".join(f"{k}: {v}" for k, v in result.machine.items())), soft_wrap=True)
            if report_dir is not None:
                body = md_table(["path", "result", "detail"], [[r.path, r.status, r.detail] for r in result.rows])
                paths = write_report(report_dir, "vitmerge selftest", s, [("Paths", body)])
                console.print(f"report: {paths.markdown}")
            if not result.ok:
                console.print(f"[bold red]FAILED[/] selftest: {summary}")
                raise typer.Exit(EXIT_FAILED)
            console.print(f"[bold green]PASSED[/] selftest: {summary}")
