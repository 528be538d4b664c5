"""TensorRT plugins for ``vitmerge::TokenMerge`` / ``TokenMergeCls`` (``tensorrt.plugin``, TensorRT 10.16 to 11.x).

The plugin computes the merge plan in PyTorch on TensorRT's CUDA stream (matching + TopK, the same
code as the PyTorch model) and the size-weighted average with the Triton kernel of
:mod:`.triton_kernel`, writing straight into TensorRT's output buffers.

**JIT only.** The plugins define ``@tensorrt.plugin.impl`` (a Python callback at run time), no
``@tensorrt.plugin.aot_impl``: the plan is PyTorch code, not one compiled kernel. An engine built
with them therefore runs only in a Python process that has called :func:`register` (``TrtRunner``
does), never in ``trtexec`` or Triton Inference Server's TensorRT backend; ``vitmerge build``
records ``"plugin_aot": false`` and ``vitmerge package`` refuses such engines with the reason. For
those servers, use the default plugin-free file (``vitmerge export``).

How the ONNX parser reaches the plugin: a node whose op equals the plugin name and that carries a
STRING attribute ``plugin_namespace`` naming the namespace (:func:`prepare_onnx` adds it in memory;
without an ``aot`` attribute the parser asks for the JIT implementation). The parser then hands over
the node's attributes that the plugin declares, converted its own way (onnx-tensorrt ``loadFields``).
**Every attribute is a STRING** (``r`` and ``protected`` as decimal text, ``method``, ``options`` as
JSON): the parser hands a STRING as its bytes plus a terminating NUL, counted in the length, and
``tensorrt.plugin`` decodes all of it, so ``'tome'`` arrives as ``'tome\\x00'``; :func:`str_attr` and
:func:`int_attr` strip it (an engine deserialized later gets the strings back without one). Why strings
for numbers: the two other ways break on a supported stack. An ``int``-annotated field is read as
``int(one-element int32 array)``, a TypeError on NumPy >= 2.4; a ``numpy.typing.NDArray[np.int32]``
annotation makes TensorRT 10.9-10.16's validators call ``issubclass`` on a generic alias, a TypeError on
Python >= 3.13. ``str`` validates everywhere.

Why TensorRT >= 10.16: the ``tensorrt.so`` of 10.8-10.15 is built with a pybind11 older than 2.12 (NumPy
1's dtype layout). Under NumPy 2 its ``PluginField.data`` reads an item size of 0, so every element
repeats element 0: ``tome\\x00`` arrives as ``ttttt``, and the first enqueue fails. 10.16 and 11.x are
NumPy-2 aware. :func:`string_fields_intact` checks the installed TensorRT for it in one call (``vitmerge
selftest`` runs it; the plugin refuses to register where it fails).

The annotations must be real classes: ``tensorrt.plugin`` reads them with ``inspect.signature`` and
``issubclass``, so this module must not use ``from __future__ import annotations``.

TensorRT is imported only inside these functions; without it they raise :class:`RuntimeMissingError`.
"""
import json
from typing import List, Tuple

import numpy as np

from ..errors import EngineBuildError, ModelFileError, RuntimeMissingError, VitmergeError
from . import DOMAIN, OP_TYPE, OP_TYPE_CLS

PLUGIN_NAMESPACE = DOMAIN
PLUGIN_NAME = OP_TYPE
PLUGIN_NAME_CLS = OP_TYPE_CLS  # with a fourth input, the class-attention row (importance)
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_ID_CLS = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME_CLS}"
PLUGIN_IDS = (PLUGIN_ID, PLUGIN_ID_CLS)
ATTRIBUTES = ("r", "protected", "method", "options")  # every one a STRING in the ONNX node
#: TensorRT versions whose ``tensorrt.plugin`` sources the tests run (10.16: the first whose compiled module
#: reads NumPy 2 arrays right, see the module docstring; 12: not released when this was written)
SUPPORTED = ((10, 16), (12, 0))
SUPPORTED_TEXT = "TensorRT 10.16 to 11.x"
WHY_10_16 = ("TensorRT 10.8-10.15's tensorrt.so is built for NumPy 1: under NumPy 2 the plugin's string attributes "
             "arrive corrupted ('tome' as 'ttttt')")


def tensorrt_version(trt) -> Tuple[int, int]:
    """(major, minor) of an imported ``tensorrt`` module; (0, 0), below every release, without a readable version."""
    try:
        major, minor = str(trt.__version__).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return (0, 0)


def require_tensorrt():
    """Import TensorRT or explain how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeMissingError(
            f"TensorRT not installed: TensorRT engines need an NVIDIA GPU machine with {SUPPORTED_TEXT} "
            "(pip install 'vitmerge[tensorrt]'); run the ONNX file in ONNX Runtime instead"
        ) from None
    return trt


def require_plugin_api():
    """``(tensorrt, tensorrt.plugin)`` of a supported version, or a clear error."""
    trt = require_tensorrt()
    version = tensorrt_version(trt)
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        why = f" ({WHY_10_16})" if (10, 8) <= version < SUPPORTED[0] else ""
        raise RuntimeMissingError(
            f"TensorRT {getattr(trt, '__version__', '?')} is not supported by the TokenMerge plugin (needs "
            f"{SUPPORTED_TEXT}){why}: pip install 'vitmerge[tensorrt]', or use the default plugin-free file "
            "(vitmerge export)"
        )
    if not string_fields_intact(trt):
        raise RuntimeMissingError(
            f"TensorRT {trt.__version__}'s PluginField returns string data corrupted under NumPy "
            f"{np.__version__} ({WHY_10_16}): install a NumPy-2-aware TensorRT (pip install 'tensorrt>=10.16'), "
            "or use the default plugin-free file (vitmerge export)"
        )
    try:
        import tensorrt.plugin as trtp
    except Exception as e:  # absent, or its sources expect a compiled module this TensorRT does not have
        raise RuntimeMissingError(
            f"TensorRT {trt.__version__}'s tensorrt.plugin module cannot be imported ({_one_line(e)}); reinstall "
            "TensorRT (pip install 'vitmerge[tensorrt]') or use the default plugin-free file (vitmerge export)"
        ) from None
    return trt, trtp


# --------------------------------------------------------------------------------------------
# The node's attributes, as ONNX files, the ONNX parser and deserialized engines give them
# --------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def string_fields_intact(trt) -> bool:
    """Does this TensorRT's compiled ``PluginField`` give a CHAR field's bytes back as they went in?

    False on TensorRT 10.8-10.15 under NumPy 2 (``b'tome\\x00'`` comes back as ``b'ttttt'``): their
    plugin attributes would arrive corrupted. Needs only ``tensorrt`` installed (no GPU)."""
    try:
        data = np.frombuffer(b"tome\x00", dtype=np.int8).copy()
        field = trt.PluginField("method", data, trt.PluginFieldType.CHAR)
        return bytes(np.asarray(field.data).tobytes()) == b"tome\x00"
    except Exception:  # a TensorRT without this API: nothing says the fields are intact
        return False


def int_attr(value, name: str) -> int:
    """An integer attribute: decimal text (the plugin form's STRING: str, bytes, a byte array, with or without
    the parser's NUL), a Python/NumPy integer or a one-element integer array."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.dtype.itemsize == 1 and value.size > 1:
        value = value.tobytes()  # a STRING field's bytes
    if isinstance(value, (str, bytes, bytearray)):
        text = str_attr(value, name).strip()
        if not text.lstrip("-").isdigit():
            raise ModelFileError(f"TokenMerge attribute {name!r} must be an integer, got {text!r}; re-create the "
                                 "plugin form with vitmerge export --merge-op plugin")
        return int(text)
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iu":
        raise ModelFileError(
            f"TokenMerge attribute {name!r} must be one integer, got {value!r}; re-create the plugin form with "
            "vitmerge export --merge-op plugin"
        )
    return int(arr.reshape(-1)[0])


def str_attr(value, name: str) -> str:
    """A STRING attribute: str, bytes or a byte array, without the C string terminator the ONNX parser adds."""
    if isinstance(value, np.ndarray):
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"TokenMerge attribute {name!r} is not UTF-8 text ({bytes(value)[:40]!r})") from None
    if not isinstance(value, str):
        raise ModelFileError(f"TokenMerge attribute {name!r} must be a string, got {value!r}")
    return value.rstrip("\x00")


def merge_attrs(r, protected, method, options) -> Tuple[int, int, str, dict]:
    """The node's four attributes in any of their forms -> (r, protected, method, options dict)."""
    from ..merging import available_methods

    r_, p_ = int_attr(r, "r"), int_attr(protected, "protected")
    if r_ < 0 or p_ < 0:
        raise ModelFileError(f"TokenMerge attributes r={r_}, protected={p_} must not be negative")
    m = str_attr(method, "method")
    if m not in available_methods():
        raise ModelFileError(
            f"TokenMerge attribute method={m!r} is not a vitmerge method ({', '.join(available_methods())}); "
            "the file was written by another vitmerge: re-export it"
        )
    text = str_attr(options, "options") or "{}"
    try:
        opts = json.loads(text)
    except ValueError as e:
        raise ModelFileError(f"TokenMerge attribute options={text!r} is not valid JSON ({e}); re-export the file") from None
    if not isinstance(opts, dict):
        raise ModelFileError(f"TokenMerge attribute options={text!r} must be a JSON object; re-export the file")
    return r_, p_, m, opts


def _onnx_attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def check_node(node) -> Tuple[int, int, str, dict]:
    """The attributes of one TokenMerge ONNX node, checked as the plugin will read them."""
    import onnx

    kinds = {a.name: a.type for a in node.attribute}
    for key in ATTRIBUTES:
        if kinds.get(key) != onnx.AttributeProto.STRING:
            have = onnx.AttributeProto.AttributeType.Name(kinds[key]) if key in kinds else "missing"
            older = " (an INT r / protected: the file was written by an older vitmerge)" if have == "INT" else ""
            raise ModelFileError(
                f"TokenMerge node {node.name!r}: attribute {key!r} must be STRING, it is {have}{older}; re-create the "
                "plugin form with vitmerge export --merge-op plugin"
            )
    n_in = 4 if node.op_type == PLUGIN_NAME_CLS else 3
    if len(node.input) != n_in or len(node.output) != 2:
        raise ModelFileError(f"TokenMerge node {node.name!r} has {len(node.input)} inputs and {len(node.output)} "
                             f"outputs; {node.op_type} takes {n_in} and gives 2")
    a = _onnx_attrs(node)
    return merge_attrs(a["r"], a["protected"], a["method"], a["options"])


# --------------------------------------------------------------------------------------------
# The plugins
# --------------------------------------------------------------------------------------------


def _as_torch(t):
    """A ``tensorrt.plugin.Tensor`` as a torch tensor on the GPU, zero copy (``__cuda_array_interface__``)."""
    import torch

    return torch.as_tensor(t, device="cuda")


def _on_stream(stream: int):
    """Run PyTorch work on TensorRT's CUDA stream."""
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


def _out_desc(x, size, r):  # r: the STRING attribute (decimal text)
    """x' and size': the inputs' types, N - r tokens (static counts)."""
    n = int_attr(r, "r")  # a Python int: shape expressions take ints, not NumPy arrays
    x_out, size_out = x.like(), size.like()
    x_out.shape_expr[1] = x.shape_expr[1] - n
    size_out.shape_expr[1] = size.shape_expr[1] - n
    return x_out, size_out


def _run(x, metric, size, cls_attn, r, protected, method, options, outputs, stream) -> None:
    from .triton_kernel import merge_tokens

    r, protected, method, opts = merge_attrs(r, protected, method, options)
    with _on_stream(stream):
        if cls_attn is not None:
            opts["cls_attn"] = _as_torch(cls_attn)
        out = (_as_torch(outputs[0]), _as_torch(outputs[1]))
        merge_tokens(_as_torch(x), _as_torch(metric), _as_torch(size), r, protected, method, out=out, **opts)


# type/format combinations the kernel runs: every input and output FP32. The merge decides which tokens merge
# from scores, so it runs in float32 (graph surgery casts a reduced-precision model's inputs to float32 around
# the node); advertising FP16 too would let a weakly typed --fp16 build pick it and merge in half precision
_COMBINATION = {3: "FP32, FP32, FP32, FP32, FP32", 4: "FP32, FP32, FP32, FP32, FP32, FP32"}


def _define_token_merge(trtp) -> None:
    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, r: str, protected: str,
              method: str, options: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _out_desc(x, size, r)

    @trtp.autotune(PLUGIN_ID)
    def _tune(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc,
              outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(_COMBINATION[3])]

    @trtp.impl(PLUGIN_ID)
    def _impl(x: trtp.Tensor, metric: trtp.Tensor, size: trtp.Tensor, r: str, protected: str, method: str,
              options: str, outputs: Tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        _run(x, metric, size, None, r, protected, method, options, outputs, stream)


def _define_token_merge_cls(trtp) -> None:
    @trtp.register(PLUGIN_ID_CLS)
    def _desc(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, cls_attn: trtp.TensorDesc,
              r: str, protected: str, method: str, options: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _out_desc(x, size, r)

    @trtp.autotune(PLUGIN_ID_CLS)
    def _tune(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, cls_attn: trtp.TensorDesc,
              outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(_COMBINATION[4])]

    @trtp.impl(PLUGIN_ID_CLS)
    def _impl(x: trtp.Tensor, metric: trtp.Tensor, size: trtp.Tensor, cls_attn: trtp.Tensor, r: str,
              protected: str, method: str, options: str, outputs: Tuple[trtp.Tensor, trtp.Tensor],
              stream: int) -> None:
        _run(x, metric, size, cls_attn, r, protected, method, options, outputs, stream)


def _defined(trtp, name: str) -> bool:
    """Whether this ``tensorrt.plugin`` already holds plugin ``vitmerge::name`` (its own record)."""
    try:
        return hasattr(getattr(trtp.op, PLUGIN_NAMESPACE), name)
    except AttributeError:  # no plugin in the namespace yet
        return False


def register() -> tuple:
    """Register the TokenMerge and TokenMergeCls plugins with TensorRT (once per ``tensorrt.plugin``
    module; later calls do nothing). Returns their ids. Raises :class:`RuntimeMissingError` without a
    supported TensorRT and :class:`EngineBuildError` when ``tensorrt.plugin`` rejects a definition."""
    trt, trtp = require_plugin_api()
    for name, define in ((PLUGIN_NAME, _define_token_merge), (PLUGIN_NAME_CLS, _define_token_merge_cls)):
        if _defined(trtp, name):
            continue
        try:
            define(trtp)
        except VitmergeError:
            raise
        except Exception as e:  # tensorrt.plugin validates the definitions with its own exception types
            raise EngineBuildError(
                f"TensorRT {trt.__version__}'s tensorrt.plugin rejected the {PLUGIN_NAMESPACE}::{name} plugin "
                f"({_one_line(e)}); use {SUPPORTED_TEXT} or use the default plugin-free file (vitmerge export)"
            ) from None
    return PLUGIN_IDS


# --------------------------------------------------------------------------------------------
# ONNX files
# --------------------------------------------------------------------------------------------


def token_merge_nodes(model) -> list:
    return [n for n in model.graph.node if n.op_type in (PLUGIN_NAME, PLUGIN_NAME_CLS) and n.domain == PLUGIN_NAMESPACE]


def has_token_merge(model) -> bool:
    return bool(token_merge_nodes(model))


def prepare_onnx(model) -> bytes:
    """Serialized copy of ``model`` whose TokenMerge nodes TensorRT's parser maps to this plugin (JIT).

    Checks each node's attributes as the plugin will read them (:class:`ModelFileError` otherwise)
    and adds ``plugin_namespace``; the model itself is not changed."""
    import copy

    import onnx

    for node in token_merge_nodes(model):
        check_node(node)
    model = copy.deepcopy(model)
    for node in token_merge_nodes(model):
        if not any(a.name == "plugin_namespace" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
    return model.SerializeToString()


__all__ = ["string_fields_intact", "ATTRIBUTES", "WHY_10_16", "PLUGIN_NAMESPACE", "PLUGIN_NAME", "PLUGIN_NAME_CLS", "PLUGIN_IDS", "SUPPORTED_TEXT", "register",
           "require_tensorrt", "require_plugin_api", "tensorrt_version", "int_attr", "str_attr", "merge_attrs",
           "check_node", "prepare_onnx", "has_token_merge", "token_merge_nodes"]
