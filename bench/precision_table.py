"""What reduced precision costs, per method, at matched FLOPs (the FP16 / BF16 table in docs/accuracy.md).

    python bench/precision_table.py                          # digits ViT, its 449 test images
    python bench/precision_table.py --write docs/accuracy.md

For each method (tome, hash, importance by default) and FLOP target (0.75, 0.5), the float32 schedule
from the budget solver is applied to the model in float32, float16 and bfloat16
(:func:`vitmerge.models.precision.cast_model`: merge steps stay float32). Every model sees the same
images in PyTorch (CPU); reported per row:

* top-1 of the model at that precision;
* top-1 agreement with the same method and schedule in float32;
* the share of identical merge decisions: every token's slot, at every merging block, compared with
  the float32 model's (a decision flips when rounding reorders two nearly tied scores).

The unmerged model's rows say what precision alone costs, with no decision to flip.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _markdown import write_block  # noqa: E402

import vitmerge  # noqa: E402
from vitmerge.data import batches, open_dataset, transform_for  # noqa: E402
from vitmerge.demo import digits  # noqa: E402
from vitmerge.models.budget import achieved_fraction, budget_schedule  # noqa: E402
from vitmerge.models.precision import cast_model  # noqa: E402
from vitmerge.models.vit import run_with_decisions  # noqa: E402

MARKER = "precision-table"  # <!-- precision-table:begin/end --> in docs/accuracy.md
DTYPES = ("fp32", "fp16", "bf16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="tome,hash,importance")
    ap.add_argument("--fractions", default="0.75,0.5")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--write", type=Path, default=None, help="replace the table between the markers in this file")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dm = digits.cached()
    base = dm.build()
    ds = open_dataset(dm.test_dir, transform=transform_for(base))
    configs = [("unmerged", None, 1.0)]
    for method in args.methods.split(","):
        for f in (float(v) for v in args.fractions.split(",")):
            configs.append((f"{method} @ {f}", method, f))
    models = {}
    for key, method, f in configs:
        fp32 = copy.deepcopy(base)
        frac = 1.0
        if method is not None:
            vitmerge.apply(fp32, method=method, r=budget_schedule(fp32, f, method))
            frac = achieved_fraction(fp32)
        for dt in DTYPES:
            models[(key, dt)] = (cast_model(copy.deepcopy(fp32), dt) if dt != "fp32" else fp32, frac)
    stats = {k: {"hit": 0, "agree": 0, "n": 0, "same": 0, "total": 0} for k in models}
    t0 = time.perf_counter()
    for x, y in batches(ds, args.batch_size):
        ref = {}
        for (key, dt), (m, _) in models.items():
            logits, dec = run_with_decisions(m, x)
            if dt == "fp32":
                ref[key] = (logits.argmax(-1), dec)
            r_top1, r_dec = ref[key]
            s = stats[(key, dt)]
            top1 = logits.argmax(-1)
            s["hit"] += int((top1 == y).sum())
            s["agree"] += int((top1 == r_top1).sum())
            s["n"] += len(y)
            for a, b in zip(dec, r_dec):
                s["same"] += int((a == b).sum())
                s["total"] += a.numel()
    seconds = time.perf_counter() - t0
    rows = []
    for (key, dt), (m, frac) in models.items():
        s = stats[(key, dt)]
        rows.append({"model": key, "dtype": dt, "flop_fraction": frac, "top1": s["hit"] / s["n"],
                     "agreement_with_fp32": s["agree"] / s["n"],
                     "decisions_identical": (s["same"] / s["total"]) if s["total"] else None})
    lines = [f"Model: the digits ViT ({dm.model_name}, {dm.kwargs['img_size']} px, patch {dm.kwargs['patch_size']}, "
             f"depth {dm.kwargs['depth']}). Data: its {stats[('unmerged', 'fp32')]['n']} test images. PyTorch eager "
             f"on CPU ({platform.machine()}), torch {torch.__version__}, vitmerge {vitmerge.__version__}; "
             f"merge steps computed in float32 at every precision. {seconds:.0f} s.",
             "",
             "| model | FLOPs counted | dtype | top-1 | top-1 agreement with fp32 | merge decisions identical to fp32 |",
             "|:---|---:|:---|---:|---:|---:|"]
    for r in rows:
        dec = "—" if r["decisions_identical"] is None else f"{r['decisions_identical']:.2%}"
        lines.append(f"| {r['model']} | {r['flop_fraction']:.3f} | {r['dtype']} | {r['top1']:.2%} | "
                     f"{r['agreement_with_fp32']:.2%} | {dec} |")
    table = "\n".join(lines)
    print(table)
    if args.write is not None:
        write_block(args.write, MARKER, table)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
