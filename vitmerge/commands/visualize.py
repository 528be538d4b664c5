"""``vitmerge visualize``: which image patches merged into the same token, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, loud_warnings, parse_options, parse_r_option, user_errors
from ._options import MERGE_PANEL, CheckpointOpt, ImgSizeOpt, MethodOpt, NumClassesOpt, OptionOpt, value


def register(app: typer.Typer) -> None:
    @app.command("visualize", short_help="PNG of which image patches merged into the same token.")
    def visualize_cmd(
        model_name: Annotated[str, typer.Argument(metavar="MODEL", help="timm model name (or timm:NAME), e.g. vit_small_patch16_224")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .png")],
        image: Annotated[str, typer.Option(
            "--image", "-i", help="Image file, or a photo shipped with scikit-image: skimage:astronaut | "
                                  "skimage:chelsea | skimage:coffee")] = "skimage:astronaut",
        checkpoint: CheckpointOpt = None,
        method: MethodOpt = "tome",
        r: Annotated[str, typer.Option("--r", rich_help_panel=MERGE_PANEL,
                                       help="Tokens merged per block: one int, or one per block comma-separated")] = "8",
        option: OptionOpt = None,
        img_size: ImgSizeOpt = None,
        num_classes: NumClassesOpt = None,
    ):
        """Draw which patches merged into the same final token (ToMe-style: each group in its mean colour, outlined)."""
        from ..models.build import build_model
        from ..profiling.visualize import load_image, render, visualize_model

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
                vis = visualize_model(model, picture, method=value(method), r=r_spec, **parse_options(option))
            path = render(vis, output, title=f"{name} — {image}")
            console.print(f"{vis.groups.size} patches -> {vis.n_groups} groups "
                          f"({vis.tokens_final} final tokens, {vis.protected} protected)")
            console.print(f"[bold green]wrote[/] {path}")
