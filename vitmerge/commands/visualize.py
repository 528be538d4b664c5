"""``vitmerge visualize``: which image patches merged into the same token, as a PNG; for detectors, the
boxes of the unmerged and the merged model side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, loud_warnings, parse_json_option, parse_options, parse_r_option, user_errors
from ._options import (MERGE_PANEL, CheckpointOpt, ImgSizeOpt, MethodOpt, ModelKwargsOpt, NumClassesOpt, OptionOpt,
                       value)


def register(app: typer.Typer) -> None:
    @app.command("visualize", short_help="PNG of which patches merged into one token (detectors: boxes unmerged vs merged).")
    def visualize_cmd(
        model_name: Annotated[str, typer.Argument(
            metavar="MODEL", help="timm model name (or timm:NAME), e.g. vit_small_patch16_224; or a detector: "
                                  "dense:NAME --checkpoint det.pth, or a YOLOS folder")],
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
        model_kwargs: ModelKwargsOpt = None,
        score: Annotated[float, typer.Option(
            "--score", help="Detectors: draw boxes scoring at least this (0..1)")] = 0.3,
        normalize: Annotated[bool, typer.Option(
            "--normalize/--no-normalize",
            help="Detectors: normalise pixels with the model's mean/std, or feed them in [0, 1] (vitmerge's demo "
                 "detectors)")] = True,
    ):
        """Draw which patches merged into the same final token (ToMe-style: each group in its mean colour, outlined).

        Detectors (dense:NAME, YOLOS folders): the photo resized to the model's input, the unmerged detector's
        boxes next to the merged one's (decoded as `vitmerge eval` decodes them), each labelled with class and score."""
        from ..models.build import build_model
        from ..models.family import family
        from ..profiling.visualize import (load_image, render, render_detections, visualize_detections,
                                           visualize_model)

        r_spec = parse_r_option(r)
        name = model_name[len("timm:"):] if model_name.startswith("timm:") else model_name
        with user_errors(), loud_warnings():
            from ..errors import OutputPathError

            if output.suffix.lower() != ".png":
                raise OutputPathError(f"--output {str(output)!r} must end in .png")
            if not output.parent.is_dir():
                raise OutputPathError(f"output folder {str(output.parent)!r} does not exist; create it or choose another --output")
            if not 0.0 <= score <= 1.0:
                from ..errors import UsageError

                raise UsageError(f"--score must be between 0 and 1, got {score}")
            picture = load_image(image)
            kwargs = parse_json_option(model_kwargs, "--model-kwargs")
            for key, v in (("img_size", img_size), ("num_classes", num_classes)):
                if v is not None:
                    kwargs[key] = v
            model = build_model(name, checkpoint, **kwargs)
            if family(model).output_names(model) != ("logits",):
                with console.status("running the unmerged and the merged detector"):
                    dv = visualize_detections(model, picture, method=value(method), r=r_spec, normalize=normalize,
                                              min_score=score, **parse_options(option))
                path = render_detections(dv, output, title=f"{name} — {image}")
                console.print(f"boxes scoring >= {score:g}: unmerged {len(dv.unmerged['boxes'])}, merged "
                              f"{len(dv.merged['boxes'])} (tokens {dv.tokens[0]} -> {dv.tokens[1]})")
                console.print(f"[bold green]wrote[/] {path}")
                return
            with console.status("running the model with source tracking"):
                vis = visualize_model(model, picture, method=value(method), r=r_spec, **parse_options(option))
            path = render(vis, output, title=f"{name} — {image}")
            console.print(f"{vis.groups.size} patches -> {vis.n_groups} groups "
                          f"({vis.tokens_final} final tokens, {vis.protected} protected)")
            console.print(f"[bold green]wrote[/] {path}")
