"""Match-step cost: ``hash`` (LSH neighbours) vs ToMe's bipartite matching, on CPU.

    python bench/bench_match.py            # N in {197, 577, 1568, 4096}, C in {384, 768}, batch 1
    python bench/bench_match.py --quick    # fewer rounds (a few seconds per row)
    python bench/bench_match.py --batch 1,8 --threads 0   # torch's default thread count

For every (batch, N, C) it times, interleaved round after round (``vitmerge.profiling.latency.
interleaved``), four runners on the same inputs:

* ``bipartite plan`` / ``hash plan``: the match step alone (``merging.plan``, returns a MergePlan);
* ``bipartite plan+merge`` / ``hash plan+merge``: the match step plus the shared size-weighted merge
  of ``x [B, N, C]``.

Both methods remove the same r = N // 4 tokens. Reported: medians (ms) and the bipartite/hash
ratio (> 1: hash is faster). ``sim`` is the mean cosine similarity between each merged-away token
and the token it ends up in, for both methods, on clustered synthetic metrics: how much matching
quality the hash gives up for its speed (bipartite is exact within its A/B split).
Target (issue 3): hash plan >= 4x faster than bipartite plan at N = 4096.
One torch thread by default: on a shared machine, multi-threaded small ops mostly measure waiting.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitmerge import merging  # noqa: E402
from vitmerge.profiling.latency import interleaved  # noqa: E402

NS = (197, 577, 1568, 4096)
CS = (384, 768)


def clustered_metric(B: int, N: int, C: int, seed: int = 0) -> torch.Tensor:
    """Tokens drawn around N // 8 centres (images have many near-duplicate patches)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, max(N // 8, 1), C, generator=g)
    pick = torch.randint(0, centres.shape[1], (B, N), generator=g)
    return centres.gather(1, pick[..., None].expand(-1, -1, C)) + 0.5 * torch.randn(B, N, C, generator=g)


def merged_similarity(metric: torch.Tensor, plan) -> float:
    """Mean cosine similarity between each merged-away token and the kept token it joins."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    dst_tok = plan.keep.gather(1, plan.dst)
    a = m.gather(1, plan.src[..., None].expand(-1, -1, m.shape[-1]))
    b = m.gather(1, dst_tok[..., None].expand(-1, -1, m.shape[-1]))
    return float((a * b).sum(-1).mean())


def run(batches, ns, cs, rounds: int, iters: int, warmup: int) -> list[dict]:
    rows = []
    for B in batches:
        for N in ns:
            for C in cs:
                metric = clustered_metric(B, N, C)
                x = torch.randn(B, N, C)
                r = N // 4
                runners = {
                    "bip": lambda: merging.plan("tome", metric, r, 1),
                    "hash": lambda: merging.plan("hash", metric, r, 1),
                    "bip+m": lambda: merging.plan("tome", metric, r, 1).merge(x),
                    "hash+m": lambda: merging.plan("hash", metric, r, 1).merge(x),
                }
                with torch.inference_mode():
                    st = interleaved(runners, rounds=rounds, iters=iters, warmup=warmup)
                    sim_b = merged_similarity(metric, merging.plan("tome", metric, r, 1))
                    sim_h = merged_similarity(metric, merging.plan("hash", metric, r, 1))
                row = {"B": B, "N": N, "C": C, "r": r, **{k: v.p50 for k, v in st.items()},
                       "sim_bip": sim_b, "sim_hash": sim_h}
                rows.append(row)
                print(fmt(row), flush=True)
    return rows


HEADER = (f"{'B':>2} {'N':>5} {'C':>4} {'r':>5} | {'bip ms':>8} {'hash ms':>8} {'ratio':>6} | "
          f"{'bip+m ms':>9} {'hash+m ms':>9} {'ratio':>6} | {'sim bip':>7} {'sim hash':>8}")


def fmt(row: dict) -> str:
    return (f"{row['B']:>2} {row['N']:>5} {row['C']:>4} {row['r']:>5} | {row['bip']:>8.3f} {row['hash']:>8.3f} "
            f"{row['bip'] / row['hash']:>5.2f}x | {row['bip+m']:>9.3f} {row['hash+m']:>9.3f} "
            f"{row['bip+m'] / row['hash+m']:>5.2f}x | {row['sim_bip']:>7.3f} {row['sim_hash']:>8.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds: a rough table in well under a minute")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    ap.add_argument("--n", default=",".join(map(str, NS)), help="comma-separated token counts")
    ap.add_argument("--c", default=",".join(map(str, CS)), help="comma-separated metric widths")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable on a shared machine; 0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, iters, warmup = (3, 3, 1) if args.quick else (10, 5, 2)
    print(f"# match step on CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {rounds * iters} interleaved runs; "
          f"hash bits={merging.hashing.DEFAULT_BITS} rounds={merging.hashing.DEFAULT_ROUNDS}; r = N // 4")
    print(HEADER)
    rows = run([int(v) for v in args.batch.split(",")], [int(v) for v in args.n.split(",")],
               [int(v) for v in args.c.split(",")], rounds, iters, warmup)
    big = [r for r in rows if r["N"] == max(r2["N"] for r2 in rows)]
    worst = min(r["bip"] / r["hash"] for r in big)
    print(f"# at N={big[0]['N']}: hash plan is {worst:.1f}x faster than bipartite at worst (target >= 4x): "
          f"{'MET' if worst >= 4 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
