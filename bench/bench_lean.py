"""The lean merge step, measured: nodes per merge step and ONNX Runtime CPU latency, each file alone.

    python bench/bench_lean.py [--model vit_small_patch16_224] [--r 16] [--batch 1,8] [--rounds 5]
                               [--methods tome,importance,hash] [--no-compile] [--json out.json]

Exports (random weights, seed 0, every file verified against PyTorch by vitmerge.export):

* ``unmerged``: the plain model (``--r 0``);
* ``<method> native``: the default file (ToMe / importance: the hand-written lean step);
* ``tome standard``: the exporter's own graph (merged rows by a one-hot MatMul);
* ``tome scatter``: the previous default, the exporter's graph with ScatterND(reduction=add) (before).

Each file is timed **in its own process** (one ONNX Runtime session, nothing else running beside it:
no idle session spinning on the cores), ``--rounds`` times in turn; the table gives the median over
rounds of each round's median. Ratios are measured side by side in this one run. The peer column is
``torch.compile`` of the same PyTorch models (merged and unmerged), also one process each.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _worker_ort(path: str, batch: int, iters: int, threads: int) -> list:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else batch for d in s.get_inputs()[0].shape]
    shape[0] = batch
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for _ in range(3):
        s.run(None, {"images": x})
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        s.run(None, {"images": x})
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _worker_compile(model: str, r: int, method: str, batch: int, iters: int, threads: int) -> list:
    import torch

    import vitmerge
    from vitmerge.models.build import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = build_model(model).eval()
    if r:
        vitmerge.apply(m, method=method, r=r)
    fn = torch.compile(m)
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        out = []
        for _ in range(iters):
            t = time.perf_counter()
            fn(x)
            out.append((time.perf_counter() - t) * 1e3)
    return out


def step_nodes(path: Path) -> list:
    """Nodes per merge step (its name scope), in block order."""
    import onnx

    pat = re.compile(r"(?:blocks|layers|layer)\.(\d+)\.token_merge")
    count = collections.Counter()
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        ns = next((p.value for p in n.metadata_props if p.key == "namespace"), "")
        m = pat.search(ns)
        if m:
            count[int(m.group(1))] += 1
    return [count[k] for k in sorted(count)]


def _run(args: list) -> list:
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--methods", default="tome,importance,hash")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--no-scatter", action="store_true", help="skip the previous ScatterND form")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "ort":
            print(json.dumps(_worker_ort(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))))
        else:
            print(json.dumps(_worker_compile(rest[0], int(rest[1]), rest[2], int(rest[3]), int(rest[4]), int(rest[5]))))
        return

    import torch

    import vitmerge
    from vitmerge.exporter.onnx_export import export_onnx_program, save_program
    from vitmerge.exporter.verify import verify
    from vitmerge.models.build import build_model
    from vitmerge.models.flops import flop_ratio

    warnings.filterwarnings("ignore")
    batches = [int(b) for b in args.batch.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    tmp = Path(tempfile.mkdtemp(prefix="vitmerge-lean-"))
    files, bound = {}, {}

    def model(method=None):
        torch.manual_seed(0)
        m = build_model(args.model).eval()
        if method:
            vitmerge.apply(m, method=method, r=args.r)
        return m

    t0 = time.time()
    files["unmerged"] = vitmerge.export(model(), tmp / "unmerged.onnx").path
    for method in methods:
        m = model(method)
        bound[f"{method} native"] = flop_ratio(m)[2]
        files[f"{method} native"] = vitmerge.export(m, tmp / f"{method}_native.onnx").path
        if method == "tome":
            bound["tome standard"] = bound["tome scatter"] = bound["tome native"]
            files["tome standard"] = vitmerge.export(m, tmp / "tome_standard.onnx", merge_op="standard").path
            if not args.no_scatter:  # the previous default graph, exported as it was (ScatterND-add)
                p = save_program(export_onnx_program(m, scatter_free=False), m, tmp, "tome_scatter.onnx")
                assert verify(m, p, batch_sizes=(1, 2)).ok
                files["tome scatter"] = p
    print(f"exported {len(files)} files in {time.time() - t0:.0f} s", flush=True)
    nodes = {k: step_nodes(p) for k, p in files.items()}

    import onnxruntime

    from vitmerge.profiling.report import _cpu_model

    results = {}
    for b in batches:
        per = collections.defaultdict(list)
        for rnd in range(args.rounds):
            for k, p in files.items():
                per[k].append(statistics.median(_run(["ort", p, b, args.iters, args.threads])))
            if not args.no_compile and b == 1:
                for k, (r, meth) in {"compile unmerged": (0, "tome"), "compile tome": (args.r, "tome")}.items():
                    per[k].append(statistics.median(_run(["compile", args.model, r, meth, b, max(args.iters // 2, 5),
                                                          args.threads])))
            print(f"batch {b}: round {rnd + 1}/{args.rounds} done", flush=True)
        results[b] = {k: statistics.median(v) for k, v in per.items()}

    print(f"\n{args.model}, r = {args.r}, random weights; ONNX Runtime {onnxruntime.__version__} CPU, {args.threads} "
          f"threads, {_cpu_model()} ({os.cpu_count()} logical cores); each file in its own process, medians of "
          f"{args.rounds} rounds x {args.iters} calls\n")
    head = f"| batch | file | nodes per merge step | p50 ms | vs unmerged | FLOP bound | of bound |"
    print(head + "\n|---:|---|---|---:|---:|---:|---:|")
    for b, res in results.items():
        base = res["unmerged"]
        for k, v in res.items():
            if k.startswith("compile"):
                continue
            n = nodes.get(k) or []
            ns = f"{min(n)}-{max(n)}" if n and min(n) != max(n) else (str(n[0]) if n else "-")
            bd = bound.get(k)
            print(f"| {b} | {k} | {ns} | {v:.2f} | {base / v:.2f}x | {f'{bd:.2f}x' if bd else '-'} | "
                  f"{f'{base / v / bd:.0%}' if bd else '-'} |")
        if "compile tome" in res:
            c0, c1 = res["compile unmerged"], res["compile tome"]
            print(f"| {b} | peer: torch.compile unmerged | - | {c0:.2f} | | | |")
            print(f"| {b} | peer: torch.compile tome | - | {c1:.2f} | {c0 / c1:.2f}x (vs compiled unmerged) | | |")
            print(f"\nbatch {b}: the tome file is {c1 / res['tome native']:.2f}x faster than torch.compile of the same "
                  f"merged model")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "r": args.r, "results": results, "nodes": nodes,
                                         "bound": bound}, indent=1))


if __name__ == "__main__":
    main()
