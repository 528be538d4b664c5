"""``vitmerge visualize``: which image patches merged into the same token, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import console, loud_warnings, user_errors


def register(app: typer.Typer) -> None:
    @app.command("visualize")
    def visualize_cmd(
        model_name: str = typer.Argument(..., metavar="MODEL", help="timm model name (or timm:NAME), e.g. vit_small_patch16_224"),
        image: str = typer.Option("skimage:astronaut", "--image", "-i", help="Image file, or a photo shipped with scikit-image: skimage:astronaut | skimage:chelsea | skimage:coffee"),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the .png"),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights (random without: groups then follow no meaning)"),
        method: str = typer.Option("tome", "--method", "-m", help="Merge method"),
        r: str = typer.Option("8", "--r", help="Tokens merged per block: one int, or one per block comma-separated"),
        img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (default: the model's)"),
        num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classifier size (default: from the checkpoint)"),
    ):
        """Draw which patches merged into the same final token (ToMe-style: each group in its mean colour, outlined)."""
        from ..models.build import build_model
        from ..profiling.visualize import load_image, render, visualize_model
        from ._common import parse_r_option

        r_spec = parse_r_option(r)
        name = model_name[len("timm:"):] if model_name.startswith("timm:") else model_name
        with user_errors(), loud_warnings():
            from ..errors import OutputPathError

            if output.suffix.lower() != ".png":
                raise OutputPathError(f"--output {str(output)!r} must end in .png")
            if not output.parent.is_dir():
                raise OutputPathError(f"output folder {str(output.parent)!r} does not exist; create it or choose another --output")
            picture = load_image(image)
            model = build_model(name, checkpoint, img_size=img_size, num_classes=num_classes)
            with console.status("running the model with source tracking"):
                vis = visualize_model(model, picture, method=method, r=r_spec)
            path = render(vis, output, title=f"{name} — {image}")
            console.print(f"{vis.groups.size} patches -> {vis.n_groups} groups "
                          f"({vis.tokens_final} final tokens, {vis.protected} protected)")
            console.print(f"[bold green]wrote[/] {path}")
