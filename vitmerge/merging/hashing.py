"""``hash``: ToMe's match step with locality-sensitive hashing instead of an all-pairs score matrix.

ToMe scores every (A, B) token pair: an (N/2 x N/2) matrix, O(N^2 C). Here each unprotected token
gets ``rounds`` SimHash codes (the signs of ``bits`` random projections of its normalised metric),
tokens are ordered by code, and only tokens that are *neighbours in one of those orders* are scored:
O(N C) per round. Similar tokens share long code prefixes, so they end up next to each other.

Step by step, for the ``U = N - protected`` unprotected tokens of one image:

1. ``codes = sign(x @ P)`` with ``P [C, rounds * bits]`` drawn from a fixed-seed CPU generator
   (:func:`projection`), so PyTorch and the exported graph (where ``P`` is an initializer) use the
   very same numbers. (Signs do not change with a token's norm: no normalisation needed here.)
2. Each round's ``bits`` are read as a reflected Gray code and ranked, so that codes next to each
   other in the order differ in one bit; ties are broken by token index (a strict order: the
   result does not depend on how a runtime sorts equal keys).
3. Round 0's order is the *backbone*. A token may merge only into a token that comes later in the
   backbone ("forward" partners): its backbone successor, and its predecessor / successor in every
   other round if those lie later in the backbone. Each token keeps its best forward partner by
   cosine similarity. Scoring costs one row gather and ``U - 1`` dot products per round.
4. The ``r`` tokens with the best partner scores merge away (ranked by a unique integer key, so
   equal scores go to the lower index in PyTorch and ONNX Runtime alike).
5. Every merge edge points forward in the backbone, so the edges form a forest; a token merged into
   a token that itself merged away follows the chain to the end (pointer jumping,
   ``ceil(log2 U)`` gathers). Each tree becomes one output token (its root, the last member in the
   backbone, never a source), so the output has exactly ``U - r`` unprotected tokens for any
   ``0 <= r <= U - 1``: more than half the tokens can go in one step, many sources into one
   destination. The plan itself has no chains: every source points straight at a kept slot.

Output order: protected tokens first (original order), then the kept tokens in original order.
Shapes stay static: sorts are TopK with a static k (:func:`.topk.topk`: chunks of at most
TensorRT's TopK limit for long sequences), chain resolution is a fixed number of gathers, the kept
order is a count; the token count depends only on ``r``. Every sort key is an exact integer inside
int32 by construction (:func:`check_key_range`, :func:`score_scale`; no float64 tensor in the graph):
runtimes that compute INT64 as INT32 (TensorRT) get the same keys. Design and cost: ``docs/methods/hash.md``.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from ..errors import ScheduleError
from .base import MergePlan, identity_plan
from .spec import MethodSpec, clamp
from .topk import topk, tracing

DEFAULT_BITS = 16
DEFAULT_ROUNDS = 2
DEFAULT_SEED = 0
MAX_BITS = 24  # the Gray-code rank (< 2^bits) is an exact float32 integer; with the token index it must fit int32
INT32_MAX = 2 ** 31 - 1  # every integer of the plan stays at or below this (TensorRT runs INT64 as INT32)
_PROJECTIONS: Dict[tuple, torch.Tensor] = {}


def check_options(bits: int = DEFAULT_BITS, rounds: int = DEFAULT_ROUNDS, seed: int = DEFAULT_SEED) -> None:
    """Raise :class:`ScheduleError` for options the hash method cannot use."""
    for name, v in (("bits", bits), ("rounds", rounds), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ScheduleError(f"hash option {name} must be an integer, got {v!r}")
    if not 1 <= bits <= MAX_BITS:
        raise ScheduleError(
            f"hash option bits={bits} is out of range: use 1 <= bits <= {MAX_BITS} (default {DEFAULT_BITS}); "
            "bits is the number of random-projection sign bits per hash round"
        )
    if rounds < 1:
        raise ScheduleError(
            f"hash option rounds={rounds} is out of range: use rounds >= 1 (default {DEFAULT_ROUNDS}); "
            "rounds is the number of independent hash orders whose neighbours are scored"
        )
    if seed < 0:
        raise ScheduleError(f"hash option seed={seed} must be >= 0")


def check_key_range(bits: int, n_free: int) -> None:
    """Raise :class:`ScheduleError` when the hash-order keys ``rank * U + index`` (rank < 2^bits, U = n_free
    unprotected tokens) could leave int32 (TensorRT and other runtimes compute INT64 as INT32)."""
    if (1 << bits) * n_free - 1 > INT32_MAX:
        fit = max(b for b in range(0, MAX_BITS + 1) if (1 << b) * n_free - 1 <= INT32_MAX) if n_free <= 2 ** 31 else 0
        raise ScheduleError(
            f"hash option bits={bits} with {n_free} unprotected tokens: the sort keys rank (< 2^{bits}) x {n_free} + "
            f"index would leave the int32 range that TensorRT computes integers in; use -O bits={fit} or fewer "
            f"(or fewer tokens)")


def score_scale(n_free: int) -> float:
    """The power of two that puts a partner score (+2, in [0, 3]) on an integer grid such that the merge key
    ``level * U + (U - 1 - index)`` stays inside int32 (and the level below 2^24, exact in float32)."""
    q = 0
    while q < 22 and 3 * (2 ** (q + 1)) * n_free + n_free - 1 <= INT32_MAX:
        q += 1
    return float(2 ** q)


def max_r(n_tokens: int, protected: int) -> int:
    """The most tokens one hash step can remove: all unprotected tokens but one."""
    return max(n_tokens - protected - 1, 0)


def match_flops(n: int, protected: int, metric_dim: int, r: int = 0, bits: int = DEFAULT_BITS,
                rounds: int = DEFAULT_ROUNDS, seed: int = DEFAULT_SEED) -> int:
    """FLOPs of the matching step: the projections (a matrix product) plus one dot product per
    neighbour in each hash order."""
    u = n - protected
    return 2 * n * metric_dim * bits * rounds + 2 * rounds * max(u - 1, 0) * metric_dim


def projection(channels: int, bits: int = DEFAULT_BITS, rounds: int = DEFAULT_ROUNDS, seed: int = DEFAULT_SEED,
               device=None, dtype=torch.float32) -> torch.Tensor:
    """The fixed SimHash projection ``[channels, rounds * bits]`` (standard normal entries).

    Drawn once from a CPU ``torch.Generator`` seeded with ``seed`` (identical on every machine) and
    cached per (channels, bits, rounds, seed, device, dtype). It is created outside any tracing
    mode, so ``torch.export`` sees a real constant and the ONNX graph stores it as an initializer.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (int(channels), int(bits), int(rounds), int(seed), str(device), dtype)
    p = _PROJECTIONS.get(key)
    if p is None:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # real numbers even while torch.export traces with fake tensors
            g = torch.Generator(device="cpu").manual_seed(int(seed))
            p = torch.randn(int(channels), int(rounds) * int(bits), generator=g, dtype=torch.float32)
            p = p.to(device=device, dtype=dtype)
        _PROJECTIONS[key] = p
    return p


def _gray_rank_weights(bits: int, device) -> torch.Tensor:
    """[bits] int64 place values 2^(bits-1) .. 1 of the rank's bits (exact integers, no float64)."""
    return torch.tensor([1 << (bits - 1 - i) for i in range(bits)], dtype=torch.long, device=device)


def hash_orders(x: torch.Tensor, bits: int, rounds: int, seed: int, protected: int = 0) -> torch.Tensor:
    """x [B, N, C] metric rows -> [B, rounds, U] indices (among the U = N - protected unprotected
    tokens) in hash order, one order per round.

    SimHash codes are signs of projections, so ``x`` need not be normalised (a positive scale
    changes no sign).
    """
    B, N, C = x.shape
    U = N - protected
    check_key_range(bits, U)
    proj = projection(C, bits, rounds, seed, device=x.device, dtype=x.dtype)
    # project all rows (one matrix product on the contiguous metric), then drop the protected ones
    signs = (x @ proj > 0)[:, protected:].to(x.dtype).reshape(B, U, rounds, bits)  # the SimHash codes
    # Read each code as a reflected Gray code: bit i of its rank is the parity of code bits 0..i.
    # The running count of set bits is a float CumSum of 0/1 (exact: at most 40; TensorRT's CumSum
    # takes floats only), its parity 0/1 is exact in any float type; the rank is then put together
    # in int64, so the key is an exact integer by construction (no float64 anywhere).
    c = torch.cumsum(signs, dim=-1)
    parity = (c - 2.0 * torch.floor(c * 0.5)).to(torch.long)  # [B, U, R, bits] in {0, 1}
    rank = (parity * _gray_rank_weights(bits, x.device)).sum(-1)  # [B, U, R] int64, < 2^bits
    key = rank.transpose(1, 2) * U + torch.arange(U, device=x.device)  # unique: index breaks ties
    # One sort per round; rows longer than TensorRT's TopK limit are sorted in chunks (merging.topk).
    return topk(key.reshape(-1, U), U, largest=False, unique=True).indices.reshape(-1, rounds, U)  # [B, R, U]


def _neighbour_dots(x: torch.Tensor, order: torch.Tensor, offset: int) -> torch.Tensor:
    """Dot products of consecutive tokens in ``order``: x [B, N, C] (token i is row offset + i),
    order [B, U] -> [B, U - 1].

    One row Gather and a row-wise dot. Eager on CPU it runs in blocks of rows, so the gathered rows
    stay in cache and no [B, U, C] temporary is allocated (several times faster at large N * C);
    the numbers are the same (each dot product is computed identically). Traced or exported, it is
    the single Gather, so the graph stays small.
    """
    B, N, C = x.shape
    U = order.shape[1]
    rows = x.reshape(B * N, C)
    flat = (order + offset + torch.arange(B, device=x.device)[:, None] * N).reshape(-1)  # [B * U]
    step = max(64, (1 << 18) // max(C, 1))
    # (tracing() first: under export B is symbolic, and comparing it would constrain the batch axis)
    if not tracing() and x.device.type == "cpu" and B * U > 2 * step:
        parts = []
        for s in range(0, B * U - 1, step):
            xs = rows.index_select(0, flat[s: s + step + 1])
            parts.append(torch.linalg.vecdot(xs[:-1], xs[1:]))
        d = torch.cat(parts)
    else:
        xs = rows.index_select(0, flat)
        d = torch.linalg.vecdot(xs[:-1], xs[1:])  # [B * U - 1]; pairs across images are dropped below
    return torch.cat([d, d.new_zeros(1)]).reshape(B, U)[:, :-1]


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """order [B, U] (a permutation) -> pos [B, U] with order[b, pos[b, i]] == i."""
    B, U = order.shape
    ar = torch.arange(U, device=order.device).expand(B, U)
    return torch.empty(B, U, dtype=torch.long, device=order.device).scatter(1, order, ar)


def hash_plan(
    metric: torch.Tensor,
    r: int,
    protected: int = 1,
    bits: int = DEFAULT_BITS,
    rounds: int = DEFAULT_ROUNDS,
    seed: int = DEFAULT_SEED,
) -> MergePlan:
    """Plan one hash merge step. metric [B, N, C]; removes ``min(r, N - protected - 1)`` tokens."""
    check_options(bits, rounds, seed)
    B, N, _ = metric.shape
    r = clamp(r, max_r(N, protected))
    if r <= 0:
        return identity_plan(metric)
    U = N - protected
    check_key_range(bits, U)
    dev = metric.device
    low = torch.full((B, 1), -2.0, dtype=metric.dtype, device=dev)  # below any cosine similarity

    with torch.no_grad():
        x = metric.contiguous()  # [B, N, C]; unprotected token i is row protected + i
        norm = x.norm(dim=-1)[:, protected:].clamp_min(1e-12)  # [B, U]
        orders = hash_orders(x, bits, rounds, seed, protected)  # [B, R, U]
        ar = torch.arange(U, device=dev).expand(B, U)
        pos0 = _inverse(orders[:, 0])  # where each token sits in the backbone (round 0) order

        # Candidate partners of every token: its neighbours in each round's order, kept only if they
        # come later in the backbone. Scores: cosine of order neighbours, one row gather per round.
        cand, score = [], []
        for k in range(rounds):
            o = orders[:, k]  # [B, U]
            ns = norm.gather(1, o)
            edge = _neighbour_dots(x, o, protected) / (ns[:, :-1] * ns[:, 1:])  # cosines, [B, U - 1]
            pk = pos0 if k == 0 else _inverse(o)
            steps = ((1, torch.cat([edge, low], 1)),) if k == 0 else \
                ((-1, torch.cat([low, edge], 1)), (1, torch.cat([edge, low], 1)))
            # the order with its ends repeated: o_ext[p + 1] is o[p], clamped to the row (itself at the
            # ends) without an integer Clip (TensorRT's Clip takes floats only)
            o_ext = torch.cat([o[:, :1], o, o[:, -1:]], dim=1)  # [B, U + 2]
            for step, padded in steps:
                j = o_ext.gather(1, pk + (1 + step))  # neighbour (itself at the ends)
                s = padded.gather(1, pk)  # score of the edge to that neighbour
                if k > 0:
                    s = s.masked_fill(pos0.gather(1, j) <= pos0, -2.0)  # only forward partners
                cand.append(j)
                score.append(s)
        best, which = torch.stack(score, dim=-1).max(dim=-1)  # best forward partner of each token
        partner = torch.stack(cand, dim=-1).gather(-1, which[..., None])[..., 0]  # [B, U]

        # The r tokens with the most similar partners merge away. TopK's order of equal values is
        # runtime-specific, so rank by a unique integer key: the score (+2, in [0, 3]) on a 2^-q grid as
        # fine as int32 allows for U tokens (score_scale: 2^-21 at U = 196, 2^-17 at U = 4096), then
        # the lower token index first. Every key is below 2^31: exact in TensorRT's INT32 too.
        exact = best.to(torch.promote_types(best.dtype, torch.float32))  # float16 would overflow
        level = torch.floor((exact + 2.0) * score_scale(U))
        key = level.to(torch.long) * U + (U - 1 - ar)
        src = topk(key, r, largest=True, unique=True).indices  # [B, r]
        is_src = torch.zeros(B, U, dtype=torch.long, device=dev).scatter(1, src, torch.ones_like(src))
        # Follow merge chains to their root: the edges point forward in the backbone (a forest).
        parent = torch.where(is_src > 0, partner, ar)
        for _ in range(max(math.ceil(math.log2(U)), 1)):
            parent = parent.gather(1, parent)
        # Kept tokens (never sources) in original order become the output slots: a stable partition
        # by counting, no sort. Kept token i goes to slot (kept tokens before it); the sources are put
        # after the kept ones only to make the scatter a permutation. (Counts are float CumSums of
        # 0/1, exact below 2^24 tokens; TensorRT's CumSum takes floats only.)
        kept = (1 - is_src).to(torch.float32)
        n_kept_before = (torch.cumsum(kept, dim=1) - kept).to(torch.long)  # [B, U]
        n_src_before = ar - n_kept_before
        place = torch.where(is_src > 0, (U - r) + n_src_before, n_kept_before)  # a permutation of 0..U-1
        keep = torch.empty_like(ar).scatter(1, place, ar)[:, : U - r]  # [B, U - r], original order
        dst = n_kept_before.gather(1, parent.gather(1, src)) + protected  # roots are kept: their slot
        keep = torch.cat([torch.arange(protected, device=dev).expand(B, protected), keep + protected], dim=-1)
    return MergePlan(keep=keep, src=src + protected, dst=dst)


SPEC = MethodSpec(
    name="hash",
    plan=hash_plan,
    max_r=max_r,
    summary="SimHash orders + neighbour matching: O(N) match step for long sequences; r may exceed N/2",
    options={"bits": DEFAULT_BITS, "rounds": DEFAULT_ROUNDS, "seed": DEFAULT_SEED},
    validate=check_options,
    match_flops=match_flops,
    invariance="any",
)

__all__ = ["hash_plan", "max_r", "match_flops", "SPEC", "projection", "hash_orders", "check_options",
           "check_key_range", "score_scale", "MAX_BITS",
           "DEFAULT_BITS", "DEFAULT_ROUNDS", "DEFAULT_SEED"]
