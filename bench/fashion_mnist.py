"""A small timm ViT trained on Fashion-MNIST (a real public data set, installed offline), then scored
on the full 10,000-image test split.

    apt-get install dataset-fashion-mnist          # Debian/Ubuntu: the four IDX files (30 MB) in
                                                   # /usr/share/datasets/fashion-mnist
    python bench/fashion_mnist.py                  # train once (cached), print test top-1
    python bench/fashion_mnist.py --patch-size 2 --epochs 3          # 197 tokens (ViT-S/16's count); slow
    python bench/fashion_mnist.py --epochs 1 --train-limit 20000     # a shorter run
    python bench/fashion_mnist.py --json           # the model.json of the cached model

Any folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte (each optionally .gz, e.g. a torchvision download) works with --data DIR
(or $FASHION_MNIST_DIR); its name must contain "fashion" so that vitmerge names the classes as
Fashion-MNIST's. Nothing is downloaded; the data set and the weights are never put in the repository.

Model: vit_tiny_patch16_224 at the images' own 28 x 28 (no resampling, so the training inputs are
exactly what `vitmerge eval`'s transform makes of the test images; checked at every run), dim 64,
2 heads, depth 4, MLP ratio 2, trained from scratch with AdamW + one-cycle, batch 64, one thread.

Token count. ``--patch-size 2`` gives 14 x 14 = 196 patch tokens + the class token = 197, ViT-S/16's
count at 224 px (the same count as 28 px upscaled to 56 with patch 4, without inventing pixels).
The time does not allow it as the default: on this project's shared 2-core machine (load ~8) it
trains at ~48 images/s, ~21 minutes per epoch, and 15,000 images (314 s) gave only 47.6 % test top-1.
The default ``--patch-size 4`` (7 x 7 = 49 + 1 = 50 tokens, like the digits model's 65) trains at
~360 images/s: one epoch of 60,000 images took 165 s and gave 81.0 % test top-1; the default two
epochs took 297 s and give 83.95 % (torch 2.14, timm 1.0.31, seed 0, one thread). Use
``--patch-size 2 --epochs 3`` (about an hour there, less on an idle machine) for the 197-token model.

The result is cached under $VITMERGE_BENCH_CACHE/fashion-mnist or ~/.cache/vitmerge/fashion-mnist,
in a folder named by a hash of the whole configuration, with the same files as `vitmerge digits
train` writes (model.pth, model.json, model_kwargs.json); model.json names the data folder, so

    vitmerge eval --config ~/.cache/vitmerge/fashion-mnist/vit-<hash>/model.json --r 0
    vitmerge eval --config .../model.json --budget 0.75

score the test split (eval prefers test; calibrate prefers train).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitmerge._io import staged  # noqa: E402
from vitmerge.data import idx  # noqa: E402
from vitmerge.demo import digits  # noqa: E402  (training helpers shared with the digits model)
from vitmerge.errors import DataError  # noqa: E402

TRAINING_CODE_VERSION = 1  # bump when the procedure below changes, so cached models are rebuilt
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
INSTALL = ("Fashion-MNIST is not installed. On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
           f"(puts the four IDX files in {DEFAULT_DATA}); or give a folder holding "
           "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
           "(each may be .gz) with --data DIR or $FASHION_MNIST_DIR; its name must contain 'fashion'.")

MODEL_NAME = "vit_tiny_patch16_224"
MEAN = digits.MEAN  # (0.5, 0.5, 0.5): the images go in as [-1, 1], grey replicated to RGB
STD = digits.STD


def model_kwargs(patch_size: int, embed_dim: int, depth: int, heads: int) -> Dict[str, Any]:
    return {
        "img_size": 28,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": 2.0,
        "num_classes": 10,
        # What timm's resolve_data_config (and so vitmerge's transform) reads back: the images are
        # already at the model's size, so no resize margin or crop, and a plain [-1, 1] scale.
        "pretrained_cfg_overlay": {"input_size": [3, 28, 28], "crop_pct": 1.0, "interpolation": "bilinear",
                                   "mean": list(MEAN), "std": list(STD), "num_classes": 10},
    }


def config(args) -> Dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "kwargs": model_kwargs(args.patch_size, args.embed_dim, args.depth, args.heads),
        "train": {"epochs": args.epochs, "train_limit": args.train_limit, "batch_size": args.batch_size,
                  "lr": args.lr, "weight_decay": 0.05, "warmup_fraction": 0.1, "seed": args.seed,
                  "sincos_pos_init": 0.1, "threads": args.threads},
        "training_code_version": TRAINING_CODE_VERSION,
    }


def config_hash(cfg: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    env = os.environ.get("VITMERGE_BENCH_CACHE")
    return Path(env).expanduser() / "fashion-mnist" if env else Path.home() / ".cache" / "vitmerge" / "fashion-mnist"


def open_data(folder: Path):
    """(train split, test split) read by vitmerge's own IDX reader, or exit with the install hint."""
    if not folder.is_dir():
        sys.exit(f"error: {str(folder)!r} does not exist.\n{INSTALL}")
    try:
        where = idx.find(folder)
        if where is None:
            sys.exit(f"error: {str(folder)!r} holds no IDX files.\n{INSTALL}")
        idx.check_pairs(where)
        train, test = idx.read_split(folder, where, "train"), idx.read_split(folder, where, "test")
    except DataError as e:
        sys.exit(f"error: {e}\n{INSTALL}")
    if not train.fashion:
        sys.exit(f"error: {str(folder)!r}: the folder's name does not contain 'fashion', so vitmerge would read it "
                 "as MNIST (digit class names); rename it or link it under a name like fashion-mnist")
    return train, test


def check_same_as_eval_transform(model, test, n: int = 64) -> float:
    """Largest difference between the tensors trained on and what vitmerge's eval transform makes of the same
    images (the PIL path `vitmerge eval` takes); they should be equal."""
    from vitmerge.data import transform_for

    tf = transform_for(model)
    n = min(n, len(test.labels))
    load = idx.GreyToRGB(test.images)
    ref = torch.stack([tf(load(i)) for i in range(n)])
    return float((ref - digits.to_tensor(test.images[:n].copy())).abs().max())


def train(cfg: Dict[str, Any], train_split, log=print):
    t = cfg["train"]
    torch.manual_seed(int(t["seed"]))
    model = digits._create(digits.DigitsConfig(model=cfg["model"], kwargs=cfg["kwargs"]))
    if t.get("sincos_pos_init"):
        with torch.no_grad():
            pe = model.pos_embed[0, int(model.num_prefix_tokens):]
            pe.copy_(digits._sincos_2d(pe.shape[0], pe.shape[1]) * float(t["sincos_pos_init"]))
    images, labels = train_split.images, torch.from_numpy(train_split.labels)
    n = len(labels)
    if t.get("train_limit"):  # a fixed-seed subset (every class can appear), for short runs
        n = min(n, int(t["train_limit"]))
    pool = torch.from_numpy(np.sort(np.random.RandomState(int(t["seed"])).permutation(len(labels))[:n]))
    opt = torch.optim.AdamW(model.parameters(), lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    bs, epochs = int(t["batch_size"]), int(t["epochs"])
    total = epochs * math.ceil(n / bs)
    warmup = min(0.5, max(float(t["warmup_fraction"]), 2.5 / total))  # OneCycleLR needs 2+ warm-up steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(t["lr"]), total_steps=total, pct_start=warmup)
    gen = torch.Generator().manual_seed(int(t["seed"]))
    t0, step, every = time.perf_counter(), 0, max(1, total // 20)
    for ep in range(epochs):
        model.train()
        order = pool[torch.randperm(n, generator=gen)]
        for i in range(0, n, bs):
            idx_b = order[i:i + bs].numpy()
            loss = F.cross_entropy(model(digits.to_tensor(images[idx_b])), labels[idx_b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % every == 0 or step == total:
                el = time.perf_counter() - t0
                log(f"  epoch {ep + 1}/{epochs} step {step}/{total} loss {loss.item():.3f} "
                    f"{el:.0f} s elapsed, ~{el / step * (total - step):.0f} s left")
    return model.eval(), n, time.perf_counter() - t0


@torch.no_grad()
def test_top1(model, test, batch: int = 250) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(test.labels), batch):
        x = digits.to_tensor(test.images[i:i + batch].copy())  # a writable copy of the read-only file data
        hits += int((model(x).argmax(-1).numpy() == test.labels[i:i + batch]).sum())
    return hits / len(test.labels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=INSTALL)
    ap.add_argument("--data", default=os.environ.get("FASHION_MNIST_DIR", DEFAULT_DATA),
                    help="folder of the four IDX files (default: $FASHION_MNIST_DIR or %(default)s)")
    ap.add_argument("--cache", default=None, help="cache folder (default: $VITMERGE_BENCH_CACHE/fashion-mnist "
                                                  "or ~/.cache/vitmerge/fashion-mnist)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=None, help="train on this many images (fixed seed)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--patch-size", type=int, default=4, choices=(2, 4),
                    help="4: 50 tokens (default); 2: 197 tokens, ~7x slower")
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: deterministic, and faster than 2 on a busy 2-core machine)")
    ap.add_argument("--force", action="store_true", help="train again even if cached")
    ap.add_argument("--json", action="store_true", help="print the cached model.json (training if needed)")
    args = ap.parse_args(argv)

    data = Path(args.data).expanduser().resolve()
    train_split, test = open_data(data)
    cfg = config(args)
    h = config_hash(cfg)
    root = Path(args.cache).expanduser() if args.cache else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"vit-{h}"
    tokens = (28 // args.patch_size) ** 2 + 1
    with digits._locked(root / f"vit-{h}.lock"):  # two runs at once train once
        meta = None
        if (out / "model.json").is_file() and not args.force:
            meta = json.loads((out / "model.json").read_text())
            print(f"cached: {out}")
        else:
            print(f"training {MODEL_NAME} ({tokens} tokens, dim {args.embed_dim}, depth {args.depth}) on "
                  f"{data} ({len(train_split.labels):,} train images) -> {out}", flush=True)
            prev = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            try:
                model, n_train, seconds = train(cfg, train_split, log=lambda s: print(s, flush=True))
                diff = check_same_as_eval_transform(model, test)
                if diff > 1e-6:
                    raise SystemExit(f"error: the training tensors differ from vitmerge's eval transform by {diff}")
                t0 = time.perf_counter()
                top1 = test_top1(model, test)
                eval_seconds = time.perf_counter() - t0
            finally:
                torch.set_num_threads(prev)
            import timm

            meta = {
                "model": cfg["model"], "kwargs": cfg["kwargs"], "checkpoint": "model.pth", "data": str(data),
                "classes": list(idx.FASHION_CLASSES), "config_hash": h, "train": cfg["train"],
                "training_code_version": TRAINING_CODE_VERSION, "tokens": tokens,
                "split": {"train": n_train, "test": len(test.labels), "seed": int(args.seed)},
                "metrics": {"test_top1": top1, "train_seconds": round(seconds, 1),
                            "test_seconds": round(eval_seconds, 1)},
                "versions": {"torch": torch.__version__, "timm": timm.__version__},
            }
            with staged(out / "model.pth", out / "model_kwargs.json", out / "model.json") as stage:
                torch.save(model.state_dict(), stage / "model.pth")
                (stage / "model_kwargs.json").write_text(json.dumps(cfg["kwargs"], indent=2) + "\n")
                (stage / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.json:
        print(json.dumps(meta, indent=2))
    m = meta["metrics"]
    print(f"Fashion-MNIST test top-1: {100 * m['test_top1']:.2f} % on {meta['split']['test']:,} images "
          f"({meta['tokens']} tokens; trained on {meta['split']['train']:,} images x {meta['train']['epochs']} epochs "
          f"in {m['train_seconds']:.0f} s)")
    print(f"model.json: {out / 'model.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
