"""Quality of importance / evo / vwt next to tome at matched FLOPs (the numbers in docs/methods/*.md).

    python bench/methods_agreement.py              # both parts below, ~5 min on 2 CPU cores
    python bench/methods_agreement.py --part random
    python bench/methods_agreement.py --part digits
    python bench/methods_agreement.py --part evo      # evo settings (start block, prop. attention, tradeoff)

Part ``random``: vit_small_patch16_224 with RANDOM weights on the scikit-image photos (5 photos x 4
crops/flips = 20 inputs). Reported per method and FLOP target: cosine similarity of the final class
token features and of the logits with the unmerged model, and top-1 agreement. With random weights
the class attention carries no meaning, so this measures only how much each method perturbs the
computation, not whether it keeps what matters.

Part ``digits``: the project's digits ViT (``vitmerge.demo.digits``: 32 px, patch 4, 64
patches, dim 96, depth 4, trained on scikit-learn's handwritten digits, cached in the temp folder,
never committed) on its 449 test images. Reported: test top-1 per method at matched FLOPs, and top-1
agreement with the unmerged model. Real (if small) learned attention: the part that can say whether
a class-attention method is useful. The vwt vocabulary is built from the training images with the
same function ``vitmerge vocab build`` uses (32 words, pixel space).

FLOP matching: for every method the constant r (vwt: its single pre-encoder r) whose FLOP fraction
(``count_flops`` merged / unmerged, batch 1) is closest to the target; the fraction reached is printed.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vitmerge  # noqa: E402
from vitmerge.merging.vwt import pixel_patches, spherical_kmeans  # noqa: E402
from vitmerge.models.vocabulary import Vocabulary  # noqa: E402
from vitmerge.models.flops import count_flops  # noqa: E402

TARGETS = (0.75, 0.5)


def methods_for(model, vocab):
    """(label, method, options, r candidates) to search for each FLOP target."""
    n = int(model.patch_embed.num_patches)
    depth = len(model.blocks)
    out = [
        ("tome", "tome", {}, range(1, n // 2 + 1)),
        ("importance", "importance", {}, range(1, n)),
        ("evo", "evo", {}, range(1, n - 1)),
        ("vwt intra", "vwt", {"mode": "intra"}, range(1, n)),
        ("vwt inter", "vwt", {"vocab": vocab}, range(1, n)),
    ]
    return out, depth


def flop_fraction(model, method, r, options, base):
    vitmerge.apply(model, method, r=r, **options)
    f = count_flops(model) / base
    vitmerge.remove(model)
    return f


def match_r(model, method, options, candidates, target, base):
    """Smallest |fraction - target| over candidates (fractions fall as r grows: bisection)."""
    cands = list(candidates)
    lo, hi = 0, len(cands) - 1
    cache = {}

    def frac(i):
        if i not in cache:
            cache[i] = flop_fraction(model, method, cands[i], options, base)
        return cache[i]

    while hi - lo > 1:
        mid = (lo + hi) // 2
        if frac(mid) > target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda i: abs(frac(i) - target))
    return cands[best], frac(best)


@torch.no_grad()
def run(model, method, r, options, x, features=False):
    if method is not None:
        vitmerge.apply(model, method, r=r, **options)
    try:
        if features:
            f = model.forward_features(x)
            return f[:, 0], model.forward_head(f)
        return model(x)
    finally:
        if method is not None:
            vitmerge.remove(model)


def skimage_inputs(model):
    from skimage import data
    from timm.data import create_transform, resolve_data_config
    from PIL import Image

    cfg = resolve_data_config({}, model=model)
    tf = create_transform(**cfg)
    xs = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = im.size
        s = min(w, h)
        for crop in (im, im.crop((0, 0, s, s)), im.crop((w - s, h - s, w, h)), im.transpose(Image.FLIP_LEFT_RIGHT)):
            xs.append(tf(crop))
    return torch.stack(xs)


def part_random():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = skimage_inputs(model)
    feats = pixel_patches(x, (16, 16))
    vocab = Vocabulary(spherical_kmeans(feats.reshape(-1, feats.shape[-1]), 64, seed=0), "pixels",
                       {"patch_size": [16, 16], "img_size": [224, 224]})
    base = count_flops(model)
    ref_f, ref_l = run(model, None, 0, {}, x, features=True)
    print(f"\n## random weights: vit_small_patch16_224, {len(x)} inputs (skimage photos, crops, flips)\n")
    print("| method | FLOP target | r | FLOPs reached | cos(cls features) | cos(logits) | top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    methods, _ = methods_for(model, vocab)
    for target in TARGETS:
        for label, method, opts, cands in methods:
            r, frac = match_r(model, method, opts, cands, target, base)
            f, lg = run(model, method, r, opts, x, features=True)
            cf = F.cosine_similarity(f, ref_f).mean().item()
            cl = F.cosine_similarity(lg, ref_l).mean().item()
            agree = (lg.argmax(-1) == ref_l.argmax(-1)).float().mean().item()
            print(f"| {label} | {target} | {r} | {frac:.3f} | {cf:.4f} | {cl:.4f} | {agree:.2f} |", flush=True)


def part_digits():
    import numpy as np

    from vitmerge.demo import digits
    from vitmerge.calibration.vocabulary import build_vocabulary, find_images

    dm = digits.cached()  # the project's digits ViT (trained once, cached in the temp folder)
    model = dm.build()
    u8, labels = digits.load_arrays(int(dm.kwargs["img_size"]))
    _, test = digits.split_indices(len(u8), digits.TRAIN["test_fraction"], digits.TRAIN["seed"])
    xte, yte = digits.to_tensor(u8[test]), torch.from_numpy(np.asarray(labels[test]))
    # The vocabulary the CLI would build from the training images (pixel space, 32 words).
    vocab = build_vocabulary(model, find_images(dm.train_dir), words=32, space="pixels")
    base = count_flops(model)
    ref = run(model, None, 0, {}, xte)
    acc0 = (ref.argmax(-1) == yte).float().mean().item()
    n = int(model.patch_embed.num_patches)
    print(f"\n## digits ViT ({dm.model_name}, {n} patches, depth {len(model.blocks)}), {len(xte)} test images; "
          f"unmerged top-1 {acc0:.3f}\n")
    print("| method | FLOP target | r | FLOPs reached | top-1 | agreement with unmerged |")
    print("|---|---|---|---|---|---|")
    methods, _ = methods_for(model, vocab)
    for target in TARGETS:
        for label, method, opts, cands in methods:
            r, frac = match_r(model, method, opts, cands, target, base)
            out = run(model, method, r, opts, xte)
            acc = (out.argmax(-1) == yte).float().mean().item()
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"| {label} | {target} | {r} | {frac:.3f} | {acc:.3f} | {agree:.3f} |", flush=True)


def part_evo():
    """evo settings on the digits model next to tome (the second table of docs/methods/evo.md)."""
    import numpy as np

    from vitmerge.demo import digits

    dm = digits.cached()
    model = dm.build()
    u8, labels = digits.load_arrays(int(dm.kwargs["img_size"]))
    _, test = digits.split_indices(len(u8), digits.TRAIN["test_fraction"], digits.TRAIN["seed"])
    xte, yte = digits.to_tensor(u8[test]), torch.from_numpy(np.asarray(labels[test]))
    base = count_flops(model)
    ref = run(model, None, 0, {}, xte).argmax(-1)
    d = len(model.blocks)
    half = [0] * (d // 2)
    settings = [
        ("evo r=42", "evo", 42, {}),
        ("evo r=42, prop. attention off", "evo", 42, {"prop_attn": False}),
        ("evo r=42, tradeoff 0", "evo", 42, {"tradeoff": 0.0}),
        ("evo r=42, tradeoff 1", "evo", 42, {"tradeoff": 1.0}),
        ("evo first half full, r=42", "evo", half + [42] * (d - len(half)), {}),
        ("evo first half full, r=55", "evo", half + [55] * (d - len(half)), {}),
        ("tome r=12", "tome", 12, {}),
    ]
    print(f"\n## evo settings, digits ViT ({len(xte)} test images)\n")
    print("| setting | FLOPs reached | top-1 | agreement with unmerged |")
    print("|---|---|---|---|")
    for label, method, r, opts in settings:
        frac = flop_fraction(model, method, r, opts, base)
        out = run(model, method, r, opts, xte).argmax(-1)
        print(f"| {label} | {frac:.3f} | {(out == yte).float().mean().item():.3f} | "
              f"{(out == ref).float().mean().item():.3f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("random", "digits", "evo", "both"), default="both")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    if args.part in ("random", "both"):
        part_random()
    if args.part in ("digits", "both"):
        part_digits()
    if args.part in ("evo", "both"):
        part_evo()


if __name__ == "__main__":
    main()
