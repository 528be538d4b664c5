"""A Triton Inference Server model repository for an exported model or a TensorRT engine.

Layout written (the standard one)::

    REPO/NAME/config.pbtxt
    REPO/NAME/VERSION/model.onnx     (platform "onnxruntime_onnx", + external-data files if any)
    REPO/NAME/VERSION/model.plan     (platform "tensorrt_plan")
    REPO/NAME/plugins/lib*.so        (only when the graph needs a custom-op / plugin library)

Inputs and outputs (names, data types, dims) come from the ONNX graph itself, or for an engine from
the metadata JSON ``vitmerge build`` writes next to it. With a dynamic batch axis the dims are given
without it, ``max_batch_size`` is set and dynamic batching is on; a graph with a fixed batch gets
``max_batch_size: 0`` and its full shape.

Custom ``vitmerge::TokenMerge`` nodes need their kernels in the server:

* ONNX Runtime backend: the library is listed per model in ``model_operations { op_library_filename }``;
  the backend registers it on the model's session (RegisterCustomOpsLibrary). The path is the one the
  *server* sees, hence ``server_repo`` (e.g. ``/models`` inside the container).
* TensorRT backend: plugin libraries cannot be named in config.pbtxt. They load at server start, with
  ``--backend-config=tensorrt,plugins="/path/lib.so"`` or ``LD_PRELOAD``; the library is copied into
  the repository and the exact command is written into config.pbtxt as a comment and returned.

The model folder is assembled in a hidden staging folder inside REPO and renamed into place, so an
interrupted run never leaves a half-written model that Triton would try to load.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import onnx
from onnx.external_data_helper import uses_external_data

from .. import metadata as md
from .._io import staged, writable_dir
from ..request import ENGINE_SUFFIXES, ModelRef
from ..backends.trt import engine_metadata_path, load_engine_metadata, plugin_libraries
from ..errors import ModelFileError, ModelNotFoundError, OutputPathError, PackagingError, RuntimeMissingError
from ..plugins import DOMAIN

ONNX_PLATFORM = "onnxruntime_onnx"
TRT_PLATFORM = "tensorrt_plan"

# ONNX TensorProto element type -> Triton DataType
ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}
# names found in engine metadata (numpy, torch, TensorRT, Triton spellings) -> Triton DataType
_NAMED_TYPES = {
    "float32": "TYPE_FP32", "float": "TYPE_FP32", "fp32": "TYPE_FP32", "float16": "TYPE_FP16", "half": "TYPE_FP16",
    "fp16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "bf16": "TYPE_BF16", "float64": "TYPE_FP64", "double": "TYPE_FP64",
    "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}
_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_*
    dims: List[int]  # full shape, batch axis included; -1 where dynamic


@dataclass
class Signature:
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    custom_nodes: int = 0  # vitmerge::TokenMerge nodes (ONNX) / plugin layers (engine)
    plugin_libraries: List[str] = field(default_factory=list)  # known from engine metadata
    batch_limit: Optional[int] = None  # engine optimisation profile's max batch
    plugin_aot: bool = False  # engine's plugin kernels compiled ahead of time into the engine

    @property
    def dynamic_batch(self) -> bool:
        return all(t.dims and t.dims[0] == -1 for t in self.inputs + self.outputs)


@dataclass
class PackageResult:
    model_dir: Path
    config_path: Path
    model_file: Path
    config: str
    platform: str
    max_batch_size: int
    notes: List[str]
    launch: str  # how to start Triton on this repository


# ------------------------------------------------------------------------------------ signatures


def _onnx_dims(value_info) -> List[int]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        raise ModelFileError(f"tensor {value_info.name!r} has no shape in the graph; re-export the model")
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]


def _onnx_type(value_info) -> str:
    elem = value_info.type.tensor_type.elem_type
    if elem not in ONNX_TO_TRITON:
        raise ModelFileError(f"tensor {value_info.name!r} has ONNX element type {elem}, which Triton has no type for")
    return ONNX_TO_TRITON[elem]


def onnx_signature(path: Union[str, Path]) -> Signature:
    model = md.load_proto(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [TensorSpec(v.name, _onnx_type(v), _onnx_dims(v)) for v in model.graph.input if v.name not in inits]
    outputs = [TensorSpec(v.name, _onnx_type(v), _onnx_dims(v)) for v in model.graph.output]
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    custom = sum(1 for n in nodes if n.domain == DOMAIN)
    return Signature(inputs, outputs, custom_nodes=custom)


def _named_type(text: Any) -> str:
    s = str(text).strip()
    if s.startswith("TYPE_"):
        return s
    key = s.lower().split(".")[-1]  # "DataType.FLOAT", "torch.float16", "float32"
    if key in _NAMED_TYPES:
        return _NAMED_TYPES[key]
    raise ModelFileError(f"engine metadata names data type {text!r}, which vitmerge cannot map to a Triton type")


def _meta_tensors(items: Any, what: str, meta_path: Path) -> List[TensorSpec]:
    if isinstance(items, dict):  # {"images": {"dtype": ..., "shape": [...]}}
        items = [{"name": k, **v} for k, v in items.items()]
    if not isinstance(items, list) or not items:
        raise ModelFileError(f"engine metadata {meta_path.name} lists no {what}; rebuild with vitmerge build")
    out = []
    for it in items:
        try:
            shape = it.get("shape", it.get("dims"))
            out.append(TensorSpec(str(it["name"]), _named_type(it.get("dtype", it.get("data_type", "float32"))),
                                  [int(d) if int(d) > 0 else -1 for d in shape]))
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(
                f"engine metadata {meta_path.name}: each of {what} needs name, dtype and shape (got {it!r})"
            ) from None
    return out


def engine_signature(path: Union[str, Path], onnx_source: Optional[Union[str, Path]] = None) -> Signature:
    """Names, types and shapes of an engine: from the metadata JSON ``vitmerge build`` writes next to it
    (``inputs``/``outputs`` lists, or the source ``onnx`` path it records), or from ``onnx_source``."""
    path = Path(path)
    meta_path = engine_metadata_path(path)
    if meta_path is None:
        raise ModelNotFoundError(
            f"no metadata for engine {path.name}: expected {path.name}.json (or {path.stem}.json) next to it, as "
            "`vitmerge build` writes. Rebuild the engine with vitmerge build, or package the .onnx instead"
        )
    meta = load_engine_metadata(path) or {}
    if "inputs" in meta and "outputs" in meta:
        inputs = _meta_tensors(meta["inputs"], "inputs", meta_path)
        outputs = _meta_tensors(meta["outputs"], "outputs", meta_path)
    else:
        src = onnx_source or meta.get("onnx")
        if not src or not Path(src).is_file():
            raise ModelNotFoundError(
                f"engine metadata {meta_path.name} names no inputs/outputs, and the ONNX file the engine was built "
                f"from ({src or 'not recorded'}) is not there to read them from: pass it with --onnx SOURCE.onnx"
            )
        sig = onnx_signature(src)
        inputs, outputs = sig.inputs, sig.outputs
    limit = None
    for key in ("batch_profile", "profile"):
        prof = meta.get(key)
        if isinstance(prof, dict) and prof.get("max") is not None:
            limit = int(prof["max"])
            break
    else:
        if meta.get("max_batch") is not None:
            limit = int(meta["max_batch"])
    libs = plugin_libraries(meta)
    custom = int(meta.get("token_merge_nodes") or 0) or int(bool(meta.get("token_merge_plugin"))) \
        or int(meta.get("merge_op") == "plugin")
    return Signature(inputs, outputs, custom_nodes=custom, plugin_libraries=libs, batch_limit=limit,
                     plugin_aot=bool(meta.get("plugin_aot")))


# ------------------------------------------------------------------------------------ config text


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(kind: str, specs: Sequence[TensorSpec], strip_batch: bool) -> List[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(specs):
        dims = t.dims[1:] if strip_batch else t.dims
        body = ["  {", f"    name: {_q(t.name)}", f"    data_type: {t.data_type}"]
        if dims:
            body.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
        else:  # one value per batch item: Triton wants dims [1] reshaped to a scalar
            body += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        lines += body + ["  }" + ("," if i < len(specs) - 1 else "")]
    lines.append("]")
    return lines


def config_text(name: str, platform: str, sig: Signature, max_batch_size: int, dynamic_batching: bool = True,
                queue_delay_us: int = 0, instance_kind: str = "auto", instances: int = 1,
                op_libraries: Sequence[str] = (), comments: Sequence[str] = ()) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    lines = [f"# {c}" for c in comments]
    lines += [f"name: {_q(name)}", f"platform: {_q(platform)}", f"max_batch_size: {max_batch_size}"]
    strip = max_batch_size > 0
    lines += _tensor_block("input", sig.inputs, strip)
    lines += _tensor_block("output", sig.outputs, strip)
    if dynamic_batching and max_batch_size > 0:
        lines += ["dynamic_batching {"] + ([f"  max_queue_delay_microseconds: {queue_delay_us}"] if queue_delay_us else []) + ["}"]
    if instance_kind != "auto":
        kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}[instance_kind]
        lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}", "  }", "]"]
    elif instances != 1:
        lines += ["instance_group [", "  {", f"    count: {instances}", "  }", "]"]
    if op_libraries:
        lines += ["model_operations {"] + [f"  op_library_filename: {_q(p)}" for p in op_libraries] + ["}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ packaging


def _external_data_files(path: Path) -> List[str]:
    model = md.load_proto(path)
    files = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    files.add(entry.value)
    return sorted(files)


def package(
    model: Union[str, Path],
    repo: Union[str, Path],
    name: Optional[str] = None,
    max_batch: int = 32,
    version: int = 1,
    plugin_lib: Optional[Union[str, Path]] = None,
    server_repo: Optional[str] = None,
    instance_kind: str = "auto",
    instances: int = 1,
    queue_delay_us: int = 0,
    dynamic_batching: bool = True,
    overwrite: bool = False,
    onnx_source: Optional[Union[str, Path]] = None,
) -> PackageResult:
    """Write ``repo/name`` (config.pbtxt + version folder) for ``model`` (.onnx or TensorRT engine)."""
    src = Path(model)
    if not src.is_file():
        raise ModelNotFoundError(f"model {str(src)!r} does not exist")
    ref = ModelRef.parse(src)
    is_engine = ref.kind == "engine"
    if not ref.is_file:
        raise ModelNotFoundError(f"{src.name}: give an .onnx file or a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")
    # the file's stem: only the last suffix goes (x.int8.onnx -> x.int8, beside x.onnx -> x: no collision)
    name = name or re.sub(r"[^A-Za-z0-9_.\-]", "_", src.stem) or "model"
    if not _NAME_OK.match(name) or name in (".", ".."):
        raise OutputPathError(f"model name {name!r} may only use letters, digits, '_', '-' and '.'")
    if version < 1:
        raise PackagingError(f"--version must be >= 1 (Triton ignores version folders named 0); got {version}")
    if max_batch < 0:
        raise PackagingError(f"--max-batch must be >= 0; got {max_batch}")
    if instance_kind not in ("auto", "cpu", "gpu"):
        raise PackagingError(f"instance kind must be auto, cpu or gpu; got {instance_kind!r}")
    if instances < 1:
        raise PackagingError(f"--instances must be >= 1; got {instances}")
    repo = writable_dir(repo, "--repo")
    final = repo / name
    if final.exists() and not overwrite:
        raise OutputPathError(f"{str(final)!r} already exists; pass --overwrite to replace it, or choose another --name")

    sig = engine_signature(src, onnx_source) if is_engine else onnx_signature(src)
    platform = TRT_PLATFORM if is_engine else ONNX_PLATFORM
    if is_engine and instance_kind == "cpu":
        raise PackagingError("TensorRT engines run on GPUs only: use --instance-kind gpu or auto")
    notes: List[str] = []
    comments = [f"Triton model configuration written by vitmerge for {src.name}"]
    if sig.dynamic_batch and max_batch > 0:
        if sig.batch_limit is not None and max_batch > sig.batch_limit:
            raise PackagingError(
                f"--max-batch {max_batch} exceeds the engine's optimisation profile (max batch {sig.batch_limit}); "
                f"use --max-batch {sig.batch_limit} or rebuild the engine with a larger --max-batch"
            )
        mbs = max_batch
    else:
        mbs = 0
        if not sig.dynamic_batch:
            fixed = sorted({t.dims[0] if t.dims else None for t in sig.inputs + sig.outputs}, key=str)
            notes.append(f"the graph has a fixed batch axis ({fixed}): max_batch_size 0, full shapes, no dynamic batching")
    server_root = server_repo if server_repo is not None else str(repo.resolve())
    server_root = server_root.rstrip("/") or "/"

    libs: List[Path] = []
    op_libraries: List[str] = []
    launch = f"tritonserver --model-repository={server_root}"
    if sig.custom_nodes:
        if plugin_lib is not None:
            libs = [Path(plugin_lib)]
        elif is_engine:
            libs = [Path(p) for p in sig.plugin_libraries]
        for lib in libs:
            if not lib.is_file():
                raise ModelNotFoundError(f"plugin library {str(lib)!r} does not exist")
        in_server = [f"{server_root}/{name}/plugins/{lib.name}" for lib in libs]
        if not is_engine:
            if not libs:
                raise RuntimeMissingError(
                    f"{src.name} has {sig.custom_nodes} vitmerge::TokenMerge custom node(s): Triton's ONNX Runtime "
                    "backend needs a compiled custom-op library for them (model_operations.op_library_filename), and "
                    "vitmerge's own kernel calls back into Python (onnxruntime-extensions), which Triton's backend "
                    "cannot run. Package the plugin-free form (vitmerge export --merge-op native or standard), or "
                    "give a compiled library with --plugin-lib PATH"
                )
            op_libraries = in_server
            notes.append(f"custom-op library listed in model_operations: {', '.join(in_server)}")
        elif libs:
            launch = (f"tritonserver --model-repository={server_root} "
                      f"--backend-config=tensorrt,plugins=\"{';'.join(in_server)}\"")
            comments += ["This engine uses the TokenMerge TensorRT plugin; the TensorRT backend loads plugins at",
                         "server start (they cannot be listed in this file). Start Triton with:", f"  {launch}",
                         f"or: LD_PRELOAD={':'.join(in_server)} tritonserver --model-repository={server_root}"]
            notes.append("TensorRT plugin library must be loaded at server start: " + launch)
        elif sig.plugin_aot:
            notes.append("engine's TokenMerge plugin kernels were compiled ahead of time into the engine; nothing to load")
        else:
            raise RuntimeMissingError(
                f"{src.name} uses the TokenMerge TensorRT plugin in its Python (JIT) form, which Triton's TensorRT "
                "backend cannot run (it loads engines without Python). Build the engine from the plugin-free graph "
                "(vitmerge export --merge-op native, then vitmerge build), or give a compiled plugin library with "
                "--plugin-lib PATH"
            )

    text = config_text(name, platform, sig, mbs, dynamic_batching=dynamic_batching, queue_delay_us=queue_delay_us,
                       instance_kind="gpu" if (is_engine and instance_kind == "auto") else instance_kind,
                       instances=instances, op_libraries=op_libraries, comments=comments)

    with staged(final) as stage:  # the model folder appears whole, replacing an --overwrite'n one at once
        folder = stage / name
        vdir = folder / str(version)
        vdir.mkdir(parents=True)
        target = vdir / ("model.plan" if is_engine else "model.onnx")
        shutil.copyfile(src, target)
        if not is_engine:
            for rel in _external_data_files(src):
                data = src.parent / rel
                if not data.is_file():
                    raise ModelFileError(f"{src.name} keeps weights in {rel}, which is missing next to it")
                (vdir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(data, vdir / rel)
        if libs:
            (folder / "plugins").mkdir()
            for lib in libs:
                shutil.copyfile(lib, folder / "plugins" / lib.name)
        (folder / "config.pbtxt").write_text(text)
    return PackageResult(model_dir=final, config_path=final / "config.pbtxt", model_file=final / str(version) / target.name,
                         config=text, platform=platform, max_batch_size=mbs, notes=notes, launch=launch)


__all__ = ["package", "PackageResult", "Signature", "TensorSpec", "onnx_signature", "engine_signature",
           "config_text", "ONNX_PLATFORM", "TRT_PLATFORM", "ONNX_TO_TRITON"]
