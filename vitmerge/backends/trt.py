"""TensorRT, the run side: a serialized engine behind the runner interface.

Supported: TensorRT 10.16 to 11.x (``pip install 'vitmerge[tensorrt]'``). The build side (engine build,
the engine metadata writer and reader) is :mod:`.trt_build`, as Polygraphy separates loaders from
runners; its names are re-exported here, so ``from vitmerge.backends.trt import build_engine`` keeps working.

Nothing here has run on a GPU yet; the tests drive this code with a stand-in for TensorRT's compiled
module on machines without one.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..errors import EngineBuildError, ModelFileError, ModelNotFoundError, RuntimeMissingError, UsageError, VitmergeError
from ..plugins.tensorrt_plugin import register, require_tensorrt
from .base import ENGINE_SUFFIXES, Runner
from .trt_build import (CALIBRATE_HINT, INPUT_NAME, BuildRequest, BuildResult, FileTypes, PrecisionPlan,  # noqa: F401
                        build_engine, dtype_name, engine_metadata_path, engine_schedule, file_types, gpu_name,
                        load_engine_metadata, metadata_path_for, plugin_libraries, precision_plan, validate,
                        write_engine)


def torch_dtypes(trt, torch) -> Dict[Any, Any]:
    """TensorRT DataType -> torch dtype, for every type this TensorRT and this PyTorch both have. An engine's
    I/O buffers are allocated with these: a wrong type is a buffer of the wrong byte size."""
    pairs = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int8": "int8", "int32": "int32",
             "int64": "int64", "bool": "bool", "uint8": "uint8", "fp8": "float8_e4m3fn"}
    out = {}
    for trt_name, torch_name in pairs.items():
        t, d = getattr(trt, trt_name, None), getattr(torch, torch_name, None)
        if t is not None and d is not None:
            out[t] = d
    return out


def engine_dtype(table: Dict[Any, Any], dtype, tensor: str, engine: str = "the engine"):
    """The torch dtype for an engine tensor of TensorRT type ``dtype``; :class:`ModelFileError` for a type
    without one (int4, fp4: no PyTorch buffer can hold them), never a float32 buffer of the wrong size."""
    try:
        return table[dtype]
    except (KeyError, TypeError):
        raise ModelFileError(f"{engine}: tensor {tensor!r} has TensorRT type {dtype_name(dtype)}, which vitmerge cannot "
                             "give a buffer for; build the engine from a file whose inputs and outputs are float32 "
                             "(vitmerge export writes such files)") from None


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
        plugin_note = ""
        if meta and (meta.get("token_merge_plugin") or meta.get("merge_op") == "plugin") and not plugin_libraries(meta):
            register()  # the Python (JIT) TokenMerge plugin: its creators must exist before deserialization
        elif meta is None:
            # no metadata: nothing says whether the engine holds TokenMerge plugins, so register them if this
            # TensorRT can (harmless otherwise) and say what is missing if the engine still does not load
            try:
                register()
            except VitmergeError as e:
                plugin_note = f"; the TokenMerge plugin could not be registered ({e})"
        logger = trt.Logger(trt.Logger.ERROR)
        trt.init_libnvinfer_plugins(logger, "")
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            if meta is None:
                raise ModelFileError(
                    f"TensorRT {trt.__version__} could not load {path.name}, and its metadata file "
                    f"{metadata_path_for(path).name} (written by vitmerge build: the TensorRT version, GPU and plugins "
                    f"the engine needs) is missing next to it{plugin_note}. Put the metadata file back, or rebuild: "
                    "vitmerge build MODEL.onnx --output " + path.name
                )
            built = meta.get("tensorrt_version")
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
        self._torch_dtype = torch_dtypes(trt, torch)
        for name in [*inputs, *outputs]:
            engine_dtype(self._torch_dtype, engine.get_tensor_dtype(name), name, path.name)
        schedule = engine_schedule(meta)
        meta = meta or {}
        info = {k: meta[k] for k in ("precision", "tensorrt_version", "gpu") if k in meta}
        # host inputs are float32 (cast to the engine's input type on the device) unless it takes integers
        in_dtype = {trt.int8: np.int8, trt.int32: np.int32}.get(engine.get_tensor_dtype(inputs[0]), np.float32)
        super().__init__(label=label or path.name, spec=str(path), runtime="trt", device="cuda",
                         input_shape=tuple(int(d) for d in shape[1:]), info=info, schedule=schedule,
                         batch_range=(lo, hi),
                         input_dtype=in_dtype)
        self.engine, self.path = engine, path
        self.input_name, self.output_names = inputs[0], outputs
        self.stream = torch.cuda.Stream()
        self._host_ctx = None  # the execution context of host calls (_infer), made on first use

    #: where engine I/O buffers live. CUDA for a real engine; the tests point it at host memory to
    #: drive this class with a stand-in engine on machines without a GPU.
    _buffer_device = "cuda"

    def _bind(self, ctx, x):
        """Bind input ``x`` (cast to the engine's input type, on the device) and fresh output buffers
        to execution context ``ctx``. Returns (x, outputs): they must live as long as ``ctx`` runs."""
        x = x.to(device=self._buffer_device,
                 dtype=engine_dtype(self._torch_dtype, self.engine.get_tensor_dtype(self.input_name), self.input_name))
        x = x.contiguous()
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
            raise UsageError(f"{self.path.name} does not accept input shape {tuple(x.shape)}")
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        outs = []
        for name in self.output_names:
            o = torch.empty(tuple(ctx.get_tensor_shape(name)), device=self._buffer_device,
                            dtype=engine_dtype(self._torch_dtype, self.engine.get_tensor_dtype(name), name))
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        return x, outs

    def _execute(self, ctx, batch: int) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise EngineBuildError(f"TensorRT failed to run {self.path.name} at batch {batch}")

    def _infer(self, images):
        """Host batch in, first output out."""
        return self._infer_all(images)[0]

    def _infer_all(self, images):
        """Host batch in, every output out. One execution context serves every host call: it is bound
        right before each run and the call waits for the result, so nothing else can rebind it meanwhile."""
        if self._host_ctx is None:
            self._host_ctx = self.engine.create_execution_context()
        x, outs = self._bind(self._host_ctx, torch.from_numpy(images))
        self._execute(self._host_ctx, images.shape[0])
        self.stream.synchronize()
        return [o.float().cpu().numpy() for o in outs]

    def _prepare(self, batch: int):
        """A run for ``batch`` on its own execution context. TensorRT keeps input shapes and buffer
        addresses in the context, so runs prepared for different batch sizes (latency, then energy,
        interleaved) must not share one: each would execute with the shape and buffers bound last."""
        ctx = self.engine.create_execution_context()
        x, outs = self._bind(ctx, torch.from_numpy(self.example(batch)))
        keep = (ctx, x, outs)  # the context and its buffers live as long as the callable

        def run():
            self._execute(keep[0], batch)
            return keep

        return run

    def sync(self) -> None:
        self.stream.synchronize()


__all__ = ["TrtRunner", "torch_dtypes", "engine_dtype",
           # the build side, re-exported (vitmerge.backends.trt_build)
           "BuildRequest", "BuildResult", "build_engine", "validate", "file_types", "precision_plan", "FileTypes",
           "PrecisionPlan", "dtype_name", "write_engine", "metadata_path_for", "engine_metadata_path",
           "load_engine_metadata", "plugin_libraries", "engine_schedule", "ENGINE_SUFFIXES", "gpu_name"]
