"""Every method at matched FLOPs, FP32 / FP16 / INT8, in ONNX Runtime on the full Fashion-MNIST test split
(the Fashion-MNIST table in docs/accuracy.md).

    apt-get install dataset-fashion-mnist              # the four IDX files in /usr/share/datasets/fashion-mnist
    python bench/fashion_mnist.py                      # train the model once (cached; ~5 min on 2 cores)
    python bench/fashion_mnist_table.py --out /tmp/fm  # this table (ONNX files under --out)
    python bench/fashion_mnist_table.py --out /tmp/fm --write docs/accuracy.md

The model is the cached one of ``bench/fashion_mnist.py`` (``--config`` to name another model.json). For the
unmerged model and each method (tome, hash, importance) at each FLOP budget (0.75, 0.5: the FLOP budget solver,
``MergeRequest(method, budget=F)``; the fraction shown is counted on the merged model):

* FP32 ONNX and FP16 ONNX (``vitmerge.exporter.export``, each verified against PyTorch; the FP16 file by the
  decision rule: every image within tolerance of PyTorch run on the file's own merge decisions, and at least
  90 % of them identical to PyTorch's over the check's random images). A file that fails its check is not
  written, so it is not scored: its row says "export check failed" with the share of identical decisions the
  check measured;
* INT8 QDQ (``vitmerge.calibration.quantize``: entropy calibration on 256 train images, chosen by a fixed
  seed; merge steps left in float).

All of them are scored in ONNX Runtime CPU in one pass over the same test images (``evaluate``: top-1, and the
agreement of each model's top-1 with the unmerged FP32 model's). Nothing is downloaded; no file is written into
the repository except the table (``--write``).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _markdown import write_block  # noqa: E402

import vitmerge  # noqa: E402
from vitmerge.backends import OrtRunner  # noqa: E402
from vitmerge.calibration.quantize import quantize  # noqa: E402
from vitmerge.data import CALIBRATION_SPLITS, open_dataset, transform_for  # noqa: E402
from vitmerge.errors import VerificationError, VitmergeError  # noqa: E402
from vitmerge.exporter import export  # noqa: E402
from vitmerge.models.build import merge, resolve_model  # noqa: E402
from vitmerge.models.flops import flop_ratio  # noqa: E402
from vitmerge.request import MergeRequest  # noqa: E402

MARKER = "fashion-mnist-table"  # <!-- fashion-mnist-table:begin/end --> in docs/accuracy.md
DEFAULT_CONFIG = Path.home() / ".cache/vitmerge/fashion-mnist/vit-7008e07a2828/model.json"


def fp16_decisions(report) -> Optional[float]:
    """The smallest share of identical merge decisions over the batches of a verification report."""
    shares = [c.decisions_identical for c in report.checks if getattr(c, "decisions_identical", None) is not None]
    return min(shares) if shares else None


def failed_decisions(message: str) -> Optional[float]:
    """The smallest 'merge decisions identical X%' in a VerificationError's message (None when absent)."""
    found = [float(v) / 100 for v in re.findall(r"merge decisions identical ([0-9.]+)%", message)]
    return min(found) if found else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model.json of the Fashion-MNIST model")
    ap.add_argument("--data", type=Path, default=None, help="Fashion-MNIST IDX folder (default: model.json's)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the ONNX files (outside the repository)")
    ap.add_argument("--methods", default="tome,hash,importance")
    ap.add_argument("--fractions", default="0.75,0.5", help="FLOP budgets, fractions of the unmerged model")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--calib-images", type=int, default=256, help="train images for INT8 calibration")
    ap.add_argument("--limit", type=int, default=None, help="score this many test images (default: all 10,000)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--write", type=Path, default=None, help="replace the table between the markers in this file")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    precisions = [p for p in args.precisions.split(",") if p]
    fractions = [float(v) for v in args.fractions.split(",") if v]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    source = resolve_model(None, config=args.config)
    cfg = json.loads(Path(args.config).read_text())
    data = args.data or Path(cfg.get("data") or "/usr/share/datasets/fashion-mnist")
    base = source.build()
    tf = transform_for(base)
    test = open_dataset(data, transform=tf, limit=args.limit)
    calib = open_dataset(data, prefer=CALIBRATION_SPLITS, transform=tf, limit=args.calib_images)
    print(f"model: {args.config}\ntest: {test.describe()}\ncalibration: {calib.describe()}")

    configs = [("unmerged", None, None)] + [(f"{m} @ {f:g}", m, f) for m in args.methods.split(",") for f in fractions]
    rows: List[Dict[str, Any]] = []
    runners: Dict[str, OrtRunner] = {}
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    for key, method, f in configs:
        model = source.build()
        if method is not None:
            merge(model, MergeRequest(method, budget=f))
        _, _, ratio = flop_ratio(model)
        info = getattr(model, "vitmerge", None)
        r = list(info.r) if info is not None else [0] * len(base.blocks)
        tokens = (info.tokens_in[0], info.tokens_out[-1]) if info is not None else (None, None)
        stem = "unmerged" if method is None else f"{method}_{int(round(f * 100))}"
        fp32_path = None
        for prec in precisions:
            row = {"model": key, "method": method or "none", "budget": f, "r": r, "tokens": tokens,
                   "flop_fraction": 1.0 / ratio, "precision": prec, "status": "ok", "label": f"{key} {prec}"}
            try:
                if prec == "fp32":
                    res = export(model, out / f"fm_{stem}.onnx")
                    fp32_path = res.path
                    row.update(path=str(res.path), check=f"max abs diff {res.verification.max_abs_diff:.1e}")
                elif prec == "fp16":
                    res = export(model, out / f"fm_{stem}.fp16.onnx", dtype="fp16")
                    dec = fp16_decisions(res.verification)
                    flipped = sum(c.forced_images or 0 for c in res.verification.checks)
                    row.update(path=str(res.path), decisions=dec,
                               check="ok" if dec is None else f"decisions {dec:.2%}" + (
                                   f" ({flipped} flipped image{'s' * (flipped != 1)} checked on the file's own "
                                   "decisions)" if flipped else ""))
                elif prec == "int8":
                    if fp32_path is None:
                        raise VitmergeError("no FP32 file to quantize (its export failed)")
                    q = quantize(fp32_path, out / f"fm_{stem}.int8.onnx", calib, method="entropy")
                    row.update(path=str(q.path), check=f"{q.quantized_nodes} quantized nodes, {q.images} calib images")
                else:
                    raise ValueError(f"unknown precision {prec!r}")
            except VerificationError as e:
                dec = failed_decisions(str(e))
                row.update(status="export check failed" + (f" (decisions {dec:.2%})" if dec is not None else ""),
                           error=str(e), decisions=dec)
            except (VitmergeError, ValueError, RuntimeError) as e:
                row.update(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0]}", error=str(e))
            if row["status"] == "ok":
                runners[row["label"]] = OrtRunner(row["path"], label=row["label"])
            rows.append(row)
            print(f"  {row['label']}: r={r}, FLOPs {row['flop_fraction']:.3f}, {row.get('check', row['status'])}")
    timings["exports + calibration"] = time.perf_counter() - t0

    # every file in one pass; the first runner (unmerged fp32) is the reference of the agreement
    ref = "unmerged fp32"
    if ref not in runners:
        raise SystemExit("the unmerged FP32 export failed: nothing to compare against")
    ordered = {ref: runners[ref], **{k: v for k, v in runners.items() if k != ref}}
    t0 = time.perf_counter()
    ev = evaluate_all(ordered, test, args.batch_size)
    timings["scoring in ONNX Runtime"] = time.perf_counter() - t0
    for row in rows:
        acc = ev.models.get(row["label"])
        if acc is not None:
            row.update(top1=acc.top1, agreement=acc.agreement)
    un = ev.models[ref].top1
    total = time.perf_counter() - t_start
    timings["total"] = total

    import onnxruntime

    lines = [f"Model: vit_tiny_patch16_224 trained on Fashion-MNIST by `bench/fashion_mnist.py` "
             f"({cfg['kwargs']['img_size']} px, patch {cfg['kwargs']['patch_size']}: {cfg.get('tokens', '?')} tokens, "
             f"dim {cfg['kwargs']['embed_dim']}, depth {cfg['kwargs']['depth']}; PyTorch test top-1 "
             f"{cfg['metrics']['test_top1']:.2%}). Data: the {ev.images} images of the Fashion-MNIST test split, "
             f"the same for every row; INT8 calibrated (entropy) on {calib_count(calib)} train images. "
             f"ONNX Runtime {onnxruntime.__version__} CPU ({platform.machine()}), torch {torch.__version__}, "
             f"vitmerge {vitmerge.__version__}. Agreement: top-1 equal to the unmerged FP32 model's. "
             f"Run time {total / 60:.1f} min on 2 cores (exports + calibration "
             f"{timings['exports + calibration']:.0f} s, scoring {timings['scoring in ONNX Runtime']:.0f} s).",
             "",
             "| model | r per block | FLOPs counted | precision | top-1 | Δ top-1 vs unmerged FP32 (points) "
             "| top-1 agreement with unmerged FP32 | export check |",
             "|:---|:---|---:|:---|---:|---:|---:|:---|"]
    for row in rows:
        r_text = "—" if row["method"] == "none" else ",".join(str(v) for v in row["r"])
        if "top1" in row:
            lines.append(f"| {row['model']} | {r_text} | {row['flop_fraction']:.3f} | {row['precision']} | "
                         f"{row['top1']:.2%} | {(row['top1'] - un) * 100:+.2f} | {row['agreement']:.2%} | "
                         f"{row.get('check', '')} |")
        else:
            lines.append(f"| {row['model']} | {r_text} | {row['flop_fraction']:.3f} | {row['precision']} | — | — | — | "
                         f"{row['status']} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\nrun time: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')})")
    if args.write is not None:
        write_block(args.write, MARKER, table)
    if args.json is not None:
        args.json.write_text(json.dumps({"images": ev.images, "unmerged_top1": un, "rows": rows, "timings_s": timings},
                                        indent=2, default=str) + "\n")
    return 0


def calib_count(ds) -> int:
    return len(ds)


def evaluate_all(runners, dataset, batch_size):
    from vitmerge.profiling.accuracy import evaluate

    return evaluate(runners, dataset, batch_size=batch_size, progress=True, description="scoring all files in ORT")


if __name__ == "__main__":
    raise SystemExit(main())
