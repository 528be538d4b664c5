"""Top-1 accuracy of every registered merge method at matched FLOPs (the table in docs/accuracy.md).

    python bench/accuracy_table.py                       # digits ViT (trained/cached), its 449 test images
    python bench/accuracy_table.py --write docs/accuracy.md
    python bench/accuracy_table.py --task video --write docs/accuracy.md   # the VideoMAE on moving digits
    python bench/accuracy_table.py --task audio --write docs/accuracy.md   # the AST on DTMF tones
    python bench/accuracy_table.py --model vit_base_patch16_224 --checkpoint vit_b.pth \\
        --data /data/imagenet/val --limit 5000          # the same table on your model and data

For each method in ``vitmerge.merging.METHODS`` (whatever is registered when it runs) and each FLOP
target (default 0.75 and 0.5 of the unmerged model), the schedule comes from the project's budget
solver (``solve_budget``; methods it does not cover, and vwt's single pre-encoder r, fall back to
the smallest constant r whose FLOPs, counted by running the model, meet the target). The FLOP
fraction reported is the one *counted* on the merged model, not the solver's estimate. All models
are scored in one pass over the same images (PyTorch eager, CPU), so the differences are the
methods', not the data's.

Methods that need state beyond the model (vwt's inter-image mode needs a visual-word vocabulary)
get it built from the calibration split when the data has one (digits: the train/ folder), and
are listed as skipped, with the reason, when it cannot be built. Any other error skips the method
and prints why.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _markdown import write_block  # noqa: E402

import vitmerge  # noqa: E402
from vitmerge import merging  # noqa: E402
from vitmerge.data import CALIBRATION_SPLITS, open_dataset, transform_for  # noqa: E402
from vitmerge.errors import VitmergeError  # noqa: E402
from vitmerge.backends import TorchRunner  # noqa: E402
from vitmerge.models.budget import achieved_fraction, budget_schedule  # noqa: E402
from vitmerge.profiling.accuracy import check_classes, evaluate  # noqa: E402

MARKERS = {"digits": "accuracy-table", "video": "accuracy-video", "audio": "accuracy-audio"}


def vwt_vocabulary(model, calib_root: Optional[Path], words: int):
    """A visual-word vocabulary from the calibration images, or (None, reason)."""
    if calib_root is None:
        return None, "no separate calibration split (train/) to build a vocabulary from"
    try:
        from vitmerge.calibration.vocabulary import build_vocabulary, find_images
    except ImportError as e:
        return None, f"vocabulary builder not available ({e})"
    files = find_images(calib_root)
    return build_vocabulary(model, files, words=words, space="pixels", seed=0), None


def variants(method: str, model, calib_root: Optional[Path], words: int) -> List[Tuple[str, Dict[str, Any], Optional[str]]]:
    """(label, apply options, reason it is skipped or None) for one registered method."""
    if method == "vwt":
        out = [("vwt (intra)", {"mode": "intra"}, None)]
        vocab, why = vwt_vocabulary(model, calib_root, words)
        out.append((f"vwt (inter, {words} words)", {"mode": "inter", "vocab": vocab}, None) if vocab is not None
                   else ("vwt (inter)", {}, f"needs a visual-word vocabulary: {why}"))
        return out
    return [(method, {}, None)]


def fraction_text(x: float) -> str:
    return f"{x:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(MARKERS), default="digits",
                    help="the demo model measured when --model is not given: digits (timm ViT), video (VideoMAE on "
                         "moving digits), audio (AST on DTMF tones); also names the table's markers")
    ap.add_argument("--model", help="timm model name or transformers model folder (default: the --task demo model)")
    ap.add_argument("--checkpoint", type=Path, help="local weights for --model")
    ap.add_argument("--model-kwargs", default=None, help="timm.create_model arguments as JSON or a .json file")
    ap.add_argument("--data", type=Path, help="labelled image folder (any layout `vitmerge eval` reads)")
    ap.add_argument("--limit", type=int, default=None, help="score this many images (fixed seed)")
    ap.add_argument("--fractions", default="0.75,0.5", help="FLOP targets, fractions of the unmerged model")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the registered methods")
    ap.add_argument("--words", type=int, default=64, help="vwt vocabulary size when one is built")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--write", type=Path, default=None, help="replace the table between the markers in this Markdown file")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    fractions = [float(v) for v in args.fractions.split(",") if v]

    # ------------------------------------------------------------------ model and data
    from vitmerge.models.build import build_model

    if args.model is None and args.task in ("video", "audio"):
        from vitmerge.demo import clipmodels

        t0 = time.perf_counter()
        cm = clipmodels.cached(args.task)
        print(f"{args.task} model: {cm.dir} ({'cached' if cm.cached else f'trained in {time.perf_counter() - t0:.0f} s'})")
        name, ckpt, kwargs, data = str(cm.model_dir), None, {}, args.data or cm.data_dir
        c = cm.build().config
        if args.task == "video":
            label = (f"VideoMAE-shaped video classifier trained on moving digits ({c.num_frames} frames of "
                     f"{c.image_size} px, tubelets {c.tubelet_size}x{c.patch_size}x{c.patch_size}, depth "
                     f"{c.num_hidden_layers}, dim {c.hidden_size}, mean pooling)")
        else:
            label = (f"AST-shaped audio classifier trained on DTMF tones in noise ({c.max_length} frames x "
                     f"{c.num_mel_bins} mel bins, {c.patch_size}x{c.patch_size} patches, depth {c.num_hidden_layers}, "
                     f"dim {c.hidden_size})")
    elif args.model is None:
        from vitmerge.demo import digits

        t0 = time.perf_counter()
        dm = digits.cached()
        print(f"digits ViT: {dm.dir} ({'cached' if dm.cached else f'trained in {time.perf_counter() - t0:.0f} s'})")
        name, ckpt, kwargs, data = dm.model_name, dm.checkpoint, json.loads(json.dumps(dm.kwargs)), args.data or dm.data_dir
        label = (f"digits ViT ({name}, {kwargs['img_size']} px, patch {kwargs['patch_size']}, depth {kwargs['depth']}, "
                 f"dim {kwargs['embed_dim']})")
    else:
        from vitmerge.commands._common import parse_json_option

        if args.data is None:
            ap.error("--data is required with --model")
        name, ckpt, data = args.model, args.checkpoint, args.data
        kwargs = parse_json_option(args.model_kwargs, "--model-kwargs")
        label = f"{name} ({ckpt or 'RANDOM weights'})"
    from vitmerge.models.family import family
    from vitmerge.models.shapes import num_classes

    base = build_model(name, ckpt, **kwargs)
    ds = open_dataset(data, transform=transform_for(base), limit=args.limit)
    check_classes(ds, num_classes(base))
    forms = family(base).forms
    calib = open_dataset(data, prefer=CALIBRATION_SPLITS)
    calib_root = calib.root if calib.root.resolve() != ds.root.resolve() else None  # a separate train/ folder
    print(f"data: {ds.describe()}" + "".join(f"\n  {n}" for n in ds.notes))

    # ------------------------------------------------------------------ models at each target
    wanted = args.methods.split(",") if args.methods else sorted(merging.available_methods(), key=lambda m: (m != "tome", m))
    runners = {"unmerged": TorchRunner(base, device="cpu")}
    rows, skipped = [], []
    for method in wanted:
        if method not in merging.METHODS:
            skipped.append((method, f"not registered (available: {', '.join(merging.available_methods())})"))
            continue
        if merging.METHODS[method].form not in forms:
            skipped.append((method, f"its {merging.METHODS[method].form} form is implemented for timm ViTs only"))
            continue
        try:
            vs = variants(method, base, calib_root, args.words)
        except Exception as e:  # vocabulary build failed: say so, keep going
            skipped.append((method, f"{type(e).__name__}: {e}"))
            continue
        for vlabel, opts, why in vs:
            if why:
                skipped.append((vlabel, why))
                continue
            for f in fractions:
                key = f"{vlabel} @ {f}"
                try:
                    m = copy.deepcopy(base)
                    r = budget_schedule(m, f, method, **opts)
                    vitmerge.apply(m, method=method, r=r, **opts)
                    frac = achieved_fraction(m)
                    with torch.no_grad():
                        m(ds[0][0][None])  # the method runs on a real image before it is scored
                except (VitmergeError, ValueError, TypeError, RuntimeError) as e:
                    skipped.append((key, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
                    continue
                runners[key] = TorchRunner(m, device="cpu")
                info = m.vitmerge
                rows.append({"key": key, "method": method, "variant": vlabel, "target": f, "r": r,
                             "tokens_last_block": info.tokens_out[-1], "tokens_in": info.tokens_in[0],
                             "flop_fraction": frac})
                print(f"  {key}: r={r}, FLOPs {frac:.3f} of unmerged")
    t0 = time.perf_counter()
    res = evaluate(runners, ds, batch_size=args.batch_size, progress=True, description="scoring all models")
    print(f"scored {len(runners)} models on {res.images} images in {time.perf_counter() - t0:.1f} s")

    # ------------------------------------------------------------------ table
    un = res.models["unmerged"]
    unit = "layer" if tuple(forms) == ("block",) else "block"
    where = (f"the {args.task} test split" if args.model is None and args.data is None else f"{ds.layout}, {ds.root}")
    what = "clips" if args.task in ("video", "audio") and args.model is None else "images"
    lines = [f"Model: {label}. Data: {res.images} {what} ({where}"
             + (f"; {len(res.unreadable)} unreadable, skipped" if res.unreadable else "") + "). "
             f"PyTorch eager on CPU ({platform.machine()}), torch {torch.__version__}, "
             f"vitmerge {vitmerge.__version__}, methods registered: {', '.join(merging.available_methods())}.",
             "",
             f"| method | FLOP target | r | tokens into {unit} 0 → out of last {unit} "
             "| FLOPs counted | top-1 | Δ top-1 (points) | top-1 agreement with unmerged |",
             "|:---|---:|:---|---:|---:|---:|---:|---:|",
             f"| unmerged | 1.0 | — | {rows[0]['tokens_in'] if rows else '—'} → same | 1.000 | {un.top1:.2%} | — | 100.00% |"]
    for f in fractions:
        for row in [r for r in rows if r["target"] == f]:
            a = res.models[row["key"]]
            r_text = str(row["r"]) if isinstance(row["r"], list) else f"{row['r']} before block 0"
            lines.append(f"| {row['variant']} | {f} | {r_text} | {row['tokens_in']} → {row['tokens_last_block']} | "
                         f"{fraction_text(row['flop_fraction'])} | {a.top1:.2%} | {(a.top1 - un.top1) * 100:+.2f} | "
                         f"{a.agreement:.2%} |")
            row.update(top1=a.top1, top5=a.top5, agreement=a.agreement, delta_points=(a.top1 - un.top1) * 100)
    if skipped:
        lines += ["", "Not in the table:"] + [f"- `{k}`: {why}" for k, why in skipped]
    table = "\n".join(lines)
    print()
    print(table)

    if args.write is not None:
        write_block(args.write, MARKERS[args.task], table)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": label, "images": res.images, "unmerged_top1": un.top1,
                                         "rows": rows, "skipped": skipped}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
