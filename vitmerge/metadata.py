"""What an exported ONNX file says about itself: the ``vitmerge.*`` metadata keys, in one place.

``vitmerge export`` writes them (``metadata_props`` of the model), and every later step reads them
back instead of asking the user again: graph surgery (method, protected tokens, options), calibration
and eval (the preprocessing), profiling and packaging (the schedule), engine builds (all of it,
copied into the engine's metadata). Also here: the graph's input/output names and the one reader of
a file's image input shape.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

from .errors import ModelFileError

PREFIX = "vitmerge."

INPUT_SHAPE = "vitmerge.input_shape"  # one input without the batch axis: [C, H, W] image, [T, C, H, W] video, [time, mel] audio
DTYPE = "vitmerge.dtype"  # what the model computes in: fp32 | fp16 | bf16 (inputs and outputs are float32)
METHOD = "vitmerge.method"
R = "vitmerge.r"  # requested r per block (JSON list)
PROP_ATTN = "vitmerge.prop_attn"
PROTECTED = "vitmerge.protected"
TOKENS_IN = "vitmerge.tokens_in"
TOKENS_OUT = "vitmerge.tokens_out"
OPTIONS = "vitmerge.options"  # the method's options (JSON object): the plugin form re-runs the method with them
DATA_CONFIG = "vitmerge.data_config"  # timm data config: the preprocessing the model expects
MERGE_OP = "vitmerge.merge_op"  # graph form: one of MERGE_OPS
MERGE_OPS = ("standard", "native", "plugin")  # the graph forms a merge step can take (docs/surgery.md)
STEP_NODES = "vitmerge.step_nodes"  # nodes per merge step (JSON object: block -> count), as written
QUANTIZATION = "vitmerge.quantization"  # e.g. int8-qdq
CALIBRATION = "vitmerge.calibration"
CALIBRATION_IMAGES = "vitmerge.calibration_images"

#: names of the graph's input and output, fixed whatever the model's forward calls them
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BOXES_NAME = "boxes"  # a detector's second graph output ([B, Q, 4] cx, cy, w, h in [0, 1]); one name for every detector

#: the keys that describe the merge schedule (copied into engine metadata, shown by profile)
SCHEDULE_KEYS = (METHOD, R, PROP_ATTN, PROTECTED, TOKENS_IN, TOKENS_OUT, OPTIONS)

PathLike = Union[str, Path]


def load_proto(path: PathLike, what: str = "ONNX model"):
    """The ONNX model at ``path`` without its external weights; a clear error when it is not one."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{what} {str(p)!r} does not exist: export one with `vitmerge export`")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as e:  # truncated, or not ONNX at all
        raise ModelFileError(f"{str(p)!r} is not a readable ONNX model ({type(e).__name__}: {e})") from None


def read(proto) -> Dict[str, str]:
    """Every metadata entry of a model proto (or of the file at a path)."""
    if isinstance(proto, (str, Path)):
        proto = load_proto(proto)
    return {p.key: p.value for p in proto.metadata_props}


def write(proto, entries: Mapping[str, Any]) -> None:
    """Set metadata entries on ``proto`` (replacing existing keys); non-strings are stored as JSON."""
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in entries.items()}
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for k, v in keep + list(values.items()):
        e = proto.metadata_props.add()
        e.key, e.value = k, v


def parsed(meta: Mapping[str, str], strip: bool = True) -> Dict[str, Any]:
    """The ``vitmerge.*`` entries with JSON values decoded (and the prefix stripped)."""
    out: Dict[str, Any] = {}
    for k, v in meta.items():
        if not k.startswith(PREFIX):
            continue
        try:
            value: Any = json.loads(v)
        except (TypeError, ValueError):
            value = v
        out[k[len(PREFIX):] if strip else k] = value
    return out


def input_info(proto, name: str | None = None) -> Tuple[str, Tuple[int, ...]]:
    """(input name, static per-sample shape) of a model with one input: (C, H, W) for images, (T, C, H, W)
    for video, (time, mel) for audio; from the graph or, for graphs whose input shape was not kept, from
    ``vitmerge.input_shape``. ``name``: the input to read (default: the only non-initializer input)."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if name is not None:
        inputs = [i for i in inputs if i.name == name]
        if not inputs:
            raise ModelFileError(f"the model has no input named {name!r}: export it with `vitmerge export`")
    if len(inputs) != 1:
        raise ModelFileError(f"expected an image model with one input, found {len(inputs)}: "
                             f"{', '.join(i.name for i in inputs)}")
    inp = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) >= 2 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return inp.name, tuple(int(d) for d in dims[1:])
    meta = read(proto)
    if INPUT_SHAPE in meta:
        return inp.name, tuple(int(d) for d in json.loads(meta[INPUT_SHAPE]))
    raise ModelFileError(f"input {inp.name!r} has shape {dims}: need a static input such as [batch, C, H, W] "
                         "(only the batch axis may be dynamic)")


__all__ = [
    "PREFIX", "INPUT_SHAPE", "DTYPE", "METHOD", "R", "PROP_ATTN", "PROTECTED", "TOKENS_IN", "TOKENS_OUT", "OPTIONS",
    "DATA_CONFIG", "MERGE_OP", "MERGE_OPS", "STEP_NODES", "QUANTIZATION", "CALIBRATION", "CALIBRATION_IMAGES", "INPUT_NAME", "OUTPUT_NAME", "BOXES_NAME",
    "SCHEDULE_KEYS", "load_proto", "read", "write", "parsed", "input_info",
]
