"""``vitmerge check A.onnx B.onnx``: do two graph forms of a model compute the same thing in ONNX Runtime?"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import console, int_list, user_errors


def register(app: typer.Typer) -> None:
    @app.command("check", short_help="Run two graph forms of a model in ONNX Runtime: max |diff|, top-1 agreement.")
    def check_cmd(
        reference: Path = typer.Argument(..., metavar="A.onnx", help="Reference graph (e.g. the standard form)"),
        candidate: Path = typer.Argument(..., metavar="B.onnx", help="Graph to compare (e.g. the native or plugin form)"),
        batches: str = typer.Option("1,4", "--batch", help="Batch sizes to run, comma-separated"),
        atol: float = typer.Option(1e-4, "--atol", help="Absolute tolerance on the logits"),
        rtol: float = typer.Option(1e-3, "--rtol", help="Tolerance relative to max |A logits|"),
        seed: int = typer.Option(0, "--seed", help="Seed of the random input images"),
    ):
        """Run A and B in ONNX Runtime on the same random images: max |diff| and top-1 agreement per batch.

        Exits 1 when any batch is over tolerance (atol + rtol * max|A|). Graphs with vitmerge::TokenMerge
        nodes run with the custom-op kernel registered.
        """
        from ..errors import VerificationError
        from ..exporter.surgery import graph_form
        from ..exporter.verify import compare_files as compare

        bs = int_list(batches, "--batch")
        with user_errors():
            with console.status("running both graphs in ONNX Runtime"):
                checks = compare(reference, candidate, bs, atol=atol, rtol=rtol, seed=seed)
            t = Table(title=f"{reference.name} ({graph_form(reference)}) vs {candidate.name} ({graph_form(candidate)})")
            for col in ("batch", "max |diff|", "tolerance", "top-1 agreement", ""):
                t.add_column(col, justify="right")
            for c in checks:
                t.add_row(str(c.batch), f"{c.max_abs_diff:.2e}", f"{c.tolerance:.1e}", f"{c.top1_agreement:.0%}",
                          "[green]ok[/]" if c.ok else "[red]over[/]")
            console.print(t)
            bad = [c for c in checks if not c.ok]
            if bad:
                raise VerificationError(
                    "outputs differ: " + "; ".join(f"batch {c.batch}: max|diff| {c.max_abs_diff:.3g} > tol {c.tolerance:.3g}"
                                                   for c in bad)
                )
            console.print("[bold green]same outputs[/] within tolerance")
