"""``vitmerge profile``'s measurement: latency interleaved across runners, energy per image, reports.

Runners (:mod:`vitmerge.backends`) give each model in its runtime a ``timed(batch)`` callable on
inputs prepared once and a ``sync()``. :func:`profile_targets` interleaves all runners batch size by
batch size, so the ratios between them see the same machine noise, and optionally measures energy
per image (:mod:`.energy`).
"""
from __future__ import annotations

import contextlib
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
    peak_mb: Optional[float] = None  # memory inference needs above the loaded model (own process); None: not measured
    peak_note: Optional[str] = None  # how it was measured, or why not

    def to_dict(self) -> Dict[str, Any]:
        d = {"label": self.label, "model": self.spec, "runtime": self.runtime, "device": self.device,
             "batch": self.batch, **self.stats.summary(self.batch), "speedup_vs_first": self.speedup,
             "method": self.info.get("method"), "r": self.info.get("r"), "r_mean": self.info.get("r_mean")}
        if self.energy is not None:
            d["energy"] = self.energy.to_dict()
        if self.peak_mb is not None or self.peak_note:
            d["peak_memory_mb"], d["peak_memory_note"] = self.peak_mb, self.peak_note
        return d


@dataclass
class ProfileResult:
    rows: List[ProfileRow]
    settings: Dict[str, Any]
    idle: Dict[str, Any] = field(default_factory=dict)  # meter source -> IdleBaseline
    energy_note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"settings": self.settings, "results": [r.to_dict() for r in self.rows],
                "idle_baselines": {k: v.to_dict() for k, v in self.idle.items()}, "energy_note": self.energy_note}


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
    energy_seconds: Optional[float] = None,
    on_round: Optional[Callable[[], None]] = None,
    on_status: Optional[Callable[[str], None]] = None,
    energy_windows: int = 3,
    energy_rest: Optional[float] = None,
    energy_clock: Optional[en.Clock] = None,
    memory: bool = False,
) -> ProfileResult:
    """Latency (interleaved across targets, per batch size) and, optionally, energy per image and peak memory.

    Memory (``memory``, :mod:`.memory`): every ONNX file (ONNX Runtime CPU) in a process of its own at each batch
    size, default session options; other runtimes are reported as not measured, with the reason.

    Energy (:mod:`.energy`): after the latency rounds every device rests (``energy_rest``, default
    the counter's: 10 s on NVML, 2 s on RAPL), its idle baseline is measured, then ``energy_windows``
    windows of ``energy_seconds`` (default the counter's: 10 s on NVML, 2 s on RAPL) per model and
    batch size, interleaved (window 1 of every row, then window 2, ...) so drift hits all rows alike.
    """
    if not targets:
        raise UsageError("nothing to profile: give at least one model")
    if rounds < 1 or iters < 1 or warmup < 0:
        raise UsageError(f"need rounds >= 1, iters >= 1, warmup >= 0 (got {rounds}, {iters}, {warmup})")
    if any(b < 1 for b in batches):
        raise UsageError(f"batch sizes must be >= 1, got {list(batches)}")
    if energy and (energy_windows < 1 or (energy_seconds is not None and energy_seconds <= 0)
                   or (energy_rest is not None and energy_rest < 0)):
        raise UsageError(f"need energy windows >= 1, window seconds > 0 and rest >= 0 (got {energy_windows}, "
                         f"{energy_seconds}, {energy_rest})")
    _unique_labels(list(targets))
    status = on_status or (lambda s: None)
    # several models in one process take turns: each must run as it would deployed on its own, with no idle
    # session's threads competing for the cores (ONNX Runtime spins them by default)
    changed = sorted({note for t in targets for note in [t.interleave() if len(targets) > 1 else None] if note})
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
                                                 "energy_seconds": energy_seconds if energy else None,
                                                 "energy_windows": energy_windows if energy else None,
                                                 "energy_rest_seconds": energy_rest if energy else None,
                                                 "interleaving": ("; ".join(changed) + " in every session, so no idle "
                                                                  "session competes for the cores") if changed else
                                                                 "as created"})
    if memory:
        _measure_memory_rows(result, status)
    if not energy:
        result.energy_note = "energy: not measured (disabled with --no-energy)"
        return result
    _measure_energy_rows(result, runners, sync_all, status, energy_seconds, energy_windows, energy_rest,
                         energy_clock or en.REAL_CLOCK)
    return result


def _measure_memory_rows(result: ProfileResult, status) -> None:
    from pathlib import Path

    from .memory import peak_memory_mb

    for row in result.rows:
        if row.runtime != "ort" or not str(row.spec).endswith(".onnx") or not Path(row.spec).is_file():
            row.peak_note = f"not measured: peak memory is measured for ONNX files in ONNX Runtime CPU, not {row.runtime}"
            continue
        status(f"peak memory: {row.label} at batch {row.batch} (own process)")
        row.peak_mb, row.peak_note = peak_memory_mb(row.spec, row.batch)


def _measure_energy_rows(result: ProfileResult, runners, sync_all, status, seconds, windows, rest, clock) -> None:
    rows = result.rows
    meters: Dict[str, Tuple[Any, Optional[str]]] = {}
    for row in rows:
        if row.device not in meters:
            meters[row.device] = en.meter_for(row.device)
    live = {device: m for device, (m, _) in meters.items() if m is not None}
    notes: List[str] = []
    try:
        with contextlib.ExitStack() as stack:
            logs = {device: stack.enter_context(en.counting(m, clock)) for device, m in live.items()}
            length = {device: m.default_seconds if seconds is None else seconds for device, m in live.items()}
            for device, m in live.items():
                if length[device] < m.default_seconds:
                    notes.append(f"{m.source}: windows of {length[device]:g} s are shorter than the "
                                 f"{m.default_seconds:g} s this counter needs (see the window spread)")
            idle: Dict[str, Any] = {}
            if live:
                pause = max(m.default_rest if rest is None else rest for m in live.values())
                status(f"energy: resting {pause:g} s before the idle baseline")
                sync_all()
                clock.sleep(pause)  # clocks drop back after the latency rounds
            for device, m in live.items():
                status(f"energy: idle baseline ({m.source}, {windows} x {length[device]:g} s)")
                idle[device] = en.measure_idle(m, length[device], sync_all, windows=windows, rest=0.0,
                                               clock=clock, log=logs[device])
                idle[device].rest_seconds = pause
                result.idle[m.source] = idle[device]
                if idle[device].watts is None:
                    notes.append(f"{m.source} idle baseline: not measured ({idle[device].reason})")
            done: Dict[int, List[en.Window]] = {i: [] for i in range(len(rows))}
            failed: Dict[int, str] = {}
            for w in range(windows):
                for i, row in enumerate(rows):
                    m = live.get(row.device)
                    if m is None or i in failed:
                        continue
                    status(f"energy window {w + 1}/{windows}: {row.label}, batch {row.batch}")
                    fn, batch = runners[(row.label, row.batch)], row.batch
                    win, why = en.run_window(m, lambda fn=fn, batch=batch: (fn(), batch)[1], length[row.device],
                                             sync_all, clock, logs[row.device])
                    if win is None:
                        failed[i] = why
                    else:
                        done[i].append(win)
    finally:
        for meter, _ in meters.values():
            if meter is not None:
                meter.close()
    for i, row in enumerate(rows):
        meter, reason = meters[row.device]
        if meter is None:
            row.energy = en.not_measured(reason or "no energy counter for this device")
        elif i in failed:
            row.energy = en.not_measured(failed[i])
        else:
            base = idle.get(row.device)
            row.energy = en.energy_result(meter, done[i], base if base is not None and base.watts is not None else None)
    reasons = sorted({r.energy.reason for r in rows if not r.energy.measured})
    if reasons:
        notes.append("energy: not measured (" + "; ".join(reasons) + ")")
    result.energy_note = "\n".join(notes) or None


def profile_sections(result: ProfileResult) -> List[Tuple[str, str]]:
    """Markdown sections for the report: latency table per batch, energy table or the reason."""
    s = result.settings
    first = result.rows[0].label if result.rows else "?"
    latency_rows = [
        (r.label, r.runtime, r.device, r.batch, r.stats.p50, r.stats.p90, r.stats.p99, r.stats.throughput(r.batch),
         r.speedup) for r in result.rows
    ]
    text = (f"{s['rounds']} interleaved rounds x {s['iters']} timed calls per model and batch size, "
            f"{s['warmup']} warm-up calls excluded, device synchronised around each call"
            + (f"; sessions: {s['interleaving']}" if s.get("interleaving", "as created") != "as created" else "") + ". "
            f"Speed-up = p50 of the first model ({first}) / p50 of the row, same batch.\n\n")
    text += md_table(["model", "runtime", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s",
                      "speed-up vs first"], latency_rows,
                     formats=[None, None, None, None, ".3f", ".3f", ".3f", ",.1f", ".2f"])
    sections = [("Latency and throughput", text)]
    mem = [r for r in result.rows if r.peak_mb is not None or r.peak_note]
    if mem:
        how = next((r.peak_note for r in mem if r.peak_mb is not None), None)
        mrows = [(r.label, r.batch, r.peak_mb if r.peak_mb is not None else r.peak_note) for r in mem]
        sections.append(("Peak memory", (f"MB that inference needs above the loaded model: {how}.\n\n" if how else "")
                         + md_table(["model", "batch", "peak MB"], mrows, formats=[None, None, ",.0f"])))
    measured = [r for r in result.rows if r.energy is not None and r.energy.measured]
    if measured:
        def mj(v):
            return None if v is None else v * 1e3

        def windows(e):
            return f"{len(e.windows)} x {e.windows[0].seconds:.1f}" if e.windows else f"1 x {e.seconds:.1f}"

        erows = [(r.label, r.batch, r.energy.source, windows(r.energy),
                  r.energy.watts, mj(r.energy.joules_per_image),
                  f"{mj(r.energy.joules_per_image_min):.3f}-{mj(r.energy.joules_per_image_max):.3f}",
                  r.energy.idle_watts, mj(r.energy.joules_per_image_above_idle))
                 for r in measured]
        body = ("Energy per image is the median over the windows (min-max beside it), each window a "
                "back-to-back run between two device synchronisations. NVML windows take their power from "
                "whole counter updates inside the window (tick-aligned); RAPL is read at the window edges. "
                "The idle baseline is the same counter over idle windows, measured separately after a rest; "
                "above idle = (window energy - idle W x window s) / images, median over the windows.\n\n")
        body += md_table(["model", "batch", "counter", "windows x s", "W", "mJ/image", "min-max", "idle W",
                          "mJ/image above idle"], erows,
                         formats=[None, None, None, None, ".1f", ".3f", None, ".1f", ".3f"])
        for source, b in result.idle.items():
            if b.watts is not None:
                body += (f"\n\nIdle baseline {source}: {b.watts:.1f} W, median of {len(b.windows)} x {b.seconds:.1f} s "
                         f"(range {b.watts_min:.1f}-{b.watts_max:.1f} W), after {b.rest_seconds:g} s of rest.")
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
