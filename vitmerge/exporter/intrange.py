"""The range of every integer a file computes: does it stay inside int32?

TensorRT computes INT64 as INT32 in many layers (and so does at least one common CPU runtime), while
ONNX Runtime computes int64 exactly: an integer that leaves the int32 range (a packed sort key, a
large index product) wraps silently there and the file computes something else, yet ONNX Runtime --
and so ``verify`` -- sees nothing wrong. This module runs the file in ONNX Runtime with every integer
tensor exposed as an extra output (graph optimisations off, so the tensors are the file's own), on
given inputs, and records each one's min and max.

:func:`integer_ranges` returns one :class:`IntRange` per integer tensor; :func:`int32_violations`
the ones outside int32. The export verification runs it on its own inputs and refuses a file with a
violation (naming the node); ``vitmerge check F.onnx --target tensorrt`` runs it on random inputs.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


@dataclass
class IntRange:
    node: str  # the node that computes the tensor
    op: str
    tensor: str
    lo: int
    hi: int

    @property
    def ok(self) -> bool:
        return INT32_MIN <= self.lo and self.hi <= INT32_MAX

    def describe(self) -> str:
        return f"{self.op} node {self.node} computes {self.tensor} in [{self.lo}, {self.hi}]"


def _integer_outputs(model: onnx.ModelProto) -> List[tuple]:
    """(node name, op, tensor name, value_info) of every integer tensor a node of the main graph computes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a file shape inference cannot read: nothing to say about its integers
        return []
    g = inferred.graph
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    out = []
    for i, n in enumerate(g.node):
        for t in n.output:
            vi = infos.get(t)
            if t and vi is not None and vi.type.tensor_type.elem_type in _INT_TYPES:
                out.append((n.name or f"{n.op_type}_{i}", n.op_type, t, vi))
    return out


def integer_ranges(path: Union[str, Path], inputs: Iterable[np.ndarray], input_name: str = None,
                   proto: Optional[onnx.ModelProto] = None) -> List[IntRange]:
    """Min / max of every integer tensor the file computes, over the given input batches (ONNX Runtime
    CPU, graph optimisations off). Custom-domain nodes (vitmerge::TokenMerge) are not looked into.
    ``proto``: the model of ``path`` in memory (not changed; the file is then not read)."""
    from ..backends.ort import session

    path = Path(path)
    if proto is None:
        model = onnx.load(str(path))
    else:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
    ints = _integer_outputs(model)
    if not ints:
        return []
    existing = {o.name for o in model.graph.output}
    for _, _, t, vi in ints:
        if t not in existing:
            model.graph.output.append(vi)
    ranges = {t: [None, None, node, op] for node, op, t, _ in ints}
    with tempfile.TemporaryDirectory(prefix="vitmerge-int-") as d:
        probe = Path(d) / path.name
        if model.ByteSize() > 1_800_000_000:  # over protobuf's cap: ONNX Runtime reads it from a file, weights beside it
            onnx.save(model, str(probe), save_as_external_data=True)
            sess = session(probe, optimization="none")
        else:  # handed over in memory: nothing is written or read back
            sess = session(probe, optimization="none", proto=model)
        name = input_name or sess.get_inputs()[0].name
        names = [o.name for o in sess.get_outputs()]
        for x in inputs:
            for n, v in zip(names, sess.run(None, {name: x})):
                if n not in ranges or np.asarray(v).size == 0:
                    continue
                v = np.asarray(v)
                lo, hi = int(v.min()), int(v.max())
                r = ranges[n]
                r[0] = lo if r[0] is None else min(r[0], lo)
                r[1] = hi if r[1] is None else max(r[1], hi)
    return [IntRange(node, op, t, lo, hi) for t, (lo, hi, node, op) in ranges.items() if lo is not None]


def int32_violations(path: Union[str, Path], inputs: Iterable[np.ndarray]) -> List[IntRange]:
    """The integer tensors of :func:`integer_ranges` that leave the int32 range."""
    return [r for r in integer_ranges(path, inputs) if not r.ok]


def random_inputs(path: Union[str, Path], batch_sizes: Sequence[int] = (1, 4), seed: int = 0,
                  proto: Optional[onnx.ModelProto] = None) -> List[np.ndarray]:
    """Random float32 batches shaped like the file's one input: its batch axis set to each size (a file
    with a static batch axis gets one batch of that size). ``proto``: the model of ``path`` in memory."""
    from .. import metadata as md

    proto = md.load_proto(path) if proto is None else proto
    name, shape = md.input_info(proto)
    inp = next(i for i in proto.graph.input if i.name == name)
    dim0 = inp.type.tensor_type.shape.dim[0] if inp.type.tensor_type.shape.dim else None
    if dim0 is not None and dim0.HasField("dim_value") and dim0.dim_value > 0:
        batch_sizes = (int(dim0.dim_value),)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(b), *shape), dtype=np.float32) for b in batch_sizes]


__all__ = ["IntRange", "integer_ranges", "int32_violations", "random_inputs", "INT32_MIN", "INT32_MAX"]
