"""Small real video and audio measurements: a VideoMAE and an AST (transformers) trained on data made in code.

As :mod:`.digits` does for images: no pretrained weights can be fetched offline, yet merge methods must be
judged on models whose accuracy means something. Two tasks, generated deterministically
(:mod:`vitmerge.data.synthetic`):

* ``video``: scikit-learn's digits moving across 16 noisy 32 x 32 frames; a VideoMAE-shaped classifier
  (tubelets 2 x 8 x 8: 8 x 4 x 4 = 128 tokens, mean pooling, width 64, depth 4) names the digit;
* ``audio``: DTMF keypad tones in white noise (-14 to -2 dB SNR), 1.28 s at 16 kHz as AST's log-mel
  features (128 frames x 64 mel bins); an AST-shaped classifier (8 x 8 patches: 8 x 16 + 2 = 130
  tokens, width 64, depth 4) names the key (12 classes).

Each is trained from scratch on one CPU thread in a few minutes and written, keyed by a hash of its
whole configuration, as::

    OUT/model/              transformers save_pretrained folder + preprocessor_config.json
    OUT/data/train/<class>/*.npy|*.wav, OUT/data/test/<class>/*.npy|*.wav
    OUT/model.json          {"model": "model", "data": "data", "checkpoint": null, metrics, ...}

so every command takes them as they take any transformers folder and clip folder
(``vitmerge export OUT/model``, ``vitmerge eval --config OUT/model.json``). Nothing is committed.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._io import staged, writable_dir
from ..data import audio as audio_features
from ..data import clips, synthetic
from ..errors import OutputPathError, UsageError
from ..models.hf import load_pretrained
from .digits import SplitFolders, _locked, default_cache_root, split_indices

TRAINING_CODE_VERSION = 1  # bump when the training procedure changes, so cached models are rebuilt

KINDS = ("video", "audio")

VIDEO_MODEL: Dict[str, Any] = {
    "image_size": 32, "patch_size": 8, "num_channels": 3, "num_frames": 16, "tubelet_size": 2,
    "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
    "use_mean_pooling": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}
VIDEO_DATA: Dict[str, Any] = {"frames": 16, "size": 32, "digit_size": 14, "noise": 0.15, "train_clips_per_digit": 4,
                              "test_fraction": 0.25, "seed": 0, "mean": 0.5, "std": 0.5}
AUDIO_MODEL: Dict[str, Any] = {
    "num_mel_bins": 64, "max_length": 128, "patch_size": 8, "frequency_stride": 8, "time_stride": 8,
    "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}
AUDIO_DATA: Dict[str, Any] = {"sample_rate": 16000, "seconds": 1.28, "train": 2400, "test": 600,
                              "snr_db": [-14.0, -2.0], "tone_seconds": [0.08, 0.3], "seed": 0}
TRAIN: Dict[str, Any] = {"epochs": 6, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.05, "warmup_fraction": 0.1,
                         "seed": 0, "threads": 1}
# VideoMAE adds a fixed sin/cos position table of amplitude ~1 to the patch embeddings; started at
# transformers' std 0.02 the digit's content is a small fraction of that and training from scratch
# stalls (48 % after 10 epochs, measured); std 0.1 puts content and position on one scale (86 %).
VIDEO_TRAIN: Dict[str, Any] = {**TRAIN, "patch_init_std": 0.1}
AUDIO_TRAIN: Dict[str, Any] = {**TRAIN, "epochs": 8}


@dataclass
class ClipConfig:
    kind: str  # "video" or "audio"
    model: Dict[str, Any]
    data: Dict[str, Any]
    train: Dict[str, Any] = field(default_factory=lambda: dict(TRAIN))

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "data": self.data, "train": self.train,
                "training_code_version": TRAINING_CODE_VERSION}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def default_config(kind: str) -> ClipConfig:
    if kind == "video":
        return ClipConfig("video", json.loads(json.dumps(VIDEO_MODEL)), dict(VIDEO_DATA), dict(VIDEO_TRAIN))
    if kind == "audio":
        return ClipConfig("audio", json.loads(json.dumps(AUDIO_MODEL)), json.loads(json.dumps(AUDIO_DATA)),
                          dict(AUDIO_TRAIN))
    raise UsageError(f"unknown demo task {kind!r}; one of {', '.join(KINDS)}")


@dataclass
class ClipModel(SplitFolders):
    """A trained video or audio demo model on disk."""

    kind: str
    dir: Path
    model_dir: Path  # save_pretrained folder
    data_dir: Path  # train/ and test/ class folders
    test_top1: float
    train_seconds: float
    cached: bool = False

    @property
    def config_path(self) -> Path:
        return self.dir / "model.json"

    def build(self):
        """The trained model (transformers, unmerged, eval mode)."""
        return load_pretrained(self.model_dir)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def classes(kind: str) -> Tuple[str, ...]:
    return tuple(str(d) for d in range(10)) if kind == "video" else synthetic.DTMF_KEYS


def make_data(cfg: ClipConfig) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{"train": (clips or waveforms, labels), "test": ...}, as written to disk (audio: 16-bit quantised)."""
    d = cfg.data
    if cfg.kind == "video":
        n = len(synthetic.digit_images(4)[1])
        tr, te = split_indices(n, float(d["test_fraction"]), int(d["seed"]))
        kw = dict(frames=int(d["frames"]), size=int(d["size"]), digit_size=int(d["digit_size"]), noise=float(d["noise"]))
        return {"train": synthetic.moving_digits(tr, clips_per_digit=int(d["train_clips_per_digit"]),
                                                 seed=int(d["seed"]), **kw),
                "test": synthetic.moving_digits(te, clips_per_digit=1, seed=int(d["seed"]) + 1, **kw)}
    out = {}
    for split, seed in (("train", int(d["seed"])), ("test", int(d["seed"]) + 1)):
        w, y = synthetic.dtmf(int(d[split]), int(d["sample_rate"]), float(d["seconds"]), tuple(d["snr_db"]),
                              tuple(d["tone_seconds"]), seed=seed)
        out[split] = (audio_features.to_pcm16(w).astype(np.float32) / 32768.0, y)  # what the .wav files hold
    return out


def preprocessor(cfg: ClipConfig, train_inputs: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """preprocessor_config.json of the model folder, in transformers' own keys (VideoMAEImageProcessor /
    ASTFeatureExtractor); the audio mean/std are those of the training set's log-mel features."""
    if cfg.kind == "video":
        s = int(cfg.model["image_size"])
        m, sd = float(cfg.data["mean"]), float(cfg.data["std"])
        return {"image_processor_type": "VideoMAEImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
                "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [m] * 3, "image_std": [sd] * 3}
    rate, mel = int(cfg.data["sample_rate"]), int(cfg.model["num_mel_bins"])
    fb = np.stack([audio_features.log_mel(w, rate, mel) for w in train_inputs])
    return {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "sampling_rate": rate,
            "num_mel_bins": mel, "max_length": int(cfg.model["max_length"]), "do_normalize": True,
            "mean": float(fb.mean()), "std": float(fb.std()), "padding_value": 0.0, "return_attention_mask": False}


def model_inputs(cfg: ClipConfig, raw: np.ndarray, pre: Dict[str, Any]) -> torch.Tensor:
    """The model's input tensors for raw clips / waveforms, through the same transforms as evaluation."""
    if cfg.kind == "video":
        s = int(cfg.model["image_size"])
        tf = clips.VideoTransform(int(cfg.model["num_frames"]), int(cfg.model["num_channels"]), (s, s),
                                  pre["image_mean"], pre["image_std"])
        return torch.stack([tf(c) for c in raw])
    tf = clips.AudioTransform(pre["sampling_rate"], pre["num_mel_bins"], pre["max_length"], pre["mean"], pre["std"])
    return torch.stack([tf((w, pre["sampling_rate"])) for w in raw])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def create(cfg: ClipConfig):
    import transformers as tf

    names = classes(cfg.kind)
    labels = {"id2label": {i: n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    if cfg.kind == "video":
        return tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(**cfg.model, **labels))
    return tf.ASTForAudioClassification(tf.ASTConfig(**cfg.model, **labels))


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).logits.argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / max(len(x), 1)


def fit(cfg: ClipConfig, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
        on_step: Optional[Callable[[int, int, float], None]] = None):
    """Train from scratch on one thread (deterministic); returns (model, test top-1, seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.train.get("threads", 1)))
    try:
        t = cfg.train
        torch.manual_seed(int(t["seed"]))
        model = create(cfg)
        with torch.no_grad():  # start the learned tokens and positions away from zero (AST initialises them at 0)
            emb = model.base_model.embeddings
            for name in ("cls_token", "distillation_token", "position_embeddings"):
                p = getattr(emb, name, None)
                if isinstance(p, torch.nn.Parameter):
                    p.normal_(0, 0.02)
            if t.get("patch_init_std"):  # patch content on the scale of VideoMAE's fixed sin/cos positions (~1)
                emb.patch_embeddings.projection.weight.normal_(0, float(t["patch_init_std"]))
        opt = torch.optim.AdamW(model.parameters(), lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
        bs, epochs = int(t["batch_size"]), int(t["epochs"])
        total = epochs * math.ceil(len(x) / bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(t["lr"]), total_steps=total,
                                                    pct_start=float(t["warmup_fraction"]))
        gen = torch.Generator().manual_seed(int(t["seed"]))
        t0, step = time.perf_counter(), 0
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                loss = F.cross_entropy(model(x[idx]).logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if on_step:
                    on_step(step, total, float(loss))
        seconds = time.perf_counter() - t0
        return model.eval(), accuracy(model, x_test, y_test), seconds
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# On disk, cached by configuration hash
# --------------------------------------------------------------------------------------------


def _read(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / "model.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(out: Path, meta: Optional[dict], cfg_hash: str) -> bool:
    return (meta is not None and meta.get("config_hash") == cfg_hash and (out / meta["model"] / "config.json").is_file()
            and (out / meta["data"] / "test").is_dir() and (out / meta["data"] / "train").is_dir())


def _result(out: Path, meta: dict, cached: bool) -> ClipModel:
    return ClipModel(kind=meta["kind"], dir=out, model_dir=out / meta["model"], data_dir=out / meta["data"],
                     test_top1=float(meta["metrics"]["test_top1"]),
                     train_seconds=float(meta["metrics"]["train_seconds"]), cached=cached)


def train(output: Union[str, Path], cfg: ClipConfig, force: bool = False,
          on_step: Optional[Callable[[int, int, float], None]] = None) -> ClipModel:
    """Train (or reuse) the demo model of ``cfg`` in ``output``; written through :func:`vitmerge._io.staged`
    (model.json, the completion marker, last)."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{str(out)!r} exists and is not a folder")
    meta = _read(out)
    if not force and _complete(out, meta, cfg.hash):
        return _result(out, meta, cached=True)
    writable_dir(out, "the demo model folder")
    with staged(*(out / n for n in ("data", "model", "model.json"))) as stage:
        raw = make_data(cfg)
        pre = preprocessor(cfg, raw["train"][0])
        x, y = model_inputs(cfg, raw["train"][0], pre), torch.from_numpy(raw["train"][1])
        xt, yt = model_inputs(cfg, raw["test"][0], pre), torch.from_numpy(raw["test"][1])
        model, top1, seconds = fit(cfg, x, y, xt, yt, on_step)
        from ..models.hf import _quiet_transformers

        with _quiet_transformers():
            model.save_pretrained(stage / "model")
        (stage / "model" / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        names = classes(cfg.kind)
        for split, (arr, lab) in raw.items():
            if cfg.kind == "video":
                clips.write_video_folder(stage / "data" / split, arr, lab, names)
            else:
                clips.write_audio_folder(stage / "data" / split, arr, lab, names, int(cfg.data["sample_rate"]))
        import transformers

        meta = {"kind": cfg.kind, "model": "model", "kwargs": {}, "checkpoint": None, "data": "data",
                "classes": list(names), "config_hash": cfg.hash, "config": cfg.to_dict(),
                "split": {s: int(len(v[1])) for s, v in raw.items()},
                "metrics": {"test_top1": top1, "train_seconds": round(seconds, 2)},
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
        (stage / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return _result(out, meta, cached=False)


def cache_dir(kind: str, cfg: Optional[ClipConfig] = None, root: Optional[Union[str, Path]] = None) -> Path:
    """Where :func:`cached` keeps the ``kind`` demo model: ``root/<kind>-<configuration hash>``."""
    cfg = cfg or default_config(kind)
    return (Path(root) if root is not None else default_cache_root()) / f"{kind}-{cfg.hash}"


def is_cached(kind: str, cfg: Optional[ClipConfig] = None, root: Optional[Union[str, Path]] = None) -> bool:
    """Whether :func:`cached` would reuse a finished model (no training) right now."""
    out = cache_dir(kind, cfg, root)
    return _complete(out, _read(out), (cfg or default_config(kind)).hash)


def cached(kind: str, cfg: Optional[ClipConfig] = None, root: Optional[Union[str, Path]] = None,
           on_step: Optional[Callable[[int, int, float], None]] = None) -> ClipModel:
    """The ``kind`` ("video" / "audio") demo model under ``root/<kind>-<hash>``, trained on first use
    (several processes asking at once train it once)."""
    cfg = cfg or default_config(kind)
    base = Path(root) if root is not None else default_cache_root()
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f"{kind}-{cfg.hash}.lock"):
        return train(base / f"{kind}-{cfg.hash}", cfg, on_step=on_step)


__all__ = ["ClipConfig", "ClipModel", "default_config", "transformers_available", "cached", "cache_dir", "is_cached",
           "train", "fit", "make_data", "model_inputs",
           "preprocessor", "classes", "KINDS", "VIDEO_MODEL", "AUDIO_MODEL", "VIDEO_DATA", "AUDIO_DATA", "TRAIN"]
