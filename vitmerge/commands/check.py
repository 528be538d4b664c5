"""``vitmerge check A.onnx B.onnx``: do two graph forms of a model compute the same thing in ONNX Runtime?
``vitmerge check F.onnx --target tensorrt``: would TensorRT's ONNX parser take every node of F?"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ._common import EXIT_FAILED, console, fail, batch_list, user_errors

TARGETS = ("tensorrt",)


def _readiness(path: Path, target: str, batches=(1, 4), seed: int = 0) -> None:
    """One line per offending node (op, node name, reason), then PASSED / FAILED; exit 1 on findings.

    Static (TensorRT's operator table), then dynamic: the file run in ONNX Runtime on random inputs with the
    range of every integer tensor recorded (a value outside int32 is a finding: TensorRT would wrap it)."""
    from ..exporter.trt_check import check_tensorrt, integer_findings

    report = check_tensorrt(path)
    with console.status("recording every integer tensor's range in ONNX Runtime"):
        ints, note = integer_findings(path, batches, seed=seed)
    report.findings.extend(ints)
    report.notes.append(note)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    for f in report.findings:
        console.print(f.line(), markup=False, soft_wrap=True)
    where = f"{path.name}: {report.nodes} nodes checked against {report.table}"
    if report.findings:
        console.print(f"[bold red]FAILED[/] {target} readiness: {len(report.findings)} node(s) TensorRT would not "
                      f"take as they are ({where})", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    console.print(f"[bold green]PASSED[/] {target} readiness ({where})", soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("check", short_help="Compare two graph forms in ONNX Runtime, or check one file for TensorRT.")
    def check_cmd(
        reference: Path = typer.Argument(..., metavar="A.onnx", help="Reference graph (e.g. the standard form); "
                                         "with --target, the one file to check"),
        candidate: Optional[Path] = typer.Argument(None, metavar="[B.onnx]",
                                                   help="Graph to compare with A (e.g. the native or plugin form)"),
        target: Optional[str] = typer.Option(None, "--target", help="Check one file for a runtime instead of comparing "
                                             "two: 'tensorrt' (a static check against TensorRT's ONNX operator table)"),
        batches: str = typer.Option("1,4", "--batch", help="Batch sizes to run, comma-separated"),
        atol: float = typer.Option(1e-4, "--atol", help="Absolute tolerance on each output (logits; detectors' boxes too)"),
        rtol: float = typer.Option(1e-3, "--rtol", help="Tolerance relative to max |A's output|, per output"),
        seed: int = typer.Option(0, "--seed", help="Seed of the random input images"),
    ):
        """Run A and B in ONNX Runtime on the same random images: max |diff| and top-1 agreement per batch.

        Every output is compared (detectors: logits and boxes), each with its own tolerance. Exits 1 when
        any output of any batch is over tolerance (atol + rtol * max|A's output|). Graphs with vitmerge::TokenMerge
        nodes run with the custom-op kernel registered.

        With one file and --target tensorrt: a readiness check (no GPU needed) against TensorRT's ONNX operator
        support (types, TopK's K limit, Scatter reductions, DOUBLE, custom domains and their plugins), then the
        file run in ONNX Runtime on random inputs (--batch, --seed) with every integer tensor's range recorded:
        a value outside int32 is a finding (TensorRT computes INT64 as INT32). Prints one line per offending node
        and exits 1 when there is any, 0 when clean.
        """
        if target is not None:
            if target.lower() not in TARGETS:
                raise fail(f"unknown --target {target!r}; use one of: {', '.join(TARGETS)}")
            if candidate is not None:
                raise fail(f"--target checks one file; got two ({reference}, {candidate}): drop --target to compare "
                           "them, or check each on its own")
            with user_errors():
                _readiness(reference, target.lower(), batch_list(batches, "--batch"), seed)
            return
        if candidate is None:
            raise fail("give two files to compare (vitmerge check A.onnx B.onnx), or one file and a runtime to check it "
                       "for (vitmerge check F.onnx --target tensorrt)")

        bs = batch_list(batches, "--batch")
        for p in (reference, candidate):  # before ONNX Runtime is imported: a typo answers at once
            if not p.is_file():
                raise fail(f"no ONNX file at {str(p)!r}")

        import numpy as np

        from ..errors import VerificationError
        from ..exporter.surgery import graph_form
        from ..exporter.verify import compare_files as compare
        from ..exporter.verify import weight_difference

        with user_errors():
            with console.status("running both graphs in ONNX Runtime"):
                checks = compare(reference, candidate, bs, atol=atol, rtol=rtol, seed=seed)
            t = Table(title=f"{reference.name} ({graph_form(reference)}) vs {candidate.name} ({graph_form(candidate)})")
            others = list(checks[0].outputs) if checks else []
            for col in ("batch", "max |diff|", "tolerance", "top-1 agreement",
                        *(f"{o}: max |diff| (tol)" for o in others), ""):
                t.add_column(col, justify="right")
            for c in checks:
                t.add_row(str(c.batch), f"{c.max_abs_diff:.2e}", f"{c.tolerance:.1e}", f"{c.top1_agreement:.0%}",
                          *(f"{d:.2e} ({tol:.1e})" for d, tol in c.outputs.values()),
                          "[green]ok[/]" if c.ok else "[red]over[/]")
            console.print(t)
            n_diff, n_common, names = weight_difference(reference, candidate)
            weights = (f"the two files have different weights ({n_diff} of the {n_common} weight tensors they share "
                       f"differ, e.g. {', '.join(names)}): they are not two forms of one model. Export both from the "
                       "same --checkpoint (or, without one, the same --seed)") if n_diff else None
            if weights:
                console.print(f"[yellow]{weights}[/]", soft_wrap=True)
            elif n_common:
                console.print(f"weights: the {n_common} weight tensors both files hold are identical")
            bad = [c for c in checks if not c.ok]
            if bad:
                raise VerificationError(("" if not weights else weights + ". ") + "outputs differ: " + "; ".join(
                    f"batch {c.batch}: " + ", ".join(
                        f"{name} max|diff| {d:.3g} > tol {tol:.3g}"
                        for name, (d, tol) in [("logits", (c.max_abs_diff, c.tolerance)), *c.outputs.items()]
                        if not (np.isfinite(d) and d <= tol)) for c in bad))
            console.print("[bold green]same outputs[/] within tolerance")
