"""Hash match quality and time at long N: which bits / rounds for N in the thousands.

    python bench/bench_hash_long.py                      # N in {1568, 4096, 8192}, r = N/4
    python bench/bench_hash_long.py --sizes 8192 --r-fraction 0.5

The metric rows are real keys: layer 0 of a VideoMAE with ViT-S widths (random weights, tubelets
2 x 16 x 16) on moving-digit clips (vitmerge.data.synthetic; 16 x 224^2 = 1,568 tokens, 32 x 256^2 =
4,096, 64 x 256^2 = 8,192), averaged over heads as ToMe's metric. For each method the match step picks
r tokens to merge away; quality is the mean cosine similarity between each merged token and the token
whose slot it joins, next to two references: ToMe's bipartite matching on the same keys, and a
per-token upper bound (every token paired with its nearest neighbour among all others, the best r).
Time: median of 5 runs of the plan (PyTorch eager, one thread).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vitmerge import merging  # noqa: E402
from vitmerge.data.synthetic import moving_digits  # noqa: E402
from vitmerge.models import hf  # noqa: E402

CLIPS = {1568: (16, 224), 4096: (32, 256), 8192: (64, 256)}
HASH = [(8, 1), (8, 2), (8, 4), (12, 2), (12, 4), (16, 1), (16, 2), (16, 4), (16, 8), (24, 2), (32, 2)]


@torch.no_grad()
def keys(n: int) -> torch.Tensor:
    import transformers as tf

    frames, size = CLIPS[n]
    torch.manual_seed(0)
    model = tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(
        image_size=size, patch_size=16, num_frames=frames, tubelet_size=2, hidden_size=384, num_hidden_layers=1,
        num_attention_heads=6, intermediate_size=1536)).eval()
    clip, _ = moving_digits([7], frames=frames, size=size, digit_size=size // 2, noise=0.3, seed=0)
    x = torch.from_numpy(clip[0]).float().div(255)[:, None].expand(-1, 3, -1, -1)[None]  # [1, T, 3, H, W]
    x = (x - 0.45) / 0.225
    emb = model.videomae.embeddings(x, None)
    layer = hf.layers(model)[0]
    _, metric = hf.attention_with_metric(layer, layer.layernorm_before(emb), None)
    return metric  # [1, N, 64]


def quality(metric: torch.Tensor, plan) -> float:
    unit = torch.nn.functional.normalize(metric[0], dim=-1)
    dst_token = plan.keep[0][plan.dst[0]]
    return float((unit[plan.src[0]] * unit[dst_token]).sum(-1).mean())


def upper_bound(metric: torch.Tensor, r: int) -> float:
    unit = torch.nn.functional.normalize(metric[0], dim=-1)
    best = []
    for part in unit.split(1024):
        s = part @ unit.T
        s[s > 1 - 1e-7] = -2  # not itself
        best.append(s.max(-1).values)
    return float(torch.cat(best).topk(r).values.mean())


def timed(fn, reps: int = 5) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1568,4096,8192")
    ap.add_argument("--r-fraction", type=float, default=0.25)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| N | r | method | mean cos of merged pairs | of the upper bound | match ms |")
    print("|---:|---:|:---|---:|---:|---:|")
    for n in (int(v) for v in args.sizes.split(",")):
        m = keys(n)
        r = int(n * args.r_fraction)
        ub = upper_bound(m, r)
        rows = [("tome", {})] + [(f"hash bits={b} rounds={k}", {"bits": b, "rounds": k}) for b, k in HASH]
        for label, opts in rows:
            method = "tome" if label == "tome" else "hash"
            if method == "tome" and r > n // 2:
                continue
            plan = merging.plan(method, m, r, 0, **opts)
            q = quality(m, plan)
            ms = timed(lambda: merging.plan(method, m, r, 0, **opts))
            print(f"| {n} | {r} | {label} | {q:.4f} | {q / ub:.1%} | {ms:.1f} |", flush=True)
        print(f"| {n} | {r} | upper bound (nearest neighbour of each token, best r) | {ub:.4f} | 100% | — |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
