"""Energy per image from hardware counters, or an honest "not measured" with the reason.

Two counters are read, never modelled:

* NVIDIA GPUs: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules
  since the driver loaded; Volta and newer). The driver updates it only every ~20-100 ms, and on
  some GPUs the power behind each update is sampled over part of that interval only.
* Intel / AMD CPUs on Linux: RAPL through ``/sys/class/powercap/intel-rapl:*/energy_uj``
  (microjoules, wraps at ``max_energy_range_uj``, updated about every millisecond). Package zones
  are summed; their sub-zones (core, uncore, dram) are parts of a package and are not added again.

How one window is measured (:func:`run_window`)
------------------------------------------------
The device is synchronised, the window opens (host clock ``t0``), the work runs back to back for at
least ``seconds``, the device is synchronised again and the window closes (``t1``); the images are
counted over exactly that span.

* **Tick-aligned** (counters that update coarsely: NVML). Reading such a counter at ``t0`` and
  ``t1`` returns the value of the last update *before* each edge, so the difference covers a span
  shifted by up to one update interval at each end: on a 2 s window with 100 ms updates that is
  about 5 % wrong, more when the power before the window (idle) differs from the power inside it.
  Instead a background thread polls the counter every few milliseconds while the window runs and
  keeps every update it sees (the value and the times of the reads just before and just after the
  change). Only whole updates that fall inside the window are used: from the first update after
  ``t0`` to the last one before ``t1``, the counter difference is the energy of exactly that span,
  all of it under load; its mean power times ``t1 - t0`` is the window's energy. The load runs
  until at least two updates have been seen inside the window (a counter that does not update
  gives "not measured"). An update's time is known to within one poll interval (a few ms against
  a window of seconds), whatever the counter's own interval or phase.
* **Edge reads** (counters that update far faster than the window: RAPL). The counter is read at
  ``t0`` and ``t1``; a 1 ms update against a 2 s window is 0.05 % at most. Polling RAPL from a
  thread would load the very CPU being measured, so it is not done.

Windows are repeated (``windows``, default 3; :func:`vitmerge.profiling.profile.profile_targets`
interleaves them across models) and reported as the median with min and max, so the counter's own
sampling noise shows as a spread instead of hiding in one number. Default window lengths follow the
counter: 10 s on NVML, 2 s on RAPL.

The idle baseline (:func:`measure_idle`) is the same method on an idle device, taken after a rest
(default 10 s on NVML, 2 s on RAPL: a GPU keeps high clocks, and draws more, for a while after
work stops) and reported next to the loaded figure; "above idle" subtracts it window by window.
Nothing here ever falls back to TDP x time or any other estimate: a reader that cannot count says why.

Time comes from a :class:`Clock` (host clock, ``time.sleep`` and a polling thread); tests pass a
simulated one, so the same code is checked against counters with known updates in fake time.
"""
from __future__ import annotations

import bisect
import contextlib
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

#: Root of the powercap class; tests point it at a folder of fake counter files.
RAPL_ROOT = Path("/sys/class/powercap")


# ---------------------------------------------------------------------------------------- time


class Clock:
    """Host time for the energy code: ``now``, ``sleep`` and ``every`` (a polling thread)."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    @contextlib.contextmanager
    def every(self, seconds: float, fn: Callable[[], None]) -> Iterator[None]:
        """Call ``fn`` about every ``seconds`` from a background thread while the block runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                fn()
                stop.wait(seconds)

        thread = threading.Thread(target=loop, name="vitmerge-energy-poll", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


REAL_CLOCK = Clock()


# ---------------------------------------------------------------------------------------- results


@dataclass
class Window:
    """One measured window: ``seconds`` of host time between two synchronised edges."""

    seconds: float
    images: int
    joules: float  # energy attributed to the window
    updates: int = 0  # counter updates inside the window the power was taken from (0: edge reads)
    update_span: float = 0.0  # seconds between the first and the last of those updates
    timing_bound: float = 0.0  # relative error bound from when those two updates happened (poll gaps)

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")

    @property
    def joules_per_image(self) -> Optional[float]:
        return self.joules / self.images if self.images > 0 else None

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "watts": self.watts, "joules_per_image": self.joules_per_image}


@dataclass
class IdleBaseline:
    """Mean power of the counter with nothing running (measured, never assumed): median of windows."""

    watts: Optional[float]  # None: not measured (``reason``)
    seconds: float  # length of each idle window
    source: str
    windows: List[float] = field(default_factory=list)  # watts of each idle window
    rest_seconds: float = 0.0  # idle time before the first window (clocks settle)
    reason: Optional[str] = None

    @property
    def watts_min(self) -> Optional[float]:
        return min(self.windows) if self.windows else None

    @property
    def watts_max(self) -> Optional[float]:
        return max(self.windows) if self.windows else None

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "watts_min": self.watts_min, "watts_max": self.watts_max}


@dataclass
class EnergyResult:
    """Energy of the windows of one workload (or why there is none).

    ``joules``, ``seconds`` and ``images`` are totals over the windows; the per-image and power
    figures are the median over the windows, with min and max beside them.
    """

    measured: bool
    reason: Optional[str] = None  # why not measured
    source: Optional[str] = None  # e.g. "nvml:NVIDIA H100 80GB HBM3" or "rapl:package-0+package-1"
    seconds: float = 0.0  # loaded time, all windows
    images: int = 0  # images processed in them
    joules: float = 0.0  # energy of all windows
    idle_watts: Optional[float] = None  # idle baseline (None: no idle baseline measured)
    idle_seconds: float = 0.0
    windows: List[Window] = field(default_factory=list)
    method: Optional[str] = None  # "tick-aligned" or "edge reads"

    def _per_window(self, f: Callable[[Window], Optional[float]], whole: Optional[float]) -> List[float]:
        vals = [f(w) for w in self.windows]
        vals = [v for v in vals if v is not None]
        return vals if self.windows else ([] if whole is None else [whole])

    def _jpi(self) -> List[float]:
        whole = self.joules / self.images if self.images > 0 else None
        return self._per_window(lambda w: w.joules_per_image, whole)

    @property
    def joules_per_image(self) -> Optional[float]:
        """Median over the windows of energy / images."""
        vals = self._jpi() if self.measured else []
        return statistics.median(vals) if vals else None

    @property
    def joules_per_image_min(self) -> Optional[float]:
        vals = self._jpi() if self.measured else []
        return min(vals) if vals else None

    @property
    def joules_per_image_max(self) -> Optional[float]:
        vals = self._jpi() if self.measured else []
        return max(vals) if vals else None

    @property
    def spread(self) -> Optional[float]:
        """(max - min) / median of J/image over the windows (0 with one window)."""
        med = self.joules_per_image
        if med is None or med <= 0:
            return None
        return (self.joules_per_image_max - self.joules_per_image_min) / med

    @property
    def watts(self) -> Optional[float]:
        if not self.measured:
            return None
        vals = self._per_window(lambda w: w.watts, self.joules / self.seconds if self.seconds > 0 else None)
        return statistics.median(vals) if vals else None

    @property
    def joules_per_image_above_idle(self) -> Optional[float]:
        """Median over the windows of (energy - idle power x window time) / images: both measured."""
        if not self.measured or self.idle_watts is None:
            return None
        idle = self.idle_watts
        whole = (self.joules - idle * self.seconds) / self.images if self.images > 0 else None
        vals = self._per_window(lambda w: (w.joules - idle * w.seconds) / w.images if w.images > 0 else None, whole)
        return statistics.median(vals) if vals else None

    def describe(self) -> str:
        if not self.measured:
            return f"energy: not measured ({self.reason})"
        text = f"energy ({self.source}): {self.joules_per_image * 1e3:.3f} mJ/image"
        if len(self.windows) > 1:
            text += (f" (median of {len(self.windows)} windows of {self.windows[0].seconds:.1f} s, "
                     f"range {self.joules_per_image_min * 1e3:.3f}-{self.joules_per_image_max * 1e3:.3f})")
        text += f", {self.watts:.1f} W"
        if self.idle_watts is not None:
            text += (f"; idle baseline {self.idle_watts:.1f} W (measured separately), "
                     f"above idle {self.joules_per_image_above_idle * 1e3:.3f} mJ/image")
        return text

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["windows"] = [w.to_dict() for w in self.windows]
        d.update(joules_per_image=self.joules_per_image, joules_per_image_min=self.joules_per_image_min,
                 joules_per_image_max=self.joules_per_image_max, spread=self.spread, watts=self.watts,
                 joules_per_image_above_idle=self.joules_per_image_above_idle)
        return d


def not_measured(reason: str) -> EnergyResult:
    return EnergyResult(measured=False, reason=reason)


# ---------------------------------------------------------------------------------------- meters


class EnergyMeter:
    """A cumulative energy counter: ``read()`` returns joules since some fixed origin.

    ``tick_aligned``: the counter updates coarsely, so windows are aligned to its updates (polled
    every ``poll_seconds``) instead of read at their edges. ``default_seconds`` / ``default_rest``:
    the window length and the rest before the idle baseline that suit this counter.
    """

    source: str = "?"
    tick_aligned: bool = False
    poll_seconds: float = 0.002
    default_seconds: float = 2.0
    default_rest: float = 2.0

    def read(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------- NVML


class NvmlMeter(EnergyMeter):
    """NVML total-energy counter of one GPU (mJ -> J); updates every ~20-100 ms, so tick-aligned."""

    tick_aligned = True
    default_seconds = 10.0
    default_rest = 10.0

    def __init__(self, nvml, handle, name: str):
        self._nvml, self._handle = nvml, handle
        self.source = f"nvml:{name}"

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

def _torch_gpu_uuid(index: int) -> Optional[str]:
    try:
        import torch

        if torch.cuda.is_available():
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            return f"GPU-{uuid}" if uuid is not None else None
    except Exception:
        pass
    return None


def nvml_meter(gpu: int = 0) -> Tuple[Optional[EnergyMeter], Optional[str]]:
    """(meter, None) for CUDA device ``gpu``, or (None, reason)."""
    try:
        import pynvml as nvml  # provided by the nvidia-ml-py package
    except ImportError:
        return None, "NVML bindings not installed (pip install nvidia-ml-py, or vitmerge[gpu])"
    try:
        nvml.nvmlInit()
    except Exception as e:
        return None, f"NVML could not start, no NVIDIA driver here ({type(e).__name__}: {e})"
    try:
        count = nvml.nvmlDeviceGetCount()
        if count < 1:
            nvml.nvmlShutdown()
            return None, "NVML sees no NVIDIA GPU"
        handle = None
        uuid = _torch_gpu_uuid(gpu)  # CUDA and NVML may number GPUs differently: match by UUID
        if uuid is not None:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            except Exception:
                handle = None
        if handle is None:
            if gpu >= count:
                nvml.nvmlShutdown()
                return None, f"GPU {gpu} not found (NVML sees {count})"
            handle = nvml.nvmlDeviceGetHandleByIndex(gpu)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises NotSupported before Volta
    except Exception as e:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
        return None, f"NVML total-energy counter unavailable ({type(e).__name__}: {e}; needs a Volta or newer GPU)"
    return NvmlMeter(nvml, handle, name), None


# ----------------------------------------------------------------------------------------- RAPL


@dataclass
class RaplZone:
    path: Path
    name: str
    max_range_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())


def rapl_delta_uj(start: int, end: int, max_range_uj: int) -> int:
    """Counter difference with at most one wraparound (the counter restarts at 0 after max_range)."""
    if end >= start:
        return end - start
    return end + max_range_uj - start


class RaplMeter(EnergyMeter):
    """Sum of the RAPL package zones. ``read()`` accumulates deltas so wraparound is handled per zone.

    RAPL updates about every millisecond, far below a window, so windows are read at their edges.
    """

    def __init__(self, zones: List[RaplZone]):
        self.zones = zones
        self.source = "rapl:" + "+".join(z.name for z in zones)
        self._last = [z.read_uj() for z in zones]
        self._total_uj = 0

    def read(self) -> float:
        for i, z in enumerate(self.zones):
            now = z.read_uj()
            self._total_uj += rapl_delta_uj(self._last[i], now, z.max_range_uj)
            self._last[i] = now
        return self._total_uj / 1e6


def _is_top_zone(p: Path) -> bool:
    # intel-rapl:0 is a package; intel-rapl:0:1 is a sub-zone of it (counted inside the package)
    return p.name.startswith("intel-rapl:") and p.name.count(":") == 1


def rapl_meter() -> Tuple[Optional[EnergyMeter], Optional[str]]:
    """(meter, None) over the readable RAPL package zones, or (None, reason)."""
    root = Path(RAPL_ROOT)
    if not root.is_dir():
        return None, f"RAPL not available: {root} does not exist (not Linux, or powercap hidden in this VM/container)"
    tops = sorted((p for p in root.iterdir() if _is_top_zone(p)), key=lambda p: p.name)
    if not tops:
        return None, f"RAPL not available: no intel-rapl zones under {root} (CPU or kernel without RAPL powercap)"
    zones: List[RaplZone] = []
    problems: List[str] = []
    for p in tops:
        try:
            name = (p / "name").read_text().strip() if (p / "name").exists() else p.name
            max_range = int((p / "max_energy_range_uj").read_text().strip())
            zone = RaplZone(p, name, max_range)
            zone.read_uj()
        except PermissionError:
            problems.append(f"{p / 'energy_uj'} is not readable (root-only on Linux >= 5.10; run as root or grant read access)")
            continue
        except (OSError, ValueError) as e:
            problems.append(f"{p}: {type(e).__name__}: {e}")
            continue
        zones.append(zone)
    packages = [z for z in zones if z.name.startswith("package")]
    # psys (platform) overlaps the packages: only use it when there is nothing else
    zones = packages or zones
    if not zones:
        return None, "RAPL not readable: " + "; ".join(problems)
    return RaplMeter(zones), None


# ------------------------------------------------------------------------------------- windows


def meter_for(device: str, gpu: int = 0) -> Tuple[Optional[EnergyMeter], Optional[str]]:
    """The counter for work on ``device`` ("cuda" -> NVML of that GPU, "cpu" -> RAPL)."""
    if device.startswith("cuda"):
        return nvml_meter(gpu)
    return rapl_meter()


@dataclass
class Update:
    """One counter update seen by the poller: it happened between ``after`` and ``seen``."""

    after: float  # start of the last read that still returned the old value
    seen: float  # end of the first read that returned ``joules``
    joules: float

    @property
    def time(self) -> float:
        return (self.after + self.seen) / 2


class UpdateLog:
    """Every update of a tick-aligned counter, as seen by polling it (``poll`` from a thread)."""

    def __init__(self, meter: EnergyMeter, clock: Clock):
        self.meter, self.clock = meter, clock
        self.updates: List[Update] = []  # in time order
        self._after: List[float] = []  # updates' ``after`` times, for bisection
        self.error: Optional[str] = None
        self._last: Optional[Tuple[float, float]] = None  # (start of the last read, its value)
        self._lock = threading.Lock()

    def poll(self) -> None:
        start = self.clock.now()
        try:
            value = self.meter.read()
        except Exception as e:  # reported by the window that needed the counter
            self.error = f"{self.meter.source} read failed ({type(e).__name__}: {e})"
            return
        end = self.clock.now()
        with self._lock:
            if self._last is not None and value != self._last[1]:
                self.updates.append(Update(self._last[0], end, value))
                self._after.append(self._last[0])
            self._last = (start, value)

    def count_since(self, t0: float) -> int:
        """Updates seen so far that happened after t0."""
        with self._lock:
            return len(self._after) - bisect.bisect_left(self._after, t0)

    def inside(self, t0: float, t1: float) -> List[Update]:
        """Updates known to have happened within [t0, t1]."""
        with self._lock:
            first = bisect.bisect_left(self._after, t0)
            return [u for u in self.updates[first:] if u.seen <= t1]


@contextlib.contextmanager
def counting(meter: EnergyMeter, clock: Optional[Clock] = None) -> Iterator[Optional[UpdateLog]]:
    """While the block runs, a tick-aligned meter is polled into an :class:`UpdateLog` (else None)."""
    clock = clock or REAL_CLOCK
    if not meter.tick_aligned:
        yield None
        return
    log = UpdateLog(meter, clock)
    log.poll()
    with clock.every(meter.poll_seconds, log.poll):
        yield log


def run_window(meter: EnergyMeter, step: Callable[[], int], seconds: float,
               sync: Optional[Callable[[], None]] = None, clock: Optional[Clock] = None,
               log: Optional[UpdateLog] = None) -> Tuple[Optional[Window], Optional[str]]:
    """Run ``step`` (one call; returns the images it processed) back to back for ``seconds`` or more.

    Returns (window, None) or (None, reason). The device is synchronised at both edges. A
    tick-aligned meter needs ``log`` (from :func:`counting`); see the module docstring for the method.
    """
    clock = clock or REAL_CLOCK
    sync = sync or (lambda: None)
    aligned = meter.tick_aligned
    if aligned and log is None:
        raise ValueError(f"{meter.source} is read at its updates: run the window inside counting(meter)")
    # a counter that has not updated twice by then is stuck (NVML updates at least every ~0.1 s)
    patience = seconds + max(seconds, 2.0)
    sync()
    t0 = clock.now()
    e0 = None if aligned else meter.read()
    images = 0
    while True:
        images += step()
        elapsed = clock.now() - t0
        if elapsed >= seconds and (not aligned or log.count_since(t0) >= 2):
            break
        if elapsed >= patience:
            break
    sync()
    t1 = clock.now()
    if not aligned:
        joules = meter.read() - e0
        if joules <= 0:
            return None, (f"{meter.source} counter did not advance over {t1 - t0:.2f} s "
                          "(window too short for its update interval, or a frozen counter)")
        return Window(seconds=t1 - t0, images=images, joules=joules), None
    if log.error:
        return None, log.error
    ups = log.inside(t0, t1)
    if len(ups) < 2 or ups[-1].joules <= ups[0].joules or ups[-1].time <= ups[0].time:
        return None, (f"{meter.source} counter did not advance: {len(ups)} update(s) in {t1 - t0:.2f} s "
                      "(a frozen counter, or a driver without energy updates)")
    a, b = ups[0], ups[-1]
    span = b.time - a.time
    watts = (b.joules - a.joules) / span
    # each update's time is known to half the gap between the reads around it
    bound = ((a.seen - a.after) + (b.seen - b.after)) / 2 / span
    return Window(seconds=t1 - t0, images=images, joules=watts * (t1 - t0), updates=len(ups),
                  update_span=span, timing_bound=bound), None


def _idle_step(clock: Clock) -> Callable[[], int]:
    def step() -> int:
        clock.sleep(0.01)
        return 0
    return step


def measure_idle(meter: EnergyMeter, seconds: Optional[float] = None, sync: Optional[Callable[[], None]] = None,
                 windows: int = 3, rest: Optional[float] = None, clock: Optional[Clock] = None,
                 log: Optional[UpdateLog] = None) -> IdleBaseline:
    """Idle power: ``rest`` seconds with nothing running (clocks settle), then ``windows`` idle
    windows of ``seconds``, measured like the loaded ones; the median is the baseline."""
    clock = clock or REAL_CLOCK
    seconds = meter.default_seconds if seconds is None else seconds
    rest = meter.default_rest if rest is None else rest
    with contextlib.ExitStack() as stack:
        if log is None:
            log = stack.enter_context(counting(meter, clock))
        if sync is not None:
            sync()
        clock.sleep(rest)
        watts: List[float] = []
        for _ in range(windows):
            win, reason = run_window(meter, _idle_step(clock), seconds, sync, clock, log)
            if win is None:
                return IdleBaseline(None, seconds, meter.source, watts, rest, reason=reason)
            watts.append(win.watts)
    return IdleBaseline(statistics.median(watts), seconds, meter.source, watts, rest)


def energy_result(meter: EnergyMeter, windows: List[Window], idle: Optional[IdleBaseline] = None) -> EnergyResult:
    """The measured result of ``windows`` (all on ``meter``), with the idle baseline beside it."""
    return EnergyResult(
        measured=True, source=meter.source, seconds=sum(w.seconds for w in windows),
        images=sum(w.images for w in windows), joules=sum(w.joules for w in windows),
        idle_watts=None if idle is None else idle.watts,
        idle_seconds=0.0 if idle is None or idle.watts is None else idle.seconds * len(idle.windows),
        windows=list(windows), method="tick-aligned" if meter.tick_aligned else "edge reads")


def measure_energy(
    fn: Callable[[], object],
    images_per_call: int,
    meter: Optional[EnergyMeter],
    reason: Optional[str] = None,
    min_seconds: Optional[float] = None,
    idle: Optional[IdleBaseline] = None,
    sync: Optional[Callable[[], None]] = None,
    windows: int = 3,
    clock: Optional[Clock] = None,
    log: Optional[UpdateLog] = None,
) -> EnergyResult:
    """``windows`` windows of ``fn`` run back to back, each at least ``min_seconds`` (default: the
    meter's, 10 s on NVML, 2 s on RAPL); J/image is the median over the windows.

    ``idle`` (from :func:`measure_idle` on the same meter) is attached as the separately measured
    baseline; nothing is subtracted from ``joules`` itself.
    """
    if meter is None:
        return not_measured(reason or "no energy counter for this device")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    clock = clock or REAL_CLOCK
    seconds = meter.default_seconds if min_seconds is None else min_seconds

    def step() -> int:
        fn()
        return images_per_call

    done: List[Window] = []
    with contextlib.ExitStack() as stack:
        if log is None:
            log = stack.enter_context(counting(meter, clock))
        for _ in range(windows):
            win, why = run_window(meter, step, seconds, sync, clock, log)
            if win is None:
                return not_measured(why)
            done.append(win)
    return energy_result(meter, done, idle)


__all__ = [
    "EnergyResult", "EnergyMeter", "NvmlMeter", "RaplMeter", "RaplZone", "RAPL_ROOT", "meter_for", "Window",
    "measure_energy", "measure_idle", "IdleBaseline", "nvml_meter", "rapl_meter", "rapl_delta_uj", "not_measured",
    "Clock", "REAL_CLOCK", "UpdateLog", "Update", "counting", "run_window", "energy_result",
]
