"""ToMe written out by hand on transformers' ViT / DeiT / VideoMAE / AST modules, for checking vitmerge's
transformers adapter against.

Float64 Python loops, sample by sample and head by head; the embeddings, projections, norms, MLPs and
heads are the model's own modules, the attention, the merge and the pooling are written here from the
papers' description (ToMe: keys averaged over heads as the metric, proportional attention, size-weighted
averages; ToMe's video models: the final mean pool weighted by token size). No vitmerge code is used.
"""
from __future__ import annotations

import torch

from support.reference_tome import bipartite_groups, merge_rows


def _layers(model):
    base = model.base_model
    return list(base.layers) if hasattr(base, "layers") else list(base.encoder.layer)


def _qkvo(layer):
    """(q, k, v, out) functions of one layer, whichever layout transformers gave it."""
    a = layer.attention
    if hasattr(a, "q_proj"):
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.num_attention_heads
    sa = a.attention
    lin = torch.nn.functional.linear
    q_bias, v_bias = getattr(sa, "q_bias", None), getattr(sa, "v_bias", None)
    if q_bias is not None:
        return (lambda h: lin(h, sa.query.weight, q_bias), lambda h: lin(h, sa.key.weight),
                lambda h: lin(h, sa.value.weight, v_bias), a.output.dense, sa.num_attention_heads)
    return sa.query, sa.key, sa.value, a.output.dense, sa.num_attention_heads


def _mlp(layer, x):
    h = layer.layernorm_after(x)
    if hasattr(layer, "mlp"):
        return x + layer.mlp(h)
    return x + layer.output.dense(layer.intermediate(h))


def protected_tokens(model) -> int:
    t = model.config.model_type
    if t == "vit":
        return 1
    if t in ("deit", "audio-spectrogram-transformer"):
        return 2
    return 0 if model.config.use_mean_pooling else 1


@torch.no_grad()
def tome_forward(model, inputs, r_per_layer, prop_attn=True):
    """Logits of a transformers classifier with ToMe, written out by hand in float64 (model must be double)."""
    t = model.config.model_type
    base = model.base_model
    protected = protected_tokens(model)
    out = []
    for sample in inputs:
        x = base.embeddings(sample[None].double(), None) if t == "videomae" else base.embeddings(sample[None].double())
        x = x[0]  # [N, D]
        size = torch.ones(x.shape[0], dtype=torch.float64)
        for layer, r in zip(_layers(model), r_per_layer):
            x, k = attention_residual(layer, x, size, prop_attn)
            if r > 0:
                _, groups = bipartite_groups(k.mean(1), r, protected)
                x, size = merge_rows(x, size, groups)
            x = _mlp(layer, x)
        out.append(_head(model, x, size))
    return torch.stack(out)


def _head(model, x, size):
    t = model.config.model_type
    base = model.base_model
    if t == "videomae":
        if model.fc_norm is not None:  # ToMe's video models: mean pool weighted by how many tubelets a token holds
            pooled = (x * size[:, None]).sum(0) / size.sum()
            return model.classifier(model.fc_norm(pooled))
        return model.classifier(base.layernorm(x)[0])
    x = base.layernorm(x)
    if t == "vit":
        return model.classifier(x[0])
    if t == "deit":
        if hasattr(model, "distillation_classifier"):
            return (model.cls_classifier(x[0]) + model.distillation_classifier(x[1])) / 2
        return model.classifier(x[0])
    return model.classifier((x[0] + x[1]) / 2)  # AST: mean of the class and distillation tokens


def attention_residual(layer, x, size, prop_attn):
    """One layer's attention half on one image, head by head: (x + attention(layernorm(x)), keys [N, H, hd])."""
    q_fn, k_fn, v_fn, o_fn, heads = _qkvo(layer)
    h = layer.layernorm_before(x)
    N = h.shape[0]
    q, k, v = (f(h).reshape(N, heads, -1) for f in (q_fn, k_fn, v_fn))  # [N, H, hd]
    scale = q.shape[-1] ** -0.5
    ctx = []
    for hh in range(heads):
        logits = (q[:, hh] @ k[:, hh].T) * scale
        if prop_attn:
            logits = logits + size.log()[None, :]
        ctx.append(logits.softmax(-1) @ v[:, hh])
    return x + o_fn(torch.cat(ctx, dim=-1)), k
