"""``vitmerge visualize``: which image patches merged into the same token, as a PNG; for detectors, the
boxes of the unmerged and the merged model side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, loud_warnings, merge_request, model_source, user_errors
from ._options import with_options


def register(app: typer.Typer) -> None:
    @app.command("visualize", short_help="PNG of which patches merged into one token (detectors: boxes unmerged vs merged).")
    @with_options(skip=("frames", "audio_length"))
    def visualize_cmd(
        model_name: Annotated[Optional[str], typer.Argument(
            metavar="[MODEL]", help="timm model name (or timm:NAME), e.g. vit_small_patch16_224, a transformers "
                                    "folder (ViT, DeiT, YOLOS), or a detector: dense:NAME --checkpoint det.pth; "
                                    "optional with --config")] = None,
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .png")] = ...,
        image: Annotated[str, typer.Option(
            "--image", "-i", help="Image file, or a photo shipped with scikit-image: skimage:astronaut | "
                                  "skimage:chelsea | skimage:coffee")] = "skimage:astronaut",
        score: Annotated[float, typer.Option(
            "--score", help="Detectors: draw boxes scoring at least this (0..1)")] = 0.3,
        normalize: Annotated[bool, typer.Option(
            "--normalize/--no-normalize",
            help="Detectors: normalise pixels with the model's mean/std, or feed them in [0, 1] (vitmerge's demo "
                 "detectors)")] = True,
        model_options: dict = None,
        merge_options: dict = None,
    ):
        """Draw which patches merged into the same final token (ToMe-style: each group in its mean colour, outlined).

        Detectors (dense:NAME, YOLOS folders): the photo resized to the model's input, the unmerged detector's
        boxes next to the merged one's (decoded as `vitmerge eval` decodes them), each labelled with class and score."""
        with user_errors():
            from ..request import ModelRef

            request = merge_request(**merge_options)  # a malformed --r or -O: refused before torch is imported
            ModelRef.parse(model_name or "x").require_pytorch("visualize")
            from .._io import check_output_path
            from ..errors import UsageError

            check_output_path(output, ".png")
            if not 0.0 <= score <= 1.0:
                raise UsageError(f"--score must be between 0 and 1, got {score}")
        from ..models.family import family
        from ..profiling.visualize import load_image, render, render_detections, visualize_detections, visualize_model

        with user_errors(), loud_warnings():
            picture = load_image(image)
            source = model_source(model_name, **model_options)
            model = source.build()
            title = f"{source.ref.label} — {image}"
            if family(model).output_names(model) != ("logits",):
                with console.status("running the unmerged and the merged detector"):
                    dv = visualize_detections(model, picture, request, normalize=normalize, min_score=score)
                path = render_detections(dv, output, title=title)
                console.print(f"boxes scoring >= {score:g}: unmerged {len(dv.unmerged['boxes'])}, merged "
                              f"{len(dv.merged['boxes'])} (tokens {dv.tokens[0]} -> {dv.tokens[1]})")
                console.print(f"[bold green]wrote[/] {path}")
                return
            with console.status("running the model with source tracking"):
                vis = visualize_model(model, picture, request)
            path = render(vis, output, title=title)
            console.print(f"{vis.groups.size} patches -> {vis.n_groups} groups "
                          f"({vis.tokens_final} final tokens, {vis.protected} protected)")
            console.print(f"[bold green]wrote[/] {path}")
