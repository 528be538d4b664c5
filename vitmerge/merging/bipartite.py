"""ToMe bipartite soft matching (Bolya et al., ICLR 2023), faithful to the reference algorithm.

Tokens alternate into sets A (even positions) and B (odd positions). Each A token proposes its
most cosine-similar B token; the r A tokens with the best proposals merge into their B partner.
Protected tokens (class, distillation, registers: the first ``protected`` positions) never merge:
their A rows and B columns are masked to -inf, exactly as the reference does for the class and
distillation tokens. The output order is the reference's: protected tokens first (in their original
order), then the unmerged A tokens, then the B tokens.
"""
from __future__ import annotations

import math

import torch

from .base import MergePlan


def max_r(n_tokens: int, protected: int) -> int:
    """The most tokens one bipartite step can remove: half the unprotected tokens."""
    return max((n_tokens - protected) // 2, 0)


def clamp_r(n_tokens: int, r: int, protected: int) -> int:
    return max(min(int(r), max_r(n_tokens, protected)), 0)


def identity_plan(metric: torch.Tensor) -> MergePlan:
    B, T = metric.shape[:2]
    assign = torch.arange(T, device=metric.device).expand(B, T)
    return MergePlan(assign=assign, n_out=T)


def _slots(T: int, r: int, protected: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static output slots (they depend on T, r, protected only) for the reference output order.

    Returns (slot_unm [t1 - r], slot_dst [t2], perm [T]) where perm maps each original position
    to its index in cat(A, B).
    """
    t1, t2 = (T + 1) // 2, T // 2
    pa, pb = (protected + 1) // 2, protected // 2
    k = torch.arange(t1 - r)
    slot_unm = torch.where(k < pa, 2 * k, protected + (k - pa))
    i = torch.arange(t2)
    slot_dst = torch.where(i < pb, 2 * i + 1, protected + (t1 - r - pa) + (i - pb))
    j = torch.arange(T)
    perm = torch.where(j % 2 == 0, j // 2, t1 + j // 2)
    return slot_unm.to(device), slot_dst.to(device), perm.to(device)


def bipartite_plan(metric: torch.Tensor, r: int, protected: int = 1) -> MergePlan:
    """Plan one ToMe merge step. metric [B, T, C] (ToMe: attention keys averaged over heads)."""
    B, T, _ = metric.shape
    r = clamp_r(T, r, protected)
    if r <= 0:
        return identity_plan(metric)
    t1, t2 = (T + 1) // 2, T // 2
    pa, pb = (protected + 1) // 2, protected // 2

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # [B, t1, t2]
        if protected:
            # Protected tokens in A never merge away; nothing merges into protected tokens in B.
            rows = torch.arange(t1, device=metric.device)[:, None] < pa
            cols = torch.arange(t2, device=metric.device)[None, :] < pb
            scores = scores.masked_fill(rows | cols, -math.inf)

        node_max, node_idx = scores.max(dim=-1)  # best B partner of each A token
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx = edge_idx[..., r:]  # A tokens that stay
        src_idx = edge_idx[..., :r]  # A tokens that merge away
        dst_idx = node_idx.gather(dim=-1, index=src_idx)
        if protected:
            unm_idx = unm_idx.sort(dim=-1)[0]  # keep the protected tokens first

        slot_unm, slot_dst, perm = _slots(T, r, protected, metric.device)
        order = torch.cat([unm_idx, src_idx], dim=-1)  # a permutation of A
        values = torch.cat([slot_unm.expand(B, t1 - r), slot_dst[dst_idx]], dim=-1)
        assign_a = torch.empty_like(order).scatter(-1, order, values)
        assign = torch.cat([assign_a, slot_dst.expand(B, t2)], dim=-1)[:, perm]
    return MergePlan(assign=assign, n_out=T - r)
