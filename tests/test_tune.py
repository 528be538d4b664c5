"""`vitmerge tune` (issue #22) on the small digits model: the block latency table, the candidates, the cache (a
second run measures nothing, an interrupted one resumes), the Pareto front against brute force, the choice for
each target against brute force and on the held-out images, and the refusals.

Latency on a shared CI box is noise: the tests check structure (shapes, keys, which candidate is chosen given
what was measured), never that merging is faster. The fast tests measure in PyTorch (no exports but the chosen
file's); the ONNX Runtime path (every candidate exported and verified) is one slow test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitmerge.cli import app
from vitmerge.errors import DataError, RuntimeMissingError, UsageError
from vitmerge.profiling.tune import (Candidate, Target, TargetNotMet, check_runtime, default_methods,
                                     default_token_counts, measure_block_latency, monotone, tune)

runner = CliRunner()

LIMIT = 100
# 2 methods x 2 budgets: one latency budget (solved from the measured table, which on a loaded box may make it
# unreachable: then it is skipped with the reason) and one FLOP budget (always a candidate)
FAST = dict(methods=["tome", "hash"], budgets=[0.8], flop_budgets=[0.6], limit=LIMIT, rounds=2, iters=2, warmup=1,
            block_rounds=2, threads=1)


def source_of(digits_model):
    from vitmerge.models.build import resolve_model

    return resolve_model(None, config=digits_model.config_path)


@pytest.fixture(scope="module")
def tuned(digits_model, tmp_path_factory):
    """One PyTorch tune run of the digits model (2 methods x 2 budgets, 100 held-out images)."""
    root = tmp_path_factory.mktemp("tune")
    result = tune(source_of(digits_model), digits_model.test_dir, Target("max_drop", 50.0), runtime="torch", batch=2,
                  output=root / "best.onnx", report_dir=root / "report", cache_dir=root / "cache", progress=False,
                  **FAST)
    return root, result


def again(digits_model, root, target, **kw):
    """The same run again (same cache key), another target: everything comes from the cache."""
    args = dict(FAST, **kw.pop("fast", {}))
    return tune(source_of(digits_model), digits_model.test_dir, target, runtime="torch", batch=2,
                cache_dir=root / "cache", progress=False, **args, **kw)


# ------------------------------------------------------------------------------------------- block latency


def test_block_latency_table_has_every_count_and_grows_with_the_tokens(digits_model, tmp_path):
    from vitmerge.models.budget import load_latency_table
    from vitmerge.merging.schedule import solve_budget_latency

    model = digits_model.build()
    out = tmp_path / "table.json"
    # one thread: two OpenMP threads on a loaded 2-core box stall each other for whole rounds (100 ms spikes)
    table = measure_block_latency(model, "torch", batch=16, rounds=5, iters=3, threads=1, output=out)
    counts = default_token_counts(65, 1)
    assert counts[-1] == 65 and counts[0] >= 2 and len(counts) >= 6
    assert sorted(table) == counts and all(v > 0 and math.isfinite(v) for v in table.values())
    # more tokens, not less time: 65 tokens against 8 is ~8x the work; noise on a shared box is far below that
    assert table[65] > table[counts[0]]
    # within noise every count costs at least about what a smaller one does
    for small in counts:
        for big in counts:
            if big > 2 * small:
                assert table[big] >= 0.7 * table[small], (small, big, table)
    written = load_latency_table(out)  # the JSON --budget-latency reads
    assert sorted(written) == counts
    vals = [written[n] for n in counts]
    assert vals == sorted(vals), "the written table is monotone"
    rs = solve_budget_latency(written, 0.7, 4, 65, 1, "tome")
    assert len(rs) == 4 and any(rs)


def test_monotone_pools_adjacent_violators():
    assert monotone({1: 1.0, 2: 3.0, 3: 2.0, 4: 5.0}) == {1: 1.0, 2: 2.5, 3: 2.5, 4: 5.0}
    assert monotone({8: 2.0, 16: 1.0}) == {8: 1.5, 16: 1.5}
    up = {1: 0.1, 2: 0.2, 5: 0.9}
    assert monotone(up) == up


def test_default_methods_come_from_the_registry_and_the_family(digits_model):
    from vitmerge.merging import METHODS

    methods = default_methods(digits_model.build())
    assert methods == [m for m, s in METHODS.items() if s.form == "block" and all(
        v is not None for v in s.options.values())]
    assert {"tome", "hash", "importance"} <= set(methods) and "vwt" not in methods and "evo" not in methods


# ------------------------------------------------------------------------------------------- one run


def test_candidates_are_merged_scored_and_timed(tuned, digits_model):
    root, r = tuned
    assert r.baseline.images == LIMIT and r.baseline.key == "unmerged"
    assert r.candidates, r.skipped
    methods = {c.method for c in r.candidates}
    assert methods <= {"tome", "hash"}
    for c in r.candidates:
        assert c.images == LIMIT  # the same held-out images for all
        assert len(c.r) == 4 and any(c.r) and c.tokens_out[-1] < 65
        assert 0 <= c.score <= 1 and 0 <= c.fidelity <= 1
        assert c.p50_ms > 0 and c.baseline_p50_ms > 0 and c.speedup == pytest.approx(c.baseline_p50_ms / c.p50_ms)
        assert 0 < c.flops_fraction < 1
        assert all(b.split()[0] in ("latency", "flops") for b in c.budgets)
    assert {"tome", "hash"} == {c.method for c in r.candidates if "flops 0.6" in c.budgets}
    labels = [b for c in r.candidates for b in c.budgets]
    assert len(labels) + len(r.skipped) == 4  # every (method, budget) is a candidate, a duplicate, or says why not


def test_the_front_is_the_brute_force_front(tuned):
    _, r = tuned
    pts = r.points

    def dominated(p):
        return any(q is not p and q.p50_ms <= p.p50_ms and q.score >= p.score
                   and (q.p50_ms < p.p50_ms or q.score > p.score) for q in pts)

    assert set(r.front) == {p.key for p in pts if not dominated(p)}
    lat = [next(p for p in pts if p.key == k).p50_ms for k in r.front]
    assert lat == sorted(lat)


@pytest.mark.parametrize("kind", ["max_drop", "target_ms", "target_speedup"])
def test_each_target_chooses_what_brute_force_chooses(tuned, digits_model, kind):
    root, r = tuned
    base, cands = r.baseline, r.candidates
    # a target that binds: the median of what was measured
    value = sorted({"max_drop": c.drop(base), "target_ms": c.p50_ms, "target_speedup": c.speedup}[kind]
                   for c in cands)[len(cands) // 2]
    value = max(value, 0.0) if kind == "max_drop" else value
    got = again(digits_model, root, Target(kind, value))
    assert not any(got.work.values()), got.work  # all from the cache
    ok = [c for c in got.points if {"max_drop": c.drop(base) <= value + 1e-9, "target_ms": c.p50_ms <= value,
                                        "target_speedup": c.speedup >= value}[kind]]
    assert ok, "the median candidate meets the target"  # (the unmerged model is a choice too: a slower merged
    # model is no answer)
    if kind == "max_drop":
        want = max(ok, key=lambda c: (c.speedup, c.score))
    else:
        want = max(ok, key=lambda c: (c.score, -c.p50_ms))
    assert got.chosen.key == want.key


def test_the_chosen_file_meets_the_constraint_on_the_held_out_images(tuned, digits_model):
    """The file written to -o, scored again on the same held-out images in ONNX Runtime, loses no more than the
    target allows (the run measured in PyTorch; the file's top-1 is the candidate's, give or take one image)."""
    from vitmerge import metadata as md
    from vitmerge.backends import OrtRunner
    from vitmerge.profiling.accuracy import evaluate
    from vitmerge.profiling.compare import open_eval_data

    root, r = tuned
    base, chosen = r.baseline, r.chosen
    drop = max(0.0, min(c.drop(base) for c in r.candidates))
    got = again(digits_model, root, Target("max_drop", drop), output=root / "binding.onnx")
    out = got.output
    assert out == root / "binding.onnx" and out.is_file()
    meta = md.parsed(md.read(md.load_proto(out)))
    if got.chosen.key != "unmerged":  # (the unmerged model when no merged one within the drop is faster)
        assert meta["method"] == got.chosen.method and list(meta["r"]) == got.chosen.r  # the schedule travels along
    ds, _ = open_eval_data(digits_model.build(), digits_model.test_dir, limit=LIMIT)
    res = evaluate({"file": OrtRunner(out)}, ds, progress=False)
    file_top1 = res.models["file"].top1
    assert res.images == LIMIT
    assert abs(file_top1 - got.chosen.score) <= 1 / LIMIT + 1e-9
    assert (base.score - file_top1) * 100 <= drop + 100 / LIMIT + 1e-9
    assert got.chosen.drop(base) <= drop + 1e-9
    assert chosen is not None and (root / "best.onnx").is_file()


def test_report_files(tuned):
    root, r = tuned
    d = root / "report"
    for name in ("report.json", "report.md", "pareto.png", "block_latency.json"):
        assert (d / name).is_file(), name
    doc = json.loads((d / "report.json").read_text())["data"]
    assert doc["chosen"] == r.chosen.key and doc["pareto_front"] == r.front
    assert doc["baseline"]["score"] == r.baseline.score and len(doc["candidates"]) == len(r.candidates)
    md_text = (d / "report.md").read_text()
    assert "(chosen)" in md_text and "## Block latency" in md_text and "pareto.png" in md_text


# ------------------------------------------------------------------------------------------- the cache


def test_a_second_run_measures_nothing_and_an_interrupted_one_resumes(tuned, digits_model):
    root, first = tuned
    assert first.work["block_latency"] == 1 and first.work["accuracy"] == len(first.candidates) + 1
    assert first.work["latency"] == len(first.candidates) and first.work["exports"] == 1  # the chosen file only
    second = again(digits_model, root, Target("max_drop", 50.0))
    assert second.work == {"block_latency": 0, "exports": 0, "accuracy": 0, "latency": 0}
    def measured(c):  # (the exported file of a chosen candidate is recorded when another test chose it)
        return {k: v for k, v in c.to_dict().items() if k not in ("onnx", "verification")}

    assert [measured(c) for c in second.candidates] == [measured(c) for c in first.candidates]
    # a run killed after its first candidate: that one's record is there, the others' are not
    cache = first.cache_dir
    gone = first.candidates[-1]
    (cache / f"{gone.key}.json").unlink()
    third = again(digits_model, root, Target("max_drop", 50.0))
    assert third.work == {"block_latency": 0, "exports": 0, "accuracy": 1, "latency": 1}
    # another limit is another key: nothing is mixed up
    other = again(digits_model, root, Target("max_drop", 50.0), fast={"limit": 20, "methods": ["tome"],
                                                                     "budgets": []})
    assert other.cache_dir != cache and other.baseline.images == 20 and other.work["block_latency"] == 1


# ------------------------------------------------------------------------------------------- refusals


def test_a_target_no_candidate_meets_names_the_best_found(tuned, digits_model):
    root, r = tuned
    with pytest.raises(TargetNotMet) as e:
        again(digits_model, root, Target("target_ms", 1e-6), report_dir=root / "not_met")
    fastest = min(e.value.result.points, key=lambda c: c.p50_ms)
    assert "no candidate meets p50 latency <= 1e-06 ms" in str(e.value) and fastest.label in str(e.value)
    assert e.value.result.best.key == fastest.key and e.value.result.chosen is None
    assert (root / "not_met" / "report.md").is_file()  # the report is written all the same
    with pytest.raises(TargetNotMet, match="speed-up >= 1000x"):
        again(digits_model, root, Target("target_speedup", 1000.0))


def test_target_options():
    assert Target.from_options(max_drop=0.5) == Target("max_drop", 0.5)
    for bad in ({}, {"max_drop": 1.0, "target_ms": 2.0}, {"max_drop": 1, "target_ms": 1, "target_speedup": 2}):
        with pytest.raises(UsageError, match="exactly one target"):
            Target.from_options(**bad)
    for kind, v in (("max_drop", -1), ("target_ms", 0), ("target_speedup", -2), ("target_ms", float("nan"))):
        with pytest.raises(UsageError):
            Target(kind, v)


def test_choice_on_made_up_candidates():
    base = Candidate("unmerged", "unmerged", None, [], [0], score=0.9, p50_ms=10, speedup=1.0)

    def c(key, score, ms):
        return Candidate(key, key, "tome", [], [1], score=score, p50_ms=ms, speedup=10 / ms)

    cands = [base, c("a", 0.9, 9), c("b", 0.895, 6), c("c", 0.88, 5), c("d", 0.85, 4)]
    assert Target("max_drop", 0.5).choose(cands, base).key == "b"
    assert Target("max_drop", 0.0).choose(cands, base).key == "a"
    assert Target("target_ms", 5.5).choose(cands, base).key == "c"
    assert Target("target_speedup", 2.4).choose(cands, base).key == "d"
    assert Target("target_ms", 3).choose(cands, base) is None
    assert Target("target_ms", 3).best_found(cands, base).key == "d"
    assert Target("target_speedup", 5).best_found(cands, base).key == "d"
    slower = [base, c("e", 0.9, 12)]  # merged but slower: the unmerged model is the answer
    assert Target("max_drop", 1.0).choose(slower, base).key == "unmerged"
    assert Target("target_ms", 11).choose(slower, base).key == "unmerged"


def test_refusals_no_data_and_runtimes(digits_model, tmp_path):
    from vitmerge.models.build import resolve_model

    src = resolve_model(digits_model.model_name, digits_model.checkpoint,
                        model_kwargs=dict(digits_model.kwargs))  # no model.json: no data folder either
    with pytest.raises(DataError, match="--data"):
        tune(src, None, Target("max_drop", 1.0), runtime="torch", progress=False, cache_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        tune(src, tmp_path / "nope", Target("max_drop", 1.0), runtime="torch", progress=False, cache_dir=tmp_path)
    with pytest.raises((RuntimeMissingError, UsageError), match="TensorRT"):  # missing here, or not measured
        check_runtime("trt")
    with pytest.raises(UsageError, match="unknown runtime"):
        check_runtime("tpu")
    check_runtime("torch")
    check_runtime("ort")
    try:
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        with pytest.raises(RuntimeMissingError, match="ort-cuda"):
            check_runtime("ort-cuda")


def test_cli_refusals(digits_model):
    d = str(digits_model.test_dir)
    cases = [
        (["tune", "vit_tiny_patch16_224", "--max-drop", "1"], "--data"),
        (["tune", "vit_tiny_patch16_224", "--data", d, "--max-drop", "1", "--target-speedup", "2"], "exactly one"),
        (["tune", "vit_tiny_patch16_224", "--data", d], "exactly one"),
        (["tune", "vit_tiny_patch16_224", "--data", d, "--max-drop", "1", "--methods", "tome,nope"], "--methods"),
        (["tune", "vit_tiny_patch16_224", "--data", d, "--max-drop", "1", "--budgets", "0.5,x"], "--budgets"),
        (["tune", "vit_tiny_patch16_224", "--data", d, "--max-drop", "1", "--budgets", ""], "at least one budget"),
        (["tune", "vit_tiny_patch16_224", "--data", d, "--max-drop", "-1"], "--max-drop"),
        (["tune", "vit_tiny_patch16_224", "--data", d, "--max-drop", "1", "--runtime", "trt"], "TensorRT"),
    ]
    for argv, needle in cases:
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, (argv, res.output)


def test_cli_end_to_end_from_the_cache(tuned, digits_model):
    """The command on the same settings as the fixture's run: everything comes from the cache, the chosen file
    and the report are written, the table and the choice are printed."""
    root, r = tuned
    argv = ["tune", "--config", str(digits_model.config_path), "--data", str(digits_model.test_dir),
            "--runtime", "torch", "--batch", "2", "--methods", "tome,hash", "--budgets", "0.8",
            "--flop-budgets", "0.6", "--threads", "1",
            "--limit", str(LIMIT), "--rounds", "2", "--iters", "2", "--warmup", "1", "--block-rounds", "2",
            "--cache-dir", str(root / "cache"), "-o", str(root / "cli" / "best.onnx"),
            "--report-dir", str(root / "cli" / "report")]
    res = runner.invoke(app, argv + ["--max-drop", "50"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "everything from the cache" in res.output and "chosen" in res.output
    assert any(f"chosen {c.label}" in res.output for c in r.candidates) or "chosen: the unmerged" in res.output
    assert (root / "cli" / "best.onnx").is_file() and (root / "cli" / "report" / "pareto.png").is_file()
    res = runner.invoke(app, argv[:-4] + ["--target-ms", "0.000001"], env={"COLUMNS": "200"})  # no -o, no report
    assert res.exit_code == 2 and "no candidate meets" in res.output and "best found" in res.output


# ------------------------------------------------------------------------------------------- ONNX Runtime


@pytest.mark.slow
def test_ort_run_exports_verifies_and_times_every_candidate(digits_model, tmp_path):
    """The deployment path: the block table from ONNX (dynamic token axis), every candidate exported and verified,
    scored and timed in ONNX Runtime; the chosen file is the scored file, byte for byte; a second run exports
    nothing."""
    src = source_of(digits_model)
    args = dict(FAST, methods=["tome"], runtime="ort", batch=4, cache_dir=tmp_path / "cache", progress=False)
    r = tune(src, digits_model.test_dir, Target("max_drop", 50.0), output=tmp_path / "best.onnx", **args)
    assert sorted(r.table) == default_token_counts(65, 1)
    assert r.work["exports"] == len(r.candidates) + 1  # the unmerged model and every candidate
    for c in r.candidates:
        assert c.onnx and Path(c.onnx).is_file() and c.verification.startswith("verified")
    assert (tmp_path / "best.onnx").read_bytes() == Path(r.chosen.onnx).read_bytes()
    r2 = tune(src, digits_model.test_dir, Target("max_drop", 50.0), output=tmp_path / "best2.onnx", **args)
    assert not any(r2.work.values()) and r2.chosen.key == r.chosen.key


def test_a_detector_is_tuned_by_eval_s_map(tmp_path):
    """A random dense detector on a COCO folder whose ground truth is the unmerged detector's own detections: in
    `vitmerge tune` the unmerged model scores mAP 1 exactly, every candidate's mAP and fidelity equal a recomputation
    here (vitmerge.apply with the candidate's r, a forward, decode, torchmetrics on the same images), the choice is
    brute force's, and the report speaks of mAP, not top-1."""
    import copy

    import torch

    import vitmerge
    from support.detection_eval import dense, png_images, timm_norm, write_truth
    from vitmerge.data.detection import decode_dense, mean_average_precision

    det = dense(tmp_path)
    x = png_images(tmp_path / "coco", n=6)
    mean, std = timm_norm(det)
    xn = (x - mean) / std
    with torch.no_grad():
        ref = decode_dense(*det(xn))
    write_truth(tmp_path / "coco", ref, [(i, str(i)) for i in range(10)], (64, 64))
    truth = [{"boxes": p["boxes"], "labels": p["labels"]} for p in ref]
    ks = [len(p["boxes"]) for p in ref]

    def top(preds):  # each image's k most confident detections, k = its ground-truth boxes
        return [{key: v[p["scores"].argsort(descending=True)[:k]] for key, v in p.items()} for p, k in zip(preds, ks)]

    def run(methods, flop_budgets, report):
        return runner.invoke(app, [str(a) for a in (
            "tune", "dense:vit_tiny_patch16_224", "--checkpoint", tmp_path / "det.pth", "--img-size", "64",
            "--model-kwargs", '{"depth": 3}', "--data", tmp_path / "coco", "--runtime", "torch", "--batch", "2",
            "--methods", methods, "--budgets", "", "--flop-budgets", flop_budgets, "--max-drop", "30",
            "--rounds", "2", "--iters", "2", "--warmup", "1", "--block-rounds", "2", "--threads", "1",
            "--cache-dir", tmp_path / "cache", "--report-dir", tmp_path / report, "-o", tmp_path / f"{report}.onnx")])

    def check(doc):
        base = doc["baseline"]
        assert base["score"] == pytest.approx(1.0) and base["images"] == 6
        for c in doc["candidates"]:
            m = copy.deepcopy(det)
            vitmerge.apply(m, c["method"], c["r"])
            with torch.no_grad():
                got = decode_dense(*m(xn))
            assert c["score"] == pytest.approx(mean_average_precision(got, truth)["map"], abs=1e-6), c["label"]
            assert c["fidelity"] == pytest.approx(mean_average_precision(top(got), top(ref))["map_50"], abs=1e-6)
            assert c["drop_points"] == pytest.approx((1.0 - c["score"]) * 100)
        ok = [c for c in [base] + doc["candidates"] if (base["score"] - c["score"]) * 100 <= 30 + 1e-9]
        assert doc["chosen"] == max(ok, key=lambda c: (c["speedup"], c["score"]))["key"]

    res = run("tome,importance", "0.8,0.6", "rep")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())["data"]
    assert doc["settings"]["metric"] == "mAP" and doc["target"]["text"] == "mAP drop <= 30 points"
    assert len(doc["candidates"]) >= 2
    check(doc)
    assert any(c["score"] < 1.0 for c in doc["candidates"])  # merging a random detector changes what it finds
    assert (tmp_path / "rep.onnx").is_file()
    md_text = (tmp_path / "rep" / "report.md").read_text()
    assert "| mAP % |" in md_text and "mAP@0.5 vs unmerged %" in md_text and "top-1 %" not in md_text
    assert "mAP" in res.output and "top-1" not in res.output

    # a new budget: only its candidate is measured, against the unmerged model's outputs (boxes too) replayed
    # from the cache, and scored as a recomputation scores it
    res = run("tome", "0.8,0.7", "rep2")
    assert res.exit_code == 0, res.output
    doc2 = json.loads((tmp_path / "rep2" / "report.json").read_text())["data"]
    assert doc2["work"]["accuracy"] == 1 and doc2["work"]["latency"] == 1 and doc2["work"]["block_latency"] == 0
    assert len(doc2["candidates"]) == 2
    check(doc2)


def test_a_run_stopped_half_way_resumes_where_it_stopped(digits_model, tmp_path):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same exception) during the second candidate: the first
    candidate's record is kept, nothing half-written is; the next run measures only what was left."""
    src = source_of(digits_model)
    args = dict(FAST, budgets=[], flop_budgets=[0.7, 0.5], methods=["tome"], limit=30)
    seen = []

    def stop_at_second(text):
        seen.append(text)
        if sum("scoring" in t for t in seen) == 3:  # the unmerged model, candidate 1, then candidate 2: stop
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(src, digits_model.test_dir, Target("max_drop", 50.0), runtime="torch", batch=2, cache_dir=tmp_path,
             progress=False, on_status=stop_at_second, **args)
    [folder] = list(tmp_path.iterdir())
    assert len(list(folder.glob("tome-*.json"))) == 1 and not list(folder.glob(".*partial*"))
    r = tune(src, digits_model.test_dir, Target("max_drop", 50.0), runtime="torch", batch=2, cache_dir=tmp_path,
             progress=False, **args)
    assert r.work == {"block_latency": 0, "exports": 0, "accuracy": 1, "latency": 1} and len(r.candidates) == 2


def test_no_candidate_at_all_is_refused_with_the_reasons(tuned, digits_model):
    root, _ = tuned
    with pytest.raises(UsageError, match="no merged candidate to measure: tome flops 1: nothing to merge"):
        again(digits_model, root, Target("max_drop", 1.0), fast={"methods": ["tome"], "budgets": [],
                                                                  "flop_budgets": [1.0]})
