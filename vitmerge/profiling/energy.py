"""Energy per image from hardware counters, or an honest "not measured" with the reason.

Two counters are read, never modelled:

* NVIDIA GPUs: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules
  since the driver loaded; Volta and newer). It updates every ~20-100 ms, so a window must run well
  past that (``min_seconds``); the device is synchronised at both edges of the window.
* Intel / AMD CPUs on Linux: RAPL through ``/sys/class/powercap/intel-rapl:*/energy_uj``
  (microjoules, wraps at ``max_energy_range_uj``). Package zones are summed; their sub-zones
  (core, uncore, dram) are parts of a package and are not added again.

The idle baseline is the same counter read over a window of the same length with nothing running;
it is reported next to the loaded figure, and the difference is labelled "above idle". Nothing here
ever falls back to TDP x time or any other estimate: a reader that cannot count says why.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

#: Root of the powercap class; tests point it at a folder of fake counter files.
RAPL_ROOT = Path("/sys/class/powercap")


@dataclass
class EnergyResult:
    """Energy of one timed window (or why there is none)."""

    measured: bool
    reason: Optional[str] = None  # why not measured
    source: Optional[str] = None  # e.g. "nvml:NVIDIA H100 80GB HBM3" or "rapl:package-0+package-1"
    seconds: float = 0.0  # length of the loaded window
    images: int = 0  # images processed in it
    joules: float = 0.0  # counter difference over the loaded window
    idle_watts: Optional[float] = None  # mean power of the idle window (None: no idle window taken)
    idle_seconds: float = 0.0

    @property
    def joules_per_image(self) -> Optional[float]:
        if not self.measured or self.images <= 0:
            return None
        return self.joules / self.images

    @property
    def watts(self) -> Optional[float]:
        if not self.measured or self.seconds <= 0:
            return None
        return self.joules / self.seconds

    @property
    def joules_per_image_above_idle(self) -> Optional[float]:
        """(loaded energy - idle power x loaded time) / images: the work's own share, both measured."""
        if not self.measured or self.images <= 0 or self.idle_watts is None:
            return None
        return (self.joules - self.idle_watts * self.seconds) / self.images

    def describe(self) -> str:
        if not self.measured:
            return f"energy: not measured ({self.reason})"
        text = f"energy ({self.source}): {self.joules_per_image * 1e3:.3f} mJ/image, {self.watts:.1f} W"
        if self.idle_watts is not None:
            text += (f"; idle baseline {self.idle_watts:.1f} W (measured separately), "
                     f"above idle {self.joules_per_image_above_idle * 1e3:.3f} mJ/image")
        return text

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d.update(joules_per_image=self.joules_per_image, watts=self.watts,
                 joules_per_image_above_idle=self.joules_per_image_above_idle)
        return d


def not_measured(reason: str) -> EnergyResult:
    return EnergyResult(measured=False, reason=reason)


class EnergyMeter:
    """A cumulative energy counter: ``read()`` returns joules since some fixed origin."""

    source: str = "?"

    def read(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------- NVML


class NvmlMeter(EnergyMeter):
    """NVML total-energy counter of one GPU (mJ -> J)."""

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
    """Sum of the RAPL package zones. ``read()`` accumulates deltas so wraparound is handled per zone."""

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


def _window(meter: EnergyMeter, body: Callable[[], int], sync: Callable[[], None]) -> Tuple[float, float, int]:
    sync()
    e0, t0 = meter.read(), time.perf_counter()
    images = body()
    sync()
    t1, e1 = time.perf_counter(), meter.read()
    return e1 - e0, t1 - t0, images


@dataclass
class IdleBaseline:
    """Mean power of the counter over a window with nothing running (measured, never assumed)."""

    watts: float
    seconds: float
    source: str


def measure_idle(meter: EnergyMeter, seconds: float = 2.0, sync: Optional[Callable[[], None]] = None,
                 sleep: Callable[[float], None] = time.sleep) -> IdleBaseline:
    joules, elapsed, _ = _window(meter, lambda: (sleep(seconds), 0)[1], sync or (lambda: None))
    return IdleBaseline(watts=joules / elapsed if elapsed > 0 else 0.0, seconds=elapsed, source=meter.source)


def measure_energy(
    fn: Callable[[], object],
    images_per_call: int,
    meter: Optional[EnergyMeter],
    reason: Optional[str] = None,
    min_seconds: float = 2.0,
    idle: Optional[IdleBaseline] = None,
    sync: Optional[Callable[[], None]] = None,
) -> EnergyResult:
    """Run ``fn`` back to back for at least ``min_seconds`` between two counter reads.

    ``idle`` (from :func:`measure_idle` on the same meter) is attached as the separately measured
    baseline; nothing is subtracted from ``joules`` itself.
    """
    if meter is None:
        return not_measured(reason or "no energy counter for this device")
    sync = sync or (lambda: None)

    def loaded() -> int:
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            if time.perf_counter() - t0 >= min_seconds:
                return calls * images_per_call

    joules, seconds, images = _window(meter, loaded, sync)
    if joules <= 0:
        return not_measured(f"{meter.source} counter did not advance over {seconds:.2f} s "
                            "(window too short for its update interval, or a frozen counter)")
    return EnergyResult(measured=True, source=meter.source, seconds=seconds, images=images, joules=joules,
                        idle_watts=None if idle is None else idle.watts,
                        idle_seconds=0.0 if idle is None else idle.seconds)


__all__ = [
    "EnergyResult", "EnergyMeter", "NvmlMeter", "RaplMeter", "RaplZone", "RAPL_ROOT", "meter_for",
    "measure_energy", "measure_idle", "IdleBaseline", "nvml_meter", "rapl_meter", "rapl_delta_uj", "not_measured",
]
