"""A ToMe patch in the style of the reference implementation, used only as a benchmark baseline.

It follows the reference's *graph shape* (full argsort, gathers with index tensors expanded to the
channel width, scatter_reduce to merge, separate size bookkeeping) so the benchmark can compare
vitmerge's exported graph with what a user gets by exporting the reference ToMe with
torch.onnx.export(dynamo=True). Written for this benchmark; the math is ToMe's.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _match(metric, r, protected):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if protected:
        scores[..., :protected, :] = -math.inf  # reference style: in-place mask of the class row
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if protected:
        unm_idx = unm_idx.sort(dim=1)[0]
    return unm_idx, src_idx, dst_idx


def _merge(x, unm_idx, src_idx, dst_idx, r):
    a, b = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = a.shape
    unm = a.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = a.gather(dim=-2, index=src_idx.expand(n, r, c))
    b = b.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
    return torch.cat([unm, b], dim=1)


class RefStyleBlock(nn.Module):
    def __init__(self, blk, r):
        super().__init__()
        self.blk, self.r = blk, r

    def forward(self, x, size):
        blk, attn = self.blk, self.blk.attn
        h = blk.norm1(x)
        B, N, _ = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + attn.proj(out)
        r = min(self.r, (N - 1) // 2)
        if r > 0:
            unm_idx, src_idx, dst_idx = _match(k.mean(1), r, protected=1)
            x = _merge(x * size, unm_idx, src_idx, dst_idx, r)
            size = _merge(size, unm_idx, src_idx, dst_idx, r)
            x = x / size
        return x + blk.mlp(blk.norm2(x)), size


class RefStyleViT(nn.Module):
    """Wraps a plain timm ViT (class token, no registers) with reference-style ToMe."""

    def __init__(self, vit, r):
        super().__init__()
        self.vit = vit
        self.blocks = nn.ModuleList(RefStyleBlock(b, r) for b in vit.blocks)

    @property
    def patch_embed(self):  # input size lookups (vitmerge.models.input_shape)
        return self.vit.patch_embed

    def forward(self, images):
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(images)))
        size = torch.ones_like(x[..., :1])
        for blk in self.blocks:
            x, size = blk(x, size)
        return v.forward_head(v.norm(x))
