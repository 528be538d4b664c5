"""ONNX -> TensorRT engine, with an optimisation profile over the batch axis of ``images``.

``build_engine`` checks everything it can without TensorRT first (files, batch range, INT8 inputs),
then needs TensorRT and a CUDA GPU. It writes ``<output>`` (the serialized engine) and a metadata
JSON next to it (``<output stem>.json``: TensorRT version, GPU, precision, batch profile, the
vitmerge schedule from the ONNX metadata), both staged and renamed only on success.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import OutputPathError, RuntimeMissingError, VitmergeError
from .tensorrt_plugin import has_token_merge, prepare_onnx, register, require_tensorrt

INPUT_NAME = "images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class EngineBuildError(VitmergeError):
    """TensorRT could not parse or build the model."""


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
        return self.output.with_suffix(".json")


@dataclass
class BuildResult:
    engine: Path
    metadata: Path
    info: dict = field(default_factory=dict)


def _has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def validate(req: BuildRequest):
    """Everything that can be checked without TensorRT. Returns the loaded ONNX model."""
    import onnx

    if not req.onnx_path.is_file():
        raise VitmergeError(f"no ONNX file at {str(req.onnx_path)!r}: export one with `vitmerge export`")
    try:
        model = onnx.load(str(req.onnx_path), load_external_data=False)
    except Exception as e:
        raise VitmergeError(f"{req.onnx_path} is not a readable ONNX model ({e})") from None
    if INPUT_NAME not in [i.name for i in model.graph.input]:
        raise VitmergeError(f"{req.onnx_path} has no input named {INPUT_NAME!r}: export it with `vitmerge export`")
    if req.output.suffix not in (".engine", ".plan", ".trt"):
        raise OutputPathError(f"output {str(req.output)!r} must end in .engine (or .plan / .trt)")
    if not req.output.parent.is_dir():
        raise OutputPathError(f"output directory {str(req.output.parent)!r} does not exist: create it first")
    if not 1 <= req.min_batch <= req.opt_batch <= req.max_batch:
        raise VitmergeError(
            f"batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch; got "
            f"{req.min_batch}, {req.opt_batch}, {req.max_batch}"
        )
    if req.calib_dir is not None and not req.int8:
        raise VitmergeError("--calib-dir is only used with --int8")
    if req.int8 and not _has_qdq(model):
        if req.calib_dir is None:
            raise VitmergeError(
                "--int8 needs either a graph with Q/DQ nodes (explicit quantization) or --calib-dir DIR with "
                "calibration images"
            )
        if not req.calib_dir.is_dir():
            raise VitmergeError(f"--calib-dir {str(req.calib_dir)!r} is not a folder")
        if not calibration_images(req.calib_dir):
            raise VitmergeError(f"--calib-dir {str(req.calib_dir)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return model


def calibration_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _image_batches(files: List[Path], shape, batch: int, limit: int):
    """Calibration batches [batch, C, H, W] float32: resize + centre crop, ImageNet mean/std (timm default)."""
    import numpy as np
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
    import torch

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
        import torch

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
    meta = {k[len("vitmerge."):]: v for k, v in ((e.key, e.value) for e in model.metadata_props) if k.startswith("vitmerge.")}
    for k, v in list(meta.items()):
        try:
            meta[k] = json.loads(v)
        except (TypeError, ValueError):
            pass
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
    tmp_engine = req.output.with_name(f".{req.output.name}.partial-{os.getpid()}")
    tmp_meta = req.metadata_path.with_name(f".{req.metadata_path.name}.partial-{os.getpid()}")
    try:
        tmp_engine.write_bytes(bytes(serialized))
        tmp_meta.write_text(json.dumps(info, indent=2))
        os.replace(tmp_meta, req.metadata_path)
        os.replace(tmp_engine, req.output)
    finally:
        for t in (tmp_engine, tmp_meta):
            t.unlink(missing_ok=True)
    return BuildResult(engine=req.output, metadata=req.metadata_path, info=info)
