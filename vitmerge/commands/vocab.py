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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_MAX_PATCHES = 50_000  # k-means memory stays ~150 MB at 768 features


def find_images(folder: str | Path) -> List[Path]:
    """Every image file under ``folder`` (any depth), sorted; DataError when there are none."""
    from ..errors import DataError

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder; give a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(
            f"no images found under {str(root)!r} (looked for {', '.join(IMAGE_SUFFIXES)} in every subfolder)"
        )
    return files


def sample_files(files: List[Path], num: Optional[int], seed: int = 0) -> List[Path]:
    """At most ``num`` of ``files``, drawn with a fixed seed (class folders sorted by name would
    otherwise give the first classes only), returned in path order."""
    import random

    if num is None or num >= len(files):
        return files
    return sorted(random.Random(seed).sample(files, num))


def _transform(model):
    """timm's eval preprocessing at the model's input size (resize, centre crop, normalise)."""
    from timm.data import create_transform, resolve_data_config

    pe = model.patch_embed
    size = (int(pe.proj.in_channels), *(int(v) for v in pe.img_size))
    cfg = resolve_data_config({"input_size": size}, model=model)
    return create_transform(**cfg), cfg


def build_vocabulary(
    model,
    files: List[Path],
    words: int = 256,
    space: str = "pixels",
    max_patches: int = DEFAULT_MAX_PATCHES,
    seed: int = 0,
    iters: int = 30,
    batch_size: int = 16,
    on_image: Optional[Callable[[int], None]] = None,
    on_iter: Optional[Callable[[int], None]] = None,
    meta: Optional[dict] = None,
):
    """Patch features of ``files`` (at most ``max_patches``, drawn evenly per image with a fixed
    seed) clustered into ``words`` unit-norm visual words. Returns a :class:`Vocabulary`."""
    import torch
    from PIL import Image

    from ..errors import DataError, ScheduleError
    from ..merging.vwt import SPACES, Vocabulary, pixel_patches, spherical_kmeans
    from ..models import model_name, patch_embed_fingerprint

    if space not in SPACES:
        raise ScheduleError(f"unknown --space {space!r}; use one of {', '.join(SPACES)}")
    if words < 2:
        raise ScheduleError(f"--words must be at least 2, got {words}")
    pe = model.patch_embed
    patch = tuple(int(v) for v in pe.patch_size)
    tf, cfg = _transform(model)
    n_per_image = max(1, max_patches // max(len(files), 1))
    gen = torch.Generator().manual_seed(seed)
    chunks, used, bad = [], 0, []
    model.eval()
    for start in range(0, len(files), batch_size):
        batch, names = [], files[start : start + batch_size]
        for f in names:
            try:
                with Image.open(f) as im:
                    batch.append(tf(im.convert("RGB")))
            except Exception as e:  # unreadable or not really an image: skip it, say so at the end
                bad.append(f"{f.name} ({type(e).__name__})")
            if on_image is not None:
                on_image(1)
        if not batch:
            continue
        x = torch.stack(batch)
        with torch.no_grad():
            feats = pixel_patches(x, patch) if space == "pixels" else pe(x).reshape(x.shape[0], -1, model.embed_dim)
        for f in feats:
            take = torch.randperm(f.shape[0], generator=gen)[: n_per_image]
            chunks.append(f[take].float())
        used += len(batch)
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {shown}", stacklevel=2)
    if not chunks:
        raise DataError("none of the images could be read; check the folder holds real image files")
    feats = torch.cat(chunks)
    centroids = spherical_kmeans(feats, words, iters=iters, seed=seed, progress=on_iter)
    info = {
        "model": model_name(model),
        "embed_dim": int(model.embed_dim),
        "img_size": [int(v) for v in pe.img_size],
        "patch_size": list(patch),
        "in_chans": int(pe.proj.in_channels),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "num_images": used,
        "num_patches": int(feats.shape[0]),
        "words": int(words),
        "seed": int(seed),
    }
    if space == "embeddings":
        info["weights"] = patch_embed_fingerprint(model)
    info.update(meta or {})
    return Vocabulary(centroids=centroids, space=space, meta=info)


def register(app: typer.Typer) -> None:
    vocab_app = typer.Typer(help="Visual-word vocabularies for the vwt method.", no_args_is_help=True)
    app.add_typer(vocab_app, name="vocab")

    @vocab_app.command("build")
    def build_cmd(
        data_dir: Path = typer.Argument(..., metavar="DATA_DIR", help="Folder of images, searched recursively (jpg, png, bmp, webp, tif, ...)"),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the vocabulary (.pt)"),
        model_name: str = typer.Option("vit_small_patch16_224", "--model", help="timm model the vocabulary is for (patch size, input size, normalisation)"),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights; needed for --space embeddings, where words live in the model's patch-embedding space"),
        words: int = typer.Option(256, "--words", "-k", help="Number of visual words (k-means centroids)"),
        num: Optional[int] = typer.Option(None, "--num", "-n", help="Use at most this many images (a fixed-seed sample over all subfolders); default all"),
        space: str = typer.Option("pixels", "--space", help="pixels (raw patches, as in the VWT paper; independent of the weights) | embeddings (patch embeddings of these weights)"),
        img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (default: the model's)"),
        model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="Extra timm.create_model arguments as JSON (or a .json file), e.g. '{\"patch_size\": 4}'"),
        max_patches: int = typer.Option(DEFAULT_MAX_PATCHES, "--max-patches", help="Patches clustered at most (spread evenly over the images)"),
        iters: int = typer.Option(30, "--iters", help="k-means iterations at most"),
        seed: int = typer.Option(0, "--seed", help="Seed of the patch sample and the k-means initialisation"),
    ):
        """Cluster image patches of DATA_DIR into visual words (spherical k-means) for `--method vwt`."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..errors import OutputPathError, ScheduleError
        from ..merging.vwt import save_vocabulary
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
            from ._common import parse_json_option

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
            console.print(f"[bold green]wrote[/] {path}   use it with: vitmerge.apply(model, 'vwt', r=R, vocab='{path}')")
