"""``vitmerge vocab build``: the visual-word vocabulary of the ``vwt`` method, from a folder of images.

The importable pieces (``find_images``, ``build_vocabulary``) do the work; the command only parses
options, shows progress and reports.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, loud_warnings, model_source, user_errors
from ._options import CheckpointOpt, ConfigOpt, ImgSizeOpt, ModelKwargsOpt, SeedOpt, Space, value

DEFAULT_MODEL = "vit_small_patch16_224"


def register(app: typer.Typer) -> None:
    vocab_app = typer.Typer(help="Visual-word vocabularies for the vwt method.", no_args_is_help=True)
    app.add_typer(vocab_app, name="vocab")

    @vocab_app.command("build", short_help="Cluster image patches into visual words for --method vwt.")
    def build_cmd(
        model_name: Annotated[Optional[str], typer.Argument(
            metavar="[MODEL]", help="The timm model (or timm:NAME) the vocabulary is for: its patch size, input size "
                                    "and normalisation (default vit_small_patch16_224; optional with --config)")] = None,
        data_dir: Annotated[Optional[Path], typer.Option(
            "--data", "-d", help="Folder of images, searched recursively (jpg, png, bmp, webp, tif, ...)")] = None,
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the vocabulary (.pt)")] = ...,
        checkpoint: CheckpointOpt = None,
        config: ConfigOpt = None,
        model_kwargs: ModelKwargsOpt = None,
        img_size: ImgSizeOpt = None,
        seed: SeedOpt = 0,
        words: Annotated[int, typer.Option("--words", "-k", help="Number of visual words (k-means centroids)")] = 256,
        num: Annotated[Optional[int], typer.Option(
            "--num", "-n", help="Use at most this many images (a fixed-seed sample over all subfolders); default all")] = None,
        space: Annotated[Space, typer.Option(
            "--space", case_sensitive=False,
            help="pixels (raw patches, as in the VWT paper; independent of the weights) or embeddings (patch "
                 "embeddings of these weights: needs --checkpoint)")] = "pixels",
        max_patches: Annotated[int, typer.Option(
            "--max-patches", help="Patches clustered at most (spread evenly over the images)")] = 50_000,
        iters: Annotated[int, typer.Option("--iters", help="k-means iterations at most")] = 30,
        model_opt: Annotated[Optional[str], typer.Option("--model", hidden=True)] = None,
    ):
        """Cluster image patches of the --data folder into visual words (spherical k-means) for `--method vwt`;
        --seed also seeds the patch sample and the k-means initialisation."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with user_errors():
            from .._io import check_output_path
            from ..errors import DataError, ScheduleError, UsageError

            if model_opt is not None:
                raise UsageError(f"vocab build takes the model as its first argument, like every command: "
                                 f"vitmerge vocab build {model_opt} --data DIR -o {output}")
            if data_dir is None:
                raise DataError("give the images to cluster with --data DIR")
            check_output_path(output, None)
            if num is not None and num < 1:
                raise ScheduleError(f"--num must be at least 1, got {num}")
            if max_patches < words:
                raise ScheduleError(f"--max-patches ({max_patches}) must be at least --words ({words})")
        from ..calibration.vocabulary import build_vocabulary, find_images, sample_files
        from ..models.vocabulary import save_vocabulary

        with user_errors(), loud_warnings():
            space = value(space)
            if model_name is None and config is None:
                model_name = DEFAULT_MODEL
            files = sample_files(find_images(data_dir), num, seed)
            source = model_source(model_name, checkpoint, config, model_kwargs, img_size, seed=seed)
            with warnings.catch_warnings():
                if space == "pixels":  # raw patches do not depend on the weights: the random-weights warning is noise
                    warnings.filterwarnings("ignore", message="no --checkpoint given")
                model = source.build()
            if space == "embeddings" and source.checkpoint is None:
                warnings.warn("--space embeddings without --checkpoint: the words fit these RANDOM weights only")
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                t_img = progress.add_task("reading images", total=len(files))
                t_km = progress.add_task("k-means", total=iters)
                vocab = build_vocabulary(
                    model, files, words=words, space=space, max_patches=max_patches, seed=seed, iters=iters,
                    on_image=lambda n: progress.advance(t_img, n), on_iter=lambda i: progress.update(t_km, completed=i + 1),
                    meta={"checkpoint": None if source.checkpoint is None else source.checkpoint.name},
                )
            path = save_vocabulary(vocab, output)
            m = vocab.meta
            console.print(f"{m['num_images']} images, {m['num_patches']} patches ({space}) -> {vocab.num_words} words "
                          f"for {m['model']} (patch {m['patch_size'][0]}x{m['patch_size'][1]}, input {m['img_size'][0]}x{m['img_size'][1]})")
            console.print(f"[bold green]wrote[/] {path}   use it with: vitmerge export MODEL --method vwt -O vocab={path} "
                          "--r R", soft_wrap=True)
