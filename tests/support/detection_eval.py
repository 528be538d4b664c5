"""COCO-format folders for the detector tests (eval, tune) whose ground truth the test writes itself: digit
canvases written as PNGs and read back exactly as the reader sees them, a small random dense detector, and the
ground truth written from any detections (so a model scored against its own detections has mAP 1)."""
import json

import numpy as np
import torch


def png_images(folder, n=6, size=64, seed=3):
    """Digit canvases written as PNGs; returns them as read back ([0, 1] floats, 8-bit exact), in order."""
    from PIL import Image

    from vitmerge.data.detection import digit_canvases, write_coco

    write_coco(digit_canvases(n, size=size, split="test", seed=seed), folder)
    files = sorted((folder / "images").glob("*.png"))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
                        .permute(2, 0, 1) for f in files])


def resize(x, hw):
    """The 8-bit images resized bilinearly by PIL to (H, W), back in [0, 1]."""
    from PIL import Image

    out = []
    for img in x:
        pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        arr = np.asarray(pil.resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float32) / 255
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


def timm_norm(det):
    """The backbone's mean/std as timm resolves them (vit_tiny's config: 0.5 / 0.5, not ImageNet's)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=det.backbone)
    return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def write_truth(folder, preds, categories, size_px):
    """annotations.json whose boxes are ``preds`` (normalised cx, cy, w, h; labels = index into
    ``categories``, a list of (COCO id, name))."""
    coco = json.loads((folder / "annotations.json").read_text())
    anns = []
    for img, p in zip(coco["images"], preds):
        w, h = size_px
        for (cx, cy, bw, bh), c in zip(p["boxes"].tolist(), p["labels"].tolist()):
            anns.append({"id": len(anns), "image_id": img["id"], "category_id": categories[c][0], "iscrowd": 0,
                         "area": bw * w * bh * h, "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]})
    coco["annotations"] = anns
    coco["categories"] = [{"id": i, "name": n} for i, n in categories]
    (folder / "annotations.json").write_text(json.dumps(coco))


def dense(tmp_path, classes=10):
    from vitmerge.models.dense import DenseDetector

    import timm

    torch.manual_seed(7)
    det = DenseDetector(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0,
                                          depth=3), classes).eval()
    torch.save(det.state_dict(), tmp_path / "det.pth")
    return det
