"""Which patches merged into which token: ToMe-style pictures of a real image; for detectors, the boxes
of the unmerged and the merged detector side by side (:func:`visualize_detections`).

The model runs once with source tracking (``vitmerge.apply(..., trace_source=True)``): after the
last block, ``last_source(model)`` is a [B, N_final, N_0] 0/1 map saying which original tokens each
final token holds. Every image patch belongs to exactly one final token; patches of one token form a
group, drawn filled with the group's mean colour and outlined, next to the original image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .._io import check_output_path
from ..errors import DataError
from ..models import last_source
from ..models.build import merge
from ..request import DEFAULT_METHOD, MergeRequest
from .plots import _figure, save_png

SKIMAGE_PREFIX = "skimage:"
#: Colour photographs that scikit-image ships inside its package (no download).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def load_image(spec: Union[str, Path]) -> np.ndarray:
    """``skimage:NAME`` (a photo shipped with scikit-image) or a local image file -> uint8 [H, W, 3]."""
    spec = str(spec)
    if spec.startswith(SKIMAGE_PREFIX):
        name = spec[len(SKIMAGE_PREFIX):]
        if name not in SKIMAGE_PHOTOS:
            raise DataError(f"unknown scikit-image photo {name!r}; choose one of: "
                            + ", ".join(SKIMAGE_PREFIX + n for n in SKIMAGE_PHOTOS))
        try:
            import skimage.data
        except ImportError:
            raise DataError("skimage: images need scikit-image (pip install scikit-image), or give an image file") from None
        img = np.asarray(getattr(skimage.data, name)())
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"image {spec!r} does not exist; give a local image file or e.g. skimage:astronaut")
        try:

            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise DataError(f"could not read image {spec!r} ({type(e).__name__}: {e})") from None
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise DataError(f"image {spec!r} has shape {img.shape}; expected an RGB image")
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def prepare(image: np.ndarray, model) -> Tuple[np.ndarray, Any]:
    """Centre square crop, bicubic resize to the model's input size; (display uint8, normalised [1,3,H,W])."""
    h, w = (int(v) for v in model.patch_embed.img_size)
    H, W = image.shape[:2]
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    crop = image[top:top + side, left:left + side]
    shown = np.asarray(Image.fromarray(crop).resize((w, h), Image.BICUBIC))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = np.asarray(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=np.float32)
    std = np.asarray(cfg.get("std", (0.229, 0.224, 0.225)), dtype=np.float32)
    x = (shown.astype(np.float32) / 255.0 - mean) / std
    return shown, torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def merge_groups(source: np.ndarray, protected: int, grid: Tuple[int, int]) -> np.ndarray:
    """[N_final, N_0] 0/1 source map -> [gh, gw] index of the final token holding each patch.

    Columns 0..protected-1 are the prefix tokens (cls, registers), the rest the patches in row-major
    order. Raises if a patch is held by no token or by several (a broken source map).
    """
    src = np.asarray(source)[:, protected:] > 0.5  # [N_final, n_patches]
    gh, gw = grid
    if src.shape[1] != gh * gw:
        raise ValueError(f"source map has {src.shape[1]} patch columns, grid is {gh}x{gw}")
    held = src.sum(0)
    if not (held == 1).all():
        bad = int(np.flatnonzero(held != 1)[0])
        raise ValueError(f"patch {bad} is held by {int(held[bad])} final tokens (expected exactly 1)")
    return src.argmax(0).reshape(gh, gw)


def colour_groups(image: np.ndarray, groups: np.ndarray, patch: Tuple[int, int]) -> np.ndarray:
    """Fill every group's pixels with the group's mean colour (float mean, rounded to uint8)."""
    ph, pw = patch
    pix = np.repeat(np.repeat(groups, ph, axis=0), pw, axis=1)  # group id per pixel
    img = image[: pix.shape[0], : pix.shape[1]].astype(np.float64)
    flat_ids = pix.ravel()
    ids, inverse = np.unique(flat_ids, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    out = np.empty_like(img)
    for c in range(3):
        sums = np.bincount(inverse, weights=img[..., c].ravel())
        out[..., c] = (sums / counts)[inverse].reshape(pix.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def group_borders(groups: np.ndarray, patch: Tuple[int, int], scale: int = 1) -> np.ndarray:
    """Boolean mask (pixel grid x ``scale``) of pixels on the edge between two different groups."""
    ph, pw = patch
    pix = np.repeat(np.repeat(groups, ph * scale, axis=0), pw * scale, axis=1)
    edge = np.zeros(pix.shape, dtype=bool)
    dx = pix[:, 1:] != pix[:, :-1]
    dy = pix[1:, :] != pix[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


@dataclass
class MergeVisualization:
    image: np.ndarray  # uint8 [H, W, 3] what the model saw (cropped, resized)
    coloured: np.ndarray  # uint8 [H, W, 3] groups filled with their mean colour (no borders)
    groups: np.ndarray  # int [gh, gw] final-token index of each patch
    patch: Tuple[int, int]
    protected: int
    tokens_final: int  # tokens after the last block, protected included
    sizes: Optional[np.ndarray]  # [N_final] patches per final token, from the model's own size bookkeeping
    method: str
    r: list

    @property
    def n_groups(self) -> int:
        return int(len(np.unique(self.groups)))


def _request(request: Optional[MergeRequest], method: str, r, options) -> MergeRequest:
    return request if request is not None else MergeRequest(method=method, r=r, options=options)


def visualize_model(model, image: np.ndarray, request: Optional[MergeRequest] = None, *, method: str = DEFAULT_METHOD,
                    r=None, **options) -> MergeVisualization:
    """Patch ``model`` (in place) as ``request`` asks (or ``method``, ``r``, ``options``), with source tracking,
    run ``image`` through it, return the groups."""
    request = _request(request, method, r, options)
    if getattr(model, "patch_embed", None) is None:  # transformers folders load too, but their grids differ
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"visualize draws the patch grid of timm ViTs; {type(model).__name__} is not one "
                                    "(give a timm model name)")
    merge(model, request, trace_source=True)
    method = request.method
    shown, x = prepare(image, model)
    with torch.inference_mode():
        model.eval()(x)
    info = model.vitmerge
    n0 = info.tokens[0][0] if info.tokens else int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
    source = last_source(model)
    src = np.eye(n0, dtype=np.float32) if source is None else source[0].float().cpu().numpy()
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    patch = tuple(int(v) for v in model.patch_embed.patch_size)
    groups = merge_groups(src, info.protected, grid)
    state = getattr(model, "_vm_state", None)
    size = getattr(state, "size", None)
    sizes = None if size is None else size[0, :, 0].float().cpu().numpy()
    coloured = colour_groups(shown, groups, patch)
    return MergeVisualization(image=shown, coloured=coloured, groups=groups, patch=patch, protected=info.protected,
                              tokens_final=src.shape[0], sizes=sizes, method=method, r=list(info.r))


def render(vis: MergeVisualization, output: Union[str, Path], title: Optional[str] = None,
           border_colour=(255, 255, 255)) -> Path:
    """Original | merged groups side by side, as a PNG (written atomically)."""
    out = check_output_path(output, ".png")
    h = vis.image.shape[0]
    scale = max(1, math.ceil(448 / h))  # crisp one-pixel borders on a small input
    up = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)  # noqa: E731
    left = up(vis.image)
    right = up(vis.coloured).copy()
    right[group_borders(vis.groups, vis.patch, scale)] = border_colour
    fig = _figure(width=10, height=5.4)
    axes = fig.subplots(1, 2)
    n_patches = vis.groups.size
    axes[0].imshow(left)
    axes[0].set_title(f"input ({n_patches} patches)")
    axes[1].imshow(right)
    r_text = str(vis.r[0]) if vis.r and all(v == vis.r[0] for v in vis.r) else str(vis.r)
    axes[1].set_title(f"{vis.method} r={r_text}: {vis.n_groups} groups "
                      f"({vis.tokens_final} tokens incl. {vis.protected} protected)")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_png(fig, out)


# --------------------------------------------------------------------------------------------
# Detectors: boxes of the unmerged vs the merged model
# --------------------------------------------------------------------------------------------

#: outline colours of the classes (cycled), chosen to read on photographs
BOX_COLOURS = ((255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 90), (255, 120, 230), (255, 150, 40))


@dataclass
class DetectionVisualization:
    image: np.ndarray  # uint8 [H, W, 3]: the photo resized to the model's input, what both models saw
    unmerged: Dict[str, np.ndarray]  # boxes [k, 4] (x0, y0, x1, y1) in input pixels, scores [k], labels [k]
    merged: Dict[str, np.ndarray]
    class_names: Optional[List[str]]
    method: str
    r: list
    tokens: Tuple[int, int]  # tokens into the first block, out of the last (merged model)
    min_score: float

    def name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names and 0 <= label < len(names) else str(label)


def _detections(spec, out, size: Tuple[int, int], min_score: float, max_boxes: int) -> Dict[str, np.ndarray]:
    from torchvision.ops import box_convert

    d = spec.decode(out["logits"], out["boxes"])[0]
    keep = (d["scores"] >= min_score).nonzero().flatten()
    keep = keep[d["scores"][keep].argsort(descending=True)][:max_boxes]
    h, w = size
    xyxy = box_convert(d["boxes"][keep].float(), "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=torch.float32)
    return {"boxes": xyxy.numpy(), "scores": d["scores"][keep].numpy(), "labels": d["labels"][keep].numpy()}


def visualize_detections(model, image: np.ndarray, request: Optional[MergeRequest] = None, *,
                         method: str = DEFAULT_METHOD, r=None, normalize: bool = True, min_score: float = 0.3,
                         max_boxes: int = 30, **options) -> DetectionVisualization:
    """Detections of ``model`` and of a merged copy (``request``, or ``method``, ``r``, ``options``) on ``image``
    resized to the model's
    input (no crop: boxes cover the whole photo), decoded as ``vitmerge eval`` decodes them, those scoring
    at least ``min_score`` (at most ``max_boxes``, best first). ``model`` itself is left unmerged."""
    import copy

    from ..data.detection import detector_input
    from ..models.family import forward_outputs

    spec = detector_input(model, normalize=normalize)
    h, w = spec.size
    shown = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(shown.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    request = _request(request, method, r, options)
    method = request.method
    merged = merge(copy.deepcopy(model), request)
    with torch.inference_mode():
        before = _detections(spec, forward_outputs(model.eval(), x), (h, w), min_score, max_boxes)
        after = _detections(spec, forward_outputs(merged.eval(), x), (h, w), min_score, max_boxes)
    info = merged.vitmerge
    return DetectionVisualization(image=shown, unmerged=before, merged=after, class_names=spec.class_names,
                                  method=method, r=list(info.r), tokens=(info.tokens_in[0], info.tokens_out[-1]),
                                  min_score=min_score)


def draw_boxes(image: np.ndarray, dets: Dict[str, np.ndarray], scale: int = 1, width: int = 2,
               name=str) -> np.ndarray:
    """``image`` upscaled ``scale`` times with every box outlined (``width`` px) in its class colour and
    labelled ``name(label) score``; returns a new uint8 array."""
    from PIL import ImageDraw

    up = Image.fromarray(np.repeat(np.repeat(image, scale, axis=0), scale, axis=1))
    draw = ImageDraw.Draw(up)
    for (x0, y0, x1, y1), s, c in zip(dets["boxes"].tolist(), dets["scores"].tolist(), dets["labels"].tolist()):
        colour = BOX_COLOURS[int(c) % len(BOX_COLOURS)]
        box = [round(x0 * scale), round(y0 * scale), round(x1 * scale) - 1, round(y1 * scale) - 1]
        if box[2] < box[0] or box[3] < box[1]:
            continue  # thinner than a pixel at this scale
        draw.rectangle(box, outline=colour, width=width)
        text = f"{name(int(c))} {s:.2f}"
        tx, ty = box[0], max(0, box[1] - 12)
        tb = draw.textbbox((tx, ty), text)
        draw.rectangle(tb, fill=colour)
        draw.text((tx, ty), text, fill=(0, 0, 0))
    return np.asarray(up)


def render_detections(vis: DetectionVisualization, output: Union[str, Path], title: Optional[str] = None) -> Path:
    """Unmerged | merged detections side by side, as a PNG (written atomically)."""
    out = check_output_path(output, ".png")
    h, w = vis.image.shape[:2]
    scale = max(1, math.ceil(448 / max(h, w)))
    fig = _figure(width=10, height=5.4 * h / w + 0.6)
    axes = fig.subplots(1, 2)
    r_text = str(vis.r[0]) if vis.r and all(v == vis.r[0] for v in vis.r) else str(vis.r)
    for ax, dets, label in ((axes[0], vis.unmerged, f"unmerged ({vis.tokens[0]} tokens)"),
                            (axes[1], vis.merged, f"{vis.method} r={r_text} ({vis.tokens[0]} -> {vis.tokens[1]} tokens)")):
        ax.imshow(draw_boxes(vis.image, dets, scale, name=vis.name))
        ax.set_title(f"{label}: {len(dets['boxes'])} boxes >= {vis.min_score:g}")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_png(fig, out)


__all__ = ["load_image", "prepare", "merge_groups", "colour_groups", "group_borders", "visualize_model",
           "render", "MergeVisualization", "SKIMAGE_PHOTOS", "DetectionVisualization", "visualize_detections",
           "draw_boxes", "render_detections", "BOX_COLOURS"]
