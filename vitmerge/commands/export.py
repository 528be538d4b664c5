"""``vitmerge export``: timm model -> merged ONNX with static token counts, verified before it is written."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ._common import console, int_list, loud_warnings, parse_json_option, parse_options, parse_r_option, user_errors


def token_table(model) -> Table:
    info = model.vitmerge
    t = Table(title=f"token schedule ({info.method}, {info.protected} protected)", show_lines=False)
    for col in ("block", "tokens in", "r asked", "removed", "tokens out"):
        t.add_column(col, justify="right")
    for i, ((n_in, removed, n_out), asked) in enumerate(zip(info.tokens, info.r)):
        t.add_row(str(i), str(n_in), str(asked), str(removed), str(n_out))
    return t


def build_merged(model_name: str, checkpoint: Optional[Path], method: str, r, img_size: Optional[int],
                 prop_attn: bool = True, num_classes: Optional[int] = None, schedule: str = "constant",
                 budget: Optional[float] = None, model_kwargs: Optional[dict] = None,
                 budget_latency: Optional[Path] = None, **options):
    """Build the timm model (local checkpoint or random), apply the method, return it."""
    from ..models import apply
    from ..models.budget import resolve_schedule
    from ..models.build import build_model

    kw = dict(model_kwargs or {})
    if img_size is not None:
        kw["img_size"] = img_size  # --img-size wins over the same key in --model-kwargs
    model = build_model(model_name, checkpoint, num_classes=num_classes, **kw)
    from ..models.mobilevit import is_mobilevit

    if is_mobilevit(model) and budget is None and r == 0:
        return model  # the plain mobile baseline: exported as is
    rs = resolve_schedule(model, method, r, schedule, budget, budget_latency, **options)
    apply(model, method=method, r=rs, prop_attn=prop_attn, **options)
    return model


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        model_name: str = typer.Argument(..., metavar="MODEL_NAME", help="timm model name, e.g. vit_small_patch16_224"),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the .onnx file"),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local .pth/.pt/.safetensors weights (state dict or {'model': ...}); random weights without it"),
        method: str = typer.Option("tome", "--method", "-m", help="Merge method"),
        r: str = typer.Option("16", "--r", help="Tokens merged per block: one int, or one per block comma-separated; 0 = the plain model"),
        schedule: str = typer.Option("constant", "--schedule", help="constant | decreasing (ToMe's inflection schedule, mean r per block)"),
        budget: Optional[float] = typer.Option(None, "--budget", help="Target FLOP fraction of the unmerged model (e.g. 0.5); solves per-block r"),
        budget_latency: Optional[Path] = typer.Option(None, "--budget-latency", help="With --budget: meet it in measured latency, from a JSON table {token count: ms per block}"),
        img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (default: the model's)"),
        num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classifier size (default: from the checkpoint, else the model's)"),
        model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="Extra timm.create_model arguments as JSON (or a .json file), e.g. '{\"depth\": 6}'"),
        option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="Method option KEY=VALUE, repeatable (e.g. -O bits=8, -O vocab=vocab.pt)"),
        prop_attn: bool = typer.Option(True, "--prop-attn/--no-prop-attn", help="Proportional attention (log token size added to attention logits)"),
        opset: int = typer.Option(18, "--opset", help="ONNX opset"),
        merge_op: str = typer.Option("standard", "--merge-op", help="Graph form of each merge: standard | native | plugin"),
        verify_batches: str = typer.Option("1,4", "--verify-batch", help="Batch sizes ONNX Runtime is checked at (same file: dynamic batch)"),
        no_verify: bool = typer.Option(False, "--no-verify", help="Skip the ONNX Runtime check (not recommended)"),
    ):
        """Export a timm ViT with token merging to ONNX: static per-block token counts, dynamic batch, verified in ONNX Runtime."""
        from ..exporter import export as do_export
        from ..exporter.onnx_export import check_output_path
        from ..models.flops import flop_ratio

        r_spec = parse_r_option(r)
        batches = int_list(verify_batches, "--verify-batch")
        with user_errors(), loud_warnings():
            check_output_path(output)  # fail before minutes of work
            if merge_op not in ("standard", "native", "plugin"):
                from ..errors import ScheduleError

                raise ScheduleError(f"unknown --merge-op {merge_op!r}; use standard, native or plugin")
            model = build_merged(model_name, checkpoint, method, r_spec, img_size, prop_attn=prop_attn,
                                 num_classes=num_classes, schedule=schedule, budget=budget,
                                 budget_latency=budget_latency, model_kwargs=parse_json_option(model_kwargs, "--model-kwargs"),
                                 **parse_options(option))
            if getattr(model, "vitmerge", None) is not None:
                console.print(token_table(model))
            base, merged, ratio = flop_ratio(model)
            console.print(f"FLOPs/image: unmerged {base / 1e9:.3f} G, merged {merged / 1e9:.3f} G -> "
                          f"[bold]{ratio:.3f}x[/] fewer (the speed-up bound)")
            t0 = time.perf_counter()
            with console.status("exporting") as status:
                result = do_export(model, output, opset=opset, check=not no_verify, batch_sizes=batches,
                                   merge_op=merge_op, on_step=lambda s: status.update(s))
            console.print(f"exported in {time.perf_counter() - t0:.1f} s")
            rep = result.verification
            if rep is not None:
                for c in rep.checks:
                    console.print(f"  ORT vs PyTorch, batch {c.batch}: max|diff| {c.max_abs_diff:.2e} "
                                  f"(tol {c.tolerance:.1e}), top-1 agreement {c.top1_agreement:.0%}")
            else:
                console.print("[yellow]not verified (--no-verify)[/]")
            console.print(f"[bold green]wrote[/] {result.path}")
