"""ONNX Runtime: sessions (CPU or CUDA), the vitmerge::TokenMerge kernel registration, and a runner.

:func:`session` is the one place an ONNX Runtime session is made: every command, the exporter's
verification, calibration and the tests go through it, so the custom-op kernel is registered
exactly when a graph needs it and load failures read the same everywhere.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .. import metadata as md
from ..errors import ModelFileError, RuntimeMissingError, VitmergeError
from ..plugins import DOMAIN
from .base import Runner

PathLike = Union[str, Path]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}
_LEVELS = ("all", "extended", "basic", "none")


def uses_custom_ops(proto) -> bool:
    """Whether the graph holds vitmerge custom nodes (``vitmerge::TokenMerge``)."""
    return any(o.domain == DOMAIN for o in proto.opset_import)


def session(path: PathLike, providers: Optional[Sequence[Any]] = None, threads: int = 0,
            optimization: str = "all"):
    """An ONNX Runtime session for ``path`` (CPU unless ``providers`` says otherwise).

    The vitmerge::TokenMerge kernels are registered when the graph holds such nodes. A file ONNX
    Runtime cannot load raises :class:`ModelFileError` with ONNX Runtime's reason.
    """
    import onnxruntime as ort

    if optimization not in _LEVELS:
        raise ValueError(f"optimization must be one of {_LEVELS}, got {optimization!r}")
    proto = md.load_proto(path)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if uses_custom_ops(proto):
        from ..plugins.ort_tokenmerge import register_ort

        register_ort(so)  # the vitmerge::TokenMerge kernel for ONNX Runtime (CPU)
        log.info("%s holds vitmerge::TokenMerge nodes: registered the CPU kernel (onnxruntime-extensions)",
                 Path(path).name)
    log.debug("ONNX Runtime session for %s: providers %s, threads %s, optimization %s", Path(path).name,
              list(providers or [CPU]), threads or "default", optimization)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or [CPU]))
    except VitmergeError:
        raise
    except Exception as e:
        raise ModelFileError(
            f"ONNX Runtime could not load {Path(path).name}: {str(e).splitlines()[0][:300]}"
        ) from None


def cuda_session(path: PathLike, threads: int = 0):
    """A session on the CUDA execution provider, or :class:`RuntimeMissingError` saying why not."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if CUDA not in have:
        raise RuntimeMissingError(
            "ONNX Runtime CUDA is not available: this onnxruntime has providers "
            f"{', '.join(have)}. Install onnxruntime-gpu (pip install 'vitmerge[gpu]') on a machine with an "
            "NVIDIA GPU, or use --runtime ort"
        )
    sess = session(path, [(CUDA, {"device_id": 0}), CPU], threads)
    if sess.get_providers()[0] != CUDA:
        raise RuntimeMissingError(
            "ONNX Runtime could not start its CUDA provider (no usable NVIDIA GPU, or CUDA/cuDNN libraries "
            "missing); use --runtime ort for the CPU"
        )
    return sess


def _dim(d) -> Optional[int]:
    return d if isinstance(d, int) and d > 0 else None


def onnx_info(proto) -> dict:
    """The merge schedule vitmerge stored in the file's metadata (empty for foreign files)."""
    meta = md.parsed(md.read(proto))
    info = {k: meta[k] for k in ("method", "r", "tokens_out") if k in meta}
    if isinstance(info.get("r"), list) and info["r"]:
        info["r_mean"] = sum(info["r"]) / len(info["r"])
    elif "input_shape" in meta:
        info["r_mean"] = 0.0  # exported by vitmerge without merging
    return info


class OrtRunner(Runner):
    """An ONNX file in ONNX Runtime (``ort``: CPU provider; ``ort-cuda``: CUDA provider, inputs and
    outputs bound on the GPU for timing so host copies are not timed)."""

    def __init__(self, path: PathLike, runtime: str = "ort", threads: int = 0, label: Optional[str] = None,
                 sess=None):
        path = Path(path)
        proto = md.load_proto(path)
        if runtime not in ("ort", "ort-cuda"):
            raise ValueError(f"OrtRunner runs 'ort' or 'ort-cuda', not {runtime!r}")
        self.session = sess or (cuda_session(path, threads) if runtime == "ort-cuda" else session(path, threads=threads))
        inp = self.session.get_inputs()[0]
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ModelFileError(f"{path.name}: input {inp.name!r} has type {inp.type}; vitmerge runs image models "
                                 "with float inputs")
        shape = list(inp.shape)
        per_image = tuple(_dim(d) for d in shape[1:])
        if any(d is None for d in per_image):
            raise ModelFileError(f"{path.name}: input {inp.name!r} has shape {shape}; only the batch axis may be "
                                 "dynamic (export with a fixed image size)")
        fixed = _dim(shape[0]) if shape else None
        super().__init__(label=label or path.name, spec=str(path), runtime=runtime,
                         device="cuda" if runtime == "ort-cuda" else "cpu", input_shape=per_image,
                         info=onnx_info(proto), batch_range=(fixed, fixed) if fixed else (1, 1 << 30),
                         input_dtype=dtype)
        self.path = path
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _infer(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], {self.input_name: images})[0]

    def _prepare(self, batch: int) -> Callable[[], object]:
        x = self.example(batch)
        if self.device == "cpu":
            feed = {self.input_name: x}
            return lambda: self.session.run(self.output_names, feed)
        import onnxruntime as ort

        binding = self.session.io_binding()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding.bind_ortvalue_input(self.input_name, x_dev)
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        keep = (x_dev, binding)  # device buffers live as long as the callable
        return lambda: self.session.run_with_iobinding(keep[1])


__all__ = ["session", "cuda_session", "uses_custom_ops", "onnx_info", "OrtRunner", "CPU", "CUDA"]
