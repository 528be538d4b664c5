"""The end-to-end demo behind `vitmerge demo` (README's main command): offline, CPU, a few minutes.

1. the digits ViT (trained here on scikit-learn's bundled handwritten digits, cached);
2. two merge methods at two FLOP budgets, each exported to ONNX and verified against PyTorch;
3. top-1 of every variant in ONNX Runtime on the held-out digits (same images for all);
4. INT8 QDQ calibration (unmerged and one merged model) and their accuracy;
5. ONNX Runtime latency at batch 1 and 8, interleaved;
6. a merge visualisation on a real photo (scikit-image's astronaut) with ViT-S/16;
7. ViT-S/16 (random weights, said so): unmerged vs ToMe r=16 latency next to the FLOP bound;
8. only with ``clips`` (``vitmerge demo --clips``): one video and one audio row: the transformers
   VideoMAE (moving digits) and AST (DTMF tones) demo models (trained here on first use, cached),
   merged at a FLOP budget, exported, verified, scored and timed in ONNX Runtime next to their
   unmerged export. Off by default: training the two takes several CPU minutes on first use, which
   would more than double the first run (README: `make demo` in a few minutes on 2 cores);
then report.json + report.md + PNG plots in one folder, with the wall and CPU seconds of every phase.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..backends import OrtRunner
from ..calibration.quantize import quantize
from ..data import CALIBRATION_SPLITS, open_dataset, transform_for
from ..exporter import export
from ..models.build import build_merged, build_model, merge, resolve_model
from ..request import MergeRequest
from ..models.flops import flop_ratio
from ..profiling.accuracy import evaluate
from ..profiling.plots import ParetoPoint, plot_latency_vs_r, plot_pareto
from ..profiling.profile import profile_targets
from ..profiling.report import md_table, write_report
from ..profiling.visualize import load_image, render, visualize_model
from . import clipmodels, digits


@dataclass
class DemoSettings:
    out_dir: Path
    methods: Sequence[str] = ("tome", "hash")
    budgets: Sequence[float] = (0.75, 0.5)
    batches: Sequence[int] = (1, 8)
    rounds: int = 6
    iters: int = 5
    calib_images: int = 200
    vit_s: bool = True  # the ViT-S/16 latency part (issue 2's embedded default)
    vit_s_model: str = "vit_small_patch16_224"
    vit_s_r: int = 16
    cache_root: Optional[Path] = None
    #: (task, method, FLOP budget) rows of the video / audio transformers part; () (the default) skips it,
    #: CLIP_ROWS is what ``vitmerge demo --clips`` runs
    clips: Sequence[tuple] = ()


CLIP_ROWS = (("video", "tome", 0.5), ("audio", "hash", 0.5))


class _Laps:
    """Wall and CPU seconds (this process and its finished children) per phase of the run."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []
        self._wall, self._cpu = time.perf_counter(), self._cpu_now()

    @staticmethod
    def _cpu_now() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __call__(self, phase: str) -> None:
        wall, cpu = time.perf_counter(), self._cpu_now()
        self.rows.append({"phase": phase, "wall_s": round(wall - self._wall, 2), "cpu_s": round(cpu - self._cpu, 2)})
        self._wall, self._cpu = wall, cpu

    def section(self) -> tuple:
        total = ["total", sum(r["wall_s"] for r in self.rows), sum(r["cpu_s"] for r in self.rows)]
        return ("Run time", "Seconds per phase of this run (CPU: user + system of the demo's process and "
                            "its workers; training is skipped when the model is cached).\n\n"
                + md_table(["phase", "wall s", "CPU s"], [[r["phase"], r["wall_s"], r["cpu_s"]] for r in self.rows]
                           + [total]))


@dataclass
class DemoResult:
    report_md: Path
    report_json: Path
    plots: List[Path]
    data: Dict[str, Any] = field(default_factory=dict)


def run(settings: DemoSettings, say: Callable[[str], None] = print, progress=None) -> DemoResult:
    out = Path(settings.out_dir)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    data: Dict[str, Any] = {"settings": vars(settings)}
    sections: List[tuple] = []
    plots: List[Path] = []
    lap = _Laps()

    # 1. the digits model -------------------------------------------------------------------------
    say("digits ViT: training on scikit-learn's handwritten digits (cached after the first run)")
    dm = digits.cached(root=settings.cache_root)
    say(f"  {dm.model_name} {dm.kwargs}: test top-1 {dm.test_top1:.2%} "
        f"({'cached' if dm.cached else f'trained in {dm.train_seconds:.0f} s'})")
    data["digits_model"] = {"name": dm.model_name, "kwargs": dm.kwargs, "test_top1_torch": dm.test_top1,
                            "checkpoint": str(dm.checkpoint)}
    lap("digits model (" + ("cached" if dm.cached else "trained") + ")")

    # 2. methods x budgets -> verified ONNX files --------------------------------------------------
    variants: Dict[str, Dict[str, Any]] = {}
    base_model = dm.build()
    res = export(base_model, onnx_dir / "digits_unmerged.onnx")
    variants["unmerged"] = {"method": "none", "budget": 1.0, "r": [0] * len(base_model.blocks), "flop_fraction": 1.0,
                            "path": res.path, "max_abs_diff": res.verification.max_abs_diff}
    for method in settings.methods:
        for budget in settings.budgets:
            model = merge(dm.build(), MergeRequest(method, budget=budget))
            base, merged, ratio = flop_ratio(model)
            name = f"{method}@{budget:g}"
            res = export(model, onnx_dir / f"digits_{method}_{int(budget * 100)}.onnx")
            variants[name] = {"method": method, "budget": budget, "r": model.vitmerge.r, "flop_fraction": merged / base,
                              "tokens_out": model.vitmerge.tokens_out, "path": res.path,
                              "max_abs_diff": res.verification.max_abs_diff}
            say(f"  exported {name}: r={model.vitmerge.r}, FLOPs {merged / base:.2f} of unmerged, "
                f"ORT vs PyTorch max|diff| {res.verification.max_abs_diff:.1e}")
    lap("fp32 exports + verification")

    # 2b. FP16 (what GPU deployments run): the same schedules, merge steps kept in float32 -----------
    # the first (mildest) budget's schedule
    fp16_of = ["unmerged", f"{settings.methods[0]}@{settings.budgets[0]:g}"]
    for name in fp16_of:
        v = variants[name]
        model = dm.build()
        if v["method"] != "none":
            merge(model, MergeRequest(v["method"], r=v["r"]))
        src = Path(v["path"])
        res = export(model, src.with_name(src.stem + ".fp16.onnx"), dtype="fp16")
        variants[f"{name} fp16"] = {**v, "path": res.path, "precision": "fp16",
                                    "max_abs_diff": res.verification.max_abs_diff}
        say(f"  exported {name} fp16: {res.verification.describe_rule()}")
    lap("fp16 exports + verification")

    # 3. INT8 ---------------------------------------------------------------------------------------
    tf = transform_for(base_model)
    calib = open_dataset(dm.data_dir, prefer=CALIBRATION_SPLITS, transform=tf, limit=settings.calib_images)
    test = open_dataset(dm.test_dir, transform=tf)
    int8_of = ["unmerged", f"{settings.methods[0]}@{settings.budgets[-1]:g}"]
    for name in int8_of:
        src = Path(variants[name]["path"])
        q = quantize(src, src.with_name(src.stem + ".int8.onnx"), calib, method="entropy")
        variants[f"{name} int8"] = {**variants[name], "path": q.path, "precision": "int8",
                                    "quantized_nodes": q.quantized_nodes}
        say(f"  INT8 QDQ {name}: {q.quantized_nodes} quantized nodes, {q.images} calibration images")
    lap("INT8 calibration")

    # 4. accuracy in ONNX Runtime, every variant on the same images ---------------------------------
    ev = evaluate({k: OrtRunner(v["path"], label=k) for k, v in variants.items()}, test, batch_size=64,
                  progress=progress if progress is not None else False, description="ORT accuracy")
    for k, acc in ev.models.items():
        variants[k]["top1"] = acc.top1
        variants[k]["agreement"] = acc.agreement
    lap("accuracy in ONNX Runtime")

    # 5. latency -------------------------------------------------------------------------------------
    targets = [OrtRunner(v["path"], label=k) for k, v in variants.items()]
    prof = profile_targets(targets, settings.batches, rounds=settings.rounds, iters=settings.iters)
    for row in prof.rows:
        variants[row.label].setdefault("p50_ms", {})[row.batch] = row.stats.p50
        variants[row.label].setdefault("speedup", {})[row.batch] = row.speedup
    data["digits"] = variants  # write_report turns paths and numbers into JSON
    data["digits_test_images"] = ev.images

    b0 = settings.batches[0]
    rows = [[k, v.get("precision", "fp32"), str(v["r"]), v["flop_fraction"], 100 * v["top1"], 100 * v["agreement"],
             *[v["p50_ms"][b] for b in settings.batches], *[v["speedup"][b] for b in settings.batches]]
            for k, v in variants.items()]
    sections.append(("Digits ViT: accuracy and ONNX Runtime latency", (
        f"{ev.images} held-out digits images, the same for every row; latency: ONNX Runtime CPU medians, "
        f"interleaved ({settings.rounds}x{settings.iters} calls per batch size).\n\n"
        + md_table(["variant", "precision", "r per block", "FLOPs vs unmerged", "top-1 %", "agrees with unmerged %",
                    *[f"p50 ms b={b}" for b in settings.batches], *[f"speed-up b={b}" for b in settings.batches]],
                   rows))))
    pts = [ParetoPoint(label=k, method=v["method"] + (f" {v['precision']}" if v.get("precision") else ""),
                       latency_ms=v["p50_ms"][b0], accuracy=100 * v["top1"]) for k, v in variants.items()]
    plots.append(plot_pareto(pts, out / "pareto_digits.png", title=f"Digits ViT: top-1 vs ORT latency (batch {b0})",
                             accuracy_label="top-1 %"))
    lap("latency in ONNX Runtime")

    # 6. visualisation on a real photo ----------------------------------------------------------------
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vis_model = build_model(settings.vit_s_model)
    vis = visualize_model(vis_model, load_image("skimage:astronaut"), method="tome", r=8)
    plots.append(render(vis, out / "merge_astronaut.png",
                        title=f"ToMe r=8 on {settings.vit_s_model} (random weights): {vis.n_groups} groups"))
    lap("merge visualisation")

    # 7. ViT-S latency (random weights) ---------------------------------------------------------------
    if settings.vit_s:
        say(f"{settings.vit_s_model} (RANDOM weights: no hub downloads): unmerged vs ToMe r={settings.vit_s_r}")
        lat = vit_latency(settings.vit_s_model, settings.vit_s_r, settings.batches, onnx_dir,
                          rounds=settings.rounds, iters=settings.iters, say=say)
        data["vit_s"] = lat
        rr = settings.vit_s_r
        sections.append((f"{settings.vit_s_model}: ToMe r={rr} vs unmerged (random weights)", md_table(
            ["batch", "unmerged p50 ms", f"r={rr} p50 ms", "speed-up", "FLOP bound", "of bound"],
            [[row["batch"], row["unmerged_p50_ms"], row["merged_p50_ms"], row["speedup"], lat["flop_ratio"],
              row["fraction_of_bound"]] for row in lat["latency"]])))
        plot_rows = [{"runtime": "ORT CPU", "r": r_, "p50_ms": row[key], "batch": row["batch"]}
                     for row in lat["latency"] for r_, key in ((0, "unmerged_p50_ms"), (rr, "merged_p50_ms"))]
        plots.append(plot_latency_vs_r(plot_rows, out / "latency_vit_s.png",
                                       title=f"{settings.vit_s_model}: ORT CPU latency vs r"))
        lap(f"{settings.vit_s_model} exports + latency")

    # 8. video and audio transformers (only when asked: `vitmerge demo --clips`) ------------------
    if not settings.clips:
        sections.append(("Video and audio transformers", "not run: `vitmerge demo --clips` adds a VideoMAE (moving "
                                                         "digits) and an AST (DTMF tones) row, trained here on first "
                                                         "use (several CPU minutes) and cached"))
    elif not clipmodels.transformers_available():
        sections.append(("Video and audio transformers", "skipped: transformers is not installed "
                                                         "(pip install 'vitmerge[hf]')"))
    else:
        models = train_clip_models(sorted({task for task, _, _ in settings.clips}), settings.cache_root, say=say)
        lap("video + audio models (" + ", ".join(f"{k} {'cached' if m.cached else 'trained'}"
                                                  for k, m in models.items()) + ")")
        rows = [clip_row(task, method, budget, settings.batches, onnx_dir, rounds=settings.rounds,
                         iters=settings.iters, cache_root=settings.cache_root, say=say)
                for task, method, budget in settings.clips]
        lap("video + audio exports, accuracy, latency")
        data["clips"] = rows
        bs = settings.batches
        sections.append(("Video and audio transformers (transformers VideoMAE / AST)", (
            "Small models trained here on data made in code (moving digits: VideoMAE-shaped; DTMF tones in noise: "
            "AST-shaped), merged at a FLOP budget, exported and verified; top-1 on their held-out clips and latency "
            "in ONNX Runtime CPU (medians, interleaved with the unmerged export).\n\n"
            + md_table(["task", "model", "merge", "r per layer", "tokens in → out", "FLOPs vs unmerged",
                        "top-1 unmerged %", "top-1 merged %", *[f"p50 ms b={b} (unmerged → merged)" for b in bs],
                        *[f"speed-up b={b}" for b in bs]],
                       [[r["task"], r["model"], f"{r['method']}@{r['budget']:g}", str(r["r"]),
                         f"{r['tokens_in']} → {r['tokens_out']}", r["flop_fraction"], 100 * r["top1_unmerged"],
                         100 * r["top1_merged"],
                         *[f"{r['p50_ms']['unmerged'][b]:.2f} → {r['p50_ms']['merged'][b]:.2f}" for b in bs],
                         *[r["speedup"][b] for b in bs]] for r in rows]))))

    sections.append(("Energy", "energy: not measured (the demo times ONNX Runtime on the CPU; "
                               "`vitmerge profile --energy` reads NVML/RAPL counters where the machine exposes them)"))
    data["phases"] = lap.rows
    sections.append(lap.section())
    paths = write_report(out, "vitmerge demo", data, sections, plots=plots)
    return DemoResult(report_md=paths.markdown, report_json=paths.json, plots=plots, data=data)


def train_clip_models(kinds: Sequence[str], cache_root: Optional[Path] = None,
                      say: Callable[[str], None] = print) -> Dict[str, "clipmodels.ClipModel"]:
    """The video / audio demo models of ``kinds``, from the cache or trained now. Each trains on one thread
    (deterministic); when two are missing and the machine has two cores they train side by side in two
    worker processes, which halves the first run's wait and gives the same weights as one after the other."""
    missing = [k for k in kinds if not clipmodels.is_cached(k, root=cache_root)]
    if missing:
        say(f"{' and '.join(missing)} transformer{'s' if len(missing) > 1 else ''}: training on generated data "
            f"(one thread each, cached after the first run)")
    out: Dict[str, clipmodels.ClipModel] = {}
    if len(missing) > 1 and (os.cpu_count() or 1) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=len(missing), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {k: pool.submit(clipmodels.cached, k, None, cache_root) for k in missing}
            out.update({k: f.result() for k, f in futures.items()})
    for k in kinds:
        if k not in out:
            out[k] = clipmodels.cached(k, root=cache_root)
        cm = out[k]
        say(f"  {k}: {cm.model_dir}: test top-1 {cm.test_top1:.2%} "
            f"({'cached' if cm.cached else f'trained in {cm.train_seconds:.0f} s'})")
    return out


def clip_row(task: str, method: str, budget: float, batches: Sequence[int], onnx_dir: Path, rounds: int = 6,
             iters: int = 5, cache_root: Optional[Path] = None, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """One demo row for the video or audio model: unmerged and merged exports (verified), top-1 of both in
    ONNX Runtime on the held-out clips, latency interleaved per batch size."""
    cm = clipmodels.cached(task, root=cache_root)  # trained by train_clip_models when run() calls this
    plain = cm.build()
    paths = {"unmerged": export(plain, Path(onnx_dir) / f"{task}_unmerged.onnx").path}
    model = merge(cm.build(), MergeRequest(method, budget=budget))
    base, merged, _ = flop_ratio(model)
    res = export(model, Path(onnx_dir) / f"{task}_{method}_{int(budget * 100)}.onnx")
    paths["merged"] = res.path
    info = model.vitmerge
    say(f"  exported {method}@{budget:g}: r={info.r}, tokens {info.tokens_in[0]} -> {info.tokens_out[-1]}, FLOPs "
        f"{merged / base:.2f} of unmerged, ORT vs PyTorch max|diff| {res.verification.max_abs_diff:.1e}")
    test = open_dataset(cm.test_dir, transform=transform_for(plain))
    ev = evaluate({k: OrtRunner(p, label=k) for k, p in paths.items()}, test, batch_size=64, progress=False)
    prof = profile_targets([OrtRunner(p, label=k) for k, p in paths.items()], batches, rounds=rounds, iters=iters)
    p50: Dict[str, Dict[int, float]] = {"unmerged": {}, "merged": {}}
    for row in prof.rows:
        p50[row.label][row.batch] = row.stats.p50
    return {"task": task, "model": type(plain).__name__, "method": method, "budget": budget, "r": list(info.r),
            "tokens_in": info.tokens_in[0], "tokens_out": info.tokens_out[-1], "flop_fraction": merged / base,
            "top1_unmerged": ev.models["unmerged"].top1, "top1_merged": ev.models["merged"].top1,
            "agreement": ev.models["merged"].agreement, "clips": ev.images, "p50_ms": p50,
            "speedup": {b: p50["unmerged"][b] / p50["merged"][b] for b in batches},
            "onnx": {k: str(p) for k, p in paths.items()}}


def vit_latency(model_name: str, r: int, batches: Sequence[int], onnx_dir: Path, rounds: int = 6, iters: int = 5,
                checkpoint: Optional[Path] = None, model_kwargs: Optional[dict] = None,
                say: Callable[[str], None] = print, on_round: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Export ``model_name`` unmerged and with ToMe r (both verified), time them interleaved in ONNX
    Runtime CPU per batch size; returns the numbers next to the FLOP bound."""
    paths, bound = {}, 1.0
    for name, rr in (("unmerged", 0), (f"tome_r{r}", r)):
        model = build_merged(resolve_model(model_name, checkpoint, model_kwargs=model_kwargs), MergeRequest("tome", r=rr))
        if rr:
            _, _, bound = flop_ratio(model)
        res = export(model, Path(onnx_dir) / f"{model_name}_{name}.onnx")
        v = res.verification
        say(f"  exported {name}: tokens {model.vitmerge.tokens_in[0]} -> {model.vitmerge.tokens_out[-1]}, "
            f"ORT vs PyTorch max|diff| {v.max_abs_diff:.1e}, top-1 agreement {v.top1_agreement:.0%}")
        paths[name] = res.path
    prof = profile_targets([OrtRunner(p, label=k) for k, p in paths.items()], batches, rounds=rounds, iters=iters,
                           on_round=on_round)
    p50 = {(row.label, row.batch): row.stats.p50 for row in prof.rows}
    rows = []
    for b in batches:
        base, merged = p50[("unmerged", b)], p50[(f"tome_r{r}", b)]
        rows.append({"batch": b, "unmerged_p50_ms": base, "merged_p50_ms": merged, "speedup": base / merged,
                     "fraction_of_bound": base / merged / bound})
    return {"model": model_name, "r": r, "flop_ratio": bound,
            "weights": str(checkpoint) if checkpoint else "random (no --checkpoint)",
            "onnx": {k: str(p) for k, p in paths.items()}, "latency": rows}
