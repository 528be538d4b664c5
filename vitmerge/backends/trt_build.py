"""TensorRT, the build side: build an engine from ONNX, write its metadata JSON and read it back.

The run side is :mod:`.trt` (:class:`~vitmerge.backends.trt.TrtRunner`), as Polygraphy separates loaders
from runners; :mod:`.trt` re-exports every name here, so ``vitmerge.backends.trt`` serves both.

Supported: TensorRT 10.16 to 11.x (``pip install 'vitmerge[tensorrt]'``). Nothing here has run on a
GPU yet; the tests drive this code with a stand-in for TensorRT's compiled module (and TensorRT's own
``tensorrt.plugin`` Python sources) on machines without one.

Precision follows the ONNX file (:func:`precision_plan`). A file that carries FP16/BF16 tensors or
Q/DQ (INT8) nodes is built as a *strongly typed* network: every tensor keeps the type the file gives
it, and no precision flag is set (TensorRT does not allow them on strongly typed networks). The only
weakly typed build is ``--fp16`` on a float32 file with TensorRT 10.x, which sets ``BuilderFlag.FP16``
(and ``INT8`` for its Q/DQ nodes) so the builder may pick FP16 kernels; TensorRT 11 removed those
flags, so there ``--fp16`` needs a file that already is FP16. INT8 comes only from Q/DQ files
(``vitmerge calibrate``): TensorRT's implicit calibration (deprecated in 10.x, removed in 11) is not
used, so no calibration cache exists.

``build_engine`` checks everything it can without TensorRT first (files, batch range, precision
requests), then needs TensorRT and a CUDA GPU. It writes ``<output>`` (the serialized engine) and
its metadata JSON next to it (``<output name>.json``, e.g. ``vit.engine.json``: TensorRT version,
GPU, precision and typing, batch profile, the engine's ``inputs``/``outputs`` (name, dtype, shape),
plugin use, the vitmerge schedule from the ONNX metadata), both staged and renamed into place only on
success, the metadata last. :func:`load_engine_metadata` reads it back (also the older
``<stem>.json`` name).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .. import metadata as md
from .._io import staged
from ..errors import EngineBuildError, ModelFileError, OutputPathError, RuntimeMissingError, UsageError
from ..plugins.tensorrt_plugin import SUPPORTED_TEXT, prepare_onnx, register, require_tensorrt, token_merge_nodes
from .base import ENGINE_SUFFIXES, ScheduleInfo, schedule_info

INPUT_NAME = md.INPUT_NAME
CALIBRATE_HINT = ("make an INT8 Q/DQ file from real images with `vitmerge calibrate MODEL.onnx --data DIR --output "
                  "MODEL.int8.onnx` and build that")


@dataclass
class BuildRequest:
    onnx_path: Path
    output: Path
    fp16: bool = False
    int8: bool = False
    calib_dir: Optional[Path] = None  # TensorRT's implicit INT8 calibration: no longer supported (an error)
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gb: float = 4.0

    @property
    def metadata_path(self) -> Path:
        return metadata_path_for(self.output)


@dataclass
class BuildResult:
    engine: Path
    metadata: Path
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# What the ONNX file carries, and the build that follows from it
# --------------------------------------------------------------------------------------------

_ONNX_FLOAT16, _ONNX_BFLOAT16, _ONNX_DOUBLE = 10, 16, 11  # onnx.TensorProto element types


@dataclass(frozen=True)
class FileTypes:
    """The reduced-precision content of an ONNX file."""

    fp16: bool = False  # FLOAT16 tensors / initializers / casts
    bf16: bool = False
    qdq: bool = False  # QuantizeLinear / DequantizeLinear nodes (explicit INT8)
    fp64: bool = False  # DOUBLE tensors: TensorRT has no float64 layers

    @property
    def reduced(self) -> bool:
        return self.fp16 or self.bf16


def file_types(model) -> FileTypes:
    """Which element types and quantization nodes an ONNX model holds (its graph and functions)."""
    graph = model.graph
    elems = set()
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        elems.add(v.type.tensor_type.elem_type)
    elems.update(t.data_type for t in graph.initializer)
    nodes = list(graph.node) + [n for f in model.functions for n in f.node]
    qdq = False
    for n in nodes:
        qdq = qdq or n.op_type in ("QuantizeLinear", "DequantizeLinear")
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to":
                elems.add(a.i)
            elif a.name == "value" and a.HasField("t"):
                elems.add(a.t.data_type)
    return FileTypes(fp16=_ONNX_FLOAT16 in elems, bf16=_ONNX_BFLOAT16 in elems, qdq=qdq, fp64=_ONNX_DOUBLE in elems)


@dataclass(frozen=True)
class PrecisionPlan:
    """How the network is created and configured for a request, a file and a TensorRT."""

    strongly_typed: bool
    flags: Tuple[str, ...]  # BuilderFlag names to set (weakly typed builds only)
    precision: str  # what the engine computes in, e.g. "fp32", "fp16", "int8+fp32", "int8+fp16"
    #: BuilderFlag names to clear. TF32 is on by default in TensorRT: an "fp32" engine would run its float32
    #: matrix products in TF32 (10 mantissa bits), and so would the merge steps of every engine (they stay
    #: float32 in reduced-precision files), which can flip near-tied merge decisions against float32
    cleared: Tuple[str, ...] = ("TF32",)

    def to_dict(self) -> Dict[str, Any]:
        return {"precision": self.precision, "typing": "strong" if self.strongly_typed else "weak",
                "builder_flags": list(self.flags), "cleared_builder_flags": list(self.cleared),
                "tf32": "TF32" not in self.cleared}


def precision_plan(req: BuildRequest, types: FileTypes, trt) -> PrecisionPlan:
    """The network typing and builder flags for ``req`` (see the module docstring).

    ``trt`` is the imported tensorrt module: what it offers (``BuilderFlag.FP16`` exists in 10.x,
    not in 11; ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) decides, not its version string."""
    version = getattr(trt, "__version__", "?")
    weak_flags = hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "INT8")
    if req.int8 and not types.qdq:
        raise UsageError(f"--int8 needs a file with Q/DQ nodes (explicit quantization): {CALIBRATE_HINT}")
    floating = "bf16" if types.bf16 and not types.fp16 else "fp16" if types.reduced else "fp32"
    if req.fp16 and not types.reduced:
        if weak_flags:  # TensorRT 10: let the builder pick FP16 kernels for a float32 file
            flags = ("FP16", "INT8") if types.qdq else ("FP16",)
            return PrecisionPlan(False, flags, "int8+fp16" if types.qdq else "fp16")
        raise UsageError(
            f"--fp16 on a float32 file: TensorRT {version} builds strongly typed networks only, which compute in "
            "the types the ONNX file gives (BuilderFlag.FP16 was removed in TensorRT 11). Build without --fp16 "
            "(FP32), give an FP16 ONNX file, or use TensorRT 10.x"
        )
    if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        raise RuntimeMissingError(f"TensorRT {version} cannot build strongly typed networks; use {SUPPORTED_TEXT}")
    return PrecisionPlan(True, (), f"int8+{floating}" if types.qdq else floating)


def validate(req: BuildRequest):
    """Everything that can be checked without TensorRT. Returns the loaded ONNX model."""
    if req.calib_dir is not None:
        raise UsageError(
            "--calib-dir (TensorRT's implicit INT8 calibration) is not supported: it is deprecated in TensorRT 10 "
            f"and removed in 11. Instead {CALIBRATE_HINT} (--int8 is then optional)"
        )
    model = md.load_proto(req.onnx_path)
    if INPUT_NAME not in [i.name for i in model.graph.input]:
        raise ModelFileError(f"{req.onnx_path} has no input named {INPUT_NAME!r}: export it with `vitmerge export`")
    if req.output.suffix not in ENGINE_SUFFIXES:
        raise OutputPathError(f"output {str(req.output)!r} must end in .engine (or .plan / .trt)")
    if not req.output.parent.is_dir():
        raise OutputPathError(f"output directory {str(req.output.parent)!r} does not exist: create it first")
    if not 1 <= req.min_batch <= req.opt_batch <= req.max_batch:
        raise UsageError(
            f"batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch; got "
            f"{req.min_batch}, {req.opt_batch}, {req.max_batch}"
        )
    if req.workspace_gb <= 0:
        raise UsageError(f"--workspace-gb must be positive, got {req.workspace_gb}")
    if req.int8 and not file_types(model).qdq:
        raise UsageError(f"--int8 needs a file with Q/DQ nodes (explicit quantization): {CALIBRATE_HINT}")
    scatter_add = [n.name for n in model.graph.node if n.op_type == "ScatterND"
                   and any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)]
    if scatter_add:
        raise EngineBuildError(
            f"{req.onnx_path.name} adds merged tokens with ScatterND(reduction=add) ({len(scatter_add)} nodes, e.g. "
            f"{scatter_add[0]}), which TensorRT's ONNX parser does not take (a file written by an older vitmerge or another tool): export it "
            "again with `vitmerge export` (every form it writes adds merged rows with a one-hot MatMul); "
            "`vitmerge check FILE --target tensorrt` lists such nodes"
        )
    return model


def gpu_name() -> str:
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    raise RuntimeMissingError("no CUDA GPU found: TensorRT engines are built on (and for) an NVIDIA GPU")


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8", "INT4": "int4", "FP4": "float4"}


def dtype_name(dtype) -> str:
    """A TensorRT DataType as the name the engine metadata uses (numpy's spelling)."""
    key = getattr(dtype, "name", None) or str(dtype).split(".")[-1]
    return _DTYPE_NAMES.get(key, key.lower())


def _tensor_entry(t) -> Dict[str, Any]:
    return {"name": t.name, "dtype": dtype_name(t.dtype), "shape": [int(d) for d in tuple(t.shape)]}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def build_engine(req: BuildRequest, on_step: Optional[Callable[[str], None]] = None) -> BuildResult:
    """Build and write the engine + metadata JSON. Raises a VitmergeError subclass on any problem,
    leaving no output file behind."""
    step = on_step or (lambda s: None)
    model = validate(req)
    types = file_types(model)
    trt = require_tensorrt()
    plan = precision_plan(req, types, trt)
    gpu = gpu_name()
    if types.fp64:
        warnings.warn(f"{req.onnx_path.name} holds float64 tensors; TensorRT has no float64 layers, so the parser "
                      "must cast them to float32 or refuse them")
    merge_nodes = token_merge_nodes(model)
    if merge_nodes:
        step("registering the TokenMerge plugin")
        register()
        payload = prepare_onnx(model)
    else:
        payload = model.SerializeToString()  # the model validate() loaded: the file is not read again

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    step("parsing ONNX")
    try:
        ok = parser.parse(payload, str(req.onnx_path))  # the path locates external weights, if any
    except Exception as e:  # a plugin callback or the bindings raising instead of reporting
        raise EngineBuildError(f"TensorRT could not parse {req.onnx_path}: {_one_line(e)}") from None
    if not ok:
        errors = "; ".join(_one_line(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {req.onnx_path}: {errors or 'no reason given'}")

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    inp = next((t for t in inputs if t.name == INPUT_NAME), None)
    if inp is None:
        raise EngineBuildError(f"TensorRT's network of {req.onnx_path.name} has no input {INPUT_NAME!r}")
    chw = tuple(int(d) for d in tuple(inp.shape)[1:])
    if any(d < 0 for d in chw):
        raise ModelFileError(f"input {INPUT_NAME!r} of {req.onnx_path.name} has shape {tuple(inp.shape)}: only the "
                             "batch axis may be dynamic; re-export with `vitmerge export`")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (req.min_batch, *chw), (req.opt_batch, *chw), (req.max_batch, *chw))
    config.add_optimization_profile(profile)
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    step(f"building the {plan.precision} engine (minutes)")
    t0 = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as e:
        raise EngineBuildError(f"TensorRT failed to build the engine: {_one_line(e)}") from None
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine (see the TensorRT messages above)")
    info = {
        "engine": req.output.name,
        "onnx": str(Path(req.onnx_path).resolve()),
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        **plan.to_dict(),
        "batch_profile": {"min": req.min_batch, "opt": req.opt_batch, "max": req.max_batch},
        "inputs": [_tensor_entry(t) for t in inputs],
        "outputs": [_tensor_entry(t) for t in outputs],
        "token_merge_plugin": bool(merge_nodes),
        "token_merge_nodes": len(merge_nodes),
        "plugin_aot": False,  # the TokenMerge plugin is JIT only: the engine needs Python + vitmerge where it runs
        "schedule": md.parsed(md.read(model)),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    write_engine(req.output, bytes(serialized), info)
    return BuildResult(engine=req.output, metadata=req.metadata_path, info=info)


# --------------------------------------------------------------------------------------------
# Engine files and their metadata
# --------------------------------------------------------------------------------------------


def metadata_path_for(engine: Union[str, Path]) -> Path:
    """Where :func:`write_engine` puts an engine's metadata: ``<engine name>.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_engine(path: Union[str, Path], serialized: bytes, info: Dict[str, Any]) -> Path:
    """Write the engine and its metadata JSON, staged; the metadata (the completion marker) goes last."""
    path = Path(path)
    meta = metadata_path_for(path)
    with staged(path, meta) as stage:
        (stage / path.name).write_bytes(serialized)
        (stage / meta.name).write_text(json.dumps(info, indent=2) + "\n")
    return path


def engine_metadata_path(engine: Union[str, Path]) -> Optional[Path]:
    """``model.engine.json`` (preferred) or ``model.json`` next to the engine, if either exists."""
    engine = Path(engine)
    for cand in (engine.with_name(engine.name + ".json"), engine.with_suffix(".json")):
        if cand.is_file():
            return cand
    return None


def load_engine_metadata(engine: Union[str, Path]) -> Optional[Dict[str, Any]]:
    p = engine_metadata_path(engine)
    if p is None:
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"engine metadata {str(p)!r} is not valid JSON ({e}); rebuild with vitmerge build") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"engine metadata {str(p)!r} must be a JSON object; rebuild with vitmerge build")
    return meta


def plugin_libraries(meta: Optional[Dict[str, Any]]) -> List[str]:
    """Shared libraries an engine needs loaded (``plugin_library`` or ``plugins`` in its metadata)."""
    if not meta:
        return []
    libs = meta.get("plugins") or meta.get("plugin_libraries") or []
    if isinstance(libs, str):
        libs = [libs]
    one = meta.get("plugin_library")
    if one:
        libs = [one, *libs]
    return [str(x) for x in libs if x]


def engine_schedule(meta: Optional[Dict[str, Any]]) -> ScheduleInfo:
    """The :class:`ScheduleInfo` of an engine: the ONNX metadata its build copied (``schedule``), through the same
    :func:`schedule_info` as the ONNX file's. An engine built from an unmerged export is unmerged (r_mean 0.0);
    one without metadata, or built from a file vitmerge did not write, is unknown."""
    if not meta:
        return schedule_info(None)
    sched = dict(meta["schedule"]) if isinstance(meta.get("schedule"), dict) else {}
    sched.update({k: meta[k] for k in ("method", "r") if k in meta})  # top-level keys (older metadata) win
    return schedule_info(sched)


__all__ = ["BuildRequest", "BuildResult", "build_engine", "validate", "file_types", "precision_plan", "FileTypes",
           "PrecisionPlan", "dtype_name", "write_engine", "metadata_path_for", "engine_metadata_path",
           "load_engine_metadata", "plugin_libraries", "engine_schedule", "gpu_name", "ENGINE_SUFFIXES",
           "CALIBRATE_HINT", "INPUT_NAME"]
