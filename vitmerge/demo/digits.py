"""A small, real, offline measurement: a timm ViT trained on scikit-learn's handwritten digits.

No ImageNet weights can be fetched offline, yet merge methods must be judged on a model whose
accuracy means something. scikit-learn ships 1,797 labelled 8x8 digit images; upsampled to 32x32
and cut into 4x4 patches they give a ViT 64 patch tokens + 1 class token, enough for token merging
to matter. :func:`train` trains such a ViT from scratch on a fixed split in about a minute on two
CPU cores and writes:

    OUT/model.pth           state dict (torch.save of tensors only)
    OUT/model.json          {"model": timm name, "kwargs": {...}, "checkpoint": ..., "data": ..., metrics}
    OUT/model_kwargs.json   the kwargs alone (for ``--model-kwargs`` of the other commands)
    OUT/data/train/<digit>/<index>.png, OUT/data/test/<digit>/<index>.png   (an ImageFolder)

The result is keyed by a hash of the whole configuration: asking again with the same configuration
reuses it. Nothing here is ever committed to the repository.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F

from .._io import cache_root, staged, writable_dir
from ..errors import DataError, OutputPathError
from ..models.build import build_model, load_model_config

TRAINING_CODE_VERSION = 1  # bump when the training procedure changes, so cached models are rebuilt

MODEL_NAME = "vit_tiny_patch16_224"
IMG_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

MODEL_KWARGS: Dict[str, Any] = {
    "img_size": IMG_SIZE,
    "patch_size": 4,  # 8 x 8 = 64 patch tokens (+ the class token)
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
    "mlp_ratio": 2.0,
    "num_classes": 10,
    # The data config timm reads back with resolve_data_config(model=...): the images are already
    # at the model's resolution, so no resize margin / crop (crop_pct 1) and a plain [-1, 1] scale.
    "pretrained_cfg_overlay": {
        "input_size": [3, IMG_SIZE, IMG_SIZE],
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": list(MEAN),
        "std": list(STD),
        "num_classes": 10,
    },
}

TRAIN: Dict[str, Any] = {
    "epochs": 8,
    "batch_size": 16,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "warmup_fraction": 0.1,
    "seed": 0,
    "test_fraction": 0.25,
    "sincos_pos_init": 0.1,  # 2-D sin/cos position embedding as the starting point (scale)
    # One thread: the same result on every machine, and on a busy 2-core box several times faster
    # than two threads fighting other processes (measured: 4.7 s vs 130 s per epoch under load).
    "threads": 1,
}


@dataclass
class DigitsConfig:
    model: str = MODEL_NAME
    kwargs: Dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(MODEL_KWARGS)))
    train: Dict[str, Any] = field(default_factory=lambda: dict(TRAIN))

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "kwargs": self.kwargs, "train": self.train,
                "training_code_version": TRAINING_CODE_VERSION}

    @property
    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class SplitFolders:
    """A demo model's data folder (``data_dir``) holds class folders under ``train/`` and ``test/``."""

    data_dir: Path

    @property
    def test_dir(self) -> Path:
        return self.data_dir / "test"

    @property
    def train_dir(self) -> Path:
        return self.data_dir / "train"


@dataclass
class DigitsModel(SplitFolders):
    """A trained digits model on disk."""

    dir: Path
    config_path: Path  # model.json
    checkpoint: Path
    data_dir: Path  # ImageFolder root holding train/ and test/
    model_name: str
    kwargs: Dict[str, Any]
    test_top1: float
    train_seconds: float
    cached: bool = False

    def build(self):
        """The trained model as a plain (unmerged) timm model in eval mode."""
        return build_model(self.model_name, self.checkpoint, **json.loads(json.dumps(self.kwargs)))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_arrays(img_size: int = IMG_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 grey images [N, S, S] (ink bright) and labels [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - dependency
        raise DataError("the digits model needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    u8 = (x[:, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return u8, np.asarray(d.target, dtype=np.int64)


def split_indices(n: int, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed (train, test) index split: the same for the same seed on every machine."""
    perm = np.random.RandomState(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def to_tensor(u8: np.ndarray) -> torch.Tensor:
    """uint8 grey [N, S, S] -> normalised RGB float [N, 3, S, S], exactly as the eval transform does
    (ToTensor's /255, then (x - mean) / std) for the PNG files written by :func:`write_image_folder`."""
    x = torch.from_numpy(u8).to(torch.float32).div(255)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def write_image_folder(root: Path, u8: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(u8[i], mode="L").save(root / str(int(labels[i])) / f"{int(i):04d}.png")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _sincos_2d(n: int, dim: int) -> torch.Tensor:
    g = int(math.isqrt(n))
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = [fn(c.flatten()[:, None] * omega) for c in (ys, xs) for fn in (torch.sin, torch.cos)]
    out = torch.cat(parts, 1)
    return F.pad(out, (0, dim - out.shape[1]))


def _create(cfg: DigitsConfig):
    import timm

    return timm.create_model(cfg.model, pretrained=False, **json.loads(json.dumps(cfg.kwargs)))


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(x), batch):
        hits += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return hits / max(len(x), 1)


def fit(cfg: DigitsConfig, on_step: Optional[Callable[[int, int, float], None]] = None):
    """Train from scratch; returns (model, test top-1, seconds). Deterministic for a fixed seed and
    thread count. on_step(step, total_steps, loss) is called after every optimiser step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.train.get("threads", 1)))
    try:
        return _fit(cfg, on_step)
    finally:
        torch.set_num_threads(threads)


def _fit(cfg: DigitsConfig, on_step):
    t = cfg.train
    torch.manual_seed(int(t["seed"]))
    u8, labels = load_arrays(int(cfg.kwargs["img_size"]))
    tr, te = split_indices(len(labels), float(t["test_fraction"]), int(t["seed"]))
    x, y = to_tensor(u8), torch.from_numpy(labels)
    model = _create(cfg)
    if t.get("sincos_pos_init"):
        with torch.no_grad():
            n_prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
            pe = model.pos_embed[0, n_prefix:]
            pe.copy_(_sincos_2d(pe.shape[0], pe.shape[1]) * float(t["sincos_pos_init"]))
    opt = torch.optim.AdamW(model.parameters(), lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    bs, epochs = int(t["batch_size"]), int(t["epochs"])
    steps_per_epoch = math.ceil(len(tr) / bs)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(t["lr"]), total_steps=total,
                                                pct_start=float(t["warmup_fraction"]))
    gen = torch.Generator().manual_seed(int(t["seed"]))
    tr_t = torch.from_numpy(tr)
    t0 = time.perf_counter()
    step = 0
    for _ in range(epochs):
        model.train()
        order = tr_t[torch.randperm(len(tr_t), generator=gen)]
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step:
                on_step(step, total, float(loss))
    seconds = time.perf_counter() - t0
    te_t = torch.from_numpy(te)
    top1 = accuracy(model, x[te_t], y[te_t])
    return model.eval(), top1, seconds


# --------------------------------------------------------------------------------------------
# On disk, cached by configuration hash
# --------------------------------------------------------------------------------------------


def _read(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / "model.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(out: Path, meta: Optional[dict], cfg_hash: str) -> bool:
    return (meta is not None and meta.get("config_hash") == cfg_hash and (out / meta["checkpoint"]).is_file()
            and (out / meta["data"] / "test").is_dir() and (out / meta["data"] / "train").is_dir())


def _result(out: Path, meta: dict, cached: bool) -> DigitsModel:
    return DigitsModel(dir=out, config_path=out / "model.json", checkpoint=out / meta["checkpoint"],
                       data_dir=out / meta["data"], model_name=meta["model"], kwargs=meta["kwargs"],
                       test_top1=float(meta["metrics"]["test_top1"]),
                       train_seconds=float(meta["metrics"]["train_seconds"]), cached=cached)


def train(output: Union[str, Path], cfg: Optional[DigitsConfig] = None, force: bool = False,
          on_step: Optional[Callable[[int, int, float], None]] = None) -> DigitsModel:
    """Train (or reuse) the digits model in ``output``; see the module docstring for the files.

    Written through :func:`vitmerge._io.staged`: everything goes to a staging folder first, model.json
    is moved in last, so an interrupted run never looks like a finished one.
    """
    cfg = cfg or DigitsConfig()
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--output {str(out)!r} exists and is not a folder")
    meta = _read(out)
    if not force and _complete(out, meta, cfg.hash):
        return _result(out, meta, cached=True)
    writable_dir(out, "--output")

    names = ("data", "model.pth", "model_kwargs.json", "model.json")  # model.json (the completion marker) last
    with staged(*(out / n for n in names)) as stage:
        model, top1, seconds = fit(cfg, on_step)
        u8, labels = load_arrays(int(cfg.kwargs["img_size"]))
        tr, te = split_indices(len(labels), float(cfg.train["test_fraction"]), int(cfg.train["seed"]))
        write_image_folder(stage / "data" / "train", u8, labels, tr)
        write_image_folder(stage / "data" / "test", u8, labels, te)
        torch.save(model.state_dict(), stage / "model.pth")
        import timm  # for its version (importing it takes seconds, so only here)

        meta = {
            "model": cfg.model,
            "kwargs": cfg.kwargs,
            "checkpoint": "model.pth",
            "data": "data",
            "classes": [str(c) for c in range(10)],
            "config_hash": cfg.hash,
            "train": cfg.train,
            "training_code_version": TRAINING_CODE_VERSION,
            "split": {"train": len(tr), "test": len(te), "seed": int(cfg.train["seed"])},
            "metrics": {"test_top1": top1, "train_seconds": round(seconds, 2)},
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
        }
        (stage / "model_kwargs.json").write_text(json.dumps(cfg.kwargs, indent=2) + "\n")
        (stage / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return _result(out, meta, cached=False)


def load(config: Union[str, Path]) -> DigitsModel:
    """Read a ``model.json`` written by :func:`train` (or a folder holding one)."""
    meta = dict(load_model_config(config).meta)
    p = Path(config).expanduser()
    p = p / "model.json" if p.is_dir() else p
    meta.setdefault("data", "data")
    meta.setdefault("metrics", {"test_top1": float("nan"), "train_seconds": float("nan")})
    return _result(p.parent, meta, cached=True)


def default_cache_root() -> Path:
    return cache_root()


def cached(cfg: Optional[DigitsConfig] = None, root: Optional[Union[str, Path]] = None,
           on_step: Optional[Callable[[int, int, float], None]] = None) -> DigitsModel:
    """The digits model for ``cfg`` under ``root/digits-<hash>``, trained on first use.

    Several processes asking at once (parallel test sessions) train it once: the others wait on a
    lock file and then reuse the result.
    """
    cfg = cfg or DigitsConfig()
    base = Path(root) if root is not None else default_cache_root()
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f"digits-{cfg.hash}.lock"):
        return train(base / f"digits-{cfg.hash}", cfg, on_step=on_step)


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["DigitsConfig", "DigitsModel", "train", "load", "cached", "fit", "load_arrays", "split_indices",
           "to_tensor", "MODEL_NAME", "MODEL_KWARGS", "TRAIN"]
