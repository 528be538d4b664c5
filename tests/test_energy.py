"""Energy counters: RAPL arithmetic on fake sysfs trees, NVML through a fake module, honest degradation."""
import sys
import types

import pytest

from vitmerge.profiling import energy as en


def zone(root, name, label, uj, max_uj):
    d = root / name
    d.mkdir()
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def set_uj(d, uj):
    (d / "energy_uj").write_text(f"{uj}\n")


@pytest.fixture
def rapl_root(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    root.mkdir()
    monkeypatch.setattr(en, "RAPL_ROOT", root)
    return root


def test_rapl_delta_reference():
    assert en.rapl_delta_uj(100, 350, 1000) == 250
    assert en.rapl_delta_uj(900, 100, 1000) == 200  # wrapped once: 900 -> 1000 -> 0 -> 100
    assert en.rapl_delta_uj(5, 5, 1000) == 0


def test_rapl_sums_packages_skips_subzones_and_handles_wraparound(rapl_root):
    (rapl_root / "intel-rapl").mkdir()  # the control-type folder, not a zone
    p0 = zone(rapl_root, "intel-rapl:0", "package-0", 1_000_000, 262_143_328_850)
    core = zone(rapl_root, "intel-rapl:0:0", "core", 500_000, 262_143_328_850)
    p1 = zone(rapl_root, "intel-rapl:1", "package-1", 9_990_000, 10_000_000)
    meter, reason = en.rapl_meter()
    assert reason is None and meter.source == "rapl:package-0+package-1"
    e0 = meter.read()
    set_uj(p0, 3_500_000)  # +2.5 J
    set_uj(core, 2_000_000)  # part of package-0: must not be added again
    set_uj(p1, 40_000)  # wrapped: (10_000_000 - 9_990_000) + 40_000 = 50_000 uJ
    e1 = meter.read()
    assert e1 - e0 == pytest.approx(2.5 + 0.05, abs=1e-12)
    set_uj(p0, 4_500_000)  # +1 J, p1 unchanged
    assert meter.read() - e1 == pytest.approx(1.0, abs=1e-12)


def test_rapl_psys_only_when_no_package(rapl_root):
    zone(rapl_root, "intel-rapl:0", "package-0", 10, 1000)
    zone(rapl_root, "intel-rapl:1", "psys", 10, 1000)
    meter, _ = en.rapl_meter()
    assert meter.source == "rapl:package-0"


def test_rapl_absent_and_unreadable_give_reasons(tmp_path, monkeypatch, rapl_root):
    monkeypatch.setattr(en, "RAPL_ROOT", tmp_path / "nope")
    meter, reason = en.rapl_meter()
    assert meter is None and "does not exist" in reason
    monkeypatch.setattr(en, "RAPL_ROOT", rapl_root)
    meter, reason = en.rapl_meter()
    assert meter is None and "no intel-rapl zones" in reason
    zone(rapl_root, "intel-rapl:0", "package-0", 10, 1000)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(en.RaplZone, "read_uj", denied)
    meter, reason = en.rapl_meter()
    assert meter is None and "not readable" in reason and "energy_uj" in reason


def test_nvml_missing_module_gives_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as when nvidia-ml-py is absent
    meter, reason = en.nvml_meter()
    assert meter is None and "nvidia-ml-py" in reason
    res = en.measure_energy(lambda: None, 1, meter, reason)
    assert not res.measured and res.joules_per_image is None
    assert res.describe() == f"energy: not measured ({reason})"


class FakeNVML(types.SimpleNamespace):
    """Counter in mJ that advances by a scripted step each time it is read."""

    def __init__(self, steps_mj, fail_init=False, unsupported=False):
        super().__init__()
        self.counter, self.steps, self.reads = 1_000_000, list(steps_mj), 0
        self.fail_init, self.unsupported, self.shutdowns = fail_init, unsupported, 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise RuntimeError("not found")

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.unsupported:
            raise RuntimeError("Not Supported")
        self.reads += 1
        if self.reads > 1:  # the probe read in nvml_meter does not advance
            self.counter += self.steps.pop(0)
        return self.counter


def test_nvml_window_arithmetic_and_idle_baseline(monkeypatch):
    # reads: probe, idle start (+0), idle end (+300 mJ), loaded start (+0), loaded end (+4800 mJ)
    fake = FakeNVML([0, 300, 0, 4800])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter, reason = en.nvml_meter(0)
    assert reason is None and meter.source == "nvml:Fake GPU"
    idle = en.measure_idle(meter, seconds=0.05)
    assert idle.watts * idle.seconds == pytest.approx(0.3)
    calls = []
    res = en.measure_energy(lambda: calls.append(1), images_per_call=8, meter=meter, min_seconds=0.05, idle=idle)
    assert res.measured and res.source == "nvml:Fake GPU"
    assert res.images == 8 * len(calls) and len(calls) >= 1
    assert res.joules == pytest.approx(4.8)
    assert res.joules_per_image == pytest.approx(4.8 / (8 * len(calls)))
    expected_above = (4.8 - idle.watts * res.seconds) / (8 * len(calls))
    assert res.joules_per_image_above_idle == pytest.approx(expected_above)
    assert res.idle_watts == idle.watts  # reported separately, not folded into joules
    d = res.to_dict()
    assert d["joules_per_image"] == pytest.approx(res.joules_per_image) and d["measured"] is True
    meter.close()
    assert fake.shutdowns == 1


@pytest.mark.parametrize("kw,needle", [(dict(fail_init=True), "NVML could not start"),
                                       (dict(unsupported=True), "total-energy counter unavailable")])
def test_nvml_failures_give_reasons(monkeypatch, kw, needle):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([], **kw))
    meter, reason = en.nvml_meter()
    assert meter is None and needle in reason


def test_counter_that_does_not_advance_is_not_a_measurement(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([0, 0]))
    meter, _ = en.nvml_meter()
    res = en.measure_energy(lambda: None, 1, meter, min_seconds=0.01)
    assert not res.measured and "did not advance" in res.reason


def test_meter_for_routes_devices(monkeypatch, rapl_root):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert "nvidia-ml-py" in en.meter_for("cuda")[1]
    assert "no intel-rapl zones" in en.meter_for("cpu")[1]
