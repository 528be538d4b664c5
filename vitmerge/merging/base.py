"""The one merge contract shared by every method.

A method decides *which* token goes *where*; this module does the rest. A plan says, per image:

* ``keep [B, n_out]``: the input tokens that become the output slots, in output order;
* ``src [B, r]``: the input tokens that merge away, and ``dst [B, r]``: the slot each one joins.

Every input token is either kept or merged away, so ``n_out + r = N``; ``n_out`` is STATIC (it
depends only on the schedule, never on the data). Merging is a size-weighted average per slot,
computed with sums (gather kept rows of ``[x*w, w]``, scatter-add the merged-away rows, divide):
ONNX ScatterElements has no "mean" reduction, and sum-then-divide is what the reference ToMe does.
Only the ``r`` merged-away rows are scattered; everything else is a plain row gather, which every
runtime executes well.

Shapes: x [B, N, D], size [B, N, 1] (how many patches a token stands for), optional weight
[B, N, 1] (extra averaging weight, e.g. importance).

Unmerging goes the other way: ``plan.unmerge(x_merged)`` gives every input token the value of the slot
it went to (``[B, n_out, D] -> [B, N, D]``, one row Gather by :attr:`MergePlan.assign`; ToMe's
``merge_source`` map, as an index instead of an [n_out, N] 0/1 matrix). Over several merge steps the map
from original positions to final tokens is the composition of the steps' assignments
(:func:`compose`); dense heads (detection, segmentation) take every position back with
:func:`unmerge` and that map. Both are static-shape gathers: ONNX Gather / GatherElements.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


def _flat(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Row indices [B, K] into a [B, n, ...] tensor -> indices into its [B * n, ...] flattening."""
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * n).reshape(-1)


def batch_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, N, D] at idx [B, K] -> [B, K, D] (one flat row Gather, no expanded index)."""
    B, N, D = x.shape
    return x.reshape(B * N, D)[_flat(idx, N)].reshape(B, idx.shape[1], D)


def batch_scatter_add(out: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, scatter_free: bool = False) -> torch.Tensor:
    """out [B, M, D] with rows [B, K, D] added at row idx [B, K] (duplicates accumulate).

    ``scatter_free``: the same sum as one batched MatMul by a 0/1 assignment matrix [B, M, K] (the native
    graph form: no ScatterND-add, which TensorRT's parser refuses)."""
    B, M, D = out.shape
    if scatter_free:
        slots = torch.arange(M, device=out.device)
        onehot = (idx[:, None, :] == slots[None, :, None]).to(rows.dtype)  # [B, M, K]
        return out + onehot @ rows
    return out.reshape(B * M, D).index_add(0, _flat(idx, M), rows.reshape(-1, D)).reshape(B, M, D)


@dataclass
class MergePlan:
    """Which tokens stay (as output slots) and which merge into which slot."""

    keep: torch.Tensor  # [B, n_out] int64 input-token indices, in output order
    src: torch.Tensor  # [B, r] int64 input-token indices that merge away
    dst: torch.Tensor  # [B, r] int64 output slots in [0, n_out)
    weight: Optional[torch.Tensor] = None  # [B, N, 1] extra averaging weight (None: size only)
    identity: bool = False  # keep == arange(N), nothing merges: merge() returns its inputs as they are

    @classmethod
    def from_assign(cls, assign: torch.Tensor, n_out: int, weight: Optional[torch.Tensor] = None) -> "MergePlan":
        """The plan whose :attr:`assign` is ``assign`` [B, N] (every slot in [0, n_out) taken by at least one
        token): each slot keeps its lowest-index token and the others merge into it. It merges as every plan with
        that assignment does (a slot's average does not depend on which member is the kept one): the verifier
        runs a model with a file's own decisions through it. ``weight``: the averaging weight, as the method's."""
        assign = assign.to(dtype=torch.long)
        B, N = assign.shape
        if not 0 < n_out <= N:
            raise ValueError(f"n_out must be in [1, {N}], got {n_out}")
        if int(assign.min()) < 0 or int(assign.max()) >= n_out:
            raise ValueError(f"an assignment to {n_out} slots has slots from {int(assign.min())} to {int(assign.max())}")
        idx = torch.arange(N, device=assign.device).expand(B, N)
        keep = torch.full((B, n_out), N, dtype=torch.long, device=assign.device).scatter_reduce(
            1, assign, idx, reduce="amin")
        if bool((keep == N).any()):
            raise ValueError("an assignment that leaves a slot empty is no merge plan")
        kept = torch.zeros(B, N, dtype=torch.bool, device=assign.device).scatter(1, keep, True)
        src = idx[~kept].reshape(B, N - n_out)  # N - n_out per row: row-major order keeps each image's own
        return cls(keep=keep, src=src, dst=assign[~kept].reshape(B, N - n_out), weight=weight)

    @property
    def n_out(self) -> int:
        return self.keep.shape[1]

    @property
    def r(self) -> int:
        return self.src.shape[1]

    @property
    def n_in(self) -> int:
        return self.keep.shape[1] + self.src.shape[1]

    @property
    def assign(self) -> torch.Tensor:
        """[B, N] output slot of every input token (the plan as one vector)."""
        B = self.keep.shape[0]
        slots = torch.arange(self.n_out, device=self.keep.device).expand(B, -1)
        a = torch.empty(B, self.n_in, dtype=torch.long, device=self.keep.device)
        return a.scatter(1, self.keep, slots).scatter(1, self.src, self.dst)

    def merge(
        self, x: torch.Tensor, size: Optional[torch.Tensor] = None, scatter_free: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of the tokens that share a slot.

        Returns ``(x_merged [B, n_out, D], size_merged [B, n_out, 1])``; ``size`` defaults to ones.

        ``scatter_free``: add the r merged rows with one batched MatMul by a 0/1 assignment matrix
        [B, n_out, r] instead of an index-add (which exports as ScatterND with reduction=add, an op
        TensorRT's ONNX parser does not take). Same sums (each is 1 x row + 0 x others, exact), at a
        cost of r x n_out x D multiply-adds and an [r, n_out] matrix per image.
        """
        B, N, D = x.shape
        if size is None:
            size = x.new_ones(B, N, 1)
        if self.identity:
            return x, size
        w = size if self.weight is None else size * self.weight
        # Values and weights travel together: one gather and one scatter move [x * w, w(, size)].
        packed = torch.cat([x * w, w] if self.weight is None else [x * w, w, size], dim=-1)
        out = batch_gather(packed, self.keep)
        if self.r:
            out = batch_scatter_add(out, self.dst, batch_gather(packed, self.src), scatter_free=scatter_free)
        x_out = out[..., :D] / out[..., D : D + 1]
        size_out = out[..., D : D + 1] if self.weight is None else out[..., D + 1 :]
        return x_out, size_out

    def unmerge(self, x_merged: torch.Tensor) -> torch.Tensor:
        """The inverse map of :meth:`merge`: [B, n_out, D] -> [B, N, D], every input token taking the value
        of the slot it went to (a kept token its own slot, a merged-away one its ``dst`` slot)."""
        if x_merged.shape[1] != self.n_out:
            raise ValueError(f"unmerge takes the {self.n_out} merged tokens of this plan, got {x_merged.shape[1]}")
        if self.identity:
            return x_merged
        return batch_gather(x_merged, self.assign)

    def merge_source(self, source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Track which original patches each token holds: source [B, n_out, N0] (0/1)."""
        B, N = self.keep.shape[0], self.n_in
        if source is None:
            source = torch.eye(N, device=self.keep.device).expand(B, N, N)
        out = batch_gather(source, self.keep)
        if self.r:
            out = batch_scatter_add(out, self.dst, batch_gather(source, self.src))
        return out.clamp(max=1)


def compose(assign: Optional[torch.Tensor], step: torch.Tensor) -> torch.Tensor:
    """The map from original positions through one more merge step: ``assign [B, N0]`` (slot of every
    original position after the steps so far; None = no step yet) followed by ``step [B, N]`` (a
    plan's :attr:`MergePlan.assign`, N = the tokens that step saw) -> ``[B, N0]``."""
    return step if assign is None else step.gather(1, assign)


def unmerge(x: torch.Tensor, assign: Optional[torch.Tensor]) -> torch.Tensor:
    """Every original position's token: ``x [B, n, D]`` gathered by ``assign [B, N0]`` (from
    :func:`compose`) -> ``[B, N0, D]``; ``assign`` None (nothing merged) returns ``x``."""
    if assign is None:
        return x
    return batch_gather(x, assign)


def identity_plan(metric: torch.Tensor) -> MergePlan:
    B, N = metric.shape[:2]
    keep = torch.arange(N, device=metric.device).expand(B, N)
    empty = keep[:, :0]
    return MergePlan(keep=keep, src=empty, dst=empty, identity=True)
