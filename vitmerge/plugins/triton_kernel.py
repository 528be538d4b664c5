"""The TokenMerge merge as one Triton kernel: gather + segment sum + divide.

Given a :class:`~vitmerge.merging.MergePlan` (``keep [B, n_out]``, ``src``/``dst [B, r]``), each
program computes one output slot j of one image over a block of channels::

    acc  = x[keep[j]] * w[keep[j]]      wsum = w[keep[j]]      ssum = size[keep[j]]
    for every merged-away token s with dst = j (a contiguous segment after sorting src by dst):
        acc += x[s] * w[s]              wsum += w[s]           ssum += size[s]
    x'[j] = acc / wsum                  size'[j] = ssum

(w = size, or size * plan.weight for methods that weight the average). Sums run in float32 whatever
the storage type. No atomics, so the result is deterministic. The kernel is built on first use,
so ``TRITON_INTERPRET=1`` set before then runs it on the CPU through Triton's interpreter (how the
tests check it against the PyTorch merge on machines without a GPU).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .. import merging
from ..errors import RuntimeMissingError

_KERNELS: dict = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _build():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise RuntimeMissingError("the TokenMerge Triton kernel needs Triton: pip install triton") from None

    @triton.jit
    def token_merge_kernel(
        x_ptr, w_ptr, s_ptr, keep_ptr, src_ptr, offs_ptr, xo_ptr, so_ptr,
        N, D, n_out, r,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)  # b * n_out + j
        b = row // n_out
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        k = tl.load(keep_ptr + row)  # kept input token of this slot
        tok = b * N + k
        wk = tl.load(w_ptr + tok).to(tl.float32)
        acc = tl.load(x_ptr + tok * D + cols, mask=cmask, other=0.0).to(tl.float32) * wk
        wsum = wk
        ssum = tl.load(s_ptr + tok).to(tl.float32)
        start = tl.load(offs_ptr + row + b)  # offsets are [B, n_out + 1]
        end = tl.load(offs_ptr + row + b + 1)
        for t in range(start, end):  # the tokens merged into this slot
            s = tl.load(src_ptr + b * r + t)
            tok_s = b * N + s
            ws = tl.load(w_ptr + tok_s).to(tl.float32)
            acc += tl.load(x_ptr + tok_s * D + cols, mask=cmask, other=0.0).to(tl.float32) * ws
            wsum += ws
            ssum += tl.load(s_ptr + tok_s).to(tl.float32)
        tl.store(xo_ptr + row * D + cols, (acc / wsum).to(xo_ptr.dtype.element_ty), mask=cmask)
        if tl.program_id(1) == 0:
            tl.store(so_ptr + row, ssum.to(so_ptr.dtype.element_ty))

    return token_merge_kernel


def kernel():
    """The jitted kernel (built for the current TRITON_INTERPRET setting)."""
    key = interpreting()
    if key not in _KERNELS:
        _KERNELS[key] = _build()
    return _KERNELS[key]


def segments(dst: torch.Tensor, src: torch.Tensor, n_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sort the merged-away tokens by their slot: (src sorted [B, r], offsets [B, n_out + 1])."""
    B, r = dst.shape
    order = torch.argsort(dst, dim=1, stable=True)
    src_sorted = src.gather(1, order)
    counts = torch.zeros(B, n_out, dtype=torch.int64, device=dst.device)
    counts.scatter_add_(1, dst, torch.ones_like(dst))
    offs = torch.cat([counts.new_zeros(B, 1), counts.cumsum(1)], dim=1)
    return src_sorted.contiguous(), offs.contiguous()


def triton_merge(plan, x: torch.Tensor, size: Optional[torch.Tensor] = None,
                 out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, block_d: int = 128):
    """``plan.merge(x, size)`` computed by the Triton kernel. Returns (x' [B, n_out, D], size' [B, n_out, 1]).

    ``out``: optional preallocated outputs (e.g. TensorRT's output buffers).
    """
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeMissingError("the Triton TokenMerge kernel needs a CUDA GPU (or TRITON_INTERPRET=1 to run it "
                                  "in Triton's CPU interpreter, slowly)")
    B, N, D = x.shape
    n_out = plan.n_out
    if size is None:
        size = x.new_ones(B, N, 1)
    w = size if plan.weight is None else size * plan.weight
    src_sorted, offs = segments(plan.dst, plan.src, n_out)
    if out is None:
        out = (torch.empty(B, n_out, D, dtype=x.dtype, device=x.device),
               torch.empty(B, n_out, 1, dtype=size.dtype, device=x.device))
    x_out, s_out = out
    block = min(block_d, max(16, 1 << (D - 1).bit_length()))
    grid = (B * n_out, (D + block - 1) // block)
    kernel()[grid](
        x.contiguous(), w.contiguous(), size.contiguous(), plan.keep.contiguous(), src_sorted, offs,
        x_out, s_out, N, D, n_out, max(plan.r, 1), BLOCK_D=block,
    )
    return x_out, s_out


def merge_tokens(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor], r: int, protected: int,
                 method: str = "tome", out=None, **options):
    """The whole TokenMerge step: plan in PyTorch (matching + TopK), merge in the Triton kernel."""
    with torch.no_grad():
        plan = merging.plan(method, metric, int(r), int(protected), **options)
        return triton_merge(plan, x, size, out=out)
