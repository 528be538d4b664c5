"""Small detectors trained on the CPU on vitmerge.data.detection's digit canvases (used by the slow tests and
by the accuracy experiment: ``python tests/support/detection_training.py`` prints mAP per method and FLOP budget).

Dense detector: a timm ViT (64 px, patch 8: 64 patches + class token, dim 96, depth 4) + vitmerge's
per-cell head; the cell holding a box's centre is positive for its class (sigmoid focal loss over every
cell and class), and regresses the box (L1 + generalised IoU). YOLOS: transformers' own
YolosForObjectDetection of the same size with 10 [DET] tokens and its own Hungarian loss.
"""
from __future__ import annotations

import time

import torch


def dense_targets(boxes, labels, grid, classes):
    """Per-cell class targets [B, Q, C] and (cell index, box) pairs of the positives."""
    gh, gw = grid
    cls_t = torch.zeros(len(boxes), gh * gw, classes)
    pos_img, pos_cell, pos_box = [], [], []
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        for box, c in zip(bx, lb):
            col = min(int(box[0] * gw), gw - 1)
            row = min(int(box[1] * gh), gh - 1)
            q = row * gw + col
            cls_t[b, q, c] = 1.0
            pos_img.append(b)
            pos_cell.append(q)
            pos_box.append(box)
    return cls_t, torch.tensor(pos_img), torch.tensor(pos_cell), torch.stack(pos_box)


def make_dense(seed: int = 0):
    import timm

    from vitmerge.models.dense import DenseDetector

    torch.manual_seed(seed)
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=96,
                           depth=4, num_heads=3, num_classes=0)
    return DenseDetector(bb, 10, hidden=64)


def train_dense(data, steps: int = 1500, batch: int = 32, lr: float = 1e-3, seed: int = 0, log=print):
    from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

    det = make_dense(seed).train()
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        out = det(data.images[idx])
        cls_t, pi, pc, pb = dense_targets([data.boxes[i] for i in idx], [data.labels[i] for i in idx], det.grid, 10)
        n_pos = max(1, len(pi))
        l_cls = sigmoid_focal_loss(out.logits, cls_t, reduction="sum") / n_pos
        pred = out.boxes[pi, pc]
        l_box = (pred - pb).abs().sum(-1).mean() * 5 + generalized_box_iou_loss(
            box_convert(pred, "cxcywh", "xyxy"), box_convert(pb, "cxcywh", "xyxy"), reduction="mean") * 2
        loss = l_cls + l_box
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"dense step {step}: loss {loss.item():.3f} (cls {l_cls.item():.3f}, box {l_box.item():.3f}) "
                f"{time.time() - t0:.0f} s")
    return det.eval()


def make_yolos(seed: int = 0, backbone=None):
    """YOLOS of the dense detector's size; ``backbone``: a timm ViT of that size (e.g. a trained dense detector's)
    whose weights the encoder starts from, as YOLOS starts from a pretrained DeiT (the [DET] tokens, their
    position embeddings and the heads start fresh)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.YolosConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                         image_size=[64, 64], patch_size=8, num_detection_tokens=10, use_mid_position_embeddings=False,
                         num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         layer_norm_eps=1e-6)  # timm's ViT eps: the same encoder function as the backbone's
    m = tf.YolosForObjectDetection(cfg)
    if backbone is not None:
        sd, src = m.state_dict(), backbone.state_dict()
        n0 = src["pos_embed"].shape[1]  # class token + patches; the [DET] positions follow them
        sd["vit.embeddings.cls_token"] = src["cls_token"]
        sd["vit.embeddings.position_embeddings"][:, :n0] = src["pos_embed"]
        for a, b in (("patch_embeddings.projection", "patch_embed.proj"),):
            for t in ("weight", "bias"):
                sd[f"vit.embeddings.{a}.{t}"] = src[f"{b}.{t}"]
        for i in range(cfg.num_hidden_layers):
            L, B = f"vit.encoder.layer.{i}.", f"blocks.{i}."
            for t in ("weight", "bias"):
                q, k, v = src[B + f"attn.qkv.{t}"].chunk(3, dim=0)
                sd[L + f"attention.attention.query.{t}"], sd[L + f"attention.attention.key.{t}"] = q, k
                sd[L + f"attention.attention.value.{t}"] = v
                for a, b in (("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
                    sd[L + f"{a}.{t}"] = src[B + f"{b}.{t}"]
        for t in ("weight", "bias"):
            sd[f"vit.layernorm.{t}"] = src[f"norm.{t}"]
        m.load_state_dict(sd)
    return m


def train_yolos(data, steps: int = 3000, batch: int = 32, lr: float = 5e-4, seed: int = 0, log=print, backbone=None):
    m = make_yolos(seed, backbone).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        labels = [{"class_labels": data.labels[i], "boxes": data.boxes[i]} for i in idx]
        loss = m(data.images[idx], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"yolos step {step}: loss {loss.item():.3f} {time.time() - t0:.0f} s")
    return m.eval()


@torch.no_grad()
def evaluate(model, data, kind: str, batch: int = 100):
    from vitmerge.data.detection import decode_dense, decode_yolos, mean_average_precision
    from vitmerge.models.family import forward_outputs

    preds = []
    for i in range(0, len(data), batch):
        out = forward_outputs(model, data.images[i:i + batch])
        logits, boxes = out["logits"], out["boxes"]
        preds += decode_dense(logits, boxes) if kind == "dense" else decode_yolos(logits, boxes)
    return mean_average_precision(preds, data.targets())


def accuracy_table(dense_steps: int = 1500, yolos_steps: int = 3000, fractions=(0.75, 0.5),
                   methods=("tome", "hash", "importance"), log=print):
    import copy

    import vitmerge
    from vitmerge.data.detection import digit_canvases
    from vitmerge.models.budget import resolve_schedule
    from vitmerge.models.flops import flop_ratio

    train = digit_canvases(4000, split="train", seed=0)
    test = digit_canvases(500, split="test", seed=1)
    rows = []
    for kind, trainer, steps in (("dense", train_dense, dense_steps), ("yolos", train_yolos, yolos_steps)):
        if not steps:
            continue
        model = trainer(train, steps=steps, log=log)
        m = evaluate(model, test, kind)
        rows.append((kind, "none", 1.0, m))
        log(f"{kind} unmerged: {m}")
        for method in methods:
            for f in fractions:
                merged = copy.deepcopy(model)
                rs = resolve_schedule(merged, method, 0, budget=f)
                vitmerge.apply(merged, method, rs)
                base, flops, _ = flop_ratio(merged)
                m = evaluate(merged, test, kind)
                rows.append((kind, method, flops / base, m))
                log(f"{kind} {method} budget {f}: r {rs}, FLOPs {flops / base:.3f} of unmerged: {m}")
    return rows


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)  # a shared CPU: one thread, no spinning against other processes
    dense_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
    yolos_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    rows = accuracy_table(dense_steps, yolos_steps)
    print("| detector | method | FLOPs vs unmerged | mAP@0.5 | mAP@[.5:.95] |")
    print("|---|---|---|---|---|")
    for kind, method, frac, m in rows:
        print(f"| {kind} | {method} | {frac:.3f} | {m['map_50']:.3f} | {m['map']:.3f} |")
