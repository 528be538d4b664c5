"""TensorRT 10 plugins for ``vitmerge::TokenMerge`` / ``TokenMergeCls`` (``tensorrt.plugin``, TensorRT >= 10.7).

The plugin computes the merge plan in PyTorch on TensorRT's CUDA stream (matching + TopK, the same
code as the PyTorch model) and the size-weighted average with the Triton kernel of
:mod:`.triton_kernel`, writing straight into TensorRT's output buffers.

TensorRT's ONNX parser hands a node it does not know to the plugin registry when the node's op
equals the plugin name and its ``plugin_namespace`` attribute names the namespace:
:func:`prepare_onnx` adds that attribute to every TokenMerge node (in memory) before parsing.

This is a JIT plugin: the engine needs Python (this module imported) where it runs. TensorRT is
imported only inside these functions; without it they raise :class:`RuntimeMissingError`.
"""
from __future__ import annotations

import json
from typing import List, Tuple

from ..errors import RuntimeMissingError

PLUGIN_NAMESPACE = "vitmerge"
PLUGIN_NAME = "TokenMerge"
PLUGIN_NAME_CLS = "TokenMergeCls"  # with a fourth input, the class-attention row (importance)
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_ID_CLS = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME_CLS}"
PLUGIN_IDS = (PLUGIN_ID, PLUGIN_ID_CLS)
_REGISTERED = False


def require_tensorrt():
    """Import TensorRT or explain how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeMissingError(
            "TensorRT not installed: TensorRT engines need an NVIDIA GPU machine with TensorRT 10 "
            "(pip install tensorrt, from NVIDIA's package index); run the ONNX file in ONNX Runtime instead"
        ) from None
    return trt


def require_plugin_api():
    trt = require_tensorrt()
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise RuntimeMissingError(
            f"TensorRT {trt.__version__} has no tensorrt.plugin module (TensorRT >= 10.7 needed for the TokenMerge "
            "plugin); upgrade TensorRT or build the native form (vitmerge export --merge-op native)"
        ) from None
    return trt, trtp


def register() -> tuple:
    """Register the TokenMerge and TokenMergeCls plugins with TensorRT (once per process). Returns their ids."""
    global _REGISTERED
    if _REGISTERED:
        return PLUGIN_IDS
    trt, trtp = require_plugin_api()

    def out_desc(x, size, r):
        x_out, size_out = x.like(), size.like()
        x_out.shape_expr[1] -= r  # static token counts: N - r
        size_out.shape_expr[1] -= r
        return x_out, size_out

    def run(x, metric, size, cls_attn, r, protected, method, options, outputs, stream):
        import torch

        from .triton_kernel import merge_tokens

        opts = json.loads(options or "{}")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt = torch.as_tensor(x, device="cuda")
            mt = torch.as_tensor(metric, device="cuda")
            st = torch.as_tensor(size, device="cuda")
            if cls_attn is not None:
                opts["cls_attn"] = torch.as_tensor(cls_attn, device="cuda")
            out = (torch.as_tensor(outputs[0], device="cuda"), torch.as_tensor(outputs[1], device="cuda"))
            merge_tokens(xt, mt, st, r, protected, method, out=out, **opts)

    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, r: int, protected: int,
              method: str, options: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return out_desc(x, size, r)

    @trtp.autotune(PLUGIN_ID)
    def _tune(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc,
              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16")]

    @trtp.impl(PLUGIN_ID)
    def _impl(x: trtp.Tensor, metric: trtp.Tensor, size: trtp.Tensor, r: int, protected: int, method: str,
              options: str, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        run(x, metric, size, None, r, protected, method, options, outputs, stream)

    @trtp.register(PLUGIN_ID_CLS)
    def _desc_cls(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, cls_attn: trtp.TensorDesc,
                  r: int, protected: int, method: str, options: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return out_desc(x, size, r)

    @trtp.autotune(PLUGIN_ID_CLS)
    def _tune_cls(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, cls_attn: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16")]

    @trtp.impl(PLUGIN_ID_CLS)
    def _impl_cls(x: trtp.Tensor, metric: trtp.Tensor, size: trtp.Tensor, cls_attn: trtp.Tensor, r: int,
                  protected: int, method: str, options: str, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        run(x, metric, size, cls_attn, r, protected, method, options, outputs, stream)

    _REGISTERED = True
    return PLUGIN_IDS


def prepare_onnx(model) -> bytes:
    """Serialized copy of ``model`` whose TokenMerge nodes TensorRT's parser maps to this plugin."""
    import copy

    import onnx

    model = copy.deepcopy(model)
    for node in model.graph.node:
        if node.op_type in (PLUGIN_NAME, PLUGIN_NAME_CLS) and node.domain == PLUGIN_NAMESPACE:
            if not any(a.name == "plugin_namespace" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
    return model.SerializeToString()


def has_token_merge(model) -> bool:
    return any(n.op_type in (PLUGIN_NAME, PLUGIN_NAME_CLS) and n.domain == PLUGIN_NAMESPACE for n in model.graph.node)
