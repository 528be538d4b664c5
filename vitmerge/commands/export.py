"""``vitmerge export``: timm model or transformers folder -> merged ONNX with static token counts, verified
before it is written.

Like every command module: options here, work in the library. The library is imported inside the
command so that ``vitmerge --help`` does not pay for torch.export, ONNX and timm.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import batch_list, console, loud_warnings, merge_request, model_source, user_errors
from ._options import DTypeOpt, MergeOp, value, with_options


def token_table(model) -> Table:
    info = model.vitmerge
    t = Table(title=f"token schedule ({info.method}, {info.protected} protected)", show_lines=False)
    for col in ("block", "tokens in", "r asked", "removed", "tokens out"):
        t.add_column(col, justify="right")
    for i, ((n_in, removed, n_out), asked) in enumerate(zip(info.tokens, info.r)):
        t.add_row(str(i), str(n_in), str(asked), str(removed), str(n_out))
    return t


def step_nodes_text(nodes: dict) -> str:
    """``{0: 19, 1: 20, 2: 20}`` -> ``block 0: 19, blocks 1-2: 20`` (runs of equal counts)."""
    items = sorted((int(b), int(n)) for b, n in nodes.items())
    runs, out = [], []
    for b, n in items:
        if runs and runs[-1][2] == n and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b, n])
    for a, z, n in runs:
        if a == -1:
            out.append(f"pre-encoder step: {n}")
            if z > -1:
                out.append(f"block 0: {n}" if z == 0 else f"blocks 0-{z}: {n}")
            continue
        out.append(f"block {a}: {n}" if a == z else f"blocks {a}-{z}: {n}")
    return ", ".join(out)


def register(app: typer.Typer) -> None:
    @app.command("export", short_help="timm ViT or transformers folder -> merged ONNX (static token counts), verified.")
    @with_options()
    def export_cmd(
        model_name: Annotated[Optional[str], typer.Argument(
            metavar="[MODEL]", help="timm model name (e.g. vit_small_patch16_224, or timm:NAME), a folder written by transformers' "
                                  "save_pretrained (ViT, DeiT, VideoMAE, AST, YOLOS), or dense:NAME (the dense "
                                  "detector on timm backbone NAME; outputs logits and boxes); optional with --config")] = None,
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .onnx file")] = ...,
        dtype: DTypeOpt = "fp32",
        model_options: dict = None,
        merge_options: dict = None,
        opset: Annotated[int, typer.Option("--opset", help="ONNX opset")] = 18,
        merge_op: Annotated[MergeOp, typer.Option(
            "--merge-op", case_sensitive=False,
            help="Graph form of each merge step: native (the default: one file for ONNX Runtime and TensorRT, "
                 "ToMe / importance steps in ~20 portable ops), standard (the exporter's own graph) or plugin "
                 "(one vitmerge::TokenMerge node); see docs/surgery.md")] = "native",
        verify_batches: Annotated[str, typer.Option(
            "--verify-batch", help="Batch sizes ONNX Runtime is checked at (one file: dynamic batch)")] = "1,4",
        no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the ONNX Runtime check (not recommended)")] = False,
    ):
        """Export a timm ViT or a transformers classifier (image, video, audio) with token merging to ONNX: static
        per-block token counts, dynamic batch, verified against PyTorch in ONNX Runtime before the file is written."""
        from .._io import check_output_path

        # everything that can be refused without torch is refused first (and answers in well under a second)
        batches = batch_list(verify_batches, "--verify-batch")
        with user_errors():
            check_output_path(output)  # fail before minutes of work
            request = merge_request(**merge_options)
        from ..exporter import export
        from ..models.build import build_merged
        from ..models.flops import flop_ratio

        with user_errors(), loud_warnings():
            source = model_source(model_name, **model_options)
            model = build_merged(source, request)
            if getattr(model, "vitmerge", None) is not None:
                console.print(token_table(model))
            base, merged, ratio = flop_ratio(model)
            console.print(f"FLOPs/image: unmerged {base / 1e9:.3f} G, merged {merged / 1e9:.3f} G -> "
                          f"[bold]{ratio:.3f}x[/] fewer (the speed-up bound)")
            t0 = time.perf_counter()
            with console.status("exporting") as status:
                result = export(model, output, opset=opset, check=not no_verify, batch_sizes=batches,
                                merge_op=value(merge_op), dtype=value(dtype), on_step=lambda s: status.update(s))
            console.print(f"exported in {time.perf_counter() - t0:.1f} s")
            rep = result.verification
            if rep is not None:
                console.print(f"verified: {rep.describe_rule()}", soft_wrap=True)
                for c in rep.checks:
                    dec = "" if c.decisions_identical is None else f", merge decisions identical {c.decisions_identical:.2%}"
                    more = "".join(f", {n} max|diff| {d:.2e} (tol {t:.1e})" for n, (d, t) in c.outputs.items())
                    console.print(f"  batch {c.batch}: max|diff| {c.max_abs_diff:.2e} (tol {c.tolerance:.1e}){more}, "
                                  f"top-1 agreement {c.top1_agreement:.0%}{dec}")
                if rep.vs_fp32:
                    v = rep.vs_fp32
                    console.print(f"  {rep.dtype} vs float32 (PyTorch, same images): top-1 agreement {v['top1_agreement']:.0%}"
                                  + (f", merge decisions identical {v['decisions_identical']:.2%}"
                                     if "decisions_identical" in v else ""))
                if value(merge_op) != "standard":
                    console.print(f"  the {value(merge_op)} form was run in ONNX Runtime and checked the same way")
                if rep.int_extent is not None:
                    console.print(f"  integers: widest |value| {rep.int_extent[0]:,} ({rep.int_extent[1]}): inside int32, "
                                  "as TensorRT computes them")
            else:
                console.print("[yellow]not verified (--no-verify)[/]")
            if result.step_nodes:
                console.print(f"nodes per merge step ({value(merge_op)} form): {step_nodes_text(result.step_nodes)}")
            console.print(f"[bold green]wrote[/] {result.path}")
