"""torch -> ONNX with static per-layer token counts and a dynamic batch axis.

Exporter choice: torch.onnx.export(dynamo=True) (torch.export + onnxscript). The legacy
TorchScript exporter traces ToMe's argsort/scatter into a graph that ONNX Runtime rejects; the
dynamo path keeps the batch axis symbolic while every token count stays a Python int (the schedule),
so each layer's shape is static. The merge step is its own module (``blocks.N.token_merge``), whose
name scope the exporter records on every node: graph surgery finds the merge subgraphs by it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import onnx
import torch
from torch import nn

from .. import metadata as md
from ..data.transforms import data_config
from .._io import check_output_path  # noqa: F401  (re-exported: the exporter's API)
from ..models import input_shape
from ..models.family import family, forward_outputs
from ..models.precision import dtype_name, model_dtype
from ..models.vit import recording
from ..models.vit import scatter_free as scatter_free_merge

INPUT_NAME = md.INPUT_NAME
OUTPUT_NAME = md.OUTPUT_NAME
DEFAULT_OPSET = 18
LARGE_MODEL_BYTES = 1_800_000_000  # above this the weights go to an external-data file (2 GB protobuf cap)
TORCH_EXTERNAL_DATA_BYTES = 1536 * 1024 * 1024  # ONNXProgram.save writes external data above this anyway
TENSORRT_TOPK_MAX = 3840  # TensorRT's TopK layer takes k <= 3840 (long sequences: sorts of N/2 or N tokens)


DECISIONS = "merge_decisions."  # extra outputs of a verification export: one [B, N] assignment per merge step


class _Entry(nn.Module):
    """A fixed, named entry point: the graph input is called ``images`` whatever the model's forward.

    Inputs and outputs are float32 whatever the model computes in (cast at the edges). The outputs are
    the family's named outputs (:func:`output_names`: ``logits``, detectors also ``boxes``); with
    ``decisions`` they also hold every merge step's assignment, for verification.
    """

    def __init__(self, model: nn.Module, decisions: bool = False):
        super().__init__()
        self.model = model
        self.dtype = model_dtype(model)
        self.decisions = decisions

    def forward(self, images: torch.Tensor):
        outs = tuple(o.to(torch.float32) for o in forward_outputs(self.model, images.to(self.dtype)).values())
        if self.decisions:
            return (*outs, *self.model._vm_state.decisions)
        return outs[0] if len(outs) == 1 else outs


def output_names(model: nn.Module) -> list:
    """The graph's named outputs, in order: ``logits`` (and ``boxes`` for detectors)."""
    return list(family(model).output_names(model))


def decision_steps(model: nn.Module) -> int:
    """How many merge steps record a decision (steps with r > 0); 0 for a model without merging."""
    if getattr(model, "_vm_state", None) is None:
        return 0
    return sum(1 for s in family(model).merge_steps(model) if getattr(s, "r", 0) > 0)


def metadata(model: nn.Module) -> dict:
    """What the graph was built with, stored in the ONNX file's metadata_props (keys: vitmerge.metadata)."""
    info = getattr(model, "vitmerge", None)
    meta = {md.INPUT_SHAPE: json.dumps(list(input_shape(model))), md.DTYPE: dtype_name(model_dtype(model))}
    if info is not None:
        meta.update({
            md.METHOD: info.method,
            md.R: json.dumps(info.r),
            md.PROP_ATTN: json.dumps(info.prop_attn),
            md.PROTECTED: str(info.protected),
            md.TOKENS_IN: json.dumps(info.tokens_in),
            md.TOKENS_OUT: json.dumps(info.tokens_out),
        })
    try:  # the preprocessing the model expects: calibrate/eval read it from the file
        meta[md.DATA_CONFIG] = json.dumps(data_config(model))
    except Exception:  # not a model timm can describe: calibrate then asks for --config/--model
        pass
    if info is not None:
        try:  # method options travel with the graph (the plugin form re-runs the method with them)
            meta[md.OPTIONS] = json.dumps(info.options, sort_keys=True)
        except TypeError:
            pass
    return meta


def export_onnx_program(model: nn.Module, opset: int = DEFAULT_OPSET, example_batch: int = 2,
                        decisions: bool = False, scatter_free: bool = False):
    """Run the dynamo exporter; returns the ONNXProgram (not yet written anywhere).

    ``decisions``: add one output per merge step (``merge_decisions.K``: the assignment [B, N] int64),
    so verification compares merge decisions too; :func:`drop_decisions` removes them afterwards.
    ``scatter_free``: merge steps add their merged rows with a one-hot MatMul, no ScatterND (the native
    graph form of every method but tome, whose native form graph surgery writes).
    """
    model = model.eval()
    shape = input_shape(model)
    example = torch.randn(example_batch, *shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    n_dec = decision_steps(model) if decisions else 0
    names = output_names(model) + [f"{DECISIONS}{i}" for i in range(n_dec)]
    # The exporter is chatty (progress lines, deprecation warnings): keep the CLI readable.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), recording(model, n_dec > 0), \
            scatter_free_merge(model, scatter_free):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Entry(model, decisions=n_dec > 0),
            (example,),
            dynamo=True,
            dynamic_shapes={"images": {0: batch}},
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    return program


def drop_decisions(path: Path, proto: Optional[onnx.ModelProto] = None) -> int:
    """Remove the ``merge_decisions.*`` outputs from the file at ``path``, and every node and
    initializer only they needed (the file then computes exactly its outputs). Returns how many.
    ``proto``: the model of ``path`` in memory, edited in place instead (nothing is read or written)."""
    given = proto is not None
    if not given:
        proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    dropped = [o for o in g.output if o.name.startswith(DECISIONS)]
    if not dropped:
        return 0
    keep = [o for o in g.output if not o.name.startswith(DECISIONS)]
    del g.output[:]
    g.output.extend(keep)
    needed = {o.name for o in keep}
    live = []
    for node in reversed(g.node):  # the graph is topologically sorted: walk back from the outputs
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # names used inside subgraphs (If/Loop), if any
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for n in a.g.node for i in n.input)
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    if not given:
        onnx.save(proto, str(path))
    return len(dropped)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def is_large(model: nn.Module) -> bool:
    """Whether the exported file keeps its weights in an external-data file (over protobuf's 2 GB cap): such a
    model is passed between the export's steps as the written file, every other one in memory. torch's
    ``ONNXProgram.save`` already writes external data above 1.5 GiB of weights, so that is the limit here too."""
    return _param_bytes(model) > min(LARGE_MODEL_BYTES, TORCH_EXTERNAL_DATA_BYTES)


def program_proto(program, model: nn.Module) -> onnx.ModelProto:
    """The program as a model proto in memory, with the metadata :func:`save_program` writes (models under
    protobuf's cap: :func:`is_large` is False)."""
    proto = program.model_proto
    md.write(proto, metadata(model))
    proto.producer_name = "vitmerge"
    return proto


def save_program(program, model: nn.Module, workdir: Path, name: str) -> Path:
    """Write the program into ``workdir/name`` (+ external data for very large models) with metadata."""
    path = workdir / name
    large = is_large(model)
    program.save(str(path), external_data=large)
    proto = onnx.load(str(path), load_external_data=False)
    md.write(proto, metadata(model))
    proto.producer_name = "vitmerge"
    onnx.save(proto, str(path))
    return path


def large_topk(proto) -> list:
    """The k of every TopK node whose k is a constant above TensorRT's limit (:data:`TENSORRT_TOPK_MAX`)."""
    from onnx import numpy_helper

    consts = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    out = []
    for n in proto.graph.node:
        if n.op_type == "TopK" and len(n.input) > 1 and n.input[1] in consts:
            k = int(numpy_helper.to_array(consts[n.input[1]]).reshape(-1)[0])
            if k > TENSORRT_TOPK_MAX:
                out.append(k)
    return out


def output_files(output: Path) -> tuple:
    """Every file an export to ``output`` may write, the .onnx last: the targets of :func:`vitmerge._io.staged`.

    Large models keep their weights in external-data files next to the .onnx (the exporter names
    them after it); they are moved into place before the .onnx, so the model appears only complete.
    """
    return (output.with_name(output.name + ".data"), output)  # onnxscript names it <name>.onnx.data
