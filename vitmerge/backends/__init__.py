"""Running a model: one :class:`Runner` interface, one module per runtime.

* :mod:`.ort`   ONNX Runtime sessions (CPU, CUDA) with the TokenMerge kernel registered as needed;
* :mod:`.torch` PyTorch eager (a module, a timm name + local checkpoint, or a transformers model folder);
* :mod:`.trt`   TensorRT: engine build, engine load, the engine metadata reader and writer.

:func:`open_runner` turns what a user types (``MODEL.onnx``, ``MODEL.engine``, ``timm:NAME``) and a
runtime name into a runner; verification, accuracy, calibration, profiling and the self-test all
run models through this interface.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import ModelNotFoundError, UsageError
from .base import ENGINE_SUFFIXES, RUNTIMES, TIMM_PREFIX, Runner
from .ort import OrtRunner
from .torch import TorchRunner, timm_runner
from .trt import TrtRunner


def default_runtime(spec: str) -> str:
    """The runtime a model spec runs in unless told otherwise (a folder: a transformers model, PyTorch)."""
    if spec.startswith(TIMM_PREFIX) or Path(spec).is_dir():
        return "torch"
    if Path(spec).suffix.lower() in ENGINE_SUFFIXES:
        return "trt"
    return "ort"


def open_runner(spec: str, runtime: Optional[str] = None, *, checkpoint=None, method: str = "tome", r: Any = 0,
                img_size: Optional[int] = None, num_classes: Optional[int] = None, device: str = "auto",
                threads: int = 0, label: Optional[str] = None, **model_options) -> Runner:
    """``MODEL.onnx`` | ``MODEL.engine`` | ``timm:NAME`` | a transformers model folder in ``runtime``
    (default: the natural one).

    ``checkpoint``, ``method``, ``r``, ``img_size``, ``num_classes``, ``device`` and ``model_options``
    (``frames``, ``audio_length`` for transformers folders) apply to the PyTorch models only.
    """
    runtime = runtime or default_runtime(spec)
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    kind = default_runtime(spec)
    if kind == "torch":
        if runtime != "torch":
            raise UsageError(
                f"{spec} is a PyTorch model: it runs with --runtime torch. For {runtime}, export it first "
                "(vitmerge export) and profile the .onnx" + (" / build an engine" if runtime == "trt" else "")
            )
        name = spec[len(TIMM_PREFIX):] if spec.startswith(TIMM_PREFIX) else spec
        if not name:
            raise ModelNotFoundError("timm: needs a model name, e.g. timm:vit_small_patch16_224")
        return timm_runner(name, checkpoint, method, r, img_size, num_classes, device, threads, label=label,
                           **{k: v for k, v in model_options.items() if v is not None})
    if not Path(spec).exists():
        raise ModelNotFoundError(f"{'TensorRT engine' if kind == 'trt' else 'ONNX model'} {spec!r} does not exist")
    if kind == "trt":
        if runtime != "trt":
            raise UsageError(f"{spec} is a TensorRT engine: it runs with --runtime trt only")
        return TrtRunner(spec, label=label)
    if runtime == "torch":
        raise UsageError(f"{spec} is an ONNX file: use --runtime ort or ort-cuda (torch takes timm:NAME)")
    if runtime == "trt":
        raise UsageError(f"{spec} is an ONNX file: build an engine first (vitmerge build {spec} --output model.engine)")
    return OrtRunner(spec, runtime, threads, label=label)


__all__ = ["Runner", "OrtRunner", "TorchRunner", "TrtRunner", "RUNTIMES", "open_runner", "default_runtime",
           "timm_runner", "TIMM_PREFIX", "ENGINE_SUFFIXES"]
