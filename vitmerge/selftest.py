"""``vitmerge selftest``: every path this machine offers, on a tiny model, each checked against ONNX Runtime CPU.

The first command to run on a new machine (an H100 box, a CI runner, a laptop). It builds a tiny
random-weight ViT (timm ``vit_tiny_patch16_224`` at 64 px, depth 2: 17 tokens), merges it with each
method, exports it in each graph form, and runs it in every runtime it can find:

    PyTorch CPU / CUDA, ONNX Runtime CPU (standard, native and plugin forms: the plugin form exercises
    the vitmerge::TokenMerge CPU kernel), an FP16 export, ONNX Runtime CUDA, the compiled Triton merge
    kernel, TensorRT (engines from the native and plugin forms, built and run), NVML / RAPL energy counters.

Every row is compared with the same model in ONNX Runtime CPU (the reference runtime: it runs on
every machine) on the same images, and ends as

* ``PASS`` with max |diff| and top-1 agreement,
* ``FAIL`` with the error (the command then exits 1), or
* ``SKIP`` with the reason (no CUDA device, TensorRT not installed, ...).

Nothing is downloaded; everything is written to a temporary folder that is removed afterwards.
"""
from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import merging
from .backends.ort import CUDA, OrtRunner, cuda_problem, import_ort
from .backends.torch import TorchRunner
from .errors import RuntimeMissingError, VitmergeError
from .exporter import export
from .models import apply
from .models.build import build_model
from .profiling import energy as en

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 64, "depth": 2}
R = 4
BATCH = 3


@dataclasses.dataclass
class Row:
    path: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SelftestResult:
    rows: List[Row]
    machine: Dict[str, str]

    @property
    def failed(self) -> List[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"machine": self.machine, "rows": [r.to_dict() for r in self.rows],
                "passed": sum(r.status == "PASS" for r in self.rows), "failed": len(self.failed),
                "skipped": sum(r.status == "SKIP" for r in self.rows)}


class Skip(Exception):
    """A path this machine does not offer; the message is the reason."""


def _compare(ref: np.ndarray, out: np.ndarray, rtol: float) -> str:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if out.shape != ref.shape:
        raise VitmergeError(f"output shape {out.shape} != reference {ref.shape}")
    diff = float(np.abs(out - ref).max())
    tol = 1e-4 + rtol * float(np.abs(ref).max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    text = f"max|diff| {diff:.1e} (tol {tol:.1e}), top-1 agreement {agree:.0%}"
    if not np.isfinite(diff) or diff > tol:
        raise VitmergeError(f"differs from ONNX Runtime CPU: {text}")
    return text


def machine() -> Dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cuda": "yes: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"}
    try:
        info["onnxruntime"] = import_ort().__version__
    except VitmergeError as e:
        info["onnxruntime"] = f"missing ({e})"
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = "not installed"
    return info


def run(methods: Optional[Sequence[str]] = None, quick: bool = False,
        on_row: Optional[Callable[[Row], None]] = None, workdir: Optional[Path] = None) -> SelftestResult:
    """Run every path; ``on_row`` is called as each row finishes (for live output)."""
    methods = list(methods or ([merging.DEFAULT_METHOD] if quick else merging.available_methods()))
    rows: List[Row] = []
    cuda = torch.cuda.is_available()
    gen = np.random.default_rng(0)
    images = gen.standard_normal((BATCH, 3, MODEL_KWARGS["img_size"], MODEL_KWARGS["img_size"])).astype(np.float32)

    def row(path: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        try:
            r = Row(path, "PASS", fn())
        except Skip as e:
            r = Row(path, "SKIP", str(e))
        except Exception as e:  # a FAIL row, not a crash: the other paths still run
            detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not isinstance(e, VitmergeError):
                detail += " | " + traceback.format_exc(limit=3).strip().splitlines()[-1]
            r = Row(path, "FAIL", detail[:500])
        r.seconds = time.perf_counter() - t0
        rows.append(r)
        if on_row is not None:
            on_row(r)

    with tempfile.TemporaryDirectory(prefix="vitmerge-selftest-", dir=workdir) as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: said in the module docstring, not per row
        tmp = Path(d)
        for method in methods:
            spec = merging.method_spec(method)
            torch.manual_seed(0)
            model = build_model(MODEL, **MODEL_KWARGS)
            apply(model, method=method, r=R, **spec.selftest_options)
            files: Dict[str, Path] = {}
            ref: Dict[str, np.ndarray] = {}

            def ort_cpu(form: str, method=method, model=model, files=files, ref=ref) -> str:
                res = export(model, tmp / f"{method}_{form}.onnx", merge_op=form, batch_sizes=(1, BATCH))
                files[form] = res.path
                out = OrtRunner(res.path)(images).numpy()
                if form == "standard":
                    ref["ort"] = out
                    return (f"export verified vs PyTorch: max|diff| {res.verification.max_abs_diff:.1e}, "
                            f"merge decisions identical {res.verification.decisions_identical:.0%}")
                return _compare(ref["ort"], out, 1e-3)

            def torch_dev(device: str, model=model, ref=ref) -> str:
                if device == "cuda" and not cuda:
                    raise Skip("no CUDA device (torch.cuda.is_available() is False)")
                if "ort" not in ref:
                    raise Skip("no ONNX Runtime CPU reference (its row failed)")
                return _compare(ref["ort"], TorchRunner(model, device=device)(images).numpy(),
                                1e-3 if device == "cpu" else 1e-2)

            row(f"{method}: ONNX Runtime CPU, standard form", lambda: ort_cpu("standard"))
            row(f"{method}: PyTorch CPU", lambda: torch_dev("cpu"))
            row(f"{method}: PyTorch CUDA", lambda: torch_dev("cuda"))
            # the plugin form (a TokenMerge node per step) and the Triton kernel exist for spec.plugin methods
            forms = ["native"] + (["plugin"] if spec.plugin else [])
            for form in forms:
                what = "TokenMerge CPU kernel (onnxruntime-extensions)" if form == "plugin" else "plugin-free rewrite"
                row(f"{method}: ONNX Runtime CPU, {form} form ({what})",
                    lambda form=form: _need_ref(ref) or ort_cpu(form))
            row(f"{method}: ONNX Runtime CUDA", lambda f=files, r=ref: _ort_cuda(f, r, images))
            row(f"{method}: FP16 export, ONNX Runtime CPU", lambda m=model, r=ref: _fp16(m, r, images, tmp, method))
            if spec.plugin:
                row(f"{method}: Triton merge kernel (compiled, CUDA)", lambda: _triton(method, cuda))
            row(f"{method}: TensorRT engine", lambda f=files, r=ref: _tensorrt(f, r, images, tmp, method, cuda))
        row("energy: NVML (GPU) counter", lambda: _energy("cuda"))
        row("energy: RAPL (CPU) counter", lambda: _energy("cpu"))
    row("CUDA driver vs PyTorch's CUDA", _driver_check)
    row("TensorRT: plugin string fields intact (NumPy ABI of tensorrt.so)", _trt_fields)
    return SelftestResult(rows=rows, machine=machine())


def driver_cuda_version() -> Optional[tuple]:
    """(major, minor) of the newest CUDA the installed NVIDIA driver supports, or None without a driver.

    From NVML when nvidia-ml-py is installed, else from ``nvidia-smi``'s header ("CUDA Version: 12.4"). Works
    when PyTorch sees no GPU (which is what a driver too old for PyTorch's CUDA looks like)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
        finally:
            pynvml.nvmlShutdown()
        return v // 1000, (v % 1000) // 10
    except Exception:
        pass
    import re
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


CUDA12_ROUTE = ("the CUDA 12 route (docs/gpu.md): a cu12 PyTorch (pip install torch --index-url "
                "https://download.pytorch.org/whl/cu126), pip install 'vitmerge[gpu-cu12,tensorrt-cu12]' "
                "(onnxruntime-gpu < 1.27, tensorrt-cu12 >= 10.16), never both TensorRT meta-packages at once; or "
                "update the driver to R580 or newer for CUDA 13")


def driver_check(torch_cuda: Optional[str], driver: Optional[tuple]) -> str:
    """PASS text, or :class:`VitmergeError` with the fix when the driver is older than PyTorch's CUDA."""
    if not torch_cuda:
        raise Skip(f"PyTorch {torch.__version__} is a CPU build (torch.version.cuda is None)")
    if driver is None:
        raise Skip("no NVIDIA driver found (no NVML, no nvidia-smi)")
    want = tuple(int(v) for v in torch_cuda.split(".")[:2])
    text = f"driver supports CUDA {driver[0]}.{driver[1]}, PyTorch {torch.__version__} is built for CUDA {torch_cuda}"
    if driver[0] < want[0]:  # within one major version CUDA's minor-version compatibility holds
        raise VitmergeError(f"{text}: PyTorch sees no GPU and TensorRT / onnxruntime-gpu of the same CUDA cannot start. "
                            f"Fix: {CUDA12_ROUTE if want[0] >= 13 and driver[0] == 12 else 'update the NVIDIA driver'}")
    if driver < want:
        return text + " (same major version: CUDA's minor-version compatibility applies)"
    return text


def _driver_check() -> str:
    return driver_check(torch.version.cuda, driver_cuda_version())


def _trt_fields() -> str:
    try:
        import tensorrt as trt
    except ImportError:
        raise Skip("TensorRT not installed") from None
    from .plugins.tensorrt_plugin import WHY_10_16, string_fields_intact

    if not string_fields_intact(trt):
        raise VitmergeError(f"TensorRT {trt.__version__} under NumPy {np.__version__}: PluginField('m', b'tome\\0', "
                            f"CHAR).data does not give b'tome\\0' back ({WHY_10_16}). Fix: pip install 'tensorrt>=10.16'")
    return f"TensorRT {trt.__version__}, NumPy {np.__version__}: b'tome\\0' comes back intact"


def _need_ref(ref) -> None:
    if "ort" not in ref:
        raise Skip("no ONNX Runtime CPU reference (the standard form's row failed)")


def _ort_cuda(files: Dict[str, Path], ref, images) -> str:
    from .backends.ort import placement_report

    ort = import_ort()
    problem = cuda_problem(ort)
    if problem is not None:
        raise Skip(problem)
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    _need_ref(ref)
    form = "native" if "native" in files else "standard"
    text = f"{form} form: " + _compare(ref["ort"], OrtRunner(files[form], runtime="ort-cuda")(images).numpy(), 1e-2)
    on_cpu = placement_report(files[form])
    if on_cpu:
        ops = sorted({op for op, _ in on_cpu})
        text += f"; {len(on_cpu)} compute node(s) placed on the CPU ({', '.join(ops)}): copies to the host and back"
    else:
        text += "; every compute node on CUDA"
    return text


def _fp16(model, ref, images, tmp: Path, method: str) -> str:
    _need_ref(ref)
    res = export(model, tmp / f"{method}_fp16.onnx", dtype="fp16", batch_sizes=(1, BATCH))
    v = res.verification
    out = OrtRunner(res.path)(images).numpy()
    agree = float((out.argmax(-1) == ref["ort"].argmax(-1)).mean())
    return (f"verified ({v.describe_rule().split(':')[0]}): decisions identical {v.decisions_identical or 1:.0%}; "
            f"top-1 agreement with the fp32 file {agree:.0%}")


def _triton(method: str, cuda: bool) -> str:
    if not cuda:
        raise Skip("no CUDA device: the compiled Triton kernel runs on a GPU (tests run it in Triton's CPU interpreter)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise Skip("Triton not installed (pip install triton)") from None
    from .plugins.triton_kernel import merge_tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 65, 96, generator=g)
    metric = torch.randn(2, 65, 32, generator=g)
    size = torch.randint(1, 4, (2, 65, 1), generator=g).float()
    extra = {"cls_attn": torch.rand(2, 65, generator=g).softmax(-1)} if merging.METHODS[method].needs_cls_attn else {}
    want = merging.plan(method, metric, 16, 1, **extra).merge(x, size)
    got = merge_tokens(x.cuda(), metric.cuda(), size.cuda(), 16, 1, method,
                       **{k: v.cuda() for k, v in extra.items()})
    torch.cuda.synchronize()
    d = max(float((g_.cpu() - w).abs().max()) for g_, w in zip(got, want))
    if d > 1e-4:
        raise VitmergeError(f"Triton merge differs from the PyTorch merge: max|diff| {d:.1e}")
    return f"merge of 2x65 tokens, r=16: max|diff| vs PyTorch {d:.1e}"


def _tensorrt(files: Dict[str, Path], ref, images, tmp: Path, method: str, cuda: bool) -> str:
    from .backends.trt import BuildRequest, TrtRunner, build_engine

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise Skip("TensorRT not installed (pip install 'vitmerge[tensorrt]' where NVIDIA's index is reachable)") from None
    if not cuda:
        raise Skip("no CUDA device: TensorRT builds and runs engines on an NVIDIA GPU")
    _need_ref(ref)
    out = []
    for form in [f for f in ("native", "plugin") if f in files]:
        try:
            eng = build_engine(BuildRequest(onnx_path=files[form], output=tmp / f"{method}_{form}.engine",
                                            min_batch=1, opt_batch=BATCH, max_batch=BATCH)).engine
            out.append(f"{form}: " + _compare(ref["ort"], TrtRunner(eng)(images).numpy(), 1e-2))
        except RuntimeMissingError:
            raise
        except VitmergeError as e:
            raise VitmergeError(f"{form} form: {e}") from None
    return "; ".join(out)


def _energy(device: str) -> str:
    meter, reason = en.meter_for(device)
    if meter is None:
        raise Skip(reason)
    try:
        e0, t0 = meter.read(), time.perf_counter()
        time.sleep(0.3)
        e1, t1 = meter.read(), time.perf_counter()
    finally:
        meter.close()
    if e1 < e0:
        raise VitmergeError(f"{meter.source}: the counter went backwards ({e0:.3f} J -> {e1:.3f} J)")
    return f"{meter.source}: readable, {(e1 - e0) / (t1 - t0):.1f} W over {t1 - t0:.2f} s idle-ish"


__all__ = ["run", "Row", "SelftestResult", "machine"]
