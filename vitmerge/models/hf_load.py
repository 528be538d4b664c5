"""Loading a Hugging Face transformers model from a save_pretrained folder (never the hub).

:func:`load_pretrained` checks the folder (config.json, the model type and class against
:data:`~.hf_table.TYPES`, the weight files) with a clear error for every way it can be wrong, loads with
``local_files_only``, and applies the input-size overrides a model type takes (its record's ``sizes``):
computed positions through the config, learned position embeddings resampled as timm does.
transformers is imported only inside the functions that load.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from ..errors import CheckpointError, ModelNotFoundError, RuntimeMissingError, UnsupportedModelError, UsageError
from .hf_table import SUPPORTED, TYPES, HFType, _pair

log = logging.getLogger(__name__)

MIN_TRANSFORMERS = "5.0"

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

#: the refusal of an override a model type does not take (--img-size: its record's no_img_size)
_REFUSED = {
    "frames": "--frames applies to video models (VideoMAE); {where} takes no frames",
    "audio_length": "--audio-length applies to audio models (AST); {where} is not one",
}


def _too_old(version: Optional[str]) -> bool:
    return version is not None and int(version.split(".")[0]) < int(MIN_TRANSFORMERS.split(".")[0])


def is_pretrained_folder(path: Union[str, Path]) -> bool:
    """A folder written by transformers' save_pretrained (it holds config.json)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def read_config(folder: Union[str, Path]) -> Dict[str, Any]:
    """config.json of a save_pretrained folder, checked: a clear error for every way it can be wrong."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ModelNotFoundError(f"{str(p)!r} is not a folder: give a timm model name or a folder written by "
                                 "transformers' save_pretrained (config.json + weights)")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{str(p)!r} has no config.json: a transformers model folder is written by "
                                 "model.save_pretrained(FOLDER) (config.json + model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(cfg_path)!r} is not readable JSON ({e}); save the model again with "
                              "save_pretrained") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{str(cfg_path)!r} is not a transformers config (expected a JSON object)")
    t = cfg.get("model_type")
    if t not in TYPES:
        raise UnsupportedModelError(f"{str(p)!r} holds model_type {t!r}, which vitmerge cannot merge. Supported: "
                                    f"{SUPPORTED}")
    arch = cfg.get("architectures") or []
    classes = TYPES[t].classes
    if arch and not any(a in classes for a in arch):
        raise UnsupportedModelError(
            f"{str(p)!r} holds {', '.join(arch)}; vitmerge merges the {t} classifiers {', '.join(classes)}. "
            f"Supported: {SUPPORTED}"
        )
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointError(f"{str(p)!r} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                              "save the model with save_pretrained")
    return cfg


def _model_class(cfg: Dict[str, Any]):
    import transformers

    classes = TYPES[cfg["model_type"]].classes
    names = [a for a in (cfg.get("architectures") or []) if a in classes] or [classes[0]]
    return getattr(transformers, names[0])


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or load reports from transformers on the user's console."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(folder: Union[str, Path], img_size: Optional[int] = None, frames: Optional[int] = None,
                    audio_length: Optional[int] = None) -> nn.Module:
    """A supported classifier from a save_pretrained folder, in eval mode, float32; weights read with
    ``local_files_only`` (nothing is fetched). Input-size overrides: ``img_size`` (ViT, DeiT, VideoMAE),
    ``frames`` (VideoMAE), ``audio_length`` (AST: time frames); learned position embeddings are resampled."""
    p = Path(folder).expanduser()
    cfg = read_config(p)
    kind = TYPES[cfg["model_type"]]
    asked = {"img_size": img_size, "frames": frames, "audio_length": audio_length}
    _check_sizes(p, kind, cfg, img_size, frames, audio_length)
    try:
        import transformers
    except ImportError:
        raise RuntimeMissingError(f"loading a transformers model folder needs transformers >= {MIN_TRANSFORMERS}: "
                                  "pip install 'vitmerge[hf]'") from None
    if _too_old(transformers.__version__):
        raise RuntimeMissingError(f"transformers {transformers.__version__} is installed; vitmerge loads and patches "
                                  f"transformers >= {MIN_TRANSFORMERS} models: pip install 'vitmerge[hf]'")
    cls = _model_class(cfg)
    # positions computed from the config (VideoMAE's sin/cos): the override goes to the config, no weights change
    overrides = {s.key: int(asked[s.option]) for s in kind.sizes if not s.resample and asked[s.option] is not None}
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(str(p), local_files_only=True, output_loading_info=True,
                                              trust_remote_code=False, **overrides)
        except (OSError, ValueError, RuntimeError, EnvironmentError, KeyError, TypeError) as e:
            raise CheckpointError(f"could not load the weights in {str(p)!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}). Are they complete and saved "
                                  "with save_pretrained?") from None
        except Exception as e:  # safetensors' own errors (corrupt header, truncated file)
            raise CheckpointError(f"could not read the weights in {str(p)!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}). Is the file complete?") from None
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        parts = [f"{len(v)} {k.replace('_', ' ')} ({', '.join(str(x) for x in v[:3])}{', ...' if len(v) > 3 else ''})"
                 for k, v in bad.items()]
        raise CheckpointError(f"the weights in {str(p)!r} do not fit its config.json: {'; '.join(parts)}")
    model = model.float().eval()
    # learned position embeddings: a model built for the new size, the embedding resampled (when the size changes)
    changes = {s.key: int(asked[s.option]) for s in kind.sizes if s.resample and asked[s.option] is not None
               and _pair(getattr(model.config, s.key)) != _pair(asked[s.option])}
    if changes:
        model = _resized(model, cls, kind, changes)
    return model


def _check_sizes(p: Path, kind: HFType, cfg: Dict[str, Any], img_size, frames, audio_length) -> None:
    where = f"{p.name} ({kind.model_type}, {kind.modality})"
    for option, v in (("frames", frames), ("audio_length", audio_length)):
        if v is not None and kind.resize(option) is None:
            raise UsageError(_REFUSED[option].format(where=where))
    if img_size is not None and kind.resize("img_size") is None:
        why = kind.no_img_size(cfg) if kind.no_img_size else "it takes no image size"
        raise UsageError(f"--img-size does not apply to {where}: {why}")
    for name, v in (("--frames", frames), ("--img-size", img_size), ("--audio-length", audio_length)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    if frames is not None:
        tub = int(cfg.get("tubelet_size", 2))
        if frames % tub:
            raise UsageError(f"--frames {frames} is not a multiple of the tubelet size {tub} of {where}: "
                             f"use {max(tub, frames - frames % tub)} or {frames - frames % tub + tub}")
    if img_size is not None:
        patch = cfg.get("patch_size", 16)
        patch = patch[0] if isinstance(patch, (list, tuple)) else int(patch)
        if img_size % patch:
            raise UsageError(f"--img-size {img_size} is not a multiple of the patch size {patch} of {where}")
    if audio_length is not None:
        need = int(cfg.get("patch_size", 16))
        if audio_length < need:
            raise UsageError(f"--audio-length {audio_length} is shorter than one patch ({need} frames) of {where}")


def _resized(model: nn.Module, cls, kind: HFType, changes: Dict[str, Any]) -> nn.Module:
    """The same weights in a model built for another input size: the learned position embedding is
    resampled (bicubic over the patch grid, the tokens the embeddings add kept), as timm does for its ViTs."""
    from timm.layers import resample_abs_pos_embed

    old_grid = kind.grid(model.config)
    cfg = model.config.__class__.from_dict({**model.config.to_dict(), **changes})
    cfg._attn_implementation_internal = model.config._attn_implementation
    with _quiet_transformers():
        new = cls(cfg)
    sd = model.state_dict()
    key = next(k for k in sd if k.endswith("embeddings.position_embeddings"))
    sd[key] = resample_abs_pos_embed(sd[key], list(kind.grid(cfg)), list(old_grid),
                                     num_prefix_tokens=kind.added(model.config), interpolation="bicubic",
                                     antialias=True, verbose=False)
    new.load_state_dict(sd, strict=True)
    new.name_or_path = model.name_or_path
    log.info("%s: position embedding resampled from grid %s to %s", type(model).__name__, old_grid, kind.grid(cfg))
    return new.float().eval()


def preprocessor_config(model: nn.Module) -> Dict[str, Any]:
    """The folder's preprocessor_config.json (image mean/std and size, or the audio feature extractor's
    settings), or {} when the model was not loaded from a folder that has one."""
    p = Path(str(getattr(model, "name_or_path", "") or "")) / "preprocessor_config.json"
    try:
        out = json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        out = {}
    return out if isinstance(out, dict) else {}


__all__ = ["MIN_TRANSFORMERS", "WEIGHT_FILES", "is_pretrained_folder", "read_config", "load_pretrained",
           "preprocessor_config"]
