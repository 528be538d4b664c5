"""Kernels behind the custom ``vitmerge::TokenMerge`` node, and the node's contract.

The node: ``vitmerge::TokenMerge(x [B,N,D], metric [B,N,C], size [B,N,1]) -> (x' [B,N-r,D],
size' [B,N-r,1])`` with STRING attributes ``r``, ``protected`` (decimal text), ``method`` and ``options``
(JSON). Methods that read the class-token attention use ``vitmerge::TokenMergeCls`` with a
fourth input ``cls_attn [B, N]``. Graph surgery writes these nodes; the kernels run them:

* :mod:`.ort_tokenmerge`: ONNX Runtime (CPU) through onnxruntime-extensions; ``register_ort(so)``.
* :mod:`.tensorrt_plugin`: TensorRT plugins (``tensorrt.plugin``), kernel in :mod:`.triton_kernel`;
  TensorRT is imported only when used.

Running a model (sessions, engines) is :mod:`vitmerge.backends`' job; this package holds kernels only.
"""
DOMAIN = "vitmerge"  # custom-op domain of the TokenMerge nodes (and the TensorRT plugin namespace)
DOMAIN_VERSION = 1
OP_TYPE = "TokenMerge"  # (x, metric, size) -> (x', size')
OP_TYPE_CLS = "TokenMergeCls"  # (x, metric, size, cls_attn) -> (x', size')
OP_TYPES = (OP_TYPE, OP_TYPE_CLS)

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OP_TYPE", "OP_TYPE_CLS", "OP_TYPES"]
