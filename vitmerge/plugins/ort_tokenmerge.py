"""ONNX Runtime kernels for ``vitmerge::TokenMerge`` / ``TokenMergeCls`` (CPU), via onnxruntime-extensions.

The node ``TokenMerge(x [B,N,D], metric [B,N,C], size [B,N,1]) -> (x' [B,N-r,D], size' [B,N-r,1])``
with attributes ``r``, ``protected``, ``method`` and ``options`` (JSON) runs exactly the PyTorch
merge step: ``vitmerge.merging.plan(method, metric, r, protected, **options).merge(x, size)``. Any
method registered in :data:`vitmerge.merging.METHODS` therefore works, including ones added later;
``TokenMergeCls`` has a fourth input, the class-token attention row ``cls_attn [B, N]``, for methods
that read it (importance).

onnxruntime-extensions ships a prebuilt custom-op library (a pip wheel, no compiler needed) that
calls back into Python for ops declared with ``onnx_op``. The callback hands results back as Python
lists, so this kernel is for running and verifying the plugin form on CPU, not for speed: measure
with ``bench/bench_graph_forms.py`` before choosing it for deployment on CPU.
"""
from __future__ import annotations

import json
from typing import Optional, Tuple

import numpy as np

from .. import merging
from ..errors import RuntimeMissingError

_REGISTERED = False
INSTALL_HINT = "pip install onnxruntime-extensions"


def token_merge(x: np.ndarray, metric: np.ndarray, size: np.ndarray, r: int, protected: int,
                method: str = "tome", options: str = "{}", cls_attn: Optional[np.ndarray] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """The TokenMerge computation on numpy arrays (the kernel body, callable without ORT).

    ``cls_attn [B, N]``: the class-token attention row, for methods that read it (TokenMergeCls).
    """
    import torch

    opts = json.loads(options) if options else {}
    # ONNX Runtime's own threads are busy around this call: PyTorch's thread pool on top of them
    # oversubscribes the cores (measured 10-40x slower on 2 cores). Small tensors: one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _merge(torch, merging, x, metric, size, r, protected, method, opts, cls_attn)
    finally:
        torch.set_num_threads(threads)


def _merge(torch, merging, x, metric, size, r, protected, method, opts, cls_attn):
    with torch.no_grad():
        xt, mt, st = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x, metric, size))
        if cls_attn is not None:
            opts["cls_attn"] = torch.from_numpy(np.ascontiguousarray(cls_attn))
        plan = merging.plan(method, mt, int(r), int(protected), **opts)
        x_out, s_out = plan.merge(xt, st)
    return x_out.numpy().astype(x.dtype, copy=False), s_out.numpy().astype(size.dtype, copy=False)


def library_path() -> str:
    """Register the TokenMerge Python op (once per process); return the custom-op library to load."""
    global _REGISTERED
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise RuntimeMissingError(
            "running vitmerge::TokenMerge nodes in ONNX Runtime needs onnxruntime-extensions: "
            f"{INSTALL_HINT} (or use a graph in the standard or native form)"
        ) from None
    if not _REGISTERED:
        f = PyCustomOpDef.dt_float
        # every attribute is a STRING (r and protected as decimal text: see tensorrt_plugin's docstring)
        attrs = {"r": PyCustomOpDef.dt_string, "protected": PyCustomOpDef.dt_string,
                 "method": PyCustomOpDef.dt_string, "options": PyCustomOpDef.dt_string}

        @onnx_op(op_type="vitmerge::TokenMerge", inputs=[f, f, f], outputs=[f, f], attrs=attrs)
        def _token_merge_op(x, metric, size, r="0", protected="1", method="tome", options="{}"):
            return token_merge(x, metric, size, r, protected, method, options)

        @onnx_op(op_type="vitmerge::TokenMergeCls", inputs=[f, f, f, f], outputs=[f, f], attrs=attrs)
        def _token_merge_cls_op(x, metric, size, cls_attn, r="0", protected="1", method="tome", options="{}"):
            return token_merge(x, metric, size, r, protected, method, options, cls_attn=cls_attn)

        _REGISTERED = True
    return get_library_path()


def register_ort(session_options) -> None:
    """Make ``session_options`` able to run ``vitmerge::TokenMerge`` nodes.

    Also stops ONNX Runtime's idle worker threads from spinning: while a TokenMerge node runs in
    Python they would otherwise keep the cores busy that the kernel needs.
    """
    session_options.register_custom_ops_library(library_path())
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
