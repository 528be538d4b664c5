"""TensorRT: build an engine from ONNX, read and write its metadata, run it behind the runner interface.

``build_engine`` checks everything it can without TensorRT first (files, batch range, INT8 inputs),
then needs TensorRT and a CUDA GPU. It writes ``<output>`` (the serialized engine) and its metadata
JSON next to it (``<output name>.json``, e.g. ``vit.engine.json``: TensorRT version, GPU, precision,
batch profile, the vitmerge schedule from the ONNX metadata), both staged and renamed only on success,
the metadata last. :func:`load_engine_metadata` reads it back (also the older ``<stem>.json`` name).
"""
from __future__ import annotations

import ctypes
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from .. import metadata as md
from .._io import staged
from ..errors import (DataError, EngineBuildError, ModelFileError, ModelNotFoundError, OutputPathError,
                      RuntimeMissingError, UsageError)
from ..plugins.tensorrt_plugin import has_token_merge, prepare_onnx, register, require_tensorrt
from .base import ENGINE_SUFFIXES, Runner

INPUT_NAME = md.INPUT_NAME
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class BuildRequest:
    onnx_path: Path
    output: Path
    fp16: bool = False
    int8: bool = False
    calib_dir: Optional[Path] = None
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gb: float = 4.0
    calib_batches: int = 16

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    @property
    def metadata_path(self) -> Path:
        return metadata_path_for(self.output)


@dataclass
class BuildResult:
    engine: Path
    metadata: Path
    info: dict = field(default_factory=dict)


def _has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def validate(req: BuildRequest):
    """Everything that can be checked without TensorRT. Returns the loaded ONNX model."""
    model = md.load_proto(req.onnx_path)
    if INPUT_NAME not in [i.name for i in model.graph.input]:
        raise ModelFileError(f"{req.onnx_path} has no input named {INPUT_NAME!r}: export it with `vitmerge export`")
    if req.output.suffix not in (".engine", ".plan", ".trt"):
        raise OutputPathError(f"output {str(req.output)!r} must end in .engine (or .plan / .trt)")
    if not req.output.parent.is_dir():
        raise OutputPathError(f"output directory {str(req.output.parent)!r} does not exist: create it first")
    if not 1 <= req.min_batch <= req.opt_batch <= req.max_batch:
        raise UsageError(
            f"batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch; got "
            f"{req.min_batch}, {req.opt_batch}, {req.max_batch}"
        )
    if req.calib_dir is not None and not req.int8:
        raise UsageError("--calib-dir is only used with --int8")
    if req.int8 and not _has_qdq(model):
        if req.calib_dir is None:
            raise UsageError(
                "--int8 needs either a graph with Q/DQ nodes (explicit quantization) or --calib-dir DIR with "
                "calibration images"
            )
        if not req.calib_dir.is_dir():
            raise DataError(f"--calib-dir {str(req.calib_dir)!r} is not a folder")
        if not calibration_images(req.calib_dir):
            raise DataError(f"--calib-dir {str(req.calib_dir)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return model


def calibration_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _image_batches(files: List[Path], shape, batch: int, limit: int):
    """Calibration batches [batch, C, H, W] float32: resize + centre crop, ImageNet mean/std (timm default)."""
    from PIL import Image

    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    _, H, W = shape
    buf = []
    for f in files:
        img = Image.open(f).convert("RGB")
        scale = max(H / img.height, W / img.width)
        img = img.resize((max(W, round(img.width * scale)), max(H, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - W) // 2, (img.height - H) // 2
        arr = np.asarray(img.crop((left, top, left + W, top + H)), np.float32).transpose(2, 0, 1) / 255.0
        buf.append((arr - mean) / std)
        if len(buf) == batch:
            yield np.stack(buf)
            buf = []
            limit -= 1
            if limit <= 0:
                return
    if buf:
        yield np.stack(buf + [buf[-1]] * (batch - len(buf)))


def _calibrator(trt, files, shape, batch: int, limit: int, cache: Path):
    """Implicit INT8 entropy calibrator fed from a local image folder (deprecated in TensorRT >= 10.1;
    prefer Q/DQ graphs)."""
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = _image_batches(files, shape, batch, limit)
            self.device = torch.empty(batch, *shape, dtype=torch.float32, device="cuda")

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            try:
                data = next(self.batches)
            except StopIteration:
                return None
            self.device.copy_(torch.from_numpy(data))
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return Calibrator()


def gpu_name() -> str:
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    raise RuntimeMissingError("no CUDA GPU found: TensorRT engines are built on (and for) an NVIDIA GPU")


def build_engine(req: BuildRequest, on_step: Optional[Callable[[str], None]] = None) -> BuildResult:
    """Build and write the engine + metadata JSON. Raises a VitmergeError subclass on any problem,
    leaving no output file behind."""
    step = on_step or (lambda s: None)
    model = validate(req)
    trt = require_tensorrt()
    gpu = gpu_name()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    plugin = has_token_merge(model)
    if plugin:
        step("registering the TokenMerge plugin")
        register()
        payload = prepare_onnx(model)
    else:
        payload = req.onnx_path.read_bytes()
    step("parsing ONNX")
    ok = parser.parse(payload, str(req.onnx_path))  # the path locates external weights, if any
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {req.onnx_path}: {errors}")

    inp = next(network.get_input(i) for i in range(network.num_inputs) if network.get_input(i).name == INPUT_NAME)
    chw = tuple(int(d) for d in tuple(inp.shape)[1:])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (req.min_batch, *chw), (req.opt_batch, *chw), (req.max_batch, *chw))
    config.add_optimization_profile(profile)
    if req.fp16 or req.int8:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = req.output.with_suffix(".calib")
    if req.int8:
        config.set_flag(trt.BuilderFlag.INT8)
        if not _has_qdq(model):
            warnings.warn("implicit INT8 calibration is deprecated in TensorRT >= 10.1; Q/DQ graphs are preferred")
            config.int8_calibrator = _calibrator(trt, calibration_images(req.calib_dir), chw, req.opt_batch,
                                                 req.calib_batches, cache)
            config.set_calibration_profile(profile)
    step(f"building the {req.precision} engine (minutes)")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine (see the TensorRT messages above)")
    meta = md.parsed(md.read(model))
    info = {
        "engine": req.output.name,
        "onnx": str(req.onnx_path),
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "precision": req.precision,
        "batch_profile": {"min": req.min_batch, "opt": req.opt_batch, "max": req.max_batch},
        "input": {"name": INPUT_NAME, "shape": ["batch", *chw]},
        "token_merge_plugin": plugin,
        "schedule": meta,
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


class TrtRunner(Runner):
    """A serialized TensorRT engine, run with TensorRT's name-based I/O on CUDA buffers owned by PyTorch.

    The engine's metadata JSON (from ``vitmerge build``) names the plugins it needs: plugin libraries
    are loaded, and the Python TokenMerge plugin is registered, before the engine is deserialized.
    """

    def __init__(self, path: Union[str, Path], label: Optional[str] = None):
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"TensorRT engine {str(path)!r} does not exist")
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeMissingError("TensorRT engines run on an NVIDIA GPU, and PyTorch sees none here")
        meta = load_engine_metadata(path)
        for lib in plugin_libraries(meta):
            if not Path(lib).is_file():
                raise RuntimeMissingError(f"{path.name} needs the plugin library {lib}, which does not exist here")
            ctypes.CDLL(lib, mode=getattr(os, "RTLD_GLOBAL", 0))
        if meta and (meta.get("token_merge_plugin") or meta.get("merge_op") == "plugin") and not plugin_libraries(meta):
            register()  # the Python (JIT) TokenMerge plugin
        logger = trt.Logger(trt.Logger.ERROR)
        trt.init_libnvinfer_plugins(logger, "")
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            built = (meta or {}).get("tensorrt_version")
            raise RuntimeMissingError(
                f"TensorRT {trt.__version__} could not load {path.name}"
                + (f" (built with TensorRT {built})" if built else "")
                + ": an engine only loads with the TensorRT version and GPU that built it. Rebuild it here: "
                "vitmerge build MODEL.onnx --output " + path.name
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise ModelFileError(f"{path.name} has inputs {inputs}; vitmerge runs single-input image models")
        shape = list(engine.get_tensor_shape(inputs[0]))
        if shape[0] == -1:
            mn, _, mx = engine.get_tensor_profile_shape(inputs[0], 0)
            lo, hi = int(mn[0]), int(mx[0])
        else:
            lo = hi = int(shape[0])
        self._torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
                             trt.int32: torch.int32, getattr(trt, "bfloat16", trt.float32): torch.bfloat16}
        meta = meta or {}
        sched = meta.get("schedule") if isinstance(meta.get("schedule"), dict) else {}
        info = {k: meta[k] for k in ("precision", "tensorrt_version", "gpu") if k in meta}
        for k in ("method", "r"):
            if k in meta or k in sched:
                info[k] = meta.get(k, sched.get(k))
        if isinstance(info.get("r"), list) and info["r"]:
            info["r_mean"] = sum(info["r"]) / len(info["r"])
        # host inputs are float32 (cast to the engine's input type on the device) unless it takes integers
        in_dtype = {trt.int8: np.int8, trt.int32: np.int32}.get(engine.get_tensor_dtype(inputs[0]), np.float32)
        super().__init__(label=label or path.name, spec=str(path), runtime="trt", device="cuda",
                         input_shape=tuple(int(d) for d in shape[1:]), info=info, batch_range=(lo, hi),
                         input_dtype=in_dtype)
        self.engine, self.path = engine, path
        self.input_name, self.output_names = inputs[0], outputs
        self.stream = torch.cuda.Stream()

    def _bind(self, x):
        """A fresh execution context bound to input ``x`` and new output buffers (one per batch
        size, so runners of different batch sizes never share shapes or addresses)."""
        ctx = self.engine.create_execution_context()
        x = x.to(self._torch_dtype.get(self.engine.get_tensor_dtype(self.input_name), torch.float32)).cuda()
        ctx.set_input_shape(self.input_name, tuple(x.shape))
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        outs = []
        for name in self.output_names:
            o = torch.empty(tuple(ctx.get_tensor_shape(name)),
                            dtype=self._torch_dtype.get(self.engine.get_tensor_dtype(name), torch.float32), device="cuda")
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        return ctx, x, outs

    def _execute(self, ctx, batch: int) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise EngineBuildError(f"TensorRT failed to run {self.path.name} at batch {batch}")

    def _infer(self, images):
        ctx, x, outs = self._bind(torch.from_numpy(images))
        self._execute(ctx, images.shape[0])
        self.stream.synchronize()
        return outs[0].float().cpu().numpy()

    def _prepare(self, batch: int):
        ctx, x, outs = self._bind(torch.from_numpy(self.example(batch)))
        keep = (ctx, x, outs)  # the context and buffers live as long as the callable

        def run():
            self._execute(keep[0], batch)
            return keep

        return run

    def sync(self) -> None:
        self.stream.synchronize()


__all__ = ["BuildRequest", "BuildResult", "build_engine", "validate", "TrtRunner", "write_engine",
           "metadata_path_for", "engine_metadata_path", "load_engine_metadata", "plugin_libraries",
           "ENGINE_SUFFIXES", "gpu_name"]
