"""ONNX Runtime CPU latency of merged vs unmerged ViT, next to the FLOP-ratio bound.

    python bench/bench_ort.py [--model vit_small_patch16_224] [--r 0,8,16] [--batch 1,8] [--rounds 12]

Exports every variant once (vitmerge.export: verified against PyTorch), then times them in
interleaved rounds (each round runs every variant in turn) and prints medians and ratios measured
side by side in this one run. Also exports a reference-style ToMe (full argsort, expanded gathers,
scatter_reduce: bench/reference_style.py) with the same dynamo exporter, as the baseline that a
user gets without vitmerge.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import vitmerge  # noqa: E402
from vitmerge.backends.ort import session as ort_session  # noqa: E402
from vitmerge.exporter.onnx_export import export_onnx_program  # noqa: E402
from vitmerge.exporter.verify import verify  # noqa: E402
from vitmerge.models.build import build_model  # noqa: E402
from vitmerge.models.flops import count_flops, flop_ratio  # noqa: E402
from vitmerge.profiling.latency import interleaved  # noqa: E402
from reference_style import RefStyleViT  # noqa: E402


def cpu_name() -> str:
    from vitmerge.profiling.report import _cpu_model

    return _cpu_model()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--r", default="0,8,16")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-style ToMe baseline")
    args = ap.parse_args()
    rs = [int(v) for v in args.r.split(",")]
    batches = [int(v) for v in args.batch.split(",")]
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="vitmerge-bench-"))
    paths, bound = {}, {}
    for r in rs:
        model = build_model(args.model)
        vitmerge.apply(model, r=r)
        _, _, bound[f"r={r}"] = flop_ratio(model)
        res = vitmerge.export(model, tmp / f"r{r}.onnx")
        paths[f"r={r}"] = res.path
        print(f"exported r={r}: {model.vitmerge.tokens_in[0]} -> {model.vitmerge.tokens_out[-1]} tokens, "
              f"ORT max|diff| {res.verification.max_abs_diff:.1e}", flush=True)
    if not args.no_reference:
        for r in [v for v in rs if v > 0]:
            plain = build_model(args.model)
            ref = RefStyleViT(plain, r).eval()
            # sanity: reference style computes what vitmerge computes
            x = torch.randn(2, 3, 224, 224)
            merged = vitmerge.apply(build_model(args.model), r=r)
            merged.load_state_dict(plain.state_dict())
            with torch.no_grad():
                d = (ref(x) - merged(x)).abs().max().item()
            prog = export_onnx_program(ref)
            p = tmp / f"ref_r{r}.onnx"
            prog.save(str(p))
            rep = verify(ref, p, batch_sizes=(1, 2))
            name = f"reference-style r={r}"
            paths[name] = p
            bound[name] = count_flops(plain) / count_flops(merged)
            print(f"exported {name}: vs vitmerge in torch max|diff| {d:.1e}, ORT vs torch {rep.max_abs_diff:.1e}", flush=True)

    sessions = {k: ort_session(p, threads=args.threads) for k, p in paths.items()}
    shape = (3, 224, 224) if "224" in args.model else None
    if shape is None:
        m = build_model(args.model)
        shape = (3, *m.patch_embed.img_size)
    print(f"\n{args.model}, ONNX Runtime {__import__('onnxruntime').__version__} CPU, {cpu_name()}, "
          f"{os.cpu_count()} logical cores, random weights; medians of {args.rounds}x{args.iters} interleaved calls\n")
    header = f"{'batch':>5} {'variant':>24} {'p50 ms':>9} {'p90 ms':>9} {'speed-up':>9} {'FLOP bound':>10} {'of bound':>9}"
    print(header)
    print("-" * len(header))
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
        stats = interleaved({k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()},
                            rounds=args.rounds, iters=args.iters, warmup=3)
        base = stats["r=0"].p50 if "r=0" in stats else None
        for k, st in stats.items():
            sp = base / st.p50 if base else float("nan")
            print(f"{b:>5} {k:>24} {st.p50:>9.2f} {st.p90:>9.2f} {sp:>8.2f}x {bound[k]:>9.2f}x {sp / bound[k]:>8.0%}")
        for r in [v for v in rs if v > 0]:
            ref = stats.get(f"reference-style r={r}")
            if ref:
                print(f"{'':>5} vitmerge r={r} vs reference-style r={r}: {ref.p50 / stats[f'r={r}'].p50:.2f}x faster")
        print()


if __name__ == "__main__":
    main()
