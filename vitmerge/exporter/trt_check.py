"""Static TensorRT readiness check of an ONNX file: would TensorRT's ONNX parser take every node?

``check_tensorrt(path)`` reads the graph (no GPU, no TensorRT needed) and returns one
:class:`Finding` per node TensorRT would refuse, run through a plugin, or run wrongly:

* **DOUBLE** anywhere (tensor, initializer, Cast target, constant): TensorRT has no float64
  layers; its parser casts DOUBLE down to FLOAT, so exact float64 keys silently lose their exactness.
* **types**: the node's data tensor has a type the operator table does not list for that op
  (e.g. INT64 into Clip or CumSum, which take floats only).
* **TopK**: ``sorted`` must be 1 and ``K`` a build-time constant below TensorRT's limit
  (``K <= 3839``, :data:`vitmerge.merging.topk.TOPK_LIMIT`).
* **Scatter with a reduction**: ScatterND with ``reduction`` != none is refused by the parser
  (onnx-tensorrt issue #957); ScatterElements with a reduction is not a TensorRT layer -- the parser
  hands it to the ``ScatterElements`` plugin of libnvinfer_plugin (scatter-add has given silently
  wrong results on TensorRT 8.6, NVIDIA/TensorRT#3750).
* **unsupported ops** (marked N in the table, or not in it) and an opset outside 9..20.
* **inputs that must be constants** (``axes`` of reductions, Slice, Squeeze, Unsqueeze, Pad; the
  CumSum axis) but are computed.
* **custom domains**: TensorRT parses such a node only through a plugin registered under the
  node's op name (``plugin_namespace`` attribute); ``vitmerge::TokenMerge`` nodes need the TokenMerge
  plugin (:mod:`vitmerge.plugins.tensorrt_plugin`). The check says whether such a plugin is
  registered in this process; a node whose plugin is registered is a note, not a finding.

The table is data (:data:`OP_TYPES`, :data:`UNSUPPORTED`), transcribed from onnx-tensorrt's
``docs/operators.md`` (the support matrix of TensorRT's ONNX parser) at :data:`TABLE_SOURCE`;
the ScatterND / ScatterElements rules are read from the parser source of the same commit
(``onnxOpImporters.cpp``). It is a static check: it cannot see limits that depend on values
computed at run time, or on the GPU; ``vitmerge build`` is the real test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple, Union

import onnx
from onnx import TensorProto

from ..errors import ModelFileError, ModelNotFoundError, VitmergeError
from ..merging.topk import TOPK_LIMIT
from ..plugins import DOMAIN as VITMERGE_DOMAIN, OP_TYPES as VITMERGE_OPS

#: Where the table below comes from (version and commit), for anyone who updates it.
TABLE_SOURCE = ("github.com/onnx/onnx-tensorrt docs/operators.md, branch 10.1-GA, commit "
                "96e781103cfc4adf4a6bb557e94bac8e693f6f4c (2024-06-17, \"ONNX-TensorRT 10.1 GA release\")")
#: Opsets of the default domain TensorRT 10.x parses ("opset 9 to opset 20").
OPSET_RANGE = (9, 20)
#: Largest K of one TopK: operators.md says "`K` input must be less than 3840", ITopKLayer::setK says
#: "only values up to 3840 are supported"; K <= 3839 satisfies both.
TOPK_MAX_K = TOPK_LIMIT

# op -> the types its data tensor may have, as written in the table (FP32 FP16 BF16 INT32 INT64 BOOL
# UINT8 INT8 FP8 INT4). One row per op marked Y. (The table's "INF64" for ConstantOfShape is INT64.)
OP_TYPES: Dict[str, str] = {
    "Abs": "FP32 FP16 BF16 INT32 INT64",
    "Acos": "FP32 FP16 BF16",
    "Acosh": "FP32 FP16 BF16",
    "Add": "FP32 FP16 BF16 INT32 INT64",
    "And": "BOOL",
    "ArgMax": "FP32 FP16 BF16 INT32 INT64",
    "ArgMin": "FP32 FP16 BF16 INT32 INT64",
    "Asin": "FP32 FP16 BF16",
    "Asinh": "FP32 FP16 BF16",
    "Atan": "FP32 FP16 BF16",
    "Atanh": "FP32 FP16 BF16",
    "AveragePool": "FP32 FP16 BF16",
    "BatchNormalization": "FP32 FP16 BF16",
    "Cast": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "CastLike": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "Ceil": "FP32 FP16 BF16",
    "Celu": "FP32 FP16 BF16",
    "Clip": "FP32 FP16 BF16",
    "Concat": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Constant": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ConstantOfShape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Conv": "FP32 FP16 BF16",
    "ConvTranspose": "FP32 FP16 BF16",
    "Cos": "FP32 FP16 BF16",
    "Cosh": "FP32 FP16 BF16",
    "CumSum": "FP32 FP16 BF16",
    "DeformConv": "FP32 FP16",
    "DepthToSpace": "FP32 FP16 BF16 INT32 INT64",
    "DequantizeLinear": "INT8 FP8 INT4",
    "Div": "FP32 FP16 BF16 INT32 INT64",
    "Dropout": "FP32 FP16 BF16",
    "Einsum": "FP32 FP16 BF16",
    "Elu": "FP32 FP16 BF16",
    "Equal": "FP32 FP16 BF16 INT32 INT64",
    "Erf": "FP32 FP16 BF16",
    "Exp": "FP32 FP16 BF16",
    "Expand": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "EyeLike": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Flatten": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Floor": "FP32 FP16 BF16",
    "Gather": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherElements": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherND": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Gelu": "FP32 FP16 BF16 INT8 INT32 INT64",
    "Gemm": "FP32 FP16 BF16",
    "GlobalAveragePool": "FP32 FP16 BF16",
    "GlobalLpPool": "FP32 FP16 BF16",
    "GlobalMaxPool": "FP32 FP16 BF16",
    "Greater": "FP32 FP16 BF16 INT32 INT64",
    "GreaterOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "GridSample": "FP32 FP16",
    "GroupNormalization": "FP32 FP16 BF16",
    "GRU": "FP32 FP16 BF16",
    "HardSigmoid": "FP32 FP16 BF16",
    "HardSwish": "FP32 FP16 BF16",
    "Hardmax": "FP32 FP16 BF16",
    "Identity": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "If": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ImageScaler": "FP32 FP16 BF16",
    "InstanceNormalization": "FP32 FP16 BF16",
    "IsInf": "FP32 FP16 BF16",
    "IsNaN": "FP32 FP16 BF16 INT32 INT64",
    "LayerNormalization": "FP32 FP16 BF16",
    "LeakyRelu": "FP32 FP16 BF16",
    "Less": "FP32 FP16 BF16 INT32 INT64",
    "LessOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "Log": "FP32 FP16 BF16",
    "LogSoftmax": "FP32 FP16 BF16",
    "Loop": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "LRN": "FP32 FP16 BF16",
    "LSTM": "FP32 FP16 BF16",
    "LpNormalization": "FP32 FP16 BF16",
    "LpPool": "FP32 FP16 BF16",
    "MatMul": "FP32 FP16 BF16",
    "Max": "FP32 FP16 BF16 INT32 INT64",
    "MaxPool": "FP32 FP16 BF16",
    "Mean": "FP32 FP16 BF16 FP8 INT32 INT64",
    "MeanVarianceNormalization": "FP32 FP16 BF16",
    "Min": "FP32 FP16 BF16 INT32 INT64",
    "Mish": "FP32 FP16",
    "Mod": "FP32 FP16 BF16 INT32 INT64",
    "Mul": "FP32 FP16 BF16 INT32 INT64",
    "Neg": "FP32 FP16 BF16 INT32 INT64",
    "NonMaxSuppression": "FP32 FP16",
    "NonZero": "FP32 FP16",
    "Not": "BOOL",
    "OneHot": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Or": "BOOL",
    "Pad": "FP32 FP16 BF16 INT32 INT64",
    "ParametricSoftplus": "FP32 FP16 BF16",
    "Pow": "FP32 FP16 BF16",
    "PRelu": "FP32 FP16 BF16",
    "QuantizeLinear": "FP32 FP16 BF16",
    "RandomNormal": "FP32 FP16 BF16",
    "RandomNormalLike": "FP32 FP16 BF16",
    "RandomUniform": "FP32 FP16 BF16",
    "RandomUniformLike": "FP32 FP16 BF16",
    "Range": "FP32 FP16 BF16 INT32 INT64",
    "Reciprocal": "FP32 FP16 BF16",
    "ReduceL1": "FP32 FP16 BF16 INT32 INT64",
    "ReduceL2": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSumExp": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMax": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMean": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMin": "FP32 FP16 BF16 INT32 INT64",
    "ReduceProd": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSumSquare": "FP32 FP16 BF16 INT32 INT64",
    "Relu": "FP32 FP16 BF16 INT32 INT64",
    "Reshape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Resize": "FP32 FP16 BF16",
    "ReverseSequence": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "RNN": "FP32 FP16 BF16",
    "RoiAlign": "FP32 FP16",
    "Round": "FP32 FP16 BF16",
    "ScaledTanh": "FP32 FP16 BF16",
    "Scan": "FP32 FP16 BF16",
    "Scatter": "FP32 FP16 BF16 INT32 INT64",
    "ScatterElements": "FP32 FP16 BF16 INT32 INT64",
    "ScatterND": "FP32 FP16 BF16 INT32 INT64",
    "Selu": "FP32 FP16 BF16",
    "Shape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Shrink": "FP32 FP16 BF16 INT32 INT64",
    "Sigmoid": "FP32 FP16 BF16",
    "Sign": "FP32 FP16 BF16 INT32 INT64",
    "Sin": "FP32 FP16 BF16",
    "Sinh": "FP32 FP16 BF16",
    "Size": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Slice": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Softmax": "FP32 FP16 BF16",
    "Softplus": "FP32 FP16 BF16",
    "Softsign": "FP32 FP16 BF16",
    "SpaceToDepth": "FP32 FP16 BF16 INT32 INT64",
    "Split": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sqrt": "FP32 FP16 BF16",
    "Squeeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sub": "FP32 FP16 BF16 INT32 INT64",
    "Sum": "FP32 FP16 BF16 INT32 INT64",
    "Tan": "FP32 FP16 BF16",
    "Tanh": "FP32 FP16 BF16",
    "ThresholdedRelu": "FP32 FP16 BF16",
    "Tile": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "TopK": "FP32 FP16 BF16 INT32 INT64",
    "Transpose": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Trilu": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Unsqueeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Upsample": "FP32 FP16 BF16",
    "Where": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Xor": "BOOL",
}

#: Ops the table marks N (not supported by TensorRT's parser).
UNSUPPORTED = frozenset("""
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow
    Col2Im CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
    HammingWindow HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix
    Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement
    QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss
    SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

#: Which tensor carries the table's type: an input index, or ("out", i) for an output; None: not checked.
_DATA_TENSOR: Dict[str, object] = {
    "Where": 1, "Constant": ("out", 0), "ConstantOfShape": ("out", 0), "RandomNormal": ("out", 0),
    "RandomUniform": ("out", 0), "If": None, "Loop": None, "Scan": None, "OneHot": None,
}
#: op -> inputs that must be build-time constants (initializers or Constant outputs), from the table's
#: restrictions ("`axes` must be an initializer", "`axis` must be an initializer").
_CONST_INPUTS: Dict[str, Tuple[int, ...]] = {
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze",
                           "CumSum")},
    "Slice": (3,), "Pad": (3,),
}
#: ONNX element type -> the table's name for it.
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL", TensorProto.UINT8: "UINT8",
    TensorProto.INT8: "INT8", TensorProto.DOUBLE: "DOUBLE",
    **{getattr(TensorProto, n): "FP8" for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
       if hasattr(TensorProto, n)},
    **({TensorProto.INT4: "INT4"} if hasattr(TensorProto, "INT4") else {}),
}
_DEFAULT_DOMAINS = ("", "ai.onnx")


def type_name(elem_type: int) -> str:
    """ONNX element type -> the table's name (FP32, INT64, ...; other types by their ONNX name)."""
    return _TYPE_NAMES.get(elem_type) or TensorProto.DataType.Name(elem_type)


@dataclass(frozen=True)
class Finding:
    """One node TensorRT would not take as it is."""

    op: str  # the node's op type (domain::op for custom domains), or model / initializer / input / output
    node: str  # the node's name (or the tensor's, for graph-level findings)
    reason: str

    def line(self) -> str:
        return f"{self.op}  {self.node}: {self.reason}"


@dataclass
class Readiness:
    """The result of :func:`check_tensorrt`: ``ok`` when there are no findings."""

    path: str
    nodes: int  # nodes checked (subgraphs included)
    findings: List[Finding] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # things that pass but are worth knowing (registered plugins)
    table: str = TABLE_SOURCE

    @property
    def ok(self) -> bool:
        return not self.findings


def plugin_status(op: str, namespace: str = "") -> Tuple[bool, str]:
    """Is a TensorRT plugin for ``namespace::op`` registered in this process? (registered, why)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed in this Python environment, so no plugin is registered in this process"
    try:
        registry = trt.get_plugin_registry()
        for version in ("1", "2"):
            if registry.get_creator(op, version, namespace) is not None:
                return True, f"registered in this process (TensorRT {trt.__version__}, version {version})"
    except Exception as e:  # an old TensorRT without this lookup, or a registry that refuses the query
        return False, f"TensorRT {trt.__version__}'s plugin registry could not be queried ({e})"
    return False, f"not registered in this process (TensorRT {trt.__version__} is installed, no {namespace}::{op} in its registry)"


def _load(source) -> Tuple[onnx.ModelProto, str]:
    if isinstance(source, onnx.ModelProto):
        return source, "<model>"
    path = Path(source)
    if not path.is_file():
        raise ModelNotFoundError(f"no ONNX file at {str(path)!r}: export one with `vitmerge export`")
    try:  # weights are not needed: small constants (TopK's K, axes) are stored inline
        return onnx.load(str(path), load_external_data=False), str(path)
    except Exception as e:
        raise ModelFileError(f"{path} is not a readable ONNX model ({e}); re-export it with `vitmerge export`") from None


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _attr_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            yield a.t
        elif a.type == onnx.AttributeProto.TENSORS:
            yield from a.tensors


class _Graph:
    """Types and constant values of every tensor name, over the graph and its subgraphs."""

    def __init__(self, model: onnx.ModelProto):
        self.types: Dict[str, int] = {}
        self.consts: Dict[str, Optional[onnx.TensorProto]] = {}
        for g in _graphs(model.graph):
            for vi in list(g.input) + list(g.output) + list(g.value_info):
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    self.types.setdefault(vi.name, vi.type.tensor_type.elem_type)
            for t in g.initializer:
                self.types[t.name] = t.data_type
                self.consts[t.name] = t
            for node in g.node:
                if node.op_type == "Cast" and node.domain in _DEFAULT_DOMAINS and node.output:
                    self.types.setdefault(node.output[0], _attr(node, "to"))  # (inference skips subgraph tensors)
                if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
                    value = _attr(node, "value")
                    self.consts[node.output[0]] = value if isinstance(value, onnx.TensorProto) else None
                    if isinstance(value, onnx.TensorProto):
                        self.types[node.output[0]] = value.data_type

    def value(self, name: str):
        """The constant's values as a numpy array, or None (not a constant, or stored outside the file)."""
        t = self.consts.get(name)
        if t is None or (t.data_location == TensorProto.EXTERNAL):
            return None
        try:
            return onnx.numpy_helper.to_array(t)
        except Exception:
            return None


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or (f"(output {node.output[0]})" if node.output else f"(node #{index})")


def _check_node(node: onnx.NodeProto, g: _Graph, opset: int) -> List[str]:
    """Reasons TensorRT would not take this default-domain node as it is (empty: fine)."""
    op, reasons = node.op_type, []
    ins = [n for n in node.input]
    names = [n for n in list(node.input) + list(node.output) if n]

    doubles = [n for n in names if g.types.get(n) == TensorProto.DOUBLE]
    doubles += [f"{a.name} attribute" for a in node.attribute
                if (a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.DOUBLE)]
    if op in ("Cast", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
        target = _attr(node, "to" if op == "Cast" else "dtype")
        if target == TensorProto.DOUBLE:
            doubles.append(f"{'to' if op == 'Cast' else 'dtype'}=DOUBLE")
    if doubles:
        reasons.append(f"DOUBLE (float64) in {', '.join(dict.fromkeys(doubles))}: TensorRT has no float64 layers "
                       "(its parser casts DOUBLE down to FLOAT, losing exactness); keep the graph in float32 / int32 / int64")

    if op in UNSUPPORTED:
        return reasons + [f"{op} is not supported by TensorRT's ONNX parser (marked N in the operator table)"]
    if op not in OP_TYPES:
        return reasons + [f"{op} is not in TensorRT's ONNX operator table (opset {opset}): the parser does not know it"]

    allowed = set(OP_TYPES[op].split())
    where = _DATA_TENSOR.get(op, 0)
    if where is not None:
        tensor = (node.output[where[1]] if isinstance(where, tuple) and len(node.output) > where[1]
                  else ins[where] if isinstance(where, int) and len(ins) > where else "")
        t = g.types.get(tensor) if tensor else None
        if t is not None and t != TensorProto.DOUBLE and type_name(t) not in allowed:
            reasons.append(f"{type_name(t)} input {tensor!r}: TensorRT's {op} takes {', '.join(OP_TYPES[op].split())}")
    if op == "Cast":
        to = _attr(node, "to")
        if to is not None and to != TensorProto.DOUBLE and type_name(to) not in allowed:
            reasons.append(f"Cast to {type_name(to)}: TensorRT's Cast produces {', '.join(OP_TYPES[op].split())}")

    if op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            reasons.append("sorted=0: TensorRT's TopK needs sorted=1")
        k = _attr(node, "k") if opset < 10 else None
        if opset >= 10:
            v = g.value(ins[1]) if len(ins) > 1 and ins[1] else None
            k = int(v.reshape(-1)[0]) if v is not None and v.size == 1 else None
        if k is None:
            reasons.append(f"K is computed at run time: TensorRT's TopK needs K <= {TOPK_MAX_K}, which cannot be "
                           "checked here; make K a constant")
        elif k > TOPK_MAX_K:
            reasons.append(f"K={k} > {TOPK_MAX_K}: TensorRT's TopK takes K < 3840 (sort longer rows in chunks, "
                           "e.g. vitmerge.merging.topk)")
    if op in ("ScatterElements", "Scatter"):
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
        if reduction != "none":
            reasons.append(f"reduction={reduction!r} is not a TensorRT layer: the parser hands it to the ScatterElements "
                           "plugin of libnvinfer_plugin (needs trt.init_libnvinfer_plugins; scatter-add gave silently "
                           "wrong results on TensorRT 8.6, NVIDIA/TensorRT#3750)")
    if op == "ScatterND":
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
        if reduction != "none":
            reasons.append(f"reduction={reduction!r}: TensorRT's ScatterND has no reduction (the parser refuses the "
                           "attribute, onnx/onnx-tensorrt#957)")
    for i in _CONST_INPUTS.get(op, ()):
        if len(ins) > i and ins[i] and ins[i] not in g.consts:
            reasons.append(f"input {i} ({ins[i]!r}) is computed: TensorRT's {op} needs it as an initializer / constant")
    if op in ("LayerNormalization", "MaxPool") and any(node.output[1:]):
        reasons.append(f"only the first output of {op} is supported by TensorRT")
    return reasons


def _check_custom(node: onnx.NodeProto) -> Tuple[List[str], List[str]]:
    """(reasons, notes) for a node of a custom domain."""
    op, domain = node.op_type, node.domain
    namespace = _attr(node, "plugin_namespace", b"")
    namespace = namespace.decode() if isinstance(namespace, bytes) else str(namespace)
    if domain == "ai.onnx.ml":
        return [f"{domain}::{op}: TensorRT does not support the ONNX-ML domain"], []
    if domain == VITMERGE_DOMAIN and op in VITMERGE_OPS:
        registered, why = plugin_status(op, namespace or VITMERGE_DOMAIN)
        need = (f"needs the vitmerge {op} TensorRT plugin (vitmerge.plugins.tensorrt_plugin.register(), TensorRT >= 10.16; "
                "`vitmerge build` registers it)")
        if registered:
            return [], [f"{domain}::{op} {node.name}: {need}: {why}"]
        return [f"{need}: {why}"], []
    registered, why = plugin_status(op, namespace)
    need = f"custom domain {domain!r}: TensorRT parses this node only through a plugin named {op!r}"
    if registered:
        return [], [f"{domain}::{op} {node.name}: {need}: {why}"]
    return [f"{need}: {why}"], []


def check_tensorrt(source: Union[str, Path, onnx.ModelProto]) -> Readiness:
    """Would TensorRT's ONNX parser take this model? One :class:`Finding` per offending node.

    ``source``: a path to an ``.onnx`` file (external weights are not read) or a ``ModelProto``.
    Raises :class:`ModelNotFoundError` / :class:`ModelFileError` for a missing / unreadable file.
    """
    model, label = _load(source)
    if model.functions:  # model-local functions: check what TensorRT would see once they are inlined
        try:
            from onnx import inliner

            model = inliner.inline_local_functions(model)
        except Exception:  # an onnx without the inliner: the function bodies are not checked
            pass
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference cannot run (e.g. unknown custom ops everywhere): declared types only
        inferred = model
    g = _Graph(inferred)
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
    report = Readiness(path=label, nodes=0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        report.findings.append(Finding("model", label, f"opset {opset}: TensorRT 10 parses opsets "
                                                       f"{OPSET_RANGE[0]} to {OPSET_RANGE[1]}; re-export with --opset 18"))
    used: Set[str] = set()
    index = 0
    for graph in _graphs(inferred.graph):
        for node in graph.node:
            used.update(n for n in node.input if n)
            report.nodes += 1
            if node.domain in _DEFAULT_DOMAINS:
                reasons, notes = _check_node(node, g, opset), []
                op = node.op_type
            else:
                reasons, notes = _check_custom(node)
                op = f"{node.domain}::{node.op_type}"
            report.notes.extend(notes)
            if reasons:
                report.findings.append(Finding(op, _node_label(node, index), "; ".join(reasons)))
            index += 1
        # DOUBLE tensors no node reports: unused initializers and graph inputs
        for t in graph.initializer:
            if t.data_type == TensorProto.DOUBLE and t.name not in used:
                report.findings.append(Finding("initializer", t.name, "DOUBLE (float64) initializer: TensorRT has no float64 layers"))
        for vi in graph.input:  # (outputs are made by nodes, which report them)
            if vi.type.tensor_type.elem_type == TensorProto.DOUBLE and vi.name not in used:
                report.findings.append(Finding("input", vi.name, "DOUBLE (float64) graph input: TensorRT has no float64 layers"))
    return report


def integer_findings(path, batch_sizes=(1, 4), seed: int = 0) -> Tuple[List[Finding], Optional[str]]:
    """Run ``path`` in ONNX Runtime on random inputs with every integer tensor recorded
    (:mod:`.intrange`): one :class:`Finding` per tensor whose values leave int32 (TensorRT computes INT64 as
    INT32 in many layers: they would wrap). Returns (findings, widest integer as a note, or why none)."""
    from .. import metadata as md
    from .intrange import integer_ranges, random_inputs

    proto = md.load_proto(path)
    if md.read(proto).get(md.DTYPE) == "bf16":
        return [], "integer ranges not run: ONNX Runtime's CPU provider has no bfloat16 kernels"
    try:
        inputs = random_inputs(path, batch_sizes, seed=seed)
    except VitmergeError as e:  # not a one-input model: the static check above is all there is
        return [], f"integer ranges not run: {e}"
    ranges = integer_ranges(path, inputs)
    bad = [Finding(r.op, r.node, f"computes {r.tensor} in [{r.lo}, {r.hi}] on random inputs: outside int32, which "
                                 "TensorRT computes INT64 in (the values would wrap)") for r in ranges if not r.ok]
    if not ranges:
        return bad, "no integer tensors"
    widest = max(ranges, key=lambda r: max(abs(r.lo), abs(r.hi)))
    return bad, (f"integers on random inputs (batch {', '.join(map(str, batch_sizes))}): widest |value| "
                 f"{max(abs(widest.lo), abs(widest.hi)):,} ({widest.op} {widest.node})")


__all__ = ["check_tensorrt", "integer_findings", "Readiness", "Finding", "plugin_status", "type_name", "OP_TYPES", "UNSUPPORTED",
           "TABLE_SOURCE", "TOPK_MAX_K", "OPSET_RANGE"]
