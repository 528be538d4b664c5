"""ONNX Runtime CPU latency of the three graph forms of a merged ViT, next to the unmerged model.

    python bench/bench_graph_forms.py [--model vit_small_patch16_224] [--r 16] [--batch 1,8] [--quick]

Exports the model unmerged (r=0) and merged (standard form), rewrites the merged file into the
native and plugin forms (vitmerge.exporter.surgery), checks that all three forms give the same
logits, then times all four graphs in interleaved rounds (each round runs every graph in turn, so
machine noise hits them alike). Prints medians, the speed-up over the unmerged model and the
fraction of the FLOP bound (vitmerge.models.flops.flop_ratio) each form reaches.

The plugin form runs its TokenMerge nodes through onnxruntime-extensions' Python-op bridge, which
copies every output through Python lists: it measures that bridge, not what a compiled kernel could do.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import vitmerge
from vitmerge.backends.ort import session as ort_session
from vitmerge.exporter.surgery import rewrite
from vitmerge.exporter.verify import compare_files as compare
from vitmerge.models.build import build_model
from vitmerge.models import input_shape
from vitmerge.models.flops import flop_ratio
from vitmerge.profiling.latency import interleaved


def cpu_name() -> str:
    from vitmerge.profiling.report import _cpu_model

    return _cpu_model()


def export_forms(model_name: str, r: int, out: Path, reuse: bool) -> tuple[dict, float, tuple]:
    """Write unmerged / standard / native / plugin files into ``out``; return paths, FLOP bound, input shape."""
    paths = {"unmerged": out / "unmerged.onnx", "standard": out / f"r{r}_standard.onnx",
             "native": out / f"r{r}_native.onnx", "plugin": out / f"r{r}_plugin.onnx"}
    torch.manual_seed(0)
    merged = vitmerge.apply(build_model(model_name), r=r)
    _, _, bound = flop_ratio(merged)
    shape = input_shape(merged)
    for name, rr in (("unmerged", 0), ("standard", r)):
        if reuse and paths[name].is_file():
            continue
        t0 = time.perf_counter()
        model = merged if rr else vitmerge.apply(build_model(model_name), r=0)
        res = vitmerge.export(model, paths[name], batch_sizes=(1, 2), merge_op="standard")
        print(f"exported {name} in {time.perf_counter() - t0:.0f} s (ORT vs PyTorch max|diff| "
              f"{res.verification.max_abs_diff:.1e})", flush=True)
    for form in ("native", "plugin"):
        res = rewrite(paths["standard"], paths[form], form)
        print(f"rewrote {res.merges} merge steps -> {form}", flush=True)
    return paths, bound, shape


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    ap.add_argument("--r", type=int, default=16, help="tokens merged per block")
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    ap.add_argument("--quick", action="store_true", help="3 rounds x 2 calls (a smoke run, noisy)")
    ap.add_argument("--no-plugin", action="store_true", help="leave the (slow on CPU) plugin form out of the timing")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the ONNX files go (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse exported files already in --out-dir")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iters = 3, 2
    batches = [int(v) for v in args.batch.split(",")]
    warnings.filterwarnings("ignore")

    out = args.out_dir or Path(tempfile.mkdtemp(prefix="vitmerge-forms-"))
    out.mkdir(parents=True, exist_ok=True)
    paths, bound, shape = export_forms(args.model, args.r, out, args.reuse)
    for form in ("native", "plugin"):
        worst = max(c.max_abs_diff for c in compare(paths["standard"], paths[form], (1, 2)))
        print(f"{form} vs standard: max|diff| {worst:.1e}")
    if args.no_plugin:
        paths.pop("plugin")
    sessions = {k: ort_session(p, threads=args.threads) for k, p in paths.items()}

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\n{args.model} r={args.r}, ONNX Runtime {__import__('onnxruntime').__version__} CPU, {cpu_name()}, "
          f"{os.cpu_count()} logical cores, load average {load[0]:.1f} at start, random weights; "
          f"medians of {args.rounds}x{args.iters} interleaved calls\n")
    header = f"{'batch':>5} {'graph':>9} {'p50 ms':>9} {'p90 ms':>9} {'vs unmerged':>11} {'vs standard':>11} {'FLOP bound':>10} {'of bound':>9}"
    print(header)
    print("-" * len(header))
    results = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
        stats = interleaved({k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()},
                            rounds=args.rounds, iters=args.iters, warmup=2)
        base, std = stats["unmerged"].p50, stats["standard"].p50
        for k, st in stats.items():
            sp = base / st.p50
            bd = 1.0 if k == "unmerged" else bound
            print(f"{b:>5} {k:>9} {st.p50:>9.2f} {st.p90:>9.2f} {sp:>10.2f}x {std / st.p50:>10.2f}x {bd:>9.2f}x {sp / bd:>8.0%}")
            results.append({"batch": b, "graph": k, "p50_ms": st.p50, "p90_ms": st.p90, "speedup_vs_unmerged": sp,
                            "speedup_vs_standard": std / st.p50, "flop_bound": bd, "samples": st.n})
        print()
    print(f"(load average {os.getloadavg()[0]:.1f} at the end)")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "r": args.r, "cpu": cpu_name(), "cores": os.cpu_count(),
                                         "load_at_start": load[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
