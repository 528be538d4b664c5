"""The preprocessing a model expects (timm's data config) and the transform that applies it.

One data config per model, from timm (``resolve_data_config``), with the input size the model was
really built with; exported files carry it as ``vitmerge.data_config`` metadata so that calibration
and evaluation of a bare ``.onnx`` file preprocess exactly as the model was trained. transformers
models: from the folder's ``preprocessor_config.json`` (images: mean/std; video and audio configs say
``modality`` and are applied by :mod:`.clips`).
"""
from __future__ import annotations

import json
import warnings
from typing import Callable, Mapping, Optional, Tuple

import torch

from .. import metadata as md
from ..models import hf
from ..models.build import build_model
from ..models.shapes import input_shape
from . import clips


def json_safe(cfg: Mapping) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def data_config(model: torch.nn.Module) -> dict:
    """timm's eval data config for ``model``, with the input size the model was really built with
    (timm's pretrained config keeps the original resolution when img_size is overridden). transformers
    models: read from the model folder's preprocessor_config.json (defaults: ImageNet mean/std for video,
    AudioSet's for audio, 0.5/0.5 for images)."""
    if hf.is_hf(model):
        return _hf_config(model)
    from timm.data import resolve_data_config  # timm takes seconds to import: only when used

    cfg = dict(resolve_data_config({}, model=model))
    if getattr(model, "patch_embed", None) is not None:
        cfg["input_size"] = input_shape(model)
    return json_safe(cfg)


def _hf_config(model) -> dict:
    pre = hf.preprocessor_config(model)
    kind = hf.modality(model)
    if kind == "video":
        return clips.video_config(model, pre)
    if kind == "audio":
        return clips.audio_config(model, pre)
    return json_safe({"input_size": list(input_shape(model)), "interpolation": "bilinear", "crop_pct": 1.0,
                      "mean": tuple(pre.get("image_mean") or (0.5, 0.5, 0.5)),
                      "std": tuple(pre.get("image_std") or (0.5, 0.5, 0.5))})


def data_config_for_name(name: str, **kwargs) -> dict:
    """The data config of timm model ``name`` (built with random weights: only its config is read)."""
    with warnings.catch_warnings():  # random weights are fine here, and not worth a warning
        warnings.simplefilter("ignore")
        return data_config(build_model(name, None, **kwargs))


def data_config_for_onnx(proto, given: Optional[dict] = None) -> Tuple[dict, Optional[str]]:
    """(data config sized to the graph's input, warning or None) for an exported file: ``given``,
    else the file's ``vitmerge.data_config``, else timm's ImageNet defaults (with a warning)."""
    from timm.data import resolve_data_config

    _, shape = md.input_info(proto)
    meta = md.read(proto)
    warn = None
    if given:
        cfg = dict(given)
    elif md.DATA_CONFIG in meta:
        cfg = json.loads(meta[md.DATA_CONFIG])
    else:
        # timm 1.x asserts unless given a model or a pretrained config: hand it ImageNet's defaults as the latter
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        cfg = dict(resolve_data_config({}, pretrained_cfg={
            "input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875, "crop_mode": "center"}))
        warn = ("the ONNX file names no preprocessing (no vitmerge.data_config metadata) and none was given: "
                "using timm's ImageNet defaults (mean/std, crop 0.875). Give --config model.json or "
                "--model NAME for the model's own preprocessing.")
    cfg["input_size"] = list(shape)
    return json_safe(cfg), warn


def eval_transform(cfg: Mapping) -> Callable:
    """torchvision transform for a data config (resize, centre crop, to tensor, normalise); video and audio
    configs (``modality``) get the clip transforms of :mod:`.clips`."""
    if cfg.get("modality") in ("video", "audio"):
        return clips.transform(dict(cfg))
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    kw = {k: (tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]) for k in keys if k in cfg}
    return create_transform(**kw, is_training=False)


def transform_for(model: torch.nn.Module) -> Callable:
    return eval_transform(data_config(model))


__all__ = ["data_config", "data_config_for_name", "data_config_for_onnx", "eval_transform", "transform_for", "json_safe"]
