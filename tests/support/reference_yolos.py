"""ToMe written out by hand on transformers' YOLOS (YolosForObjectDetection), for checking vitmerge's
transformers adapter against.

Float64 loops, image by image and head by head. What it states: the class token and every [DET] token
never merge (transformers appends the [DET] tokens at the end; here they simply stand right after the class
token, where ToMe's protected prefix is); the patch tokens merge by ToMe's bipartite matching in their
order; the mid position embeddings (added after every layer but the last) reach a merged token as the
mean of its members' embeddings, found from the list of original positions each token holds. The
embeddings, projections, norms, MLPs and heads are the model's own modules. No vitmerge code is used.
"""
from __future__ import annotations

import torch

from support.reference_tome import bipartite_groups, merge_rows
from support.reference_tome_hf import _layers, _mlp, attention_residual


def yolos_config(mid: bool, **kw):
    """A tiny YOLOS config (32 x 48 images in 8 x 8 patches = 24 patches, 5 [DET] tokens, depth 3)."""
    import transformers as tf

    base = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                image_size=[32, 48], patch_size=8, num_detection_tokens=5, use_mid_position_embeddings=mid,
                num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.YolosConfig(**{**base, **kw})


def make_yolos(mid: bool = False, seed: int = 0, attn: str = "sdpa", **kw):
    import transformers as tf

    torch.manual_seed(seed)
    m = tf.YolosForObjectDetection(yolos_config(mid, **kw))
    m.set_attn_implementation(attn)
    with torch.no_grad():  # transformers starts tokens and positions at 0 and its heads near 0: make them matter
        for name, p in m.named_parameters():
            if "position" in name or "token" in name:
                p.normal_(0, 0.5)
            elif name.startswith(("class_labels_classifier", "bbox_predictor")) and name.endswith("weight"):
                p.normal_(0, 0.4)
    return m.eval()


@torch.no_grad()
def yolos_tome_forward(model, images, r_per_layer, prop_attn=True):
    """(logits [B, d, classes + 1], boxes [B, d, 4]) of YOLOS with ToMe, by hand in float64 (model double)."""
    base = model.base_model
    cfg = model.config
    d = int(cfg.num_detection_tokens)
    layers = _layers(model)
    out_logits, out_boxes = [], []
    for sample in images:
        x = base.embeddings(sample[None].double())[0]  # [N0, D]: cls, patches, det (transformers' order)
        n0 = x.shape[0]
        order = [0] + list(range(n0 - d, n0)) + list(range(1, n0 - d))
        x = x[order]
        members = [[o] for o in order]  # original positions each token holds
        size = torch.ones(n0, dtype=torch.float64)
        mid = base.encoder.interpolation(tuple(sample.shape[-2:])) if cfg.use_mid_position_embeddings else None
        for i, (layer, r) in enumerate(zip(layers, r_per_layer)):
            x, k = attention_residual(layer, x, size, prop_attn)
            if r > 0:
                _, groups = bipartite_groups(k.mean(1), r, 1 + d)
                x, size = merge_rows(x, size, groups)
                members = [[p for j in g for p in members[j]] for g in groups]
            x = _mlp(layer, x)
            if mid is not None and i < len(layers) - 1:
                x = x + torch.stack([mid[i, 0, m].double().mean(0) for m in members])
        x = base.layernorm(x)
        det = torch.stack([x[members.index([n0 - d + j])] for j in range(d)])  # each [DET] token, alone
        out_logits.append(model.class_labels_classifier(det))
        out_boxes.append(model.bbox_predictor(det).sigmoid())
    return torch.stack(out_logits), torch.stack(out_boxes)
