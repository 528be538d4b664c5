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

from .base import MergePlan, identity_plan
from .spec import LeanStep, MethodSpec, clamp
from .topk import topk


def max_r(n_tokens: int, protected: int) -> int:
    """The most tokens one bipartite step can remove: half the unprotected tokens."""
    return max((n_tokens - protected) // 2, 0)


def match_flops(n: int, protected: int, metric_dim: int, r: int = 0) -> int:
    """FLOPs of the matching step: the A x B score matrix."""
    return 2 * ((n + 1) // 2) * (n // 2) * metric_dim


def _static_indices(T: int, r: int, protected: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Static tables (they depend on T, r, protected only) for the reference output order:
    protected tokens first in their original order, then unmerged A tokens, then B tokens.

    Returns (b_keep [t2 - pb] original indices of the unprotected B tokens,
             slot_b [t2] output slot of every B token).
    """
    t1, t2 = (T + 1) // 2, T // 2
    pa, pb = (protected + 1) // 2, protected // 2
    i = torch.arange(t2)
    slot_b = torch.where(i < pb, 2 * i + 1, protected + (t1 - r - pa) + (i - pb))
    b_keep = 2 * torch.arange(pb, t2) + 1
    return b_keep.to(device), slot_b.to(device)


def bipartite_plan(metric: torch.Tensor, r: int, protected: int = 1) -> MergePlan:
    """Plan one ToMe merge step. metric [B, T, C] (ToMe: attention keys averaged over heads)."""
    B, T, _ = metric.shape
    r = clamp(r, max_r(T, protected))
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
        # argsort / sort as TopK with a static k: exports without runtime shape arithmetic (and in
        # chunks below TensorRT's TopK limit when t1 is longer: merging.topk).
        edge_idx = topk(node_max, t1, largest=True).indices
        unm_idx = edge_idx[..., r:]  # A tokens that stay
        src_idx = edge_idx[..., :r]  # A tokens that merge away
        dst_idx = node_idx.gather(dim=-1, index=src_idx)
        if protected:
            unm_idx = topk(unm_idx, t1 - r, largest=False, unique=True).values  # protected first

        b_keep, slot_b = _static_indices(T, r, protected, metric.device)
        # Protected tokens (A and B alike) are the first `protected` slots, in original order.
        keep = torch.cat([
            torch.arange(protected, device=metric.device).expand(B, protected),
            2 * unm_idx[:, pa:],
            b_keep.expand(B, t2 - pb),
        ], dim=-1)
    return MergePlan(keep=keep, src=2 * src_idx, dst=slot_b[dst_idx])


SPEC = MethodSpec(
    name="tome",
    plan=bipartite_plan,
    max_r=max_r,
    summary="ToMe bipartite soft matching, faithful to the reference (r <= half the unprotected tokens)",
    match_flops=match_flops,
    invariance="alternating",
    lean=LeanStep("bipartite"),
)
