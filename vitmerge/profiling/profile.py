"""``vitmerge profile``'s measurement: latency interleaved across runners, energy per image, reports.

Runners (:mod:`vitmerge.backends`) give each model in its runtime a ``timed(batch)`` callable on
inputs prepared once and a ``sync()``. :func:`profile_targets` interleaves all runners batch size by
batch size, so the ratios between them see the same machine noise, and optionally measures energy
per image (:mod:`.energy`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..backends import Runner
from ..errors import UsageError
from . import energy as en
from . import plots
from .latency import LatencyStats, interleaved
from .report import md_table, prepare_dir, write_report

log = logging.getLogger(__name__)


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


def _unique_labels(targets: Sequence[Runner]) -> None:
    seen: Dict[str, int] = {}
    for t in targets:
        base = t.label if sum(1 for u in targets if u.label == t.label) == 1 else f"{t.label} [{t.runtime}]"
        n = seen.get(base, 0)
        seen[base] = n + 1
        t.label = base if n == 0 else f"{base} #{n + 1}"


def profile_targets(
    targets: Sequence[Runner],
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
    if not targets:
        raise UsageError("nothing to profile: give at least one model")
    if rounds < 1 or iters < 1 or warmup < 0:
        raise UsageError(f"need rounds >= 1, iters >= 1, warmup >= 0 (got {rounds}, {iters}, {warmup})")
    if any(b < 1 for b in batches):
        raise UsageError(f"batch sizes must be >= 1, got {list(batches)}")
    _unique_labels(list(targets))
    status = on_status or (lambda s: None)
    syncs = [t.sync for t in targets]

    def sync_all():
        for s in syncs:
            s()

    rows: List[ProfileRow] = []
    runners: Dict[Tuple[str, int], Callable[[], object]] = {}
    for b in batches:
        fns = {t.label: t.timed(b) for t in targets}
        runners.update({(label, b): fn for label, fn in fns.items()})
        status(f"batch {b}: {len(fns)} model(s) interleaved")
        log.info("batch %d: %s interleaved, %d rounds x %d calls", b, ", ".join(fns), rounds, iters)
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


__all__ = ["profile_targets", "profile_sections", "ProfileResult", "ProfileRow", "write_profile_report"]
