"""ONNX Runtime: sessions (CPU or CUDA), the vitmerge::TokenMerge kernel registration, and a runner.

:func:`session` is the one place an ONNX Runtime session is made: every command, the exporter's
verification, calibration and the tests go through it, so the custom-op kernel is registered
exactly when a graph needs it and load failures read the same everywhere.

ONNX Runtime comes as one of two distributions that install the same ``onnxruntime`` folder:
``onnxruntime`` (CPU; ``vitmerge[cpu]``) or ``onnxruntime-gpu`` (CPU + CUDA; ``vitmerge[gpu]``).
Both at once leave whichever files were written last, often without the CUDA provider;
:func:`cuda_problem` names that state and its fix.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import metadata as md
from .._version import dist_version
from ..errors import ModelFileError, RuntimeMissingError, UsageError, VitmergeError
from ..plugins import DOMAIN
from .base import Runner, ScheduleInfo, schedule_info

PathLike = Union[str, Path]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}
_LEVELS = ("all", "extended", "basic", "none")


#: the pip distributions that provide the ``onnxruntime`` package (CPU, and CPU + CUDA)
CPU_DIST, GPU_DIST = "onnxruntime", "onnxruntime-gpu"
GPU_INSTALL = "pip install 'onnxruntime-gpu[cuda,cudnn]'"


def uses_custom_ops(proto) -> bool:
    """Whether the graph holds vitmerge custom nodes (``vitmerge::TokenMerge``)."""
    return any(o.domain == DOMAIN for o in proto.opset_import)


def custom_nodes(proto) -> List[str]:
    """The op types of the vitmerge custom nodes in the graph, its subgraphs and its functions."""
    found: List[str] = []

    def walk(nodes) -> None:
        for n in nodes:
            if n.domain == DOMAIN:
                found.append(n.op_type)
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g.node)

    walk(proto.graph.node)
    for f in proto.functions:
        walk(f.node)
    return found


def import_ort():
    """``import onnxruntime``, or :class:`RuntimeMissingError` saying which extra to install."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        have = [f"{d} {v}" for d in (CPU_DIST, GPU_DIST) if (v := dist_version(d))]
        if have:  # installed, yet not importable: the shared folder was broken by the pair
            raise RuntimeMissingError(
                f"ONNX Runtime does not import ({e}) although {' and '.join(have)} "
                f"{'are' if len(have) > 1 else 'is'} installed: reinstall one of them: "
                f"pip uninstall -y {CPU_DIST} {GPU_DIST} && pip install 'vitmerge[cpu]' (or 'vitmerge[gpu]')"
            ) from None
        raise RuntimeMissingError(
            "ONNX Runtime is not installed: pip install 'vitmerge[cpu]', or 'vitmerge[gpu]' on a machine "
            "with an NVIDIA GPU (one of the two, never both)"
        ) from None
    return ort


def cuda_problem(ort) -> Optional[str]:
    """Why this ONNX Runtime has no CUDA provider, with the fix; None when it has one."""
    have = list(ort.get_available_providers())
    if CUDA in have:
        return None
    cpu_v, gpu_v = dist_version(CPU_DIST), dist_version(GPU_DIST)
    if cpu_v and gpu_v:
        return (f"{CPU_DIST} {cpu_v} and {GPU_DIST} {gpu_v} are both installed. They write the same "
                f"'onnxruntime' folder, and the files there now come without the CUDA provider (providers: "
                f"{', '.join(have)}). Remove both, then install only the GPU one: "
                f"pip uninstall -y {CPU_DIST} {GPU_DIST} && {GPU_INSTALL}")
    if gpu_v:
        return (f"{GPU_DIST} {gpu_v} is installed but this ONNX Runtime lists no CUDA provider (providers: "
                f"{', '.join(have)}); reinstall it: pip uninstall -y {GPU_DIST} && {GPU_INSTALL}")
    return (f"this is the CPU build of ONNX Runtime ({CPU_DIST} {cpu_v or ort.__version__}; providers: "
            f"{', '.join(have)}). For --runtime ort-cuda replace it, on a machine with an NVIDIA GPU: "
            f"pip uninstall -y {CPU_DIST} && {GPU_INSTALL} (or install 'vitmerge[gpu]' instead of "
            "'vitmerge[cpu]'); or use --runtime ort")


def _has_external_data(proto) -> bool:
    return any(t.data_location == 1 for t in proto.graph.initializer)  # onnx.TensorProto.EXTERNAL


def model_source(path: PathLike, proto) -> Union[str, bytes]:
    """What ONNX Runtime is given for ``proto`` (the model of ``path``, already loaded): its bytes, so the file is
    not read a second time; the path when its weights live in an external-data file (or exceed protobuf's 2 GB),
    which ONNX Runtime finds next to the file."""
    if _has_external_data(proto) or proto.ByteSize() > 1_800_000_000:
        return str(path)
    return proto.SerializeToString()


def session(path: PathLike, providers: Optional[Sequence[Any]] = None, threads: int = 0,
            optimization: str = "all", spinning: bool = True, proto=None):
    """An ONNX Runtime session for ``path`` (CPU unless ``providers`` says otherwise).

    ``proto``: the model of ``path``, already loaded (or not yet written: an export's model in memory); the
    file is then not read. Without it the file is read once (:func:`vitmerge.metadata.load_proto`) and
    ONNX Runtime is given the loaded model (:func:`model_source`).

    The vitmerge::TokenMerge kernels are registered when the graph holds such nodes. A file ONNX
    Runtime cannot load raises :class:`ModelFileError` with ONNX Runtime's reason.
    """
    ort = import_ort()
    if optimization not in _LEVELS:
        raise ValueError(f"optimization must be one of {_LEVELS}, got {optimization!r}")
    proto = md.load_proto(path) if proto is None else proto
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:  # workers stop spinning when a run returns (several sessions in one process: see OrtRunner)
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    if uses_custom_ops(proto):
        from ..plugins.ort_tokenmerge import register_ort

        register_ort(so)  # the vitmerge::TokenMerge kernel for ONNX Runtime (CPU)
        log.info("%s holds vitmerge::TokenMerge nodes: registered the CPU kernel (onnxruntime-extensions)",
                 Path(path).name)
    log.debug("ONNX Runtime session for %s: providers %s, threads %s, optimization %s", Path(path).name,
              list(providers or [CPU]), threads or "default", optimization)
    try:
        return ort.InferenceSession(model_source(path, proto), sess_options=so, providers=list(providers or [CPU]))
    except VitmergeError:
        raise
    except Exception as e:
        raise ModelFileError(
            f"ONNX Runtime could not load {Path(path).name}: {str(e).splitlines()[0][:300]}"
        ) from None


def refuse_custom_nodes_on_cuda(path: PathLike, proto=None) -> None:
    """:class:`UsageError` when the graph holds vitmerge custom nodes: their ONNX Runtime kernel
    (onnxruntime-extensions) runs on the CPU only, so under the CUDA provider ONNX Runtime would copy
    every merge's tensors to the host and back, silently, and the timing would not be the GPU's."""
    proto = md.load_proto(path) if proto is None else proto
    nodes = custom_nodes(proto)
    if nodes:
        kinds = ", ".join(sorted({f"{DOMAIN}::{t}" for t in nodes}))
        raise UsageError(
            f"{Path(path).name} holds {len(nodes)} {kinds} node(s), whose ONNX Runtime kernel runs on the CPU only: "
            "under ort-cuda every merge would be copied to the host and back. Use --runtime ort (CPU), "
            "export with --merge-op standard or native for ort-cuda, or build a TensorRT engine"
        )


def cuda_session(path: PathLike, threads: int = 0, spinning: bool = True, proto=None):
    """A session on the CUDA execution provider, or an error saying why not.

    Graphs with vitmerge custom nodes are refused (:func:`refuse_custom_nodes_on_cuda`); a missing
    CUDA provider is explained by :func:`cuda_problem`. ``proto``: as for :func:`session`.
    """
    proto = md.load_proto(path) if proto is None else proto
    refuse_custom_nodes_on_cuda(path, proto)
    ort = import_ort()
    problem = cuda_problem(ort)
    if problem:
        raise RuntimeMissingError(f"ONNX Runtime CUDA is not available: {problem}")
    preload_cuda_libraries(ort)
    sess = session(path, [(CUDA, {"device_id": 0}), CPU], threads, spinning=spinning, proto=proto)
    if sess.get_providers()[0] != CUDA:
        raise RuntimeMissingError(
            "ONNX Runtime could not start its CUDA provider (no usable NVIDIA GPU, or the CUDA and cuDNN "
            f"libraries {GPU_DIST} was built for are missing: {GPU_INSTALL}, or import torch first); "
            "use --runtime ort for the CPU"
        )
    return sess


def preload_cuda_libraries(ort) -> bool:
    """Load the CUDA / cuDNN libraries onnxruntime-gpu was built for from the NVIDIA pip packages
    (``onnxruntime.preload_dlls()``, ONNX Runtime >= 1.21), instead of relying on ``import torch`` having
    loaded compatible ones first. Returns whether it ran (older ONNX Runtimes do not have it)."""
    fn = getattr(ort, "preload_dlls", None)
    if fn is None:
        return False
    try:
        fn()
    except Exception as e:  # the libraries are not pip-installed: ONNX Runtime then searches the system paths
        log.info("onnxruntime.preload_dlls() did not load the CUDA libraries (%s): using the system's", e)
        return False
    return True


#: ops ONNX Runtime keeps on the CPU by design (shape arithmetic on small int tensors): not worth a report
_HOST_OPS = {"Shape", "Size", "Constant", "ConstantOfShape", "Range", "Squeeze", "Unsqueeze", "Reshape", "Concat",
             "Gather", "Slice", "Cast", "Identity", "Flatten"}


def cpu_placed_nodes(sess, feeds: dict) -> List[Tuple[str, str]]:
    """(op, node) of every compute node ONNX Runtime ran on the CPU provider in one profiled run of ``sess``
    (a session created with profiling on, e.g. :func:`placement_report`). Shape-only ops are left out."""
    import json as _json

    sess.run(None, feeds)
    prof = sess.end_profiling()
    try:
        events = _json.loads(Path(prof).read_text())
    finally:
        Path(prof).unlink(missing_ok=True)
    out = []
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and \
                args.get("provider") == CPU and args.get("op_name") not in _HOST_OPS:
            out.append((args.get("op_name", "?"), e["name"][: -len("_kernel_time")]))
    return sorted(set(out))


def placement_report(path: PathLike, batch: int = 1) -> List[Tuple[str, str]]:
    """Compute nodes of ``path`` that ONNX Runtime places on the CPU under the CUDA provider (one profiled run
    on random inputs): each one is a device-to-host copy and back at run time. Empty when all run on CUDA."""
    ort = import_ort()
    problem = cuda_problem(ort)
    if problem:
        raise RuntimeMissingError(f"ONNX Runtime CUDA is not available: {problem}")
    preload_cuda_libraries(ort)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=[(CUDA, {"device_id": 0}), CPU])
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) or d <= 0 else d for d in inp.shape]
    shape[0] = batch
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return cpu_placed_nodes(sess, {inp.name: x})


def _dim(d) -> Optional[int]:
    return d if isinstance(d, int) and d > 0 else None


def onnx_schedule(proto) -> ScheduleInfo:
    """The merge schedule vitmerge stored in the file's metadata (unknown for foreign files)."""
    return schedule_info(md.parsed(md.read(proto)))


def onnx_info(proto) -> dict:
    """:func:`onnx_schedule` as a dict (``runner.info``'s schedule part)."""
    return onnx_schedule(proto).as_dict()


class OrtRunner(Runner):
    """An ONNX file in ONNX Runtime (``ort``: CPU provider; ``ort-cuda``: CUDA provider, inputs and
    outputs bound on the GPU for timing so host copies are not timed; graphs with vitmerge custom
    nodes, whose kernel is CPU-only, are refused on ``ort-cuda``)."""

    def __init__(self, path: PathLike, runtime: str = "ort", threads: int = 0, label: Optional[str] = None,
                 sess=None, proto=None):
        """``proto``: the model of ``path`` already in memory (an export verifying what it has not written yet);
        without it the file is read once, and that one load serves the checks and the session."""
        path = Path(path)
        if runtime not in ("ort", "ort-cuda"):
            raise ValueError(f"OrtRunner runs 'ort' or 'ort-cuda', not {runtime!r}")
        given = proto
        proto = md.load_proto(path) if proto is None else proto
        if runtime == "ort-cuda":
            refuse_custom_nodes_on_cuda(path, proto)  # also when a session is handed in
        self.session = sess or (cuda_session(path, threads, proto=proto) if runtime == "ort-cuda"
                                else session(path, threads=threads, proto=proto))
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
                         schedule=onnx_schedule(proto), batch_range=(fixed, fixed) if fixed else (1, 1 << 30),
                         input_dtype=dtype)
        self.path = path
        self._proto = given  # a model not read from path (interleave makes its session again from it)
        self.threads = threads
        self.spinning = sess is None  # a session vitmerge made: ONNX Runtime's default, idle workers spin
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def interleave(self) -> Optional[str]:
        """Make the session fit for interleaved timing beside other models in this process: ONNX Runtime's idle
        intra-op workers spin after every run by default, so a session waiting its turn steals the cores of the
        one being timed (ViT-S, 2 cores: 30.5 ms alone, 59.2 ms interleaved). The session is made again with
        ``session.force_spinning_stop``: its workers still spin while it runs (as deployed: turning spinning off
        altogether made a 1 ms model 1.5x slower), and stop the moment its run returns, so nothing idle competes
        with the next model. Returns what was changed."""
        if not self.spinning:
            return None
        if self.runtime == "ort-cuda":
            self.session = cuda_session(self.path, self.threads, spinning=False, proto=self._proto)
        else:
            self.session = session(self.path, threads=self.threads, spinning=False, proto=self._proto)
        self.spinning = False
        return "ONNX Runtime workers stop spinning between runs"

    def _infer(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], {self.input_name: images})[0]

    def _infer_all(self, images: np.ndarray):
        return self.session.run(self.output_names, {self.input_name: images})

    def _prepare(self, batch: int) -> Callable[[], object]:
        x = self.example(batch)
        if self.device == "cpu":
            feed = {self.input_name: x}
            return lambda: self.session.run(self.output_names, feed)
        ort = import_ort()
        binding = self.session.io_binding()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding.bind_ortvalue_input(self.input_name, x_dev)
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        keep = (x_dev, binding)  # device buffers live as long as the callable
        return lambda: self.session.run_with_iobinding(keep[1])


__all__ = ["session", "cuda_session", "uses_custom_ops", "custom_nodes", "refuse_custom_nodes_on_cuda",
           "cuda_problem", "import_ort", "onnx_info", "onnx_schedule", "model_source", "OrtRunner", "CPU", "CUDA"]
