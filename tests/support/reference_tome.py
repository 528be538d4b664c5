"""A deliberately simple ToMe written from the paper's description, for checking vitmerge against.

Plain Python loops over float64 numbers; no batching, no clever indexing, no code shared with
vitmerge. Slow, and only meant for small inputs.
"""
from __future__ import annotations

import math

import torch


def bipartite_groups(metric, r: int, protected: int):
    """One image. metric: [N, C] float64. Returns (order, groups): the output tokens in order, each
    a list of input indices (the first is the token that stays, the rest merged into it)."""
    N = metric.shape[0]
    unit = [metric[i] / metric[i].norm() for i in range(N)]
    A = list(range(0, N, 2))
    B = list(range(1, N, 2))
    r = max(0, min(r, (N - protected) // 2))
    best = {}  # a -> (score, b)
    for a in A:
        if a < protected:
            best[a] = (-math.inf, None)
            continue
        top = (-math.inf, None)
        for b in B:
            if b < protected:
                continue
            s = float(unit[a] @ unit[b])
            if s > top[0]:
                top = (s, b)
        best[a] = top
    ranked = sorted(A, key=lambda a: -best[a][0])  # strongest proposals first
    merged_away = ranked[:r]
    staying_a = ranked[r:]
    if protected:
        staying_a = sorted(staying_a)  # protected tokens first, the rest in original order
    groups = {i: [i] for i in staying_a + B}
    for a in merged_away:
        groups[best[a][1]].append(a)
    prot = list(range(protected))
    order = prot + [a for a in staying_a if a >= protected] + [b for b in B if b >= protected]
    return order, [groups[i] for i in order]


def merge_rows(x, size, groups):
    """Size-weighted average of each group (float64): returns (x' [n_out, D], size' [n_out])."""
    xs, ss = [], []
    for g in groups:
        tot = sum(float(size[i]) for i in g)
        xs.append(sum(x[i] * float(size[i]) for i in g) / tot)
        ss.append(tot)
    return torch.stack(xs), torch.tensor(ss, dtype=torch.float64)


@torch.no_grad()
def tome_forward(model, images, r_per_block, prop_attn=True):
    """timm ViT/DeiT forward with ToMe written out by hand, image by image, in float64."""
    m = model
    out = []
    for img in images:
        x = m.patch_embed(img[None].double())
        x = m._pos_embed(x)
        x = m.norm_pre(x)[0]  # [N, D]
        size = torch.ones(x.shape[0], dtype=torch.float64)
        protected = m.num_prefix_tokens
        for blk, r in zip(m.blocks, r_per_block):
            a = blk.attn
            h = blk.norm1(x)
            N = h.shape[0]
            qkv = a.qkv(h).reshape(N, 3, a.num_heads, a.head_dim)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, hd]
            heads = []
            for hh in range(a.num_heads):
                logits = (q[:, hh] @ k[:, hh].T) * a.scale
                if prop_attn:
                    logits = logits + size.log()[None, :]
                heads.append(logits.softmax(-1) @ v[:, hh])
            x = x + a.proj(torch.cat(heads, dim=-1))
            if r > 0:
                _, groups = bipartite_groups(k.mean(1), r, protected)
                x, size = merge_rows(x, size, groups)
            x = x + blk.mlp(blk.norm2(x))
        x = m.norm(x)[None]
        out.append(m.forward_head(x)[0])
    return torch.stack(out)
