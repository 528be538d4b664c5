"""`vitmerge profile`: statistics on synthetic workloads with known timings, real ORT/PyTorch runs, errors."""
import json
import os
import time

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

import vitmerge
from vitmerge.cli import app
from vitmerge.backends import Runner, open_runner as open_target
from vitmerge.request import MergeRequest
from vitmerge.backends.ort import session as ort_session
from vitmerge.errors import ModelFileError, RuntimeMissingError, UsageError
from vitmerge.profiling import energy as en
from vitmerge.profiling import latency
from vitmerge.profiling.profile import profile_sections, profile_targets
from support.synthetic_counter import World, WorldMeter

runner = CliRunner()


def tiny_onnx(tmp_path_factory, r):
    """A 2-block ViT-Tiny at 64 px exported once per test session (shared by the test files)."""
    root = tmp_path_factory.getbasetemp() / "vitmerge-tiny-onnx"
    root.mkdir(exist_ok=True)
    path = root / f"vit_tiny64_d2_r{r}.onnx"
    if not path.exists():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False).eval()
        if r:
            vitmerge.apply(m, r=r)
        vitmerge.export(m, path, batch_sizes=(1, 2))
    return path


@pytest.fixture(scope="session")
def onnx_pair(tmp_path_factory):
    return tiny_onnx(tmp_path_factory, 0), tiny_onnx(tmp_path_factory, 4)


class FakeRunner(Runner):
    """A runner whose timed call is ``fn`` (a workload with known timing)."""

    def __init__(self, label, fn, device="cpu"):
        super().__init__(label=label, spec=label, runtime="fake", device=device, input_shape=(1,), info={"r_mean": 0.0})
        self.fn = fn

    def _prepare(self, batch):
        return self.fn


def fake_target(label, fn, device="cpu"):
    return FakeRunner(label, fn, device)


# ------------------------------------------------------------------------------- statistics


def test_percentiles_against_numpy_with_a_scripted_clock(monkeypatch):
    """Each call 'takes' a known duration on a fake clock: percentiles must be numpy's exactly."""
    rng = np.random.default_rng(0)
    durations = {"a": list(rng.uniform(1, 5, 40)), "b": list(rng.uniform(10, 30, 40))}
    clock = {"t": 0.0}
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["t"])
    order = []

    def make(name):
        def run():
            order.append(name)
            if len([o for o in order if o == name]) > 2:  # the 2 warm-up calls take no scripted time
                clock["t"] += durations[name].pop(0) / 1e3
        return run

    stats = latency.interleaved({"a": make("a"), "b": make("b")}, rounds=8, iters=5, warmup=2)
    assert order[:4] == ["a", "a", "b", "b"]  # warm-up first
    assert order[4:14] == ["a"] * 5 + ["b"] * 5  # then round by round, models taking turns
    rng = np.random.default_rng(0)
    ref_a, ref_b = rng.uniform(1, 5, 40), rng.uniform(10, 30, 40)
    for name, ref in (("a", ref_a), ("b", ref_b)):
        s = stats[name]
        assert s.n == 40
        np.testing.assert_allclose(s.times_ms, ref, rtol=1e-9)
        assert s.p50 == pytest.approx(np.median(ref))
        assert s.p90 == pytest.approx(np.percentile(ref, 90))
        assert s.p99 == pytest.approx(np.percentile(ref, 99))
        assert s.mean == pytest.approx(ref.mean())
        assert s.throughput(8) == pytest.approx(8 * 1e3 / np.median(ref))


def test_profile_targets_known_sleeps_and_ratio():
    """Two workloads that sleep 3 ms and 12 ms: p50 >= the sleep, ratio about 4, warm-up excluded."""
    calls = {"fast": 0, "slow": 0}

    def sleeper(name, ms):
        def run():
            calls[name] += 1
            time.sleep(ms / 1e3)
        return run

    targets = [fake_target("slow", sleeper("slow", 12)), fake_target("fast", sleeper("fast", 3))]
    res = profile_targets(targets, [1, 4], rounds=4, iters=3, warmup=2)
    assert calls == {"slow": 2 * (2 + 12), "fast": 2 * (2 + 12)}
    assert [(r.label, r.batch) for r in res.rows] == [("slow", 1), ("fast", 1), ("slow", 4), ("fast", 4)]
    for r in res.rows:
        assert r.stats.n == 12
        floor = 12 if r.label == "slow" else 3
        assert r.stats.p50 >= floor and r.stats.p90 >= r.stats.p50 and r.stats.p99 >= r.stats.p90
        assert r.to_dict()["throughput_ips"] == pytest.approx(r.batch * 1e3 / r.stats.p50)
    slow1, fast1 = res.rows[0], res.rows[1]
    assert slow1.speedup == 1.0
    assert 2.0 < fast1.speedup < 4.5  # 12/3 = 4 less the sleep overshoot both share
    assert res.energy_note == "energy: not measured (disabled with --no-energy)"


def test_energy_in_profile_on_a_simulated_gpu(monkeypatch):
    """Two models on a simulated GPU (tests/support/synthetic_counter.py, fake time): the counter updates every
    20-100 ms; after work the GPU draws 95 W for 6 s before dropping to 38 W idle.

    profile_targets must rest before the idle baseline (38 W, not the 95 W right after the latency
    rounds), use the NVML-like defaults (3 windows of >= 10 s per row), interleave the windows across
    rows, and get each row's J/image and above-idle figure from the true power and call time."""
    world = World(tick=0.1, tick_min=0.02, phase=0.021, idle_w=38.0, settle_w=95.0, settle_s=6.0)
    meter = WorldMeter(world)
    monkeypatch.setattr(en, "meter_for", lambda device, gpu=0: (meter, None))
    calls = []

    def model(name, seconds, watts):
        def run():
            calls.append((name, world.now()))
            world.work(seconds, watts)
        return run

    targets = [fake_target("a", model("a", 0.007, 250.0), device="cuda"),
               fake_target("b", model("b", 0.004, 180.0), device="cuda")]
    res = profile_targets(targets, [2], rounds=1, iters=2, warmup=0, energy=True, energy_clock=world)
    base = res.idle[meter.source]
    assert base.rest_seconds == meter.default_rest and base.watts == pytest.approx(38.0, rel=1e-3)
    for row, (call_s, watts) in zip(res.rows, [(0.007, 250.0), (0.004, 180.0)]):
        e = row.energy
        assert e.measured and e.source == "sim" and e.method == "tick-aligned"
        assert len(e.windows) == 3 and all(w.seconds >= meter.default_seconds for w in e.windows)
        bound = meter.poll_seconds / (meter.default_seconds - 0.2)
        assert all(abs(w.joules_per_image / (call_s * watts / 2) - 1) <= bound for w in e.windows)
        assert e.joules_per_image_above_idle == pytest.approx((watts - 38.0) * call_s / 2, rel=2e-3)
        assert e.images == 2 * sum(1 for name, _ in calls if name == row.label) - 2 * 2  # less the latency calls
    # windows interleaved: a, b, a, b, a, b (each window one run of calls of one model)
    runs = [calls[0][0]]
    for name, _ in calls[1:]:
        if name != runs[-1]:
            runs.append(name)
    assert runs[-6:] == ["a", "b"] * 3
    md = dict(profile_sections(res))["Energy"]
    assert "| a | 2 | sim | 3 x 10.0 |" in md and "median" in md and "min-max" in md
    assert "Idle baseline sim: 38.0 W, median of 3 x 10.0 s" in md and "after 10 s of rest" in md
    assert res.to_dict()["idle_baselines"]["sim"]["watts"] == base.watts


def test_short_energy_windows_are_flagged(monkeypatch):
    world = World(tick=0.1, idle_w=40.0)
    meter = WorldMeter(world)
    monkeypatch.setattr(en, "meter_for", lambda device, gpu=0: (meter, None))
    res = profile_targets([fake_target("m", lambda: world.work(0.01, 100.0), device="cuda")], [1], rounds=1, iters=1,
                          warmup=0, energy=True, energy_seconds=2.0, energy_windows=1, energy_rest=0.0,
                          energy_clock=world)
    assert res.rows[0].energy.measured and res.rows[0].energy.windows[0].seconds >= 2.0
    assert "windows of 2 s are shorter than the 10 s this counter needs" in res.energy_note
    with pytest.raises(UsageError, match="energy windows >= 1"):
        profile_targets([fake_target("m", lambda: None)], [1], rounds=1, iters=1, warmup=0, energy=True,
                        energy_windows=0)


def test_energy_not_measured_here_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(en, "RAPL_ROOT", tmp_path / "no-powercap")
    res = profile_targets([fake_target("m", lambda: None)], [1], rounds=1, iters=1, warmup=0, energy=True,
                          energy_seconds=0.01)
    assert not res.rows[0].energy.measured
    assert res.energy_note.startswith("energy: not measured (RAPL not available")
    assert dict(profile_sections(res))["Energy"] == res.energy_note


# ------------------------------------------------------------------------------- real runtimes


def test_ort_target_runs_the_model(onnx_pair):
    a, b = onnx_pair
    t = open_target(str(b))
    assert t.runtime == "ort" and t.device == "cpu" and t.input_shape == (3, 64, 64)
    assert t.info["method"] == "tome" and t.info["r"] == [4, 4] and t.info["r_mean"] == 4.0
    from vitmerge.backends.base import ScheduleInfo

    assert open_target(str(a)).schedule == ScheduleInfo(r_mean=0.0, dtype="fp32")  # unmerged: the record every runtime gives
    out = t.timed(3)()
    assert out[0].shape == (3, 1000)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(t(x).numpy(), ort_session(b).run(None, {"images": x})[0])  # host path, same file
    res = profile_targets([open_target(str(a)), t, open_target(str(a))], [1, 2], rounds=2, iters=2, warmup=1)
    labels = [r.label for r in res.rows[:3]]
    assert len(set(labels)) == 3  # the same file twice still gets its own row
    assert res.rows[0].speedup == 1.0 and all(r.stats.p50 > 0 for r in res.rows)


def test_torch_target_merges_and_runs():
    with pytest.warns(UserWarning, match="RANDOM weights"):  # no checkpoint: said loudly
        t = open_target("vit_tiny_patch16_224", request=MergeRequest(r=2), img_size=32, device="cpu")
    assert t.runtime == "torch" and t.info["method"] == "tome" and t.info["r"] == [2] * 12
    assert t.timed(2)().shape == (2, 1000)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert open_target("timm:vit_tiny_patch16_224", img_size=32).info["r_mean"] == 0.0


def test_cli_profile_two_models_writes_report(onnx_pair, tmp_path):
    a, b = onnx_pair
    rep = tmp_path / "rep"
    res = runner.invoke(app, ["profile", str(a), str(b), "--batch", "1,2", "--rounds", "2", "--iters", "2",
                              "--warmup", "1", "--no-energy", "--report-dir", str(rep)])
    assert res.exit_code == 0, res.output
    assert "energy: not measured (disabled with --no-energy)" in " ".join(res.output.split())
    doc = json.loads((rep / "report.json").read_text())
    rows = doc["data"]["results"]
    assert [(r["label"], r["batch"]) for r in rows] == [
        (a.name, 1), (b.name, 1), (a.name, 2), (b.name, 2)]
    assert rows[0]["speedup_vs_first"] == 1.0 and rows[1]["r_mean"] == 4.0
    assert all(r["p50_ms"] > 0 and r["throughput_ips"] > 0 and r["samples"] == 4 for r in rows)
    # peak memory of each file at each batch, each in a process of its own; batch 2 needs more than batch 1
    assert all(r["peak_memory_mb"] > 0 and "own process" in r["peak_memory_note"] for r in rows)
    assert rows[2]["peak_memory_mb"] >= rows[0]["peak_memory_mb"] * 0.9
    md = (rep / "report.md").read_text()
    assert "| model | runtime | device | batch | p50 ms |" in md and "## Energy" in md and "## Peak memory" in md
    png = (rep / "latency_vs_r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert doc["plots"] == ["latency_vs_r.png"]


def test_cli_profile_timm_model():
    res = runner.invoke(app, ["profile", "timm:vit_tiny_patch16_224", "--img-size", "32", "--r", "1", "--batch", "1",
                              "--rounds", "1", "--iters", "1", "--warmup", "0", "--no-energy"])
    assert res.exit_code == 0, res.output
    assert "torch/cpu" in res.output


# ------------------------------------------------------------------------------- errors


def _custom_op_model(path):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    node = helper.make_node("TokenMerge", ["images"], ["logits"], domain="vitmerge", r=1)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("vitmerge", 1)])
    onnx.save(model, path)
    return path


def test_custom_nodes_get_the_kernel_registered(tmp_path, monkeypatch):
    """A graph importing the vitmerge domain gets the TokenMerge kernel registered before ORT loads it; a
    node that does not fit the kernel's signature (one input instead of three) fails as a ModelFileError
    carrying ONNX Runtime's reason, not as a raw ORT exception."""
    import onnxruntime as ort

    from vitmerge.plugins import ort_tokenmerge

    seen = []
    real = ort_tokenmerge.register_ort
    monkeypatch.setattr(ort_tokenmerge, "register_ort", lambda so: (seen.append(so), real(so)))
    path = _custom_op_model(tmp_path / "c.onnx")
    with pytest.raises(ModelFileError, match="ONNX Runtime could not load c.onnx: .*TokenMerge"):
        ort_session(path, ["CPUExecutionProvider"])
    assert len(seen) == 1 and isinstance(seen[0], ort.SessionOptions)
    plain = tmp_path / "plain.onnx"
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["images"], ["logits"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 18)]), plain)
    ort_session(plain)
    assert len(seen) == 1  # no custom domain: nothing registered


def test_runtime_errors(onnx_pair, tmp_path):
    a, _ = onnx_pair
    with pytest.raises(UsageError, match="build an engine"):
        open_target(str(a), "trt")
    with pytest.raises(UsageError, match="runtime torch"):
        open_target("timm:vit_tiny_patch16_224", "ort")
    with pytest.raises(UsageError, match="unknown runtime"):
        open_target(str(a), "tvm")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeMissingError, match="onnxruntime-gpu"):
            open_target(str(a), "ort-cuda")
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"\0" * 64)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeMissingError, match="TensorRT not installed"):
            open_target(str(eng))


@pytest.mark.parametrize("args,needle", [
    (["{tmp}/missing.onnx"], "does not exist"),
    (["{a}", "--batch", "1,x"], "comma-separated integers"),
    (["{a}", "--runtime", "trt"], "build an engine first"),
    (["{a}", "--batch", "0"], "--batch values must be at least 1"),
    (["{notonnx}"], "not a readable ONNX model"),
])
def test_cli_bad_input(onnx_pair, tmp_path, args, needle):
    notonnx = tmp_path / "x.onnx"
    notonnx.write_text("hello")
    args = [s.format(tmp=tmp_path, a=onnx_pair[0], notonnx=notonnx) for s in args]
    res = runner.invoke(app, ["profile", *args, "--rounds", "1", "--iters", "1", "--no-energy"])
    assert res.exit_code == 2, res.output
    assert needle in " ".join(res.output.split())


# ------------------------------------------------------------------------------- ONNX Runtime CUDA


class SessionRecorder:
    """Stands in for onnxruntime.InferenceSession where no GPU exists: records what was asked."""

    def __init__(self):
        self.made = []

    def __call__(self, path, sess_options=None, providers=None):
        self.made.append((path, providers))
        return type("FakeSession", (), {"get_providers": lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"]})()


@pytest.fixture
def cuda_stand_in(monkeypatch):
    """ONNX Runtime as if onnxruntime-gpu on a GPU machine: CUDA listed, sessions recorded, not made."""
    import onnxruntime as ort

    rec = SessionRecorder()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", rec)
    return rec


def _graph(path, nodes, opsets):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]), path)
    return path


def test_ort_cuda_refuses_graphs_with_tokenmerge_nodes(tmp_path, cuda_stand_in):
    """The TokenMerge kernel (onnxruntime-extensions) is CPU-only: under the CUDA provider ORT would copy
    around every merge and the timing would not be the GPU's. Refused before any session is made, on a
    machine where the CUDA provider is there; a graph without such nodes goes through."""
    from vitmerge.backends import ort as ortb

    plugin = _custom_op_model(tmp_path / "c.onnx")
    for call in (lambda: open_target(str(plugin), "ort-cuda"), lambda: ortb.cuda_session(plugin),
                 lambda: ortb.OrtRunner(plugin, "ort-cuda", sess=object())):
        with pytest.raises(UsageError, match=r"c\.onnx holds 1 vitmerge::TokenMerge node\(s\), whose ONNX Runtime "
                                             r"kernel runs on the CPU only.*--runtime ort"):
            call()
    assert cuda_stand_in.made == []
    # a merge node inside a subgraph (an If branch) counts too
    inner = helper.make_graph([helper.make_node("TokenMergeCls", ["images"], ["t"], domain="vitmerge")], "then", [],
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 4])])
    nested = _graph(tmp_path / "nested.onnx",
                    [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
                     helper.make_node("If", ["c"], ["logits"], then_branch=inner, else_branch=inner)],
                    [("", 18), ("vitmerge", 1)])
    with pytest.raises(UsageError, match="holds 2 vitmerge::TokenMergeCls node"):
        ortb.cuda_session(nested)
    # importing the domain without using it is no reason to refuse; the CPU runtime never refuses
    plain = _graph(tmp_path / "plain.onnx", [helper.make_node("Relu", ["images"], ["logits"])],
                   [("", 18), ("vitmerge", 1)])
    ortb.cuda_session(plain)
    assert [p for _, p in cuda_stand_in.made] == [[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]]
    assert ortb.custom_nodes(onnx.load(str(plugin))) == ["TokenMerge"]


class FakeOrt:
    __version__ = "1.99.0"

    def __init__(self, providers):
        self.providers = providers

    def get_available_providers(self):
        return self.providers


@pytest.mark.parametrize("installed,needles", [
    ({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"},
     ["onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are both installed",
      "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu[cuda,cudnn]'"]),
    ({"onnxruntime": "1.32.0"},
     ["CPU build of ONNX Runtime (onnxruntime 1.32.0", "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu"]),
    ({"onnxruntime-gpu": "1.31.1"}, ["onnxruntime-gpu 1.31.1 is installed but", "pip uninstall -y onnxruntime-gpu &&"]),
])
def test_missing_cuda_provider_is_explained_with_a_working_fix(monkeypatch, installed, needles):
    """Never recommend installing onnxruntime-gpu beside onnxruntime: every fix uninstalls first."""
    from vitmerge.backends import ort as ortb

    monkeypatch.setattr(ortb, "dist_version", lambda name: installed.get(name))
    msg = ortb.cuda_problem(FakeOrt(["AzureExecutionProvider", "CPUExecutionProvider"]))
    for needle in needles:
        assert needle in msg
    assert msg.index("pip uninstall") < msg.index("pip install")
    assert ortb.cuda_problem(FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"])) is None


def test_onnxruntime_not_importable_says_which_extra(monkeypatch):
    import sys

    from vitmerge.backends import ort as ortb

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(ortb, "dist_version", lambda name: None)
    with pytest.raises(RuntimeMissingError, match=r"ONNX Runtime is not installed: pip install 'vitmerge\[cpu\]'"):
        ortb.import_ort()
    monkeypatch.setattr(ortb, "dist_version", lambda name: "1.30.0")
    with pytest.raises(RuntimeMissingError, match=r"onnxruntime 1.30.0 and onnxruntime-gpu 1.30.0 are installed: "
                                                  r"reinstall one of them: pip uninstall -y onnxruntime onnxruntime-gpu"):
        ortb.import_ort()


def test_gpu_extra_never_installs_the_cpu_runtime_beside_the_gpu_one():
    """pyproject: onnxruntime is not a core dependency (it would sit beside onnxruntime-gpu); the cpu and gpu
    extras each bring one of the two."""
    import re
    import tomllib
    from pathlib import Path

    proj = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()  # noqa: E731
    core = {name(r) for r in proj["dependencies"]}
    extras = {k: {name(r) for r in v} for k, v in proj["optional-dependencies"].items()}
    assert "onnxruntime" not in core and "onnxruntime-gpu" not in core
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" not in extras["cpu"]
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]
    # the CUDA 12 route: onnxruntime-gpu below 1.27 (CUDA 12 builds), TensorRT's cu12 meta-package, never `tensorrt`
    cu12 = proj["optional-dependencies"]["gpu-cu12"]
    assert extras["gpu-cu12"] == {"onnxruntime-gpu", "nvidia-ml-py"} and any("<1.27" in r for r in cu12)
    assert extras["tensorrt-cu12"] == {"tensorrt-cu12"} and extras["tensorrt"] == {"tensorrt"}
    assert all(">=10.16" in r for r in proj["optional-dependencies"]["tensorrt"] + proj["optional-dependencies"]["tensorrt-cu12"])
    assert not any("onnxruntime" in deps or "onnxruntime-gpu" in deps for k, deps in extras.items()
                   if k not in ("cpu", "gpu", "gpu-cu12"))


def test_piped_profile_table_keeps_every_number(onnx_pair):
    """Output that is not a terminal (a log, CI, `| tee`): rich would crop the table at 80 columns ("vs 1st" read
    "1."). Piped, every row keeps its full speed-up and throughput."""
    import subprocess
    import sys

    a, b = onnx_pair
    long_a = a.parent / ("a_rather_long_file_name_for_a_model_" + a.name)
    long_a.write_bytes(a.read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    p = subprocess.run([sys.executable, "-m", "vitmerge.cli", "profile", str(long_a), str(b), "--batch", "1",
                        "--rounds", "1", "--iters", "1", "--warmup", "0", "--no-energy", "--no-memory"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [ln for ln in p.stdout.splitlines() if ("ort/cpu" in ln)]
    assert len(rows) == 2, p.stdout
    import re

    assert all(re.search(r"\d+\.\d\dx\s*$", ln) for ln in rows), rows  # "1.00x", never "1."
    assert all(re.search(r"\d[\d,]*\.\d ", ln) for ln in rows), rows  # img/s in full


def test_interleaved_sessions_do_not_spin_and_orders_agree(onnx_pair):
    """Several ONNX Runtime sessions timed in turn in one process: each is made again so its workers stop spinning
    when its run returns (an idle session's spinning workers stole the timed one's cores: ratios flipped with the
    order of the files), the report says so, the ratio does not depend on the order, and a model's p50 is what it
    gets timed alone within 10 %. Batch 16 (about 5 ms a call here): each run wakes the workers once, a cost that
    is noise at that size (a 1 ms call pays about 0.2 ms more; docs/profiling.md)."""
    a, b = onnx_pair
    batch = [16]

    def ratio(first, second):
        ta, tb = open_target(str(first)), open_target(str(second))
        res = profile_targets([ta, tb], batch, rounds=6, iters=5, warmup=2)
        assert not ta.spinning and not tb.spinning
        assert "stop spinning between runs" in res.settings["interleaving"]
        return res.rows[1].stats.p50 / res.rows[0].stats.p50

    ab, ba = ratio(a, b), ratio(b, a)
    assert 0.85 < ab * ba < 1.18, (ab, ba)  # t_b/t_a times t_a/t_b: 1 when the order does not matter
    pairs = []
    for _ in range(9):  # adjacent short windows, the median of their ratios: this machine drifts by 20 % a second
        single = open_target(str(b))
        res = profile_targets([single], batch, rounds=3, iters=4, warmup=2)
        assert single.spinning and res.settings["interleaving"] == "as created"  # one model: left as created
        inter = profile_targets([open_target(str(a)), open_target(str(b))], batch, rounds=3, iters=4, warmup=2)
        pairs.append(inter.rows[1].stats.p50 / res.rows[0].stats.p50)
    assert 0.9 < np.median(pairs) < 1.1, sorted(pairs)
