"""``vitmerge vocab build``: the visual-word vocabulary of the ``vwt`` method, from a folder of images.

The importable pieces (``find_images``, ``build_vocabulary``) do the work; the command only parses
options, shows progress and reports.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer

from ._common import console, loud_warnings, user_errors
from ._options import CheckpointOpt, ImgSizeOpt, ModelKwargsOpt, Space, value


def register(app: typer.Typer) -> None:
    vocab_app = typer.Typer(help="Visual-word vocabularies for the vwt method.", no_args_is_help=True)
    app.add_typer(vocab_app, name="vocab")

    @vocab_app.command("build", short_help="Cluster image patches into visual words for --method vwt.")
    def build_cmd(
        data_dir: Path = typer.Argument(..., metavar="DATA_DIR", help="Folder of images, searched recursively (jpg, png, bmp, webp, tif, ...)"),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the vocabulary (.pt)"),
        model_name: str = typer.Option("vit_small_patch16_224", "--model", help="timm model the vocabulary is for (patch size, input size, normalisation)"),
        checkpoint: CheckpointOpt = None,
        words: int = typer.Option(256, "--words", "-k", help="Number of visual words (k-means centroids)"),
        num: Optional[int] = typer.Option(None, "--num", "-n", help="Use at most this many images (a fixed-seed sample over all subfolders); default all"),
        space: Space = typer.Option("pixels", "--space", case_sensitive=False, help="pixels (raw patches, as in the VWT paper; independent of the weights) or embeddings (patch embeddings of these weights: needs --checkpoint)"),
        img_size: ImgSizeOpt = None,
        model_kwargs: ModelKwargsOpt = None,
        max_patches: int = typer.Option(50_000, "--max-patches", help="Patches clustered at most (spread evenly over the images)"),
        iters: int = typer.Option(30, "--iters", help="k-means iterations at most"),
        seed: int = typer.Option(0, "--seed", help="Seed of the patch sample and the k-means initialisation"),
    ):
        """Cluster image patches of DATA_DIR into visual words (spherical k-means) for `--method vwt`."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..errors import OutputPathError, ScheduleError
        from ..models.vocabulary import save_vocabulary
        from ..models.build import build_model

        with user_errors(), loud_warnings():
            if not output.parent.is_dir():
                raise OutputPathError(f"output folder {str(output.parent)!r} does not exist; create it or choose another --output")
            if output.exists() and output.is_dir():
                raise OutputPathError(f"--output {str(output)!r} is a folder; give a file name such as vocab.pt")
            if num is not None and num < 1:
                raise ScheduleError(f"--num must be at least 1, got {num}")
            if max_patches < words:
                raise ScheduleError(f"--max-patches ({max_patches}) must be at least --words ({words})")
            from ..calibration.vocabulary import build_vocabulary, find_images, sample_files
            from ._common import parse_json_option

            space = value(space)
            kwargs = parse_json_option(model_kwargs, "--model-kwargs")
            if img_size is not None:
                kwargs["img_size"] = img_size
            files = sample_files(find_images(data_dir), num, seed)
            with warnings.catch_warnings():
                if space == "pixels":  # raw patches do not depend on the weights: the random-weights warning is noise
                    warnings.filterwarnings("ignore", message="no --checkpoint given")
                model = build_model(model_name, checkpoint, **kwargs)
            if space == "embeddings" and checkpoint is None:
                warnings.warn("--space embeddings without --checkpoint: the words fit these RANDOM weights only")
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                t_img = progress.add_task("reading images", total=len(files))
                t_km = progress.add_task("k-means", total=iters)
                vocab = build_vocabulary(
                    model, files, words=words, space=space, max_patches=max_patches, seed=seed, iters=iters,
                    on_image=lambda n: progress.advance(t_img, n), on_iter=lambda i: progress.update(t_km, completed=i + 1),
                    meta={"checkpoint": None if checkpoint is None else checkpoint.name},
                )
            path = save_vocabulary(vocab, output)
            m = vocab.meta
            console.print(f"{m['num_images']} images, {m['num_patches']} patches ({space}) -> {vocab.num_words} words "
                          f"for {m['model']} (patch {m['patch_size'][0]}x{m['patch_size'][1]}, input {m['img_size'][0]}x{m['img_size'][1]})")
            console.print(f"[bold green]wrote[/] {path}   use it with: vitmerge export MODEL --method vwt -O vocab={path} "
                          f"--r R (in Python: vitmerge.apply(model, 'vwt', r=R, vocab='{path}'))", soft_wrap=True)
