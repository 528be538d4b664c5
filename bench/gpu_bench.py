"""Everything vitmerge can measure on a GPU machine, in one call (run by ``bash bench/gpu.sh OUTDIR``).

    python bench/gpu_bench.py --out OUTDIR [--dry-run] [--budget-s 450]

Writes ``OUTDIR/gpu.json`` (every number, with the device, versions and settings) and ``OUTDIR/gpu.md``
(the tables), and prints a summary. Parts, in order, each one skipped with its reason when this machine
cannot run it (and the rest going on), under one time budget (``--budget-s``: parts that would start after
it are reported as not run):

1. ``vitmerge selftest --quick`` (every runtime path this machine offers), as a subprocess;
2. PyTorch CUDA latency, ViT-S/16 and ViT-B/16 (random weights) unmerged vs ToMe vs hash (r = 16 per block),
   eager and CUDA graphs, fp32 (TF32 off) and fp16, batch 1, 8 and 64: medians of CUDA-event timings;
3. the Triton merge kernel against the PyTorch merge on the GPU (max |diff| and time);
4. NVML energy per image, ViT-S unmerged vs ToMe at batch 64, fp16, CUDA graphs (idle baseline beside it).

``--dry-run``: the same code on the CPU at tiny sizes (a 2-block ViT at 64 px, batch 1 and 2, a few
iterations) with every CUDA part reported as skipped and why; tests run it, so the GPU day does not
find a broken script. The GPU machines lent to this project have PyTorch (CUDA 13), Triton, timm,
transformers, onnx and CPU onnxruntime, nothing to download: this needs torch and timm only (the
selftest needs the rest of vitmerge's dependencies and says what is missing if they are not there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"vit_small_patch16_224": "ViT-S/16", "vit_base_patch16_224": "ViT-B/16"}
VARIANTS = (("unmerged", None), ("tome r=16", "tome"), ("hash r=16", "hash"))
R = 16


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def skipped(reason: str) -> Dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def environment(torch) -> Dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cpu": platform.processor() or platform.machine(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        from vitmerge.selftest import driver_cuda_version

        d = driver_cuda_version()
        info["driver_cuda"] = f"{d[0]}.{d[1]}" if d else None
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["driver_cuda"] = f"unknown ({type(e).__name__}: {e})"
    for mod in ("timm", "triton", "onnxruntime", "tensorrt", "pynvml"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def run_selftest(out: Path, dry: bool, budget: Budget) -> Dict[str, Any]:
    if dry:
        return skipped("dry run: the selftest has its own tests")
    if budget.left() < 120:
        return skipped("time budget")
    cmd = [sys.executable, "-m", "vitmerge.cli", "selftest", "--quick", "--report-dir", str(out / "selftest")]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, min(240, budget.left() - 60)),
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - t0}
    (out / "selftest.txt").write_text(p.stdout + p.stderr)
    res = {"status": "ran", "exit_code": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "tail": (p.stdout + p.stderr).strip().splitlines()[-25:]}
    report = out / "selftest" / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        res["rows"] = (data.get("data") or data).get("rows")
    return res


def timed(torch, fn: Callable[[], Any], device: str, iters: int, warmup: int) -> Dict[str, float]:
    """Median / p90 of ``iters`` calls in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"p50_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "iters": iters}


def build(torch, name: str, method: Optional[str], dtype, device: str, dry: bool):
    import timm

    import vitmerge

    torch.manual_seed(0)
    kw = dict(img_size=64, depth=2) if dry else {}
    m = timm.create_model(name, pretrained=False, **kw).eval()
    if method:
        vitmerge.apply(m, method=method, r=4 if dry else R)
    return m.to(device=device, dtype=dtype)


def graphed(torch, model, x):
    """A CUDA-graph replay of ``model(x)`` (static input buffer ``x``)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = model(x)
    return lambda: (g.replay(), y)[1]


def latency(torch, dry: bool, budget: Budget) -> List[Dict[str, Any]]:
    cuda = torch.cuda.is_available() and not dry
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # "fp32" means float32 math
        torch.backends.cudnn.allow_tf32 = False
    models = {"vit_tiny_patch16_224": "ViT-Ti (dry run: 2 blocks, 64 px)"} if dry else MODELS
    batches = (1, 2) if dry else (1, 8, 64)
    dtypes = [("fp32", torch.float32)] + ([("fp16", torch.float16)] if cuda else [])
    rows = []
    with torch.inference_mode():
        for name, label in models.items():
            for dname, dtype in dtypes:
                for vname, method in VARIANTS:
                    if budget.left() < 20:
                        rows.append({"model": label, "dtype": dname, "variant": vname, **skipped("time budget")})
                        continue
                    model = build(torch, name, method, dtype, device, dry)
                    size = 64 if dry else 224
                    for b in batches:
                        x = torch.randn(b, 3, size, size, device=device, dtype=dtype)
                        iters = 3 if dry else (50 if b < 64 else 20)
                        base = {"model": label, "dtype": dname, "variant": vname, "batch": b, "device": device}
                        rows.append({**base, "mode": "eager", **timed(torch, lambda: model(x), device, iters, 2)})
                        if not cuda:
                            rows.append({**base, "mode": "cuda graph", **skipped(
                                "dry run on the CPU" if dry else "no CUDA device (torch.cuda.is_available() is False)")})
                            continue
                        try:
                            fn = graphed(torch, model, x)
                            rows.append({**base, "mode": "cuda graph", **timed(torch, fn, device, iters, 3)})
                        except Exception as e:  # noqa: BLE001 - a model that cannot be captured is a finding
                            rows.append({**base, "mode": "cuda graph", "status": "failed",
                                         "reason": f"{type(e).__name__}: {str(e)[:200]}"})
                    del model
                    if cuda:
                        torch.cuda.empty_cache()
    for r in rows:  # speed-up against the unmerged model of the same configuration
        if "p50_ms" in r and r["variant"] != "unmerged":
            base = next((u for u in rows if u.get("variant") == "unmerged" and u.get("p50_ms") and
                         all(u.get(k) == r.get(k) for k in ("model", "dtype", "batch", "mode"))), None)
            if base:
                r["speedup"] = base["p50_ms"] / r["p50_ms"]
    return rows


def triton_vs_torch(torch, dry: bool, budget: Budget) -> List[Dict[str, Any]]:
    if dry or not torch.cuda.is_available():
        return [skipped("dry run on the CPU: the compiled kernel needs a GPU (tests run it in Triton's CPU "
                        "interpreter)" if dry else "no CUDA device")]
    try:
        from vitmerge import merging
        from vitmerge.plugins.triton_kernel import merge_tokens
    except Exception as e:  # noqa: BLE001
        return [skipped(f"Triton kernel not importable: {type(e).__name__}: {e}")]
    out = []
    for B, N, D, r, method in ((1, 197, 384, 16, "tome"), (64, 197, 384, 16, "tome"), (64, 197, 768, 16, "tome"),
                               (8, 1568, 768, 300, "hash")):
        if budget.left() < 10:
            out.append({"shape": [B, N, D], "r": r, "method": method, **skipped("time budget")})
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, N, D, device="cuda", generator=g)
        metric = torch.randn(B, N, 64, device="cuda", generator=g)
        size = torch.randint(1, 4, (B, N, 1), device="cuda", generator=g).float()
        plan = merging.plan(method, metric, r, 1)
        want = plan.merge(x, size)
        got = merge_tokens(x, metric, size, r, 1, method)
        diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
        t_torch = timed(torch, lambda: plan.merge(x, size), "cuda", 100, 5)
        t_plan = timed(torch, lambda: merging.plan(method, metric, r, 1).merge(x, size), "cuda", 100, 5)
        t_triton = timed(torch, lambda: merge_tokens(x, metric, size, r, 1, method), "cuda", 100, 5)
        out.append({"shape": [B, N, D], "r": r, "method": method, "max_abs_diff": diff,
                    "torch_merge_ms": t_torch["p50_ms"], "torch_plan_and_merge_ms": t_plan["p50_ms"],
                    "triton_plan_and_merge_ms": t_triton["p50_ms"]})
    return out


def energy(torch, dry: bool, budget: Budget) -> List[Dict[str, Any]]:
    if dry or not torch.cuda.is_available():
        return [skipped("dry run on the CPU" if dry else "no CUDA device")]
    from vitmerge.profiling import energy as en

    meter, why = en.meter_for("cuda")
    if meter is None:
        return [skipped(f"no NVML counter: {why}")]
    out = []
    try:
        idle = en.measure_idle(meter, seconds=3.0, sync=torch.cuda.synchronize)
        with torch.inference_mode():
            for vname, method in VARIANTS[:2]:
                if budget.left() < 25:
                    out.append({"variant": vname, **skipped("time budget")})
                    continue
                model = build(torch, "vit_small_patch16_224", method, torch.float16, "cuda", False)
                x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.float16)
                fn = graphed(torch, model, x)
                res = en.measure_energy(fn, 64, meter, min_seconds=4.0, idle=idle, sync=torch.cuda.synchronize,
                                        windows=2)
                out.append({"variant": vname, "model": "ViT-S/16", "batch": 64, "dtype": "fp16", "mode": "cuda graph",
                            **res.to_dict()})
                del model
    finally:
        meter.close()
    return out


def markdown(res: Dict[str, Any]) -> str:
    env = res["environment"]
    lines = [f"# vitmerge on {env.get('gpu') or env.get('cpu')} ({'dry run' if res['dry_run'] else 'GPU run'})", "",
             f"torch {env['torch']} (CUDA {env.get('torch_cuda')}), driver CUDA {env.get('driver_cuda')}, "
             f"triton {env.get('triton')}, timm {env.get('timm')}; {res['seconds']:.0f} s in all.", "",
             "## Latency (PyTorch; fp32 = float32 math, TF32 off)", "",
             "| model | dtype | batch | mode | variant | p50 ms | speed-up |", "|---|---|---:|---|---|---:|---:|"]
    for r in res["latency"]:
        if "p50_ms" in r:
            sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['mode']} | {r['variant']} | "
                         f"{r['p50_ms']:.3f} | {sp} |")
        else:
            lines.append(f"| {r['model']} | {r['dtype']} | {r.get('batch', '')} | {r.get('mode', '')} | {r['variant']} | "
                         f"{r['status']}: {r['reason']} | |")
    lines += ["", "## Triton merge kernel vs PyTorch merge (GPU)", ""]
    for r in res["triton"]:
        lines.append(f"- {json.dumps(r)}")
    lines += ["", "## Energy (NVML)", ""]
    for r in res["energy"]:
        lines.append(f"- {json.dumps(r)}")
    st = res["selftest"]
    lines += ["", "## selftest", "", f"- {st.get('status')}: " + (f"exit {st.get('exit_code')}" if "exit_code" in st
                                                                   else st.get("reason", ""))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450.0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    budget = Budget(args.budget_s)
    res: Dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(torch)}
    print(f"environment: {json.dumps(res['environment'])}", flush=True)
    res["selftest"] = run_selftest(args.out, args.dry_run, budget)
    print(f"selftest: {res['selftest'].get('status')}", flush=True)
    res["latency"] = latency(torch, args.dry_run, budget)
    print(f"latency: {sum('p50_ms' in r for r in res['latency'])} rows measured", flush=True)
    res["triton"] = triton_vs_torch(torch, args.dry_run, budget)
    res["energy"] = energy(torch, args.dry_run, budget)
    res["seconds"] = time.perf_counter() - budget.t0
    (args.out / "gpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    (args.out / "gpu.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
