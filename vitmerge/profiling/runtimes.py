"""Runtimes that ``vitmerge profile`` measures, behind one small interface.

A :class:`Target` is one model in one runtime: ``target.runner(batch)`` returns a zero-argument
callable that runs one batch on inputs prepared once (so input creation is never timed), and
``target.sync()`` waits for the device (``torch.cuda.synchronize`` for CUDA work; ONNX Runtime's
``run`` is synchronous). Runtimes:

* ``torch``     PyTorch eager on a timm model (``timm:NAME``), merged with ``vitmerge.apply``;
                CUDA when available (``device``), else CPU.
* ``ort``       ONNX Runtime, CPU execution provider.
* ``ort-cuda``  ONNX Runtime, CUDA execution provider (needs onnxruntime-gpu and an NVIDIA GPU);
                inputs and outputs stay on the GPU (I/O binding), so host copies are not timed.
* ``trt``       a serialized TensorRT engine (lazy import; needs TensorRT and a GPU).

Every missing piece raises :class:`~vitmerge.errors.RuntimeMissingError` saying what to install.
:func:`profile_targets` interleaves all targets batch size by batch size, so the ratios between them
see the same machine noise, and optionally measures energy per image (:mod:`.energy`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ModelNotFoundError, RuntimeMissingError, ScheduleError, VitmergeError
from .latency import LatencyStats, interleaved

RUNTIMES = ("torch", "ort", "ort-cuda", "trt")
TIMM_PREFIX = "timm:"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}


def _noop() -> None:
    return None


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


@dataclass
class Target:
    """One model in one runtime, ready to run at any batch size it supports."""

    label: str
    spec: str  # what the user gave: a path or timm:NAME
    runtime: str
    device: str  # "cpu" or "cuda"
    input_shape: Tuple[int, ...]  # per-image shape, e.g. (3, 224, 224)
    make_runner: Callable[[int], Callable[[], object]]
    sync: Callable[[], None] = _noop
    info: Dict[str, Any] = field(default_factory=dict)  # method, r, tokens, ... where known
    batch_range: Tuple[int, int] = (1, 1 << 30)

    def runner(self, batch: int) -> Callable[[], object]:
        lo, hi = self.batch_range
        if not lo <= batch <= hi:
            raise ScheduleError(
                f"{self.label}: batch {batch} is outside what this model accepts ({lo}..{hi}); "
                + ("rebuild the engine with a larger --max-batch" if self.runtime == "trt"
                   else "export it with a dynamic batch axis (vitmerge export does)")
            )
        return self.make_runner(batch)


# ------------------------------------------------------------------------------------- helpers


def onnx_info(path: str | Path) -> Dict[str, Any]:
    """The merge schedule vitmerge stored in the file's metadata (empty for foreign files)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    info: Dict[str, Any] = {}
    if "vitmerge.method" in meta:
        info["method"] = meta["vitmerge.method"]
    for key in ("r", "tokens_out"):
        if f"vitmerge.{key}" in meta:
            try:
                info[key] = json.loads(meta[f"vitmerge.{key}"])
            except ValueError:
                pass
    if isinstance(info.get("r"), list) and info["r"]:
        info["r_mean"] = sum(info["r"]) / len(info["r"])
    elif "vitmerge.input_shape" in meta:
        info["r_mean"] = 0.0  # exported by vitmerge without merging
    return info


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise ModelNotFoundError(f"{what} {str(path)!r} is not a file")


def make_ort_session(path: str | Path, providers: Sequence[Any], threads: int = 0):
    """An ONNX Runtime session for ``path``; TokenMerge custom ops registered when the graph has them."""
    from ..exporter.verify import ort_session

    path = Path(path)
    try:
        return ort_session(path, threads=threads, providers=providers)
    except VitmergeError:
        raise
    except Exception as e:
        raise ModelNotFoundError(
            f"ONNX Runtime could not load {path.name}: {str(e).splitlines()[0][:300]}"
        ) from None


def _dim(d) -> Optional[int]:
    return d if isinstance(d, int) and d > 0 else None


# ------------------------------------------------------------------------------------- targets


def ort_target(path: str | Path, runtime: str = "ort", threads: int = 0, label: Optional[str] = None) -> Target:
    path = Path(path)
    _check_file(path, "ONNX model")
    try:
        import onnx

        onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelNotFoundError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    if runtime == "ort-cuda":
        import onnxruntime as ort

        have = ort.get_available_providers()
        if "CUDAExecutionProvider" not in have:
            raise RuntimeMissingError(
                "ONNX Runtime CUDA is not available: this onnxruntime has providers "
                f"{', '.join(have)}. Install onnxruntime-gpu (pip install 'vitmerge[gpu]') on a machine with an "
                "NVIDIA GPU, or use --runtime ort"
            )
        sess = make_ort_session(path, [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], threads)
        if sess.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeMissingError(
                "ONNX Runtime could not start its CUDA provider (no usable NVIDIA GPU, or CUDA/cuDNN libraries "
                "missing); use --runtime ort for the CPU"
            )
        device = "cuda"
    else:
        sess = make_ort_session(path, ["CPUExecutionProvider"], threads)
        device = "cpu"
    inp = sess.get_inputs()[0]
    out_names = [o.name for o in sess.get_outputs()]
    dtype = _ORT_TYPES.get(inp.type)
    if dtype is None:
        raise ModelNotFoundError(f"{path.name}: input {inp.name!r} has type {inp.type}; vitmerge profiles image models with float inputs")
    shape = list(inp.shape)
    per_image = tuple(_dim(d) for d in shape[1:])
    if any(d is None for d in per_image):
        raise ModelNotFoundError(
            f"{path.name}: input {inp.name!r} has shape {shape}; only the batch axis may be dynamic (export with a fixed image size)"
        )
    fixed = _dim(shape[0]) if shape else None
    batch_range = (fixed, fixed) if fixed else (1, 1 << 30)

    def make(batch: int):
        x = np.random.default_rng(0).standard_normal((batch, *per_image)).astype(dtype)
        if device == "cpu":
            feed = {inp.name: x}
            return lambda: sess.run(out_names, feed)
        import onnxruntime as ort

        binding = sess.io_binding()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding.bind_ortvalue_input(inp.name, x_dev)
        for name in out_names:
            binding.bind_output(name, "cuda", 0)
        return lambda: sess.run_with_iobinding(binding)

    info = onnx_info(path)
    return Target(label=label or path.name, spec=str(path), runtime=runtime, device=device,
                  input_shape=per_image, make_runner=make, info=info, batch_range=batch_range)


def torch_target(name: str, checkpoint: Optional[str | Path] = None, method: str = "tome", r: Any = 0,
                 img_size: Optional[int] = None, num_classes: Optional[int] = None, device: str = "auto",
                 threads: int = 0, prop_attn: bool = True, label: Optional[str] = None) -> Target:
    """PyTorch eager: timm model ``name`` (local checkpoint or random weights), merged when r != 0."""
    import torch

    import vitmerge
    from ..models.build import build_model
    from .flops import input_shape

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeMissingError("--device cuda: PyTorch sees no CUDA GPU here (CPU-only build or no driver); use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    model = build_model(name, checkpoint, img_size=img_size, num_classes=num_classes)
    info: Dict[str, Any] = {"method": None, "r": None, "r_mean": 0.0}
    if r != 0:
        vitmerge.apply(model, method=method, r=r, prop_attn=prop_attn)
        mi = model.vitmerge
        info = {"method": mi.method, "r": list(mi.r), "r_mean": sum(mi.r) / len(mi.r), "tokens_out": mi.tokens_out}
    shape = tuple(input_shape(model))
    model = model.eval().to(device)

    def make(batch: int):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)

        def run():
            with torch.inference_mode():
                return model(x)

        return run

    tag = f"{name}" + (f" {info['method']} r={_r_text(info['r'])}" if info.get("method") else "")
    return Target(label=label or tag, spec=f"{TIMM_PREFIX}{name}", runtime="torch", device=device,
                  input_shape=shape, make_runner=make, sync=_cuda_sync if device == "cuda" else _noop, info=info)


def _r_text(r) -> str:
    if isinstance(r, list) and r and all(v == r[0] for v in r):
        return str(r[0])
    return str(r)


def engine_metadata_path(engine: str | Path) -> Optional[Path]:
    """``model.engine.json`` (preferred) or ``model.json`` next to the engine, if either exists."""
    engine = Path(engine)
    for cand in (engine.with_name(engine.name + ".json"), engine.with_suffix(".json")):
        if cand.is_file():
            return cand
    return None


def load_engine_metadata(engine: str | Path) -> Optional[Dict[str, Any]]:
    p = engine_metadata_path(engine)
    if p is None:
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"engine metadata {str(p)!r} is not valid JSON ({e}); rebuild with vitmerge build") from None
    if not isinstance(meta, dict):
        raise ModelNotFoundError(f"engine metadata {str(p)!r} must be a JSON object; rebuild with vitmerge build")
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


def trt_target(path: str | Path, label: Optional[str] = None) -> Target:
    """A TensorRT engine, run with TensorRT 10's name-based I/O on CUDA buffers owned by PyTorch."""
    path = Path(path)
    _check_file(path, "TensorRT engine")
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeMissingError(
            "TensorRT not installed: profiling an engine needs the tensorrt Python package "
            "(pip install 'vitmerge[tensorrt]', from NVIDIA's package index) and an NVIDIA GPU"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise RuntimeMissingError("TensorRT engines run on an NVIDIA GPU, and PyTorch sees none here")
    meta = load_engine_metadata(path)
    for lib in plugin_libraries(meta):
        import ctypes
        import os

        if not Path(lib).is_file():
            raise RuntimeMissingError(f"{path.name} needs the plugin library {lib}, which does not exist here")
        ctypes.CDLL(lib, mode=os.RTLD_GLOBAL if hasattr(os, "RTLD_GLOBAL") else 0)
    if meta and (meta.get("token_merge_plugin") or meta.get("merge_op") == "plugin") and not plugin_libraries(meta):
        from ..plugins.tensorrt_plugin import register  # the Python (JIT) TokenMerge plugin

        register()
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
        raise ModelNotFoundError(f"{path.name} has inputs {inputs}; vitmerge profiles single-input image models")
    inp = inputs[0]
    shape = list(engine.get_tensor_shape(inp))
    per_image = tuple(int(d) for d in shape[1:])
    lo, hi = 1, 1 << 30
    if shape[0] == -1:
        mn, _, mx = engine.get_tensor_profile_shape(inp, 0)
        lo, hi = int(mn[0]), int(mx[0])
    else:
        lo = hi = int(shape[0])
    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
                   trt.int32: torch.int32}
    ctx = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def make(batch: int):
        x = torch.randn(batch, *per_image, generator=torch.Generator().manual_seed(0))
        x = x.to(torch_dtype.get(engine.get_tensor_dtype(inp), torch.float32)).cuda()
        ctx.set_input_shape(inp, tuple(x.shape))
        ctx.set_tensor_address(inp, x.data_ptr())
        outs = []
        for name in outputs:
            oshape = tuple(ctx.get_tensor_shape(name))
            o = torch.empty(oshape, dtype=torch_dtype.get(engine.get_tensor_dtype(name), torch.float32), device="cuda")
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        keep = (x, outs)  # buffers live as long as the runner

        def run():
            ok = ctx.execute_async_v3(stream.cuda_stream)
            if not ok:
                raise RuntimeMissingError(f"TensorRT failed to run {path.name} at batch {batch}")
            return keep

        return run

    def sync():
        stream.synchronize()

    meta = meta or {}
    sched = meta.get("schedule") if isinstance(meta.get("schedule"), dict) else {}
    info = {k: meta[k] for k in ("precision", "tensorrt_version", "gpu") if k in meta}
    for k in ("method", "r"):
        if k in meta or k in sched:
            info[k] = meta.get(k, sched.get(k))
    if isinstance(info.get("r"), list) and info["r"]:
        info["r_mean"] = sum(info["r"]) / len(info["r"])
    return Target(label=label or path.name, spec=str(path), runtime="trt", device="cuda", input_shape=per_image,
                  make_runner=make, sync=sync, info=info, batch_range=(lo, hi))


def default_runtime(spec: str) -> str:
    if spec.startswith(TIMM_PREFIX):
        return "torch"
    if Path(spec).suffix.lower() in ENGINE_SUFFIXES:
        return "trt"
    return "ort"


def open_target(spec: str, runtime: Optional[str] = None, *, checkpoint=None, method: str = "tome", r: Any = 0,
                img_size: Optional[int] = None, num_classes: Optional[int] = None, device: str = "auto",
                threads: int = 0, label: Optional[str] = None) -> Target:
    """``MODEL.onnx`` | ``MODEL.engine`` | ``timm:NAME`` in ``runtime`` (default: the natural one)."""
    runtime = runtime or default_runtime(spec)
    if runtime not in RUNTIMES:
        raise ScheduleError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    kind = default_runtime(spec)
    if spec.startswith(TIMM_PREFIX):
        if runtime != "torch":
            raise ScheduleError(
                f"{spec} is a PyTorch model: it runs with --runtime torch. For {runtime}, export it first "
                "(vitmerge export) and profile the .onnx" + (" / build an engine" if runtime == "trt" else "")
            )
        name = spec[len(TIMM_PREFIX):]
        if not name:
            raise ModelNotFoundError("timm: needs a model name, e.g. timm:vit_small_patch16_224")
        return torch_target(name, checkpoint, method, r, img_size, num_classes, device, threads, label=label)
    if kind == "trt":
        if runtime != "trt":
            raise ScheduleError(f"{spec} is a TensorRT engine: it runs with --runtime trt only")
        return trt_target(spec, label=label)
    if runtime == "torch":
        raise ScheduleError(f"{spec} is an ONNX file: use --runtime ort or ort-cuda (torch takes timm:NAME)")
    if runtime == "trt":
        raise ScheduleError(f"{spec} is an ONNX file: build an engine first (vitmerge build {spec} --output model.engine)")
    return ort_target(spec, runtime, threads, label=label)


# ------------------------------------------------------------------------------------- profile


@dataclass
class ProfileRow:
    label: str
    spec: str
    runtime: str
    device: str
    batch: int
    stats: LatencyStats
    info: Dict[str, Any]
    speedup: float = 1.0  # p50 of the first target / p50 of this one, same batch
    energy: Any = None  # EnergyResult

    def to_dict(self) -> Dict[str, Any]:
        d = {"label": self.label, "model": self.spec, "runtime": self.runtime, "device": self.device,
             "batch": self.batch, **self.stats.summary(self.batch), "speedup_vs_first": self.speedup,
             "method": self.info.get("method"), "r": self.info.get("r"), "r_mean": self.info.get("r_mean")}
        if self.energy is not None:
            d["energy"] = self.energy.to_dict()
        return d


@dataclass
class ProfileResult:
    rows: List[ProfileRow]
    settings: Dict[str, Any]
    idle: Dict[str, Any] = field(default_factory=dict)  # meter source -> IdleBaseline
    energy_note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"settings": self.settings, "results": [r.to_dict() for r in self.rows],
                "idle_baselines": {k: vars(v) for k, v in self.idle.items()}, "energy_note": self.energy_note}


def _unique_labels(targets: Sequence[Target]) -> None:
    seen: Dict[str, int] = {}
    for t in targets:
        base = t.label if sum(1 for u in targets if u.label == t.label) == 1 else f"{t.label} [{t.runtime}]"
        n = seen.get(base, 0)
        seen[base] = n + 1
        t.label = base if n == 0 else f"{base} #{n + 1}"


def profile_targets(
    targets: Sequence[Target],
    batches: Sequence[int],
    rounds: int = 10,
    iters: int = 5,
    warmup: int = 3,
    energy: bool = False,
    energy_seconds: float = 2.0,
    on_round: Optional[Callable[[], None]] = None,
    on_status: Optional[Callable[[str], None]] = None,
) -> ProfileResult:
    """Latency (interleaved across targets, per batch size) and, optionally, energy per image."""
    from . import energy as en

    if not targets:
        raise ScheduleError("nothing to profile: give at least one model")
    if rounds < 1 or iters < 1 or warmup < 0:
        raise ScheduleError(f"need rounds >= 1, iters >= 1, warmup >= 0 (got {rounds}, {iters}, {warmup})")
    if any(b < 1 for b in batches):
        raise ScheduleError(f"batch sizes must be >= 1, got {list(batches)}")
    _unique_labels(list(targets))
    status = on_status or (lambda s: None)
    syncs = {id(t.sync): t.sync for t in targets}.values()

    def sync_all():
        for s in syncs:
            s()

    rows: List[ProfileRow] = []
    runners: Dict[Tuple[str, int], Callable[[], object]] = {}
    for b in batches:
        fns = {t.label: t.runner(b) for t in targets}
        runners.update({(label, b): fn for label, fn in fns.items()})
        status(f"batch {b}: {len(fns)} model(s) interleaved")
        stats = interleaved(fns, rounds=rounds, iters=iters, warmup=warmup, sync=sync_all, progress=on_round)
        first = stats[targets[0].label].p50
        for t in targets:
            s = stats[t.label]
            rows.append(ProfileRow(t.label, t.spec, t.runtime, t.device, b, s, dict(t.info),
                                   speedup=first / s.p50 if s.p50 > 0 else math.nan))
    result = ProfileResult(rows=rows, settings={"batches": list(batches), "rounds": rounds, "iters": iters,
                                                 "warmup": warmup, "energy": energy,
                                                 "energy_seconds": energy_seconds if energy else None})
    if not energy:
        result.energy_note = "energy: not measured (disabled with --no-energy)"
        return result
    meters: Dict[str, Tuple[Any, Optional[str]]] = {}
    for t in targets:
        if t.device not in meters:
            meters[t.device] = en.meter_for(t.device)
    try:
        idle: Dict[str, Any] = {}
        for device, (meter, _) in meters.items():
            if meter is not None:
                status(f"idle baseline ({meter.source}, {energy_seconds:.1f} s)")
                sync_all()
                idle[device] = en.measure_idle(meter, energy_seconds)
                result.idle[meter.source] = idle[device]
        for row in rows:
            meter, reason = meters[row.device]
            if meter is not None:
                status(f"energy: {row.label}, batch {row.batch}")
            row.energy = en.measure_energy(runners[(row.label, row.batch)], row.batch, meter, reason,
                                           min_seconds=energy_seconds, idle=idle.get(row.device), sync=sync_all)
    finally:
        for meter, _ in meters.values():
            if meter is not None:
                meter.close()
    reasons = sorted({r.energy.reason for r in rows if not r.energy.measured})
    if reasons:
        result.energy_note = "energy: not measured (" + "; ".join(reasons) + ")"
    return result


def profile_sections(result: ProfileResult) -> List[Tuple[str, str]]:
    """Markdown sections for the report: latency table per batch, energy table or the reason."""
    from .report import md_table

    s = result.settings
    first = result.rows[0].label if result.rows else "?"
    latency_rows = [
        (r.label, r.runtime, r.device, r.batch, r.stats.p50, r.stats.p90, r.stats.p99, r.stats.throughput(r.batch),
         r.speedup) for r in result.rows
    ]
    text = (f"{s['rounds']} interleaved rounds x {s['iters']} timed calls per model and batch size, "
            f"{s['warmup']} warm-up calls excluded, device synchronised around each call. "
            f"Speed-up = p50 of the first model ({first}) / p50 of the row, same batch.\n\n")
    text += md_table(["model", "runtime", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s",
                      "speed-up vs first"], latency_rows,
                     formats=[None, None, None, None, ".3f", ".3f", ".3f", ",.1f", ".2f"])
    sections = [("Latency and throughput", text)]
    measured = [r for r in result.rows if r.energy is not None and r.energy.measured]
    if measured:
        erows = [(r.label, r.batch, r.energy.source, r.energy.seconds, r.energy.watts,
                  r.energy.joules_per_image * 1e3,
                  None if r.energy.idle_watts is None else r.energy.idle_watts,
                  None if r.energy.joules_per_image_above_idle is None else r.energy.joules_per_image_above_idle * 1e3)
                 for r in measured]
        body = ("Counter difference over a back-to-back window; the idle baseline is the same counter over an "
                "idle window of the same length, measured separately.\n\n")
        body += md_table(["model", "batch", "counter", "window s", "W", "mJ/image", "idle W", "mJ/image above idle"], erows,
                         formats=[None, None, None, ".2f", ".1f", ".3f", ".1f", ".3f"])
        if result.energy_note:
            body += f"\n\n{result.energy_note}"
        sections.append(("Energy", body))
    else:
        sections.append(("Energy", result.energy_note or "energy: not measured"))
    return sections


def write_profile_report(result: ProfileResult, report_dir, title: str = "vitmerge profile"):
    """report.json + report.md (+ latency/energy vs r plots when the models differ in r)."""
    from . import plots
    from .report import prepare_dir, write_report

    d = prepare_dir(report_dir)
    sections = profile_sections(result)
    made = []
    rows = [r for r in result.rows if r.info.get("r_mean") is not None]
    if len({r.info["r_mean"] for r in rows}) >= 2:
        def line(r):  # one line per runtime and method (r=0 rows join every method's line)
            return r.runtime + (f" {r.info['method']}" if r.info.get("method") and len(methods) > 1 else "")

        methods = {r.info.get("method") for r in rows if r.info.get("method")}
        pts = [{"runtime": line(r), "batch": r.batch, "r": r.info["r_mean"], "p50_ms": r.stats.p50,
                "p90_ms": r.stats.p90} for r in rows]
        made.append(plots.plot_latency_vs_r(pts, d / "latency_vs_r.png"))
        epts = [{"runtime": line(r), "batch": r.batch, "r": r.info["r_mean"], "energy": r.energy}
                for r in rows if r.energy is not None]
        if epts:
            path, note = plots.plot_energy_vs_r(epts, d / "energy_vs_r.png")
            if path is not None:
                made.append(path)
            else:
                sections.append(("Energy plot", note))
    else:
        sections.append(("Plots", "latency vs r: not plotted (the profiled models do not differ in r; "
                                  "give several exports, e.g. r=0, 8, 16)"))
    return write_report(d, title, result.to_dict(), sections, plots=made)


__all__ = [
    "RUNTIMES", "Target", "open_target", "ort_target", "torch_target", "trt_target", "make_ort_session",
    "onnx_info", "profile_targets", "profile_sections", "ProfileResult", "ProfileRow",
    "engine_metadata_path", "load_engine_metadata", "plugin_libraries", "default_runtime", "write_profile_report",
]
