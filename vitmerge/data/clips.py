"""Labelled video clips (.npy) and audio files (.wav) from local folders, preprocessed as the model expects.

Layout: class folders, like an ImageFolder of images (classes sorted by folder name, their index is
the label)::

    DIR/<class>/<clip>.npy      video: uint8 or float, [T, H, W] (grey), [T, H, W, C] or [T, C, H, W]
    DIR/<class>/<clip>.wav      audio: PCM WAV, any rate (resampled to the model's), mono or averaged

and the same inside ``train/`` / ``val/`` / ``test/`` split folders (:func:`vitmerge.data.open_dataset`
finds them). Video preprocessing is VideoMAE's: uint8 scaled to [0, 1], shorter side resized to the
model's size and centre-cropped, normalised by the mean/std of the model folder's
``preprocessor_config.json`` (ImageNet's by default); a clip must have exactly the model's frame count
(a clear :class:`~vitmerge.errors.DataError` otherwise: export with ``--frames`` to match). Audio: AST's
log-mel features (:mod:`.audio`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from . import audio

VIDEO_SUFFIX = ".npy"
AUDIO_SUFFIX = ".wav"
KINDS = {VIDEO_SUFFIX: "video", AUDIO_SUFFIX: "audio"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def detect(folder: Path) -> Optional[str]:
    """"video" or "audio" when ``folder``'s class sub-folders hold .npy / .wav files, else None."""
    try:
        subdirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and _visible(d)]
    except OSError:
        return None
    for d in subdirs:
        for f in sorted(d.iterdir()):
            if f.is_file() and _visible(f) and f.suffix.lower() in KINDS:
                return KINDS[f.suffix.lower()]
    return None


def _load_video(path: str) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _load_audio(path: str):
    return audio.read_wav(path)


@dataclass
class ClipScan:
    """What :func:`scan` found: the parts of a dataset (``open_dataset`` makes the ImageDataset of them)."""

    layout: str
    items: List[Tuple[str, int]]
    classes: List[str]
    load: Callable
    notes: List[str]


def scan(folder: Path, kind: str) -> ClipScan:
    """The labelled clips under ``folder``'s class sub-folders; items load as arrays: video [T, ...] or
    audio (waveform, rate)."""
    suffix = VIDEO_SUFFIX if kind == "video" else AUDIO_SUFFIX
    classes = [d.name for d in sorted(folder.iterdir()) if d.is_dir() and _visible(d)]
    items, other = [], 0
    for label, c in enumerate(classes):
        for f in sorted((folder / c).rglob("*")):
            if not f.is_file() or not _visible(f):
                continue
            if f.suffix.lower() == suffix:
                items.append((str(f), label))
            else:
                other += 1
    notes = [f"{other} files that are not {suffix} were left out"] if other else []
    load = _load_video if kind == "video" else _load_audio
    return ClipScan(f"{kind} clips ({suffix} in class folders)", items, classes, load, notes)


# --------------------------------------------------------------------------------------------
# Transforms: one clip (as loaded) -> the model's input tensor
# --------------------------------------------------------------------------------------------


class VideoTransform:
    """A clip array -> float tensor [T, C, H, W] for a VideoMAE-style model (see the module docstring)."""

    def __init__(self, frames: int, channels: int, size: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.frames, self.channels = int(frames), int(channels)
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor([float(v) for v in std], dtype=torch.float32).view(1, -1, 1, 1)

    def _tchw(self, clip: np.ndarray) -> torch.Tensor:
        a = np.asarray(clip)
        scale = 255.0 if a.dtype == np.uint8 else 1.0
        x = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32) / scale
        if x.dim() == 3:  # [T, H, W] grey
            x = x[:, None]
        elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # [T, H, W, C]
            x = x.permute(0, 3, 1, 2)
        elif not (x.dim() == 4 and x.shape[1] in (1, 3)):
            raise DataError(f"a video clip must be [T, H, W], [T, H, W, C] or [T, C, H, W] with C = 1 or 3; "
                            f"got shape {tuple(a.shape)}")
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x[:, :self.channels]
        return x

    def __call__(self, clip: np.ndarray) -> torch.Tensor:
        x = self._tchw(clip)
        if x.shape[0] != self.frames:
            raise DataError(f"a clip has {x.shape[0]} frames and the model takes {self.frames}: give "
                            f"{self.frames}-frame clips, or load the model with --frames {x.shape[0]}")
        h, w = x.shape[-2:]
        th, tw = self.size
        if (h, w) != (th, tw):
            s = max(th / h, tw / w)  # shorter side to the target, then centre crop
            nh, nw = max(th, int(round(h * s))), max(tw, int(round(w * s)))
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        return ((x - self.mean) / self.std).contiguous()


class AudioTransform:
    """(waveform, rate) -> float tensor [max_length, mel bins]: AST's features (:func:`.audio.ast_features`)."""

    def __init__(self, sampling_rate: int, num_mel_bins: int, max_length: int, mean: float, std: float):
        self.rate, self.mel, self.length = int(sampling_rate), int(num_mel_bins), int(max_length)
        self.mean, self.std = float(mean), float(std)

    def __call__(self, item) -> torch.Tensor:
        wav, rate = item
        if int(rate) != self.rate:
            from scipy.signal import resample_poly

            g = math.gcd(int(rate), self.rate)
            wav = resample_poly(np.asarray(wav, np.float64), self.rate // g, int(rate) // g)
        return torch.from_numpy(audio.ast_features(wav, self.rate, self.mel, self.length, self.mean, self.std))


def video_config(model, pre: Dict[str, Any]) -> Dict[str, Any]:
    from ..models.hf import input_shape

    t, c, h, w = input_shape(model)
    return {"modality": "video", "input_size": [t, c, h, w],
            "mean": list(pre.get("image_mean") or IMAGENET_MEAN), "std": list(pre.get("image_std") or IMAGENET_STD)}


def audio_config(model, pre: Dict[str, Any]) -> Dict[str, Any]:
    from ..models.hf import input_shape

    length, mel = input_shape(model)
    normalise = pre.get("do_normalize", True)
    return {"modality": "audio", "input_size": [length, mel],
            "sampling_rate": int(pre.get("sampling_rate", audio.SAMPLE_RATE)),
            "mean": float(pre.get("mean", audio.AUDIOSET_MEAN)) if normalise else 0.0,
            "std": float(pre.get("std", audio.AUDIOSET_STD)) if normalise else 0.5}


def transform(cfg: Dict[str, Any]) -> Callable:
    """The clip transform for a data config of modality video or audio."""
    size = cfg["input_size"]
    if cfg["modality"] == "video":
        return VideoTransform(size[0], size[1], size[2:], cfg["mean"], cfg["std"])
    return AudioTransform(cfg["sampling_rate"], size[1], size[0], cfg["mean"], cfg["std"])


def write_video_folder(root: Path, clips: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                       names: Optional[Sequence[str]] = None) -> None:
    """Clips [n, T, ...] as ``root/<class>/<name>.npy``."""
    _write(root, labels, classes, names, lambda p, i: np.save(p.with_suffix(VIDEO_SUFFIX), clips[i]))


def write_audio_folder(root: Path, waves: np.ndarray, labels: np.ndarray, classes: Sequence[str], sample_rate: int,
                       names: Optional[Sequence[str]] = None) -> None:
    """Waveforms [n, samples] as 16-bit ``root/<class>/<name>.wav``."""
    _write(root, labels, classes, names,
           lambda p, i: audio.write_wav(p.with_suffix(AUDIO_SUFFIX), waves[i], sample_rate))


def _write(root: Path, labels, classes, names, save) -> None:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    names: List[str] = list(names) if names is not None else [f"{i:05d}" for i in range(len(labels))]
    for i, (y, n) in enumerate(zip(labels, names)):
        save(root / classes[int(y)] / n, i)


__all__ = ["detect", "scan", "ClipScan", "VideoTransform", "AudioTransform", "video_config", "audio_config", "transform",
           "write_video_folder", "write_audio_folder", "VIDEO_SUFFIX", "AUDIO_SUFFIX"]
