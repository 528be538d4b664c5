"""The report every measuring command writes: ``report.json`` (numbers) + ``report.md`` (for people).

``report.md`` is meant to be pasted into a design review as is: what machine the numbers come from
(CPU model and cores, GPU or none, library versions), then one section per measurement, tables in
GitHub Markdown. Both files are written atomically (temporary file + rename): a crash never leaves a
half-written report behind, and a re-run replaces the old one whole.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .._io import atomic_write, writable_dir
from .._version import __version__, dist_version

Section = Tuple[str, str]  # (heading, markdown body)


# ---------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> Dict[str, Any]:
    """Where the numbers were measured: CPU, cores, memory, GPU (or none), library versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    gpus: List[str] = []
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
    except Exception:  # torch is a dependency; still, a report must not fail on a probe
        pass
    info["gpus"] = gpus
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = list(ort.get_available_providers())
    except Exception:
        info["onnxruntime"] = None
    for dist in ("onnx", "timm", "tensorrt", "nvidia-ml-py"):
        v = dist_version(dist)
        if v is not None:
            info[dist.replace("-", "_")] = v
    try:
        info["vitmerge"] = __version__
    except Exception:
        pass
    return info


def machine_markdown(info: Mapping[str, Any]) -> str:
    cores = f"{info.get('logical_cores')} logical"
    if info.get("usable_cores") not in (None, info.get("logical_cores")):
        cores += f" ({info.get('usable_cores')} usable by this process)"
    gpus = ", ".join(info.get("gpus") or []) or "none"
    ort = info.get("onnxruntime") or "not installed"
    if info.get("onnxruntime_providers"):
        ort += " (" + ", ".join(p.replace("ExecutionProvider", "") for p in info["onnxruntime_providers"]) + ")"
    rows = [
        ("CPU", info.get("cpu")),
        ("cores", cores),
        ("memory", f"{info['memory_gib']} GiB" if info.get("memory_gib") else "unknown"),
        ("GPU", gpus + (f" (CUDA {info['cuda']})" if info.get("cuda") else "")),
        ("OS / Python", f"{info.get('os')} / {info.get('python')}"),
        ("PyTorch", info.get("torch", "?")),
        ("ONNX Runtime", ort),
    ]
    for key, label in (("tensorrt", "TensorRT"), ("timm", "timm"), ("onnx", "onnx"), ("vitmerge", "vitmerge")):
        if info.get(key):
            rows.append((label, info[key]))
    return md_table(["", ""], rows)


# ---------------------------------------------------------------------------------------- tables


def fmt(value: Any, digits: int = 3, spec: Optional[str] = None) -> str:
    """A table cell: floats to ``digits`` decimals (or format ``spec``), None/NaN as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if spec:
            return format(value, spec)
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[Sequence[str]] = None,
             formats: Optional[Sequence[Optional[str]]] = None) -> str:
    """GitHub Markdown table; numbers right-aligned unless ``align`` ('l'/'r' per column) says otherwise.

    formats: an optional format spec per column for floats (e.g. ".2f", ",.1f"); None keeps :func:`fmt`'s default.
    """
    rows = [list(r) for r in rows]
    if align is None:
        align = ["r" if rows and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                                     for r in rows if i < len(r) and r[i] is not None) else "l"
                 for i in range(len(headers))]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in headers) + " |",
           "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    for r in rows:
        specs = list(formats or []) + [None] * (len(r) - len(formats or []))
        out.append("| " + " | ".join(esc(fmt(c, spec=f)) for c, f in zip(r, specs)) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- writing


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, numpy/torch scalars and arrays -> JSON types; NaN/inf -> null (strict JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return to_jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return str(obj)


def prepare_dir(directory: Union[str, Path]) -> Path:
    """Create the report folder (and parents); clear error when that is not possible."""
    return writable_dir(directory, "report folder")


@dataclasses.dataclass
class ReportPaths:
    json: Path
    markdown: Path
    plots: List[Path]


def write_report(
    directory: Union[str, Path],
    name: str,
    data: Mapping[str, Any],
    markdown_sections: Union[Sequence[Section], Mapping[str, str]] = (),
    plots: Sequence[Union[str, Path]] = (),
    machine: Optional[Mapping[str, Any]] = None,
) -> ReportPaths:
    """Write ``directory/report.json`` and ``directory/report.md``.

    data: the command's numbers (anything :func:`to_jsonable` handles); stored under "data" next to
    "name", "created", "machine" and "plots" (file names relative to the folder).
    markdown_sections: (heading, body) pairs or a {heading: body} mapping, in order; bodies are
    Markdown (use :func:`md_table` for tables). Plots are embedded as images.
    """
    d = prepare_dir(directory)
    machine = dict(machine) if machine is not None else machine_info()
    sections = list(markdown_sections.items()) if isinstance(markdown_sections, Mapping) else list(markdown_sections)
    plot_paths = [Path(p) for p in plots]
    rel = [os.path.relpath(p, d) for p in plot_paths]
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    doc = {"name": name, "created": created, "machine": to_jsonable(machine), "plots": rel,
           "data": to_jsonable(data)}
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    md = [f"# {name}", "", f"_Measured {created} with vitmerge {machine.get('vitmerge', '?')}._", "",
          "## Machine", "", machine_markdown(machine), ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body.rstrip(), ""]
    if rel:
        md += ["## Plots", ""]
        for r in rel:
            md += [f"![{Path(r).stem}]({r})", ""]
    json_path, md_path = d / "report.json", d / "report.md"
    atomic_write(json_path, text)
    atomic_write(md_path, "\n".join(md).rstrip() + "\n")
    return ReportPaths(json=json_path, markdown=md_path, plots=plot_paths)


__all__ = ["write_report", "ReportPaths", "machine_info", "machine_markdown", "md_table", "fmt",
           "to_jsonable", "atomic_write", "prepare_dir"]
