"""Kernels behind the custom ``vitmerge::TokenMerge`` node.

* :mod:`.ort_tokenmerge`: ONNX Runtime (CPU) through onnxruntime-extensions; ``register_ort(so)``.
* :mod:`.tensorrt_plugin`: a TensorRT 10 plugin (``tensorrt.plugin``), kernel in :mod:`.triton_kernel`;
  TensorRT is imported only when used.
"""
from __future__ import annotations

from .ort_tokenmerge import register_ort, token_merge

__all__ = ["register_ort", "token_merge"]
