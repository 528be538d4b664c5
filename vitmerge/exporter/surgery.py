"""Graph surgery on the merge steps of an exported model (onnx-graphsurgeon passes).

Finding the merge subgraphs needs no pattern guessing: every node the dynamo exporter emits for a
merge step carries the step's module scope (``blocks.N.token_merge`` in timm ViTs,
``layers.N.token_merge`` / ``encoder.layer.N.token_merge`` in transformers models) in its
``namespace`` metadata.
A merge subgraph is read off its boundary::

    x [B, N, D], metric [B, N, C], size [B, N, 1] (absent in the first merging block)
        -> blocks.N.token_merge ->
    x' [B, N - r, D], size' [B, N - r, 1] (absent when no later block uses it)

Three graph forms, one function each over a ``gs.Graph``:

* ``standard``: the graph as exported (TopK / GatherElements / GatherND / ScatterND with add).
* ``native`` (:func:`to_native`): ToMe rebuilt from ops that ONNX Runtime and TensorRT run without
  plugins: the plan from TopK with k = r (not a full sort) plus small compares, and the whole
  size-weighted average as ONE batched MatMul with a 0/1 assignment matrix; no gather or scatter of
  token rows at all.
* ``plugin`` (:func:`to_plugin`): each merge step becomes a single ``vitmerge::TokenMerge`` node
  (STRING attributes ``r``, ``protected``, ``method``, ``options``), run by :mod:`vitmerge.plugins`.
  Methods whose plan also reads the class-token attention row (``importance``) get
  ``vitmerge::TokenMergeCls`` with that row as a fourth input ``cls_attn [B, N]``.

:func:`rewrite` applies a form to a file: staged write, ONNX checker, then an atomic rename;
:func:`rewrite_model` applies it to a model already in memory (the exporter's, not written yet).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import metadata as md
from .._io import check_output_path, staged
from ..errors import ModelNotFoundError, SurgeryError
from ..merging import METHODS
from . import lean
from ..plugins import DOMAIN, DOMAIN_VERSION, OP_TYPE, OP_TYPE_CLS, OP_TYPES as PLUGIN_OPS

FORMS = md.MERGE_OPS
FORM_KEY = md.MERGE_OP  # model metadata: which form the file holds

# timm ViTs: blocks.N.token_merge; transformers: layers.N.token_merge (or encoder.layer.N.token_merge)
_SCOPE = re.compile(r"(?:^|[/.:\s])((?:blocks|layers|layer)\.(\d+)\.token_merge):")
_INDEX_OPS = {"TopK", "ArgMax", "ArgMin", "NonZero", *PLUGIN_OPS}


# --------------------------------------------------------------------------------------------
# Loading and saving with the metadata onnx-graphsurgeon does not carry
# --------------------------------------------------------------------------------------------


def import_graph(model) -> "gs.Graph":
    """``onnx.ModelProto`` -> ``gs.Graph`` with node metadata (``node.metadata``) and the model's
    ``vitmerge.*`` metadata (``graph.model_metadata``) attached; shapes inferred if missing."""
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    graph = gs.import_onnx(model)
    # import_onnx keeps the node order of the proto: pair them up to carry metadata_props over.
    for node, proto in zip(graph.nodes, model.graph.node):
        node.metadata = {e.key: e.value for e in proto.metadata_props}
    graph.model_metadata = {e.key: e.value for e in model.metadata_props}
    return graph


def load(path: Union[str, Path]) -> "gs.Graph":
    """Read an ONNX file into a ``gs.Graph`` ready for :func:`find_merges`."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no ONNX file at {str(path)!r}: export one with `vitmerge export`")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # a truncated or non-ONNX file
        raise SurgeryError(f"{path} is not a readable ONNX model ({e})") from None
    return import_graph(model)


def export_graph(graph) -> "onnx.ModelProto":
    """``gs.Graph`` -> ``onnx.ModelProto`` with node and model metadata restored."""
    model = gs.export_onnx(graph)
    by_name = {n.name: getattr(n, "metadata", None) for n in graph.nodes}
    for proto in model.graph.node:
        for k, v in (by_name.get(proto.name) or {}).items():
            e = proto.metadata_props.add()
            e.key, e.value = k, str(v)
    for k, v in getattr(graph, "model_metadata", {}).items():
        e = model.metadata_props.add()
        e.key, e.value = k, str(v)
    model.producer_name = "vitmerge"
    if any(n.domain == DOMAIN for n in graph.nodes) and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


# --------------------------------------------------------------------------------------------
# Finding the merge subgraphs
# --------------------------------------------------------------------------------------------


@dataclass
class MergeSubgraph:
    """One merge step of the graph, by its boundary tensors."""

    block: int
    scope: str  # the namespace prefix of the step, up to and including its module
    nodes: list  # the gs.Nodes recorded under blocks.N.token_merge
    x: "gs.Variable"
    metric: "gs.Variable"
    size: Optional["gs.Variable"]  # None: the first merge, size is all ones
    x_out: "gs.Variable"
    size_out: Optional["gs.Variable"]  # None: no later block reads it
    cls_attn: Optional["gs.Variable"] = None  # [B, N] class-token attention, for methods that read it
    method: Optional[str] = None
    protected: Optional[int] = None
    options: Dict = field(default_factory=dict)
    options_known: bool = False  # the file recorded the options (metadata vitmerge.options)

    @property
    def n_in(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_out(self) -> int:
        return int(self.x_out.shape[1])

    @property
    def r(self) -> int:
        return self.n_in - self.n_out

    @property
    def dim(self) -> int:
        return int(self.x.shape[-1])

    def __repr__(self) -> str:
        return (f"MergeSubgraph(block={self.block}, {self.n_in} -> {self.n_out} tokens, r={self.r}, "
                f"{len(self.nodes)} nodes, x={self.x.name}, metric={self.metric.name}, "
                f"size={self.size.name if self.size is not None else None}, x'={self.x_out.name}, "
                f"size'={self.size_out.name if self.size_out is not None else None})")


def _scope_of(node) -> Optional[tuple[int, str]]:
    ns = (getattr(node, "metadata", None) or {}).get("namespace", "")
    m = _SCOPE.search(ns)
    if m is None:
        return None
    end = ns.find("/", m.end())
    return int(m.group(2)), ns[: end if end >= 0 else len(ns)]


_FLOAT_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}


def _is_float(t) -> bool:
    if t.dtype is None:
        return False
    try:
        return _onnx_type(t) in _FLOAT_TYPES
    except (TypeError, ValueError, KeyError):
        return False


def _rank3(t) -> bool:
    return t.shape is not None and len(t.shape) == 3


def _static(t, axes=(1, 2)) -> bool:
    return all(isinstance(t.shape[a], (int, np.integer)) for a in axes)


def _reaches_index_op(start, inside: set) -> bool:
    """Whether data from tensor ``start`` flows (within the step) into an op that picks indices."""
    seen, todo = set(), [start]
    while todo:
        t = todo.pop()
        for n in t.outputs:
            if id(n) not in inside or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op in _INDEX_OPS:
                return True
            todo.extend(n.outputs)
    return False


def _roles(block: int, nodes: list, graph, method: Optional[str]) -> dict:
    """Boundary tensors of one step: which input is x, metric, size (cls_attn); which output is x', size'."""
    inside = {id(n) for n in nodes}
    produced = {id(t) for n in nodes for t in n.outputs}
    ins, outs = [], []
    for n in nodes:
        for t in n.inputs:
            if (isinstance(t, gs.Variable) and id(t) not in produced and _is_float(t) and t.shape is not None
                    and len(t.shape) in (2, 3) and t not in ins):
                ins.append(t)
        for t in n.outputs:
            used_outside = any(id(c) not in inside for c in t.outputs) or t in graph.outputs
            if used_outside and _is_float(t) and _rank3(t) and t not in outs:
                outs.append(t)
    where = f"merge step blocks.{block}.token_merge" + (f" (method {method})" if method else "")
    for t in ins + outs:
        if not _static(t, axes=range(1, len(t.shape))):
            raise SurgeryError(f"{where}: tensor {t.name} has shape {t.shape}; token counts must be static")

    plugin = [n for n in nodes if n.op in PLUGIN_OPS and n.domain == DOMAIN]
    if plugin:  # already in plugin form: the node's inputs say which is which
        node = plugin[0]
        x, metric = node.inputs[0], node.inputs[1]
        size = node.inputs[2] if id(node.inputs[2]) not in produced else None
        cls_attn = node.inputs[3] if len(node.inputs) > 3 else None
    else:
        rank2 = [t for t in ins if len(t.shape) == 2]
        ins = [t for t in ins if len(t.shape) == 3]
        rest = [t for t in ins if t.shape[-1] != 1]
        metric_c = [t for t in rest if _reaches_index_op(t, inside)]
        x_c = [t for t in rest if t not in metric_c]
        n = x_c[0].shape[1] if len(x_c) == 1 else None
        # shared helpers (the exporter de-duplicates constants across steps) differ in shape from these
        size_in = [t for t in ins if t.shape[-1] == 1 and t.shape[1] == n]
        cls_in = [t for t in rank2 if t.shape[1] == n]
        if len(x_c) != 1 or len(metric_c) != 1 or len(size_in) > 1 or len(cls_in) > 1:
            raise SurgeryError(
                f"{where} is not a TokenMerge step (x [B,N,D], metric [B,N,C], size [B,N,1] -> x', size'): found "
                f"x candidates {[t.name for t in x_c]}, metric candidates {[t.name for t in metric_c]}, "
                f"size candidates {[t.name for t in size_in]}, other inputs {[t.name for t in cls_in]}. "
                "Only the standard form exists for this graph"
            )
        x, metric = x_c[0], metric_c[0]
        size = size_in[0] if size_in else None
        cls_attn = cls_in[0] if cls_in else None
    x_out = [t for t in outs if t.shape[-1] == x.shape[-1] and t.shape[-1] != 1]
    size_out = [t for t in outs if t.shape[-1] == 1]
    if len(x_out) != 1 or len(size_out) > 1:
        raise SurgeryError(
            f"{where} is not a TokenMerge step: expected outputs x' [B,N',D] and optionally size' [B,N',1]; "
            f"found {[(t.name, t.shape) for t in outs]}. Only the standard form exists for this graph"
        )
    return dict(x=x, metric=metric, size=size, x_out=x_out[0], size_out=size_out[0] if size_out else None,
                cls_attn=cls_attn)


def find_merges(graph) -> List[MergeSubgraph]:
    """Every merge step of ``graph`` (from :func:`load` / :func:`import_graph`), in block order.

    Steps are found by the ``blocks.N.token_merge`` name scope the exporter records on each node:
    exactly one subgraph per merging block, none for blocks with r = 0 (they have no merge step).
    """
    meta = getattr(graph, "model_metadata", {}) or {}
    method = meta.get(md.METHOD)
    protected = int(meta[md.PROTECTED]) if md.PROTECTED in meta else None
    options = json.loads(meta.get(md.OPTIONS, "{}") or "{}")
    groups: Dict[int, list] = {}
    scopes: Dict[int, str] = {}
    for node in graph.nodes:
        s = _scope_of(node)
        if s is not None:
            groups.setdefault(s[0], []).append(node)
            scopes.setdefault(s[0], s[1])
    merges = []
    for block in sorted(groups):
        roles = _roles(block, groups[block], graph, method)
        merges.append(MergeSubgraph(block=block, scope=scopes[block], nodes=groups[block], method=method,
                                    protected=protected, options=dict(options),
                                    options_known=md.OPTIONS in meta, **roles))
    return merges


# --------------------------------------------------------------------------------------------
# Building blocks for the passes
# --------------------------------------------------------------------------------------------


class _Emitter:
    """Adds nodes to a graph under one merge step's scope, with unique names."""

    def __init__(self, graph, m: MergeSubgraph, tag: str):
        self.graph, self.m = graph, m
        self.prefix = f"vitmerge_{tag}_b{m.block}"
        self.count = 0
        self.namespace = f"{m.scope}/{tag}: vitmerge.exporter.surgery"

    def _name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}_{what}_{self.count}"

    def const(self, value, what: str = "const"):
        return gs.Constant(self._name(what), np.asarray(value))

    def op(self, op: str, inputs: list, attrs: Optional[dict] = None, outputs: int | list = 1,
           dtype=None, shape=None, domain: Optional[str] = None):
        """Append one node; returns its output variable (or the list, for several outputs)."""
        if isinstance(outputs, int):
            outputs = [gs.Variable(self._name(op.lower()), dtype=dtype, shape=shape) for _ in range(outputs)]
        node = gs.Node(op=op, name=self._name(op), attrs=attrs or {}, inputs=list(inputs), outputs=outputs)
        if domain:
            node.domain = domain
        node.metadata = {"namespace": f"{self.namespace}/{node.name}"}
        self.graph.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def i64(self, *values):
        return self.const(np.array(values, dtype=np.int64), "i64")

    def var(self, what: str, dtype=None, shape=None) -> "gs.Variable":
        """A new tensor of this step (the output of a node added later)."""
        return gs.Variable(self._name(what), dtype=dtype, shape=shape)


def _onnx_type(t) -> int:
    """The ONNX element type of a graph-surgeon tensor (its dtype is a numpy dtype or an ONNX enum)."""
    if isinstance(t.dtype, (int, np.integer)):
        return int(t.dtype)
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))


def _as_f32(e: "_Emitter", t):
    """``t`` as float32: itself, or a Cast (reduced-precision models: merge steps compute in float32)."""
    if t is None or _onnx_type(t) == onnx.TensorProto.FLOAT:
        return t
    return e.op("Cast", [t], {"to": onnx.TensorProto.FLOAT}, dtype=np.float32, shape=t.shape)


def _emit_into(e: "_Emitter", value, target) -> None:
    """Make ``target`` (an existing graph tensor) carry ``value`` (float32), casting to its type."""
    if _onnx_type(target) == onnx.TensorProto.FLOAT:
        e.op("Identity", [value], outputs=[target])
    else:
        e.op("Cast", [value], {"to": _onnx_type(target)}, outputs=[target])


def _detach(m: MergeSubgraph) -> None:
    """Cut x' and size' loose from the nodes that computed them (graph.cleanup() drops those)."""
    for t in (m.x_out, m.size_out):
        if t is not None:
            t.inputs.clear()


def _ones_size(e: _Emitter, x) -> "gs.Variable":
    """size = ones [B, N, 1] for the first merge step (the batch comes from x at run time)."""
    bn = e.op("Shape", [x], {"start": 0, "end": 2}, dtype=np.int64, shape=[2])
    shape = e.op("Concat", [bn, e.i64(1)], {"axis": 0}, dtype=np.int64, shape=[3])
    one = gs.Constant(e._name("one"), np.ones(1, np.float32))
    return e.op("ConstantOfShape", [shape], {"value": one}, dtype=np.float32, shape=[x.shape[0], x.shape[1], 1])


# Method forms whose merge step is not (x, metric, size) -> (x', size') (see merging.spec.FORMS).
_NO_SURGERY = {
    "slow_fast": "its slow-fast step keeps every token (inputs x and class attention, four outputs), not a TokenMerge",
    "pre_encoder": "it groups patches once before the encoder (vwt_merge), it has no per-block merge steps",
}


def _refuse_stepless(method: str, form: str) -> None:
    ms = METHODS.get(method)
    if ms is not None and ms.form in _NO_SURGERY:
        raise SurgeryError(f"the {form} form does not exist for method {method!r}: {_NO_SURGERY[ms.form]}; "
                           "use --merge-op standard")


def _need(m: MergeSubgraph, form: str) -> tuple[str, int]:
    if m.method is None or m.protected is None:
        raise SurgeryError(
            f"the {form} form needs the merge method and protected-token count, which this file's metadata "
            "lacks (keys vitmerge.method, vitmerge.protected): export it with `vitmerge export`"
        )
    return m.method, m.protected


# --------------------------------------------------------------------------------------------
# Pass: plugin form
# --------------------------------------------------------------------------------------------


def plugin_merge(graph, m: MergeSubgraph) -> None:
    """Replace one merge step by a single ``vitmerge::TokenMerge(x, metric, size) -> (x', size')``."""
    method, protected = _need(m, "plugin")
    _refuse_stepless(method, "plugin")
    ms = METHODS.get(method)
    if (ms is None or ms.options) and not m.options_known:  # a method without options has nothing to record
        raise SurgeryError(
            f"the plugin form re-runs method {method!r} from the node's attributes, but this file does not record "
            "the method's options (metadata key vitmerge.options): re-export it with a vitmerge that writes them"
        )
    e = _Emitter(graph, m, "tokenmerge")
    size = m.size if m.size is not None else _ones_size(e, m.x)
    size_out = m.size_out
    if size_out is None:  # the last merge: nobody reads size', but the node still produces it
        size_out = gs.Variable(e._name("size_out"), dtype=np.float32, shape=[m.x.shape[0], m.n_out, 1])
    _detach(m)
    # every attribute a STRING (r and protected as decimal text): the one type TensorRT's plugin API reads right
    # on every supported stack (see plugins/tensorrt_plugin.py)
    attrs = {"r": str(int(m.r)), "protected": str(int(protected)), "method": str(method),
             "options": json.dumps(m.options, sort_keys=True)}
    # the kernels take float32 (reduced-precision models: cast in and out, as the exported step does)
    inputs = [_as_f32(e, m.x), _as_f32(e, m.metric), _as_f32(e, size)] + \
        ([_as_f32(e, m.cls_attn)] if m.cls_attn is not None else [])
    op = OP_TYPE if m.cls_attn is None else OP_TYPE_CLS
    if _onnx_type(m.x_out) == onnx.TensorProto.FLOAT:
        e.op(op, inputs, attrs, outputs=[m.x_out, size_out], domain=DOMAIN)
    else:
        x32 = gs.Variable(e._name("x_out"), dtype=np.float32, shape=m.x_out.shape)
        e.op(op, inputs, attrs, outputs=[x32, size_out], domain=DOMAIN)
        _emit_into(e, x32, m.x_out)


def to_plugin(graph) -> int:
    """Pass: every merge step -> one ``vitmerge::TokenMerge`` node. Returns the number rewritten."""
    merges = find_merges(graph)
    for m in merges:
        plugin_merge(graph, m)
    graph.cleanup().toposort()
    return len(merges)


# --------------------------------------------------------------------------------------------
# Pass: native form (ToMe)
# --------------------------------------------------------------------------------------------


def _tome_slots(e: _Emitter, m: MergeSubgraph, protected: int, metric):
    """ToMe's plan as W [B, n_out - p, ta]: the output slot (after the p protected ones) of every
    unprotected A token, one-hot. Same scores and same TopK as the exported plan, so the same merges.

    Tokens alternate A (even) / B (odd); the p protected tokens are the first ones and keep slots
    0..p-1. Then come the unmerged A tokens (in index order; in score order when p = 0, as in the
    reference), then the unprotected B tokens; each of the r best-matching A tokens joins the slot of
    its most similar B token. The order matters: it decides the A/B split of the next step.
    """
    T, r, p = m.n_in, m.r, protected
    t1, t2, pa, pb = (T + 1) // 2, T // 2, (p + 1) // 2, p // 2
    ta, nu = t1 - pa, t1 - r - pa
    f32 = np.float32

    # scores between A and B on the unit-normalised metric, exactly as the exported graph computes them
    norm = e.op("ReduceL2", [metric, e.i64(-1)], {"keepdims": 1}, dtype=f32)
    unit = e.op("Div", [metric, norm], dtype=f32)
    a = e.op("Slice", [unit, e.i64(0), e.i64(T), e.i64(1), e.i64(2)], dtype=f32)
    b = e.op("Slice", [unit, e.i64(1), e.i64(T), e.i64(1), e.i64(2)], dtype=f32)
    scores = e.op("MatMul", [a, e.op("Transpose", [b], {"perm": [0, 2, 1]}, dtype=f32)], dtype=f32)
    if p:  # protected A rows and B columns never match
        mask = (np.arange(t1)[:, None] < pa) | (np.arange(t2)[None, :] < pb)
        scores = e.op("Where", [e.const(mask, "mask"), e.const(np.array(-np.inf, f32), "ninf"), scores], dtype=f32)
    best = e.op("ReduceMax", [scores, e.i64(-1)], {"keepdims": 0}, dtype=f32)  # [B, t1]
    partner = e.op("ArgMax", [scores], {"axis": -1, "keepdims": 0}, dtype=np.int64)  # [B, t1]
    if pa:
        best = e.op("Slice", [best, e.i64(pa), e.i64(t1), e.i64(1)], dtype=f32)  # [B, ta]
        partner = e.op("Slice", [partner, e.i64(pa), e.i64(t1), e.i64(1)], dtype=np.int64)
    ids = e.const(np.arange(ta, dtype=np.int64), "ids")
    if p:
        # the r A tokens that merge away: TopK with k = r, no full sort; the unmerged ones keep index order
        _, src = e.op("TopK", [best, e.i64(r)], {"axis": -1, "largest": 1, "sorted": 1}, outputs=2)
        src = e.op("Unsqueeze", [src, e.i64(-1)], dtype=np.int64)  # [B, r, 1]
        before = e.op("ReduceSum", [e.op("Cast", [e.op("Less", [src, ids])], {"to": 1}, dtype=f32), e.i64(1)],
                      {"keepdims": 0}, dtype=f32)  # [B, ta] merged tokens with a smaller index
        keep_slot = e.op("Sub", [e.const(np.arange(ta, dtype=f32), "pos"), before], dtype=f32)  # i - before[i]
    else:
        # nothing protected: as in the reference, the unmerged A tokens stay in score order (the order
        # decides which tokens fall into A and B at the next step), so this takes the full TopK
        _, order = e.op("TopK", [best, e.i64(ta)], {"axis": -1, "largest": 1, "sorted": 1}, outputs=2)
        src = e.op("Unsqueeze", [e.op("Slice", [order, e.i64(0), e.i64(r), e.i64(1)], dtype=np.int64), e.i64(-1)],
                   dtype=np.int64)  # [B, r, 1]
        unm = e.op("Unsqueeze", [e.op("Slice", [order, e.i64(r), e.i64(ta), e.i64(1)], dtype=np.int64), e.i64(-1)],
                   dtype=np.int64)  # [B, nu, 1]
        at = e.op("Cast", [e.op("Equal", [unm, ids])], {"to": 1}, dtype=f32)  # [B, nu, ta] one-hot
        keep_slot = e.op("ReduceSum", [e.op("Mul", [at, e.const(np.arange(nu, dtype=f32)[:, None], "rank")], dtype=f32),
                                       e.i64(1)], {"keepdims": 0}, dtype=f32)  # rank among the unmerged
    merged = e.op("ReduceSum", [e.op("Cast", [e.op("Equal", [src, ids])], {"to": 1}, dtype=f32), e.i64(1)],
                  {"keepdims": 0}, dtype=f32)  # [B, ta] 1 = merges away
    # kept A token: its slot among the unmerged; merged A token: its partner's slot
    b_slot = np.where(np.arange(t2) < pb, -1, nu + np.arange(t2) - pb).astype(f32)  # protected B: never a partner
    join_slot = e.op("Gather", [e.const(b_slot, "bslot"), partner], {"axis": 0}, dtype=f32)
    slot = e.op("Where", [e.op("Cast", [merged], {"to": 9}, dtype=bool), join_slot, keep_slot], dtype=f32)
    rows = e.const(np.arange(m.n_out - p, dtype=f32)[:, None], "rows")  # [n_out - p, 1]
    slot = e.op("Unsqueeze", [slot, e.i64(1)], dtype=f32)  # [B, 1, ta]
    return e.op("Cast", [e.op("Equal", [slot, rows], dtype=bool)], {"to": 1}, dtype=f32)  # [B, n_out - p, ta]


def _dense_tome_merge(graph, m: MergeSubgraph, protected: int) -> None:
    """The previous native ToMe step (a dense 0/1 matrix over the A tokens): kept for steps the lean
    form cannot write (more kept tokens than one TensorRT TopK sorts)."""
    e = _Emitter(graph, m, "native")
    f32 = np.float32
    T, D, p, nu = m.n_in, m.dim, protected, (m.n_in + 1) // 2 - m.r - (protected + 1) // 2
    size = m.size if m.size is not None else _ones_size(e, m.x)
    batch = m.x.shape[0]
    _detach(m)
    pa, pb = (p + 1) // 2, p // 2
    x, size = _as_f32(e, m.x), _as_f32(e, size)  # reduced-precision models merge in float32
    w = _tome_slots(e, m, p, _as_f32(e, m.metric))
    packed = e.op("Concat", [e.op("Mul", [x, size], dtype=f32), size], {"axis": -1}, dtype=f32)  # [B, T, D+1]
    pa_rows = e.op("Slice", [packed, e.i64(2 * pa), e.i64(T), e.i64(1), e.i64(2)], dtype=f32)  # unprotected A
    pb_rows = e.op("Slice", [packed, e.i64(2 * pb + 1), e.i64(T), e.i64(1), e.i64(2)], dtype=f32)  # unprotected B
    body = e.op("MatMul", [w, pa_rows], dtype=f32)  # [B, n_out - p, D+1]: unmerged A + merged-in A
    if nu:  # B tokens sit after the nu unmerged A slots
        pb_rows = e.op("Pad", [pb_rows, e.i64(0, nu, 0, 0, 0, 0)], {"mode": "constant"}, dtype=f32)
    body = e.op("Add", [body, pb_rows], dtype=f32)
    if p:
        prot = e.op("Slice", [packed, e.i64(0), e.i64(p), e.i64(1)], dtype=f32)
        body = e.op("Concat", [prot, body], {"axis": 1}, dtype=f32, shape=[batch, m.n_out, D + 1])
    sums_x = e.op("Slice", [body, e.i64(0), e.i64(D), e.i64(2)], dtype=f32)
    outputs = [m.size_out] if m.size_out is not None else 1
    sums_w = e.op("Slice", [body, e.i64(D), e.i64(D + 1), e.i64(2)], outputs=outputs)
    _emit_into(e, e.op("Div", [sums_x, sums_w], dtype=f32), m.x_out)


def _bipartite_step(e, m: MergeSubgraph, x, metric, size, protected: int, outs):
    return lean.tome_step(e, x, metric, size, m.n_in, m.r, protected, m.dim, outs=outs)


def _class_attention_step(e, m: MergeSubgraph, x, metric, size, protected: int, outs, min_weight: float):
    if m.cls_attn is None:
        raise SurgeryError(f"merge step blocks.{m.block}.token_merge (method {m.method}) has no class-attention "
                           "input: only the standard form exists for this graph")
    return lean.importance_step(e, x, metric, size, _as_f32(e, m.cls_attn), m.n_in, m.r, protected,
                                m.dim, int(m.metric.shape[-1]), min_weight, outs=outs)


@dataclass(frozen=True)
class _LeanKind:
    limits: Callable  # (n_in, r, protected) -> why the lean step cannot be written (None: it can)
    write: Callable  # (emitter, step, x, metric, size, protected, outs, **LeanStep.params) -> (x', size')
    over_limits: Optional[Callable] = None  # (graph, step, protected): the graph for steps over the limits


#: the hand-written steps (:mod:`.lean`) by ``LeanStep.kind`` -- what they compute, never a method's name
LEAN_KINDS: Dict[str, _LeanKind] = {
    "bipartite": _LeanKind(lean.tome_limits, _bipartite_step, over_limits=_dense_tome_merge),
    "class_attention": _LeanKind(lean.importance_limits, _class_attention_step),
}

#: methods whose whole merge step graph surgery writes by hand (their spec's ``lean``); every other method's
#: native form is the exporter's own graph with the merged rows added by a one-hot MatMul (no ScatterND)
LEAN_METHODS = tuple(name for name, ms in METHODS.items() if ms.lean is not None)


def _lean_step(method: Optional[str]):
    ms = METHODS.get(method)
    return None if ms is None else ms.lean


def lean_reason(m: MergeSubgraph) -> Optional[str]:
    """Why step ``m`` keeps the exporter's graph in the native form (None: the lean step is written)."""
    step = _lean_step(m.method)
    if step is None:
        return f"method {m.method!r} has no hand-written step"
    return LEAN_KINDS[step.kind].limits(m.n_in, m.r, m.protected or 0)


def native_merge(graph, m: MergeSubgraph) -> bool:
    """Rewrite one merge step into the lean native form (:mod:`.lean`: ~20 portable ops, no scatter).

    Returns False (step left as exported) for methods without a hand-written step or a step larger than
    one TensorRT TopK sorts; a bipartite (ToMe) step gets the previous dense form instead.
    """
    method, protected = _need(m, "native")
    _refuse_stepless(method, "native")
    step = _lean_step(method)
    if step is None:
        return False
    kind = LEAN_KINDS[step.kind]
    if lean_reason(m):
        if kind.over_limits is not None:
            kind.over_limits(graph, m, protected)
            return True
        return False
    e = _Emitter(graph, m, "native")
    f32 = onnx.TensorProto.FLOAT
    x, metric = _as_f32(e, m.x), _as_f32(e, m.metric)
    size = _as_f32(e, m.size)
    # write straight into the step's output tensors where they are float32 (no extra Identity)
    x_target = m.x_out if _onnx_type(m.x_out) == f32 else None
    s_target = m.size_out if m.size_out is not None and _onnx_type(m.size_out) == f32 else None
    _detach(m)
    x_new, s_new = kind.write(e, m, x, metric, size, protected, (x_target, s_target), **step.params)
    if x_target is None:
        _emit_into(e, x_new, m.x_out)
    if m.size_out is not None and s_target is None:
        _emit_into(e, s_new, m.size_out)
    return True


def to_native(graph) -> int:
    """Pass: every merge step -> the lean native step where one exists (:func:`native_merge`).
    Returns the number rewritten."""
    merges = find_merges(graph)
    n = sum(bool(native_merge(graph, m)) for m in merges)
    graph.cleanup().toposort()
    return n


PASSES: Dict[str, Callable] = {"native": to_native, "plugin": to_plugin}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@dataclass
class RewriteResult:
    path: Path
    form: str
    merges: int  # merge steps rewritten (0: the file was copied unchanged)


def graph_form(path: Union[str, Path]) -> str:
    """The form a file holds: ``plugin`` / ``native`` / ``standard`` (from metadata and nodes)."""
    model = md.load_proto(path)
    if any(o.domain == DOMAIN for o in model.opset_import):
        return "plugin"
    return md.read(model).get(FORM_KEY, "standard")


def _save(model, out: Path, stage: Path) -> Path:
    path = stage / out.name
    if model.ByteSize() > 1_800_000_000:  # over the protobuf cap: weights in a side file
        onnx.save(model, str(path), save_as_external_data=True, location=_data_file(out).name)
    else:
        onnx.save(model, str(path))
    return path


def _data_file(out: Path) -> Path:
    """The external-data file that goes with ``out`` when its weights exceed the protobuf cap."""
    return out.with_name(f"{out.name}.data")


def _copy(src: Path, out: Path, stage: Path) -> None:
    """Unchanged copy (with its external weights, if any) into the staging folder."""
    if src.resolve() == out.resolve():
        return
    proto = onnx.load(str(src), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        _save(onnx.load(str(src)), out, stage)
    else:
        shutil.copyfile(src, stage / out.name)


def _rewritten(graph, form: str, src) -> Tuple[Optional["onnx.ModelProto"], int]:
    """(the model of ``graph`` with every merge step in ``form``, merge steps rewritten); (None, 0) when the model
    stays as it is (no merge steps, or already in ``form``). ``src`` names the model in messages."""
    if form not in FORMS:
        raise SurgeryError(f"unknown graph form {form!r}; use one of: {', '.join(FORMS)}")
    current = graph.model_metadata.get(FORM_KEY, "standard")
    if any(n.domain == DOMAIN for n in graph.nodes):
        current = "plugin"
    if form == "standard":
        if current != "standard":
            raise SurgeryError(f"{src} holds the {current} form; the standard form cannot be rebuilt from it: "
                               "export the model again")
        return None, 0
    _refuse_stepless(graph.model_metadata.get(md.METHOD, ""), form)
    merges = find_merges(graph)
    if not merges:
        r = json.loads(graph.model_metadata.get(md.R, "0") or "0")
        if any(v > 0 for v in (r if isinstance(r, list) else [r])):
            method = graph.model_metadata.get(md.METHOD, "?")
            raise SurgeryError(f"{src} merges tokens (method {method}) but has no blocks.N.token_merge steps to "
                               f"rewrite: the {form} form does not exist for this method; use the standard form")
    if not merges or form == current:
        return None, 0
    n = PASSES[form](graph)
    graph.model_metadata[FORM_KEY] = form
    return export_graph(graph), n


def _check(model, form: str, src) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise SurgeryError(f"the {form} form of {src} fails the ONNX checker: {e}") from None


def rewrite_model(model: "onnx.ModelProto", form: str, name: str = "the model",
                  check: bool = True) -> Tuple["onnx.ModelProto", int]:
    """``model`` (in memory, under protobuf's 2 GB) with every merge step in ``form``: (the new model, merge steps
    rewritten). ``model`` itself comes back, unchanged, when there is nothing to rewrite (0 steps). The result
    goes through the ONNX checker (``check``); ``name`` names the model in messages."""
    out, n = _rewritten(import_graph(model), form, name)
    if out is None:
        return model, 0
    if check:
        _check(out, form, name)
    return out, n


def rewrite(in_path: Union[str, Path], out_path: Union[str, Path], form: str, check: bool = True) -> RewriteResult:
    """Write ``in_path`` with every merge step in ``form`` ("standard", "native" or "plugin") to ``out_path``.

    ``standard`` copies the file. A graph with no merge steps is copied unchanged in any form.
    ``in_path`` may equal ``out_path``. The result goes through the ONNX checker in a staging folder
    and replaces ``out_path`` only when complete: a failure leaves no (half-written) output.
    """
    if form not in FORMS:
        raise SurgeryError(f"unknown graph form {form!r}; use one of: {', '.join(FORMS)}")
    src, out = Path(in_path), check_output_path(out_path)
    model, n = _rewritten(load(src), form, src)
    with staged(_data_file(out), out) as stage:
        if model is None:
            _copy(src, out, stage)
        else:
            written = _save(model, out, stage)
            if check:
                _check(str(written), form, src)
    return RewriteResult(path=out, form=form, merges=n)


__all__ = [
    "FORMS", "DOMAIN", "OP_TYPE", "OP_TYPE_CLS", "PLUGIN_OPS", "SurgeryError", "MergeSubgraph", "RewriteResult", "load", "import_graph",
    "export_graph", "find_merges", "plugin_merge", "native_merge", "to_plugin", "to_native", "rewrite", "rewrite_model",
    "graph_form",
]
