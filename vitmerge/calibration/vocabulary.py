"""The visual-word vocabulary of the ``vwt`` method, built from a folder of images (spherical
k-means over patch features); :func:`vitmerge.models.vocabulary.save_vocabulary` writes it."""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch
from PIL import Image

from ..data.datasets import IMAGE_SUFFIXES
from ..data.transforms import data_config, eval_transform
from ..errors import DataError, ScheduleError
from ..merging.vwt import SPACES, pixel_patches, spherical_kmeans
from ..models.vocabulary import Vocabulary, model_name, patch_embed_fingerprint

DEFAULT_MAX_PATCHES = 50_000  # k-means memory stays ~150 MB at 768 features


def find_images(folder: Union[str, Path]) -> List[Path]:
    """Every image file under ``folder`` (any depth), sorted; DataError when there are none."""
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
    if num is None or num >= len(files):
        return files
    return sorted(random.Random(seed).sample(files, num))


def _transform(model):
    """timm's eval preprocessing at the model's input size (resize, centre crop, normalise)."""
    cfg = data_config(model)
    return eval_transform(cfg), cfg


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


__all__ = ["find_images", "sample_files", "build_vocabulary", "DEFAULT_MAX_PATCHES"]
