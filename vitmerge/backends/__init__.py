"""Running a model: one :class:`Runner` interface, one module per runtime.

* :mod:`.ort`   ONNX Runtime sessions (CPU, CUDA) with the TokenMerge kernel registered as needed;
* :mod:`.torch` PyTorch eager (a module built by :func:`vitmerge.models.build.build_merged`);
* :mod:`.trt`   TensorRT engines (:mod:`.trt_build`: engine build and the engine metadata reader and writer).

:func:`open_runner` turns a model reference (:class:`~vitmerge.request.ModelRef`: ``MODEL.onnx``,
``MODEL.engine``, a timm name, ``dense:NAME``, a transformers folder) and a runtime name into a runner; verification, accuracy, calibration, profiling and the self-test all
run models through this interface.
"""
from __future__ import annotations

from typing import Optional, Union

from ..errors import ModelNotFoundError, UsageError
from ..models.build import ModelSource, build_merged, resolve_model
from ..request import ENGINE_SUFFIXES, TIMM_PREFIX, MergeRequest, ModelRef
from .base import RUNTIMES, Runner
from .ort import OrtRunner
from .torch import TorchRunner
from .trt import TrtRunner


def default_runtime(model: Union[str, ModelRef]) -> str:
    """The runtime a model runs in unless told otherwise: torch for names and folders, ort for .onnx, trt for engines."""
    return ModelRef.parse(model).runtime


def open_runner(model: Union[str, ModelRef, ModelSource], runtime: Optional[str] = None, *,
                request: Optional[MergeRequest] = None,
                device: str = "auto", threads: int = 0, label: Optional[str] = None, **model_options) -> Runner:
    """A model reference (:class:`~vitmerge.request.ModelRef`: a timm name or ``timm:NAME``, ``dense:NAME``, a
    transformers folder, ``MODEL.onnx``, ``MODEL.engine``) in ``runtime`` (default: the natural one).

    PyTorch models are built with ``model_options`` (:func:`vitmerge.models.build.resolve_model`'s: checkpoint,
    img_size, num_classes, model_kwargs, frames, audio_length, seed) and merged as ``request`` asks (default: not
    merged); ``device`` applies to them only. A :class:`~vitmerge.models.build.ModelSource` (a reference already
    resolved with its options) is taken as it is. Files carry their own merge; ``request`` next to one is refused.
    """
    source = model if isinstance(model, ModelSource) else None
    ref = source.ref if source is not None else ModelRef.parse(model)
    runtime = runtime or ref.runtime
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if ref.is_pytorch:
        if runtime != "torch":
            raise UsageError(
                f"{ref.text} is a PyTorch model: it runs with --runtime torch. For {runtime}, export it first "
                "(vitmerge export) and profile the .onnx" + (" / build an engine" if runtime == "trt" else "")
            )
        if source is None:
            source = resolve_model(ref, **{k: v for k, v in model_options.items() if v is not None})
        elif any(v is not None for v in model_options.values()):
            raise UsageError("give the model options to resolve_model, not next to a ModelSource")
        request = request or MergeRequest.unmerged()
        model = build_merged(source, request) if request.merges else source.build()  # r = 0: the plain model
        if threads:
            import torch

            torch.set_num_threads(threads)
        tag = ref.label + ("" if getattr(model, "vitmerge", None) is None or not request.merges
                           else f" {request.describe()}")
        return TorchRunner(model, label=label or tag, spec=ref.spec, device=device)
    given = sorted(k for k, v in model_options.items() if v is not None)
    if given or (request is not None and request.merges):
        what = ", ".join("--" + k.replace("_", "-") for k in given) or "merge options (--r, --budget, ...)"
        raise UsageError(f"{what} apply to models built in PyTorch; {ref.text} is a file that carries its own "
                         "weights and merge")
    if not ref.path.exists():
        raise ModelNotFoundError(f"{'TensorRT engine' if ref.kind == 'engine' else 'ONNX model'} {ref.text!r} does not exist")
    if ref.kind == "engine":
        if runtime != "trt":
            raise UsageError(f"{ref.text} is a TensorRT engine: it runs with --runtime trt only")
        return TrtRunner(str(ref.path), label=label)
    if runtime == "torch":
        raise UsageError(f"{ref.text} is an ONNX file: use --runtime ort or ort-cuda (torch takes a timm name, "
                         "dense:NAME or a transformers folder)")
    if runtime == "trt":
        raise UsageError(f"{ref.text} is an ONNX file: build an engine first (vitmerge build {ref.text} --output "
                         "model.engine)")
    return OrtRunner(str(ref.path), runtime, threads, label=label)


__all__ = ["Runner", "OrtRunner", "TorchRunner", "TrtRunner", "RUNTIMES", "open_runner", "default_runtime",
           "TIMM_PREFIX", "ENGINE_SUFFIXES"]
