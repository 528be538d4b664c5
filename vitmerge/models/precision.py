"""Reduced precision (FP16 / BF16): which dtype a model runs in, and casting a model to one.

What runs in what (the same in PyTorch, in the exported graph and in a strongly typed TensorRT engine):

* weights and activations: the chosen dtype;
* every merge step: (at least) float32 — the metric's normalisation, the similarity scores, the
  size-weighted sums and the divide (see :mod:`vitmerge.models.vit`); token sizes stay float32;
* the graph's input ``images`` and output ``logits``: float32, cast at the edges, so clients feed and
  read plain float32 arrays whatever the model runs in (numpy has no bfloat16);
* BF16 only: the patch embedding's convolution runs in float32 (ONNX opset 18 has no bfloat16 Conv;
  it is one small op at the input) and its output is cast to bfloat16.
"""
from __future__ import annotations

from collections import Counter
from typing import Union

import torch
from torch import nn

from ..errors import UsageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """'fp16' / 'float16' / torch.float16 -> torch.float16 (None -> float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in NAMES:
            raise UsageError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    key = aliases.get(str(dtype).lower(), str(dtype).lower())
    if key not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return NAMES.get(dtype, str(dtype).replace("torch.", ""))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype that holds most of the model's parameters (what its blocks compute in)."""
    counts: Counter = Counter()
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


class Float32Conv(nn.Conv2d):
    """A Conv2d kept in float32 whose output is cast to ``out_dtype`` (BF16's patch embedding).

    Swapped in by class (like the merge adapter): parameters, attributes and state-dict keys stay.
    """

    out_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(self.out_dtype)


def cast_model(model: nn.Module, dtype: Union[str, torch.dtype]) -> nn.Module:
    """Cast ``model`` in place to ``dtype`` (see the module docstring for what stays float32)."""
    dt = resolve_dtype(dtype)
    model.to(dt)
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, Float32Conv):  # cast again: undo the float32 island first
        proj.__class__ = nn.Conv2d
    if dt == torch.bfloat16 and type(proj) is nn.Conv2d:
        proj.float()
        proj.__class__ = Float32Conv
        proj.out_dtype = dt
    return model


__all__ = ["DTYPES", "resolve_dtype", "dtype_name", "model_dtype", "cast_model", "Float32Conv"]
