"""Test helper independent of vitmerge's loaders: the digits PNGs read with PIL, scaled by hand."""
import numpy as np
from PIL import Image


def load_digit_pngs(test_dir):
    """ImageFolder of digit PNGs -> (x float32 [N, 3, H, W] in [-1, 1], y int [N]) as numpy arrays."""
    xs, ys = [], []
    for cls_dir in sorted(test_dir.iterdir()):
        for f in sorted(cls_dir.glob("*.png")):
            a = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0
            xs.append(((a - 0.5) / 0.5).transpose(2, 0, 1))
            ys.append(int(cls_dir.name))
    return np.ascontiguousarray(np.stack(xs)), np.array(ys)
