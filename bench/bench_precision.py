"""FP16 vs FP32 in ONNX Runtime CPU: latency (interleaved, medians), file sizes, and where ORT falls back.

    python bench/bench_precision.py                       # ViT-S/16 (random weights), unmerged and ToMe r=16
    python bench/bench_precision.py --model vit_tiny_patch16_224 --r 8 --batch 1,8

Each model is exported twice (``--dtype fp32`` and ``--dtype fp16``, both verified), then all four
files are timed interleaved in one run. ONNX Runtime's CPU provider has float16 kernels for few ops on
x86 (LayerNormalization, data movement): for the rest its graph optimiser inserts Casts and computes in
float32. The "fp16 compute" column counts, in ORT's optimised graph, the nodes that still take
float16 inputs, next to the Casts ORT added: a CPU speed-up is not expected, and this says why. The
float16 file is for GPUs (TensorRT, ORT-CUDA); on CPU it halves the file and the memory for weights.
"""
from __future__ import annotations

import argparse
import collections
import platform
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from vitmerge.backends import OrtRunner  # noqa: E402
from vitmerge.exporter import export  # noqa: E402
from vitmerge.models import apply  # noqa: E402
from vitmerge.models.build import build_model  # noqa: E402
from vitmerge.profiling.profile import profile_targets  # noqa: E402


def fp16_placement(path: Path, tmp: Path) -> tuple:
    """(nodes computing on float16 inputs, Casts in ORT's optimised graph, Casts in the file)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / "optimised.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp / "optimised.onnx"))
    src = onnx.load(str(path), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(opt.graph.value_info) + list(opt.graph.input) + list(opt.graph.output)}
    types.update({t.name: t.data_type for t in opt.graph.initializer})
    on16 = collections.Counter(n.op_type for n in opt.graph.node if n.op_type != "Cast"
                               and onnx.TensorProto.FLOAT16 in (types.get(i) for i in n.input if i))
    casts = sum(n.op_type == "Cast" for n in opt.graph.node)
    return on16, casts, sum(n.op_type == "Cast" for n in src.graph.node)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = {}
        for r in (0, args.r):
            model = build_model(args.model)
            if r:
                apply(model, method="tome", r=r)
            for dt in ("fp32", "fp16"):
                key = f"{'unmerged' if r == 0 else f'tome r={r}'} {dt}"
                paths[key] = export(model, tmp / f"{key.replace(' ', '_').replace('=', '')}.onnx", dtype=dt,
                                    batch_sizes=(1, 3)).path
                print(f"exported {key}: {paths[key].stat().st_size / 2**20:.1f} MiB")
        runners = [OrtRunner(p, threads=args.threads, label=k) for k, p in paths.items()]
        prof = profile_targets(runners, batches, rounds=args.rounds, iters=args.iters, warmup=3)
        p50 = {(row.label, row.batch): row.stats.p50 for row in prof.rows}
        print(f"\n{args.model} (random weights), ONNX Runtime {ort.__version__} CPU ({platform.processor() or platform.machine()}, "
              f"{args.threads} threads), {args.rounds}x{args.iters} interleaved calls, medians\n")
        print("| model | dtype | file MiB | " + " | ".join(f"p50 ms b={b}" for b in batches) + " | "
              + " | ".join(f"fp16/fp32 b={b}" for b in batches) + " |")
        print("|:---|:---|---:|" + "---:|" * (2 * len(batches)))
        for key, path in paths.items():
            base = key.rsplit(" ", 1)[0]
            dt = key.rsplit(" ", 1)[1]
            ratios = [p50[(key, b)] / p50[(f"{base} fp32", b)] for b in batches]
            print(f"| {base} | {dt} | {path.stat().st_size / 2**20:.1f} | "
                  + " | ".join(f"{p50[(key, b)]:.2f}" for b in batches) + " | "
                  + " | ".join(f"{x:.2f}" for x in ratios) + " |")
        for key, path in paths.items():
            if key.endswith("fp16"):
                on16, casts, src_casts = fp16_placement(path, tmp)
                print(f"\n{key}: ORT CPU optimised graph computes {sum(on16.values())} nodes on float16 inputs "
                      f"({dict(on16)}); {casts} Casts after optimisation vs {src_casts} in the file "
                      f"(the difference: float32 fallbacks ORT inserted)")
    print(f"\ntorch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
