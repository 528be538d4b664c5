"""PNG plots for reports (matplotlib, Agg canvas; no display needed).

* latency vs r, one line per runtime (and batch size);
* accuracy vs latency with the Pareto front across methods and schedules, plus a baseline point
  (e.g. MobileViT) where one is given;
* energy per image vs r, only from measured points: with none, no plot and a note saying why.

Every function writes atomically (temporary file + rename) and returns the path it wrote.
"""
from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .._io import atomic_write

PathLike = Union[str, Path]


def _figure(width: float = 6.4, height: float = 4.2):
    # Figure + Agg canvas directly: no pyplot, no global backend switch, safe in threads and tests.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: PathLike) -> Path:
    """Render ``fig`` as PNG and write it atomically (temporary file + rename)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------- Pareto


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point dominates, fastest first.

    Lower latency (first value) and higher accuracy (second value) are better. A point is dominated
    when another is at least as good in both and strictly better in one; identical points do not
    dominate each other, so all copies of a front point are on the front.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: List[int] = []
    best = float("-inf")  # highest accuracy among strictly faster points
    k = 0
    while k < len(order):
        lat = points[order[k]][0]
        group = []  # all points with this exact latency
        while k < len(order) and points[order[k]][0] == lat:
            group.append(order[k])
            k += 1
        top = points[group[0]][1]  # group is sorted by accuracy, best first
        if top > best:
            front += [i for i in group if points[i][1] == top]
            best = top
    return front


# ------------------------------------------------------------------------------------- plots


def plot_latency_vs_r(rows: Sequence[Mapping[str, Any]], path: PathLike, title: str = "Latency vs r") -> Path:
    """rows: {"runtime", "r", "p50_ms", optional "batch", "p90_ms"}; one line per runtime (x batch)."""
    if not rows:
        raise ValueError("plot_latency_vs_r needs at least one row")
    lines: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        label = str(row["runtime"]) + (f", batch {row['batch']}" if row.get("batch") is not None else "")
        lines[label].append(row)
    fig = _figure()
    ax = fig.add_subplot()
    for label, pts in lines.items():
        pts = sorted(pts, key=lambda p: float(p["r"]))
        xs, ys = [float(p["r"]) for p in pts], [float(p["p50_ms"]) for p in pts]
        line, = ax.plot(xs, ys, marker="o", label=label)
        if all(p.get("p90_ms") is not None for p in pts):
            ax.fill_between(xs, ys, [float(p["p90_ms"]) for p in pts], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("r (tokens merged per block)")
    ax.set_ylabel("latency p50 [ms] (band: to p90)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)


@dataclass
class ParetoPoint:
    label: str  # e.g. "tome r=16" or "hashing budget 0.5"
    method: str
    latency_ms: float
    accuracy: float  # top-1, 0..1 or percent: whatever the caller uses consistently


def plot_pareto(points: Sequence[Union[ParetoPoint, Mapping[str, Any]]], path: PathLike,
                baseline: Optional[Union[ParetoPoint, Mapping[str, Any]]] = None,
                title: str = "Accuracy vs latency", accuracy_label: str = "top-1 accuracy") -> Path:
    """Scatter per method, the Pareto front as a step line, the baseline as a star (not on the front)."""
    pts = [p if isinstance(p, ParetoPoint) else ParetoPoint(**{k: p[k] for k in ("label", "method", "latency_ms", "accuracy")})
           for p in points]
    if not pts:
        raise ValueError("plot_pareto needs at least one point")
    fig = _figure()
    ax = fig.add_subplot()
    by_method: Dict[str, List[ParetoPoint]] = defaultdict(list)
    for p in pts:
        by_method[p.method].append(p)
    for method, group in by_method.items():
        ax.scatter([p.latency_ms for p in group], [p.accuracy for p in group], label=method, s=28, zorder=3)
    front = pareto_front([(p.latency_ms, p.accuracy) for p in pts])
    fx, fy = [pts[i].latency_ms for i in front], [pts[i].accuracy for i in front]
    ax.step(fx, fy, where="post", color="black", lw=1.2, alpha=0.7, label="Pareto front", zorder=2)
    for i in front:
        ax.annotate(pts[i].label, (pts[i].latency_ms, pts[i].accuracy), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if baseline is not None:
        b = baseline if isinstance(baseline, ParetoPoint) else ParetoPoint(
            **{k: baseline[k] for k in ("label", "method", "latency_ms", "accuracy")})
        ax.scatter([b.latency_ms], [b.accuracy], marker="*", s=160, color="tab:red", label=b.label, zorder=4)
    ax.set_xlabel("latency p50 [ms]")
    ax.set_ylabel(accuracy_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)


def plot_energy_vs_r(rows: Sequence[Mapping[str, Any]], path: PathLike,
                     title: str = "Energy per image vs r") -> Tuple[Optional[Path], Optional[str]]:
    """rows: {"runtime", "r", "energy": EnergyResult-like dict or object, optional "batch"}.

    Returns (path, None), or (None, note) when no row holds a measured value: energy is never
    estimated, so there is then nothing to draw.
    """
    def get(e, key):
        return e.get(key) if isinstance(e, Mapping) else getattr(e, key, None)

    measured = [r for r in rows if r.get("energy") is not None and get(r["energy"], "measured")]
    if not measured:
        reasons = sorted({str(get(r["energy"], "reason")) for r in rows if r.get("energy") is not None} - {"None"})
        return None, "energy per image vs r: not plotted, energy not measured (" + ("; ".join(reasons) or "no energy data") + ")"
    lines: Dict[str, List[Tuple[float, float, Optional[float]]]] = defaultdict(list)
    for r in measured:
        e = r["energy"]
        label = str(r["runtime"]) + (f", batch {r['batch']}" if r.get("batch") is not None else "")
        above = get(e, "joules_per_image_above_idle")
        lines[label].append((float(r["r"]), float(get(e, "joules_per_image")) * 1e3,
                             None if above is None else float(above) * 1e3))
    fig = _figure()
    ax = fig.add_subplot()
    for label, pts in lines.items():
        pts.sort()
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} (total)")
        if all(p[2] is not None for p in pts):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", color=line.get_color(),
                    label=f"{label} (above idle)")
    ax.set_xlabel("r (tokens merged per block)")
    ax.set_ylabel("energy per image [mJ]")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path), None


__all__ = ["pareto_front", "plot_latency_vs_r", "plot_pareto", "plot_energy_vs_r", "ParetoPoint", "save_png"]
