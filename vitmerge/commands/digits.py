"""``vitmerge digits train``: the offline demo model (a small timm ViT on scikit-learn's digits)."""
from __future__ import annotations

from pathlib import Path

import typer

from ._common import console, user_errors


def register(app: typer.Typer) -> None:
    digits_app = typer.Typer(help="The offline demo model: a small timm ViT trained on scikit-learn's handwritten digits.",
                             no_args_is_help=True)

    @digits_app.command("train", short_help="Train (or reuse) the offline digits demo ViT.")
    def train_cmd(
        output: Path = typer.Option(Path("vitmerge-digits"), "--output", "-o", help="Folder for model.pth, model.json and the PNG image folders"),
        epochs: int = typer.Option(None, "--epochs", help="Training epochs (default: the fixed recipe's)"),
        force: bool = typer.Option(False, "--force", help="Train again even if OUTPUT holds this configuration already"),
    ):
        """Train the digits ViT (about a minute on 2 CPU cores) and write it with its test/train image folders."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..demo import digits

        with user_errors():
            cfg = digits.DigitsConfig()
            if epochs is not None:
                if epochs <= 0:
                    from ._common import fail

                    raise fail(f"--epochs must be positive, got {epochs}")
                cfg.train["epochs"] = int(epochs)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("loss {task.fields[loss]:.3f}"), console=console) as prog:
                task = prog.add_task("training", total=None, loss=float("nan"))

                def step(i, total, loss):
                    prog.update(task, completed=i, total=total, loss=loss)

                res = digits.train(output, cfg, force=force, on_step=step)
            what = "reused (same configuration)" if res.cached else f"trained in {res.train_seconds:.0f} s"
            console.print(f"{res.model_name} {res.kwargs['img_size']}px, patch {res.kwargs['patch_size']}, "
                          f"depth {res.kwargs['depth']}, dim {res.kwargs['embed_dim']}: {what}; "
                          f"test top-1 [bold]{res.test_top1:.2%}[/]")
            console.print(f"[bold green]wrote[/] {res.config_path}")
            console.print(f"  evaluate:  vitmerge eval --config {res.config_path} --r 8")
            console.print(f"  export:    vitmerge export {res.model_name} --checkpoint {res.checkpoint} "
                          f"--model-kwargs {res.dir / 'model_kwargs.json'} -o digits.onnx --r 8")

    app.add_typer(digits_app, name="digits")
