"""The lean merge step: one ToMe / importance merge written by hand in ~20 portable ONNX ops.

Every node of an exported graph is a kernel launch (ONNX Runtime CPU pays ~9 us a node at batch 1;
on a GPU a launch each), and the exporter's own merge step is 40-50 nodes of Shape / Expand /
Reshape / index arithmetic around a ScatterND-add. The step itself needs much less:

* **scores in position space**: every token's row against the B-side columns, with the B side
  gathered by a constant index list that starts with ``n_keep`` dummy columns. The ArgMax over a
  row is then directly the output *slot* of the token's best B partner (slots of the B tokens follow
  the ``n_keep`` kept slots), and a constant additive mask removes what may not match (dummy
  columns; rows that are not unprotected A tokens). Transpose + MatMul, one Add, ReduceMax + ArgMax.
* **which tokens merge**: TopK with k = r over the rows' best scores (non-A rows are masked far below
  any cosine similarity); ties go to the lower position, ONNX TopK's documented rule, as in PyTorch.
* **the kept tokens in output order** (protected, unmerged A, B): one more TopK over an exact integer
  key (a float below 2^24: position class and position, minus a large constant for merged tokens,
  read off a OneHot + ReduceSum of the merged positions). With no protected token the unmerged A
  tokens keep ToMe's score order: the key is then the score itself.
* **the merge**: rows ``[x * size, size]`` of the kept tokens by one GatherND (batch_dims=1), the r
  merged rows by another, added to their slots by one MatMul with a OneHot ``[B, n_out, r]``
  (a one-hot MatMul adds each row exactly once: no scatter, no race, the same sums on every run and
  in every runtime), then Split and Div.

Nothing here is wider than int32 in value (positions and slots < N; keys < 2^24 and float), there is
no float64, no ScatterND / ScatterElements, and every TopK has k <= n_out (the caller checks it
against TensorRT's limit). Cost beyond the scores: O(N * r) for the one-hots and O(n_out * r * D) for
the merged rows -- nothing quadratic in N besides ToMe's own score matrix.

Reference semantics are those of :func:`vitmerge.merging.bipartite.bipartite_plan` and
:func:`vitmerge.merging.importance.importance_plan` followed by :meth:`MergePlan.merge`; the tests
compare the graphs with them (and with float64 PyTorch) on random and tie-heavy inputs.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from ..merging.topk import TOPK_LIMIT

F32 = np.float32
I64 = np.int64

# additive masks (scores are cosine similarities in [-1, 1])
_ROW_OFF = -8.0  # rows that may not merge away: their best score lands in [-9, -7]
_COL_OFF = -16.0  # dummy / forbidden columns: never a row's best


class LeanUnsupported(ValueError):
    """The lean form cannot express this step (a TopK would exceed TensorRT's limit)."""


def tome_limits(n_in: int, r: int, protected: int) -> Optional[str]:
    """Why the lean ToMe step cannot be written for these sizes (None: it can)."""
    n_out = n_in - r
    if n_out > TOPK_LIMIT or r > TOPK_LIMIT:
        return (f"{n_in} tokens -> {n_out}: the lean step sorts the {n_out} kept tokens with one TopK, "
                f"and TensorRT's TopK takes k <= {TOPK_LIMIT}")
    return None


def importance_limits(n_in: int, r: int, protected: int) -> Optional[str]:
    if n_in > TOPK_LIMIT:
        return (f"{n_in} tokens: the lean importance step ranks every token with one TopK, and TensorRT's "
                f"TopK takes k <= {TOPK_LIMIT}")
    return None


def _packed(e, x, size, extra=()):
    """``[x * size, size, *extra]`` [B, N, D + 1 + ...]; the first step (size None) appends a column of ones."""
    if size is None:
        body = e.op("Concat", [x, *extra], {"axis": -1}, dtype=F32) if extra else x
        # ones as the last column: Pad with value 1 (the size of an unmerged token)
        return e.op("Pad", [body, e.i64(0, 0, 0, 0, 0, 1), e.const(np.array(1.0, F32), "one")],
                    {"mode": "constant"}, dtype=F32), True
    xs = e.op("Mul", [x, size], dtype=F32)
    return e.op("Concat", [xs, size, *extra], {"axis": -1}, dtype=F32), False


def _merge_rows(e, packed, keep3, src3, dst, n_out: int):
    """rows of ``packed`` at keep3 [B, n_out, 1] plus the rows at src3 [B, r, 1] added into slots dst [B, r, 1]."""
    rows = e.op("GatherND", [packed, keep3], {"batch_dims": 1}, dtype=F32)  # [B, n_out, W]
    moved = e.op("GatherND", [packed, src3], {"batch_dims": 1}, dtype=F32)  # [B, r, W]
    onehot = e.op("OneHot", [dst, e.const(np.array(n_out, I64), "depth"), e.const(np.array([0, 1], F32), "onoff")],
                  {"axis": 1}, dtype=F32)  # [B, n_out, r]: 1 where merged token k joins slot s
    # each merged row is added once to its slot, exactly (1 x row + 0 x the others)
    return e.op("Add", [rows, e.op("MatMul", [onehot, moved], dtype=F32)], dtype=F32)


def _finish(e, sums, splits, x_idx, size_idx, outs):
    """Split the merged sums and divide: x' = sums_x / sums_w. ``outs`` = (x' target, size' target), each a graph
    tensor to write into (float32) or None for a new one."""
    targets = [None] * len(splits)
    if outs[1] is not None:
        targets[size_idx] = outs[1]
    vs = [t if t is not None else e.var("split") for t in targets]
    parts = e.op("Split", [sums, e.i64(*splits)], {"axis": -1}, outputs=vs)
    x_out = e.op("Div", [parts[0], parts[1]], outputs=[outs[0]] if outs[0] is not None else 1, dtype=F32)
    return x_out, parts[size_idx]


def tome_step(e, x, metric, size, n_in: int, r: int, protected: int, dim: int, outs=(None, None)):
    """Emit one ToMe step; returns (x' [B, n_out, D] float32, size' [B, n_out, 1] float32).

    x, metric, size: float32 graph tensors ([B, N, D], [B, N, C], [B, N, 1] or None for all ones).
    """
    why = tome_limits(n_in, r, protected)
    if why:
        raise LeanUnsupported(why)
    T, p = n_in, protected
    t1, t2 = (T + 1) // 2, T // 2
    pa, pb = (p + 1) // 2, p // 2
    n_out = T - r
    n_keep = p + (t1 - pa) - r  # protected + unmerged A: the slots before the B tokens
    pos = np.arange(T)
    b_pos = np.arange(2 * pb + 1, T, 2)  # unprotected B positions, in slot order after n_keep
    is_a = (pos % 2 == 0) & (pos >= 2 * pa)  # unprotected A: the only rows that may merge away
    is_b = (pos % 2 == 1) & (pos >= 2 * pb + 1)

    # scores: every row against [n_keep dummies | B tokens]; ArgMax of a row = its partner's slot
    unit = e.op("LpNormalization", [metric], {"axis": -1, "p": 2}, dtype=F32)
    cols = np.concatenate([np.zeros(n_keep, I64), b_pos]).astype(I64)
    bside = e.op("Gather", [unit, e.const(cols, "cols")], {"axis": 1}, dtype=F32)  # [B, n_out, C]
    # (Transpose + MatMul: ONNX Runtime fuses them into one kernel; its Einsum is 2x slower here)
    scores = e.op("MatMul", [unit, e.op("Transpose", [bside], {"perm": [0, 2, 1]}, dtype=F32)], dtype=F32)  # [B, N, n_out]
    mask = np.zeros((T, n_out), F32)
    mask[:, :n_keep] = _COL_OFF
    if p == 0:
        # no protected token: the unmerged A tokens keep their score order, so the keep key below is the
        # score itself; a B row's best lands at -20 - 4t + [-1, 1]: after every A token, by position
        mask[is_b, :] += (-20.0 - 4.0 * pos[is_b])[:, None]
    else:
        mask[~is_a, n_keep:] += _ROW_OFF
    scores = e.op("Add", [scores, e.const(mask, "mask")], dtype=F32)
    best = e.op("ReduceMax", [scores, e.i64(-1)], {"keepdims": 1}, dtype=F32)  # [B, N, 1]
    slot = e.op("ArgMax", [scores], {"axis": -1, "keepdims": 0}, dtype=I64)  # [B, N]: the best partner's slot (first max)

    # the r best-matching A tokens merge away (TopK: ties to the lower position)
    _, src3 = e.op("TopK", [best, e.i64(r)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)  # [B, r, 1]
    big = float(4 * T + 128)
    # (ReduceMin, not ReduceSum: the same value, each position is in src at most once; ONNX Runtime's ReduceSum
    # over a middle axis is 2.5x slower here)
    merged = e.op("ReduceMin", [
        e.op("OneHot", [src3, e.const(np.array(T, I64), "depth"), e.const(np.array([0.0, -big], F32), "onoff")],
             {"axis": 1}, dtype=F32),  # [B, N, r, 1]
        e.i64(2)], {"keepdims": 0}, dtype=F32)  # [B, N, 1]: -big at the merged positions, else 0
    if p == 0:
        key = e.op("Add", [best, merged], dtype=F32)
    else:
        # exact integer key: protected (3T - t) > unmerged A (2T - t) > B (T - t) > merged A (< 0)
        kc = np.where(pos < p, 3 * T - pos, np.where(is_a, 2 * T - pos, T - pos)).astype(F32)[:, None]
        key = e.op("Add", [merged, e.const(kc, "key")], dtype=F32)
    _, keep3 = e.op("TopK", [key, e.i64(n_out)], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)  # [B, n_out, 1]
    dst = e.op("GatherND", [slot, src3], {"batch_dims": 1}, dtype=I64)  # [B, r]: the slot each merged token joins

    packed, _ = _packed(e, x, size)  # [B, N, D + 1]
    sums = _merge_rows(e, packed, keep3, src3, dst, n_out)
    return _finish(e, sums, (dim, 1), 0, 1, outs)


def importance_step(e, x, metric, size, cls_attn, n_in: int, r: int, protected: int, dim: int, channels: int,
                    min_weight: float, outs=(None, None)):
    """Emit one importance step; returns (x', size'). cls_attn [B, N] float32 (class-token attention)."""
    why = importance_limits(n_in, r, protected)
    if why:
        raise LeanUnsupported(why)
    T, p = n_in, protected
    n_out = T - r
    # rank: protected first (+4 above any probability), then by importance (ties: lower position first)
    imp3 = e.op("Unsqueeze", [cls_attn, e.i64(-1)], dtype=F32)  # [B, N, 1]
    lift = np.where(np.arange(T) < p, 4.0, 0.0).astype(F32)[:, None]
    _, order = e.op("TopK", [e.op("Add", [imp3, e.const(lift, "lift")], dtype=F32), e.i64(T)],
                    {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)  # [B, N, 1]
    sel, src3 = e.op("Split", [order, e.i64(n_out, r)], {"axis": 1}, outputs=2)
    keep3, _ = e.op("TopK", [sel, e.i64(n_out)], {"axis": 1, "largest": 0, "sorted": 1}, outputs=2)  # positions, ascending

    unit = e.op("LpNormalization", [metric], {"axis": -1, "p": 2}, dtype=F32)
    w = e.op("Max", [imp3, e.const(np.array(min_weight, F32), "floor")], dtype=F32)  # importance weight
    if size is not None:
        w = e.op("Mul", [w, size], dtype=F32)
        packed = e.op("Concat", [e.op("Mul", [x, w], dtype=F32), w, size, unit], {"axis": -1}, dtype=F32)
    else:
        body = e.op("Concat", [e.op("Mul", [x, w], dtype=F32), w, unit], {"axis": -1}, dtype=F32)
        packed = e.op("Pad", [body, e.i64(0, 0, 0, 0, 0, 1), e.const(np.array(1.0, F32), "one")],
                      {"mode": "constant"}, dtype=F32)  # the size column (ones) goes last
    width = dim + 2 + channels
    unit_at = dim + 2 if size is not None else dim + 1  # where the unit metric sits in a packed row
    rows = e.op("GatherND", [packed, keep3], {"batch_dims": 1}, dtype=F32)  # [B, n_out, W]
    moved = e.op("GatherND", [packed, src3], {"batch_dims": 1}, dtype=F32)  # [B, r, W]
    sel_c = np.zeros(width, F32)
    sel_c[unit_at: unit_at + channels] = 1.0
    # cosine of each merged token with each kept one (only the metric channels of the packed rows count)
    sim = e.op("MatMul", [e.op("Mul", [moved, e.const(sel_c, "metric_channels")], dtype=F32),
                          e.op("Transpose", [rows], {"perm": [0, 2, 1]}, dtype=F32)], dtype=F32)  # [B, r, n_out]
    if p:
        colmask = np.zeros(n_out, F32)
        colmask[:p] = _COL_OFF  # never into a protected token
        sim = e.op("Add", [sim, e.const(colmask, "colmask")], dtype=F32)
    dst = e.op("ArgMax", [sim], {"axis": -1, "keepdims": 0}, dtype=I64)  # [B, r]: the slot (kept tokens are the slots)
    onehot = e.op("OneHot", [dst, e.const(np.array(n_out, I64), "depth"), e.const(np.array([0, 1], F32), "onoff")],
                  {"axis": 1}, dtype=F32)
    sums = e.op("Add", [rows, e.op("MatMul", [onehot, moved], dtype=F32)], dtype=F32)
    if size is not None:
        return _finish(e, sums, (dim, 1, 1, channels), 0, 2, outs)
    return _finish(e, sums, (dim, 1, channels, 1), 0, 3, outs)


__all__ = ["tome_step", "importance_step", "tome_limits", "importance_limits", "LeanUnsupported"]
