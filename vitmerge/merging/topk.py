"""TopK that every runtime can run, at any length: exact sorts from TopKs no larger than TensorRT's limit.

TensorRT's TopK takes ``K < 3840`` (onnx-tensorrt ``docs/operators.md``, 10.x: "`K` input must be
less than 3840"; ``ITopKLayer::setK``: "only values up to 3840 are supported" -- the stricter
reading, ``K <= 3839``, satisfies both). Token counts of long sequences (video, audio, high
resolution: 1,200 - 16,000 tokens) sort more keys than that in one go. :func:`topk` is a drop-in
for ``key.topk(k, dim=-1, sorted=True)`` on ``[B, n]`` keys:

* ``n <= TOPK_LIMIT``: the one TopK, exactly as before (the exported graph does not change);
* longer rows: the row is cut into chunks of ``CHUNK`` keys, each chunk sorted on its own (one
  TopK with ``k = CHUNK`` over ``[B, C, CHUNK]``), and every key's place in the whole order is the
  number of keys that come before it, counted in every sorted chunk by a binary search
  (``log2(CHUNK) + 1`` GatherElements, all chunks at once). A scatter of the indices at those places
  gives the full order; the first ``k`` are the answer.

The order is a strict total order, so the result is exact and the same in every runtime:

* ``unique=True`` (the caller's keys are distinct in every row, e.g. integer keys that carry the
  token index): order by key;
* ``unique=False`` (keys may tie, e.g. float attention): order by key, ties to the lower index --
  ONNX TopK's documented tie rule. The chunks are then sorted by counting (pairwise comparisons
  within a chunk of ``CHUNK_TIES`` keys), because no runtime promises TopK's order of equal keys.

Cost for ``n`` keys in ``C = ceil(n / CHUNK)`` chunks: one TopK per chunk plus ``n * C * 12``
gathered comparisons (``n * CHUNK_TIES`` more comparisons for keys with ties). Static shapes
throughout: every size depends on ``n`` and ``k`` only. Eager PyTorch (no graph being traced) sorts
long rows with one stable ``torch.sort`` instead: the same order, at a fraction of the cost.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

#: Largest K given to one TopK: TensorRT 10 takes K < 3840 (see the module docstring).
TOPK_LIMIT = 3839
#: Chunk length of the long sort (a power of two, at most TOPK_LIMIT): one binary search step per bit.
CHUNK = 2048
#: Chunk length when keys may tie: chunks are sorted by pairwise counting, ``CHUNK_TIES ** 2`` per chunk.
CHUNK_TIES = 512


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def _sentinel(key: torch.Tensor, largest: bool):
    """A value that sorts after every real key (padding of the last chunk)."""
    if key.dtype.is_floating_point:
        return -math.inf if largest else math.inf
    info = torch.iinfo(key.dtype)
    return info.min if largest else info.max


def sort_positions(key: torch.Tensor, largest: bool = True, unique: bool = False,
                   chunk: int | None = None) -> torch.Tensor:
    """key [B, n] -> pos [B, n] int64: the place of every key in the sorted row (0 = first).

    Sorted means by key (descending if ``largest``), ties to the lower index. Chunks of ``chunk``
    keys (default :data:`CHUNK`, or :data:`CHUNK_TIES` when ``unique`` is False) are sorted by TopK
    (distinct keys) or by counting (keys may tie), then every key is placed by a binary search in
    every sorted chunk; see the module docstring. The last chunk is padded with -inf / +inf (floats)
    or the dtype's min / max (integers), so distinct integer keys must not take those two values.
    """
    n = key.shape[-1]
    L = int(chunk or (CHUNK if unique else CHUNK_TIES))
    if L < 1 or L & (L - 1) or L > TOPK_LIMIT:
        raise ValueError(f"chunk must be a power of two <= {TOPK_LIMIT}, got {L}")
    C = max(-(-n // L), 1)
    dev = key.device
    pad = torch.full_like(key[..., :1], _sentinel(key, largest)).expand(-1, C * L - n)
    padded = torch.cat([key, pad], dim=-1).reshape(-1, C, L)  # [B, C, L]
    slot = torch.arange(C * L, device=dev).reshape(1, C, L)  # index of every padded key (pads: >= n)

    if unique:
        # Distinct keys: TopK sorts each chunk; only values are compared below.
        S = padded.topk(L, dim=-1, largest=largest, sorted=True).values  # [B, C, L]
        I = None
    else:
        # Rank inside the chunk by counting the keys that come first (key order, then lower index):
        # a strict order whatever the runtime's TopK does with equal keys.
        a, b = padded[..., :, None], padded[..., None, :]  # key i, key j
        first = (b > a) if largest else (b < a)
        first = first | ((b == a) & (slot[..., None, :] < slot[..., :, None]))
        place = first.sum(-1)  # [B, C, L]: place of key i inside its chunk
        S = torch.empty_like(padded).scatter(-1, place, padded)
        I = torch.empty_like(place).scatter(-1, place, slot.expand_as(place))

    # Count, for every key, the keys before it in each sorted chunk: a binary search over L = 2^m
    # slots, all keys and chunks at once. Everything is laid out flat as [B, n * C] with the key
    # repeated per chunk, so every step is same-shape elementwise work (ONNX Runtime is several times
    # slower on broadcasting Where / compare kernels): gather the probe, compare, step forward.
    Sf = S.reshape(-1, C * L)
    If = I.reshape(-1, C * L) if I is not None else None
    x = key[..., None].expand(-1, n, C).reshape(-1, n * C)  # [B, n * C]
    me = torch.arange(n, device=dev).repeat_interleave(C)  # [n * C]: the key's own index
    base = (torch.arange(C, device=dev) * L).repeat(n)  # [n * C]: where each chunk starts in Sf
    pos = torch.zeros_like(x, dtype=torch.long) + base  # absolute search position in Sf

    def before(p: torch.Tensor) -> torch.Tensor:  # the probed sorted key comes before the key
        v = Sf.gather(1, p)
        out = (v > x) if largest else (v < x)
        if If is not None:
            out = out | ((v == x) & (If.gather(1, p) < me))
        return out.to(torch.long)

    s = L // 2
    while s >= 1:
        step = before(pos + (s - 1))
        pos = pos + (step * s if s > 1 else step)
        s //= 2
    pos = pos + before(pos)  # now pos - base in [0, L]: keys of that chunk that come before the key
    return (pos - base).reshape(-1, n, C).sum(-1)


def tracing() -> bool:
    """True while torch.export / torch.compile / the ONNX exporter trace the code (a graph is being
    built), False in eager PyTorch."""
    return bool(torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export())


def topk(key: torch.Tensor, k: int, largest: bool = True, unique: bool = False, chunked: bool | None = None) -> TopK:
    """``key.topk(k, dim=-1, largest=largest, sorted=True)`` for key [B, n], with every TopK in the
    graph at most :data:`TOPK_LIMIT` long (see the module docstring).

    ``unique``: the caller promises distinct keys in every row (cheaper chunk sort). Rows up to
    ``TOPK_LIMIT`` keys are one TopK in a traced graph. Longer rows: the chunked sort while a graph is
    traced. In eager PyTorch keys that may tie are sorted with one stable ``torch.sort`` (PyTorch's
    own topk orders equal keys arbitrarily), which gives the exported graph's order: by key, ties to the
    lower index. ``chunked`` forces the chunked or the eager path (tests).
    """
    n = key.shape[-1]
    k = int(k)
    traced = tracing() if chunked is None else chunked
    if n <= TOPK_LIMIT and (traced or unique):
        # one TopK in the graph; ONNX TopK's documented tie rule (lower index first) holds in every runtime
        # that follows the spec. Eager PyTorch with distinct keys: its topk gives the same order.
        return TopK(*key.topk(k, dim=-1, largest=largest, sorted=True))
    if not traced:
        # eager PyTorch: its topk does not order equal keys by index, so a stable sort gives the exported
        # graph's order (by key, ties to the lower index) here too
        values, indices = torch.sort(key, dim=-1, descending=largest, stable=True)
        return TopK(values[..., :k], indices[..., :k])
    pos = sort_positions(key, largest=largest, unique=unique)
    order = torch.empty_like(pos).scatter(-1, pos, torch.arange(n, device=key.device).expand_as(pos))
    idx = order[..., :k]
    return TopK(key.gather(-1, idx), idx)


__all__ = ["TOPK_LIMIT", "CHUNK", "CHUNK_TIES", "TopK", "topk", "sort_positions", "tracing"]
