"""`vitmerge tune` on a trained detector: the fastest dense-detector file within an mAP budget, on ONNX Runtime CPU.

    python bench/detector_tune.py                      # train once (cached, ~9 min on one thread), then tune
    python bench/detector_tune.py --batch 1 8 --max-drop 1.0 2.0

The detector is docs/accuracy.md's: a DenseDetector on a timm ViT (64 px canvases, patch 8: 64 patches + class
token, width 96, depth 4) trained 3,000 steps on 4,000 digit canvases (`vitmerge.data.detection.digit_canvases`,
scikit-learn's bundled digits pasted on noise: real glyphs, generated layout, nothing downloaded), by the
training helper of the slow tests (tests/support/detection_training.py). The 500 test canvases are written as a
COCO-format folder (8-bit PNGs + annotations.json) and `vitmerge tune` runs on it exactly as a user would:

    vitmerge tune dense:vit_tiny_patch16_224 --checkpoint det.pth --model-kwargs '{...}' --no-normalize \\
        --data canvases/ --runtime ort --batch B --max-drop P --budgets ... --flop-budgets ...

mAP is eval's (torchmetrics, mAP@[.5:.95]); `--max-drop` is in mAP points. Weights, canvases and the tune
cache live under $VITMERGE_BENCH_CACHE/detector or ~/.cache/vitmerge/detector, never in the repository. Each
run prints the candidates table of every (batch, drop) pair; the tune cache makes the second drop of a batch
free (everything measured once per batch).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the detector's trainer lives with the slow tests that use it

MODEL = "dense:vit_tiny_patch16_224"
KWARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}


def cache_root() -> Path:
    env = os.environ.get("VITMERGE_BENCH_CACHE")
    return Path(env).expanduser() / "detector" if env else Path.home() / ".cache" / "vitmerge" / "detector"


def prepare(steps: int, seed: int, log=print):
    """(checkpoint, COCO folder): the detector trained once and the 500 test canvases written once."""
    import torch

    from support.detection_training import train_dense
    from vitmerge._io import atomic_write
    from vitmerge.data.detection import digit_canvases, write_coco

    tag = hashlib.sha256(json.dumps({"steps": steps, "seed": seed, "kwargs": KWARGS, "hidden": 64},
                                    sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"dense-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "det.pth"
    if not ckpt.is_file():
        log(f"training the dense detector, {steps} steps on one thread (cached in {folder})")
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        det = train_dense(digit_canvases(4000, split="train", seed=0), steps=steps, seed=seed, log=log)
        import io

        buf = io.BytesIO()
        torch.save(det.state_dict(), buf)
        atomic_write(ckpt, buf.getvalue())
        log(f"trained in {time.perf_counter() - t0:.0f} s")
    coco = folder / "canvases"
    if not (coco / "annotations.json").is_file():
        write_coco(digit_canvases(500, split="test", seed=1), coco)
    return ckpt, coco


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-drop", type=float, nargs="+", default=[1.0, 2.0], help="mAP points")
    ap.add_argument("--budgets", default="0.9,0.8,0.7")
    ap.add_argument("--flop-budgets", default="0.9,0.75")
    ap.add_argument("--limit", type=int, default=None, help="score this many test canvases (default: all 500)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from rich.console import Console

    from vitmerge.commands.tune import candidates_table
    from vitmerge.models.build import resolve_model
    from vitmerge.profiling.tune import Target, TargetNotMet, tune

    ckpt, coco = prepare(args.steps, args.seed)
    source = resolve_model(MODEL, checkpoint=ckpt, model_kwargs=KWARGS, num_classes=10)
    budgets = [float(v) for v in args.budgets.split(",") if v.strip()]
    flops = [float(v) for v in args.flop_budgets.split(",") if v.strip()]
    console = Console(width=150)
    for batch in args.batch:
        for drop in args.max_drop:
            t0 = time.perf_counter()
            try:
                r = tune(source, coco, Target("max_drop", drop), runtime="ort", batch=batch, budgets=budgets,
                         flop_budgets=flops, limit=args.limit, normalize=False, rounds=args.rounds, iters=args.iters,
                         threads=args.threads, cache_dir=cache_root() / "tune", progress=True)
            except TargetNotMet as e:
                r = e.result
            console.print(candidates_table(r))
            c = r.chosen
            done = {k: v for k, v in r.work.items() if v}
            measured = ", ".join(f"{k} {v}" for k, v in done.items()) or "all from the cache"
            got = "none" if c is None else (f"{c.label}, mAP {c.score:.4f} ({c.gain(r.baseline):+.2f} points), "
                                            f"{c.speedup:.2f}x")
            console.print(f"batch {batch}, --max-drop {drop:g} (mAP points): chosen {got}; "
                          f"{time.perf_counter() - t0:.0f} s ({measured})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
