"""Reduced precision (#11): FP16 / BF16 exports that stay faithful, checked against float32 and float64 references."""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import timm
import torch
from typer.testing import CliRunner

import vitmerge
from vitmerge import merging
from vitmerge.backends.ort import session as ort_session
from vitmerge.cli import app
from vitmerge.exporter import export
from vitmerge.exporter.verify import batch_check, upcast_copy
from vitmerge.models.precision import cast_model, model_dtype, resolve_dtype
from vitmerge.models.vit import TokenMerge, MergeState

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPTS = {"vwt": {"mode": "intra"}}


def tiny(method=None, r=4, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False).eval()
    if method:
        vitmerge.apply(m, method=method, r=r, **OPTS.get(method, {}))
    return m


def elem_types(proto):
    """ONNX element type of every initializer, by count of values."""
    c = collections.Counter()
    for t in proto.graph.initializer:
        c[t.data_type] += int(np.prod(t.dims)) if t.dims else 1
    return c


def scoped(proto, scope="token_merge"):
    return [n for n in proto.graph.node
            if any(scope in p.value for p in n.metadata_props if p.key == "namespace")]


@pytest.mark.parametrize("method", [m if m in ("tome", "hash", "importance") else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(merging.METHODS)])
def test_fp16_export_runs_in_ort_cpu_and_tracks_fp32(method, tmp_path):
    """Every method: a float16-weight file that ONNX Runtime CPU runs at batch 1 and 3 (verified against PyTorch
    float16 by the decision rule), float32 in and out, merge steps in float32, logits tracking the float32 export."""
    model = tiny(method)
    res = export(model, tmp_path / "m16.onnx", dtype="fp16", batch_sizes=(1, 3))
    rep = res.verification
    assert rep.ok and rep.dtype == "fp16" and [c.batch for c in rep.checks] == [1, 3]
    assert all(c.rule == "decisions" and c.decisions_identical is not None for c in rep.checks)
    proto = onnx.load(str(res.path))
    types = elem_types(proto)
    assert types[onnx.TensorProto.FLOAT16] > 0.95 * sum(types.values())  # the weights are float16
    io = [v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)]
    assert io == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]
    assert {e.key: e.value for e in proto.metadata_props}["vitmerge.dtype"] == "fp16"
    assert not [o.name for o in proto.graph.output if o.name.startswith("merge_decisions")]  # dropped after verifying
    # no scatter with a reduction; the merged rows are summed by a MatMul in float32 (the merge rule)
    typed = onnx.shape_inference.infer_shapes(proto)
    kinds = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    assert not [n for n in typed.graph.node if n.op_type.startswith("Scatter")
                and any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)]
    merge_mm = [n for n in scoped(typed, "vwt_merge" if method == "vwt" else "token_merge") if n.op_type == "MatMul"]
    assert merge_mm and all(kinds.get(i) == onnx.TensorProto.FLOAT for n in merge_mm for i in n.input if i in kinds), \
        [(n.name, [kinds.get(i) for i in n.input]) for n in merge_mm]
    steps = scoped(proto, "vwt_merge" if method == "vwt" else "token_merge")
    assert any(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT for n in steps)
    # the written file itself, on new images: close to the float32 model
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    lo = ort_session(res.path).run(None, {"images": x})[0]
    with torch.no_grad():
        hi = model(torch.from_numpy(x)).numpy()
    assert lo.dtype == np.float32 and np.isfinite(lo).all()
    assert np.abs(lo - hi).max() <= 0.05 * np.abs(hi).max() + 1e-2


@pytest.mark.parametrize("method", ["tome", pytest.param("hash", marks=pytest.mark.slow)])
def test_bf16_export_verified_through_an_upcast_copy(method, tmp_path):
    model = tiny(method)
    res = export(model, tmp_path / "m.onnx", dtype="bf16", batch_sizes=(1, 2))
    rep = res.verification
    assert rep.ok and rep.dtype == "bf16" and "upcast copy" in rep.how
    proto = onnx.load(str(res.path))
    onnx.checker.check_model(proto, full_check=True)
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")  # opset 18 has no bfloat16 Conv: it runs in fp32
    w = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    assert w.data_type == onnx.TensorProto.FLOAT
    other32 = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and t.name not in conv.input)
    assert elem_types(proto)[onnx.TensorProto.BFLOAT16] > 100 * other32  # every other weight is bfloat16
    # the upcast copy is exactly the same graph in float32: no bfloat16 left anywhere
    up = onnx.load(str(upcast_copy(res.path, tmp_path / "up.onnx")))
    assert onnx.TensorProto.BFLOAT16 not in elem_types(up)
    assert all(a.i != onnx.TensorProto.BFLOAT16 for n in up.graph.node if n.op_type == "Cast" for a in n.attribute)


def test_merge_arithmetic_stays_in_float32():
    """Sizes in the hundreds (long sequences): x * size summed in float16 overflows (max 65504); the step computes
    in float32 and matches a float64 loop reference of the same assignment, to float16 rounding of the result."""
    torch.manual_seed(0)
    B, N, D, r = 1, 41, 8, 20
    x = (torch.rand(B, N, D) * 200 + 100).half()
    metric = torch.randn(B, N, 16).half()
    size = torch.full((B, N, 1), 400.0)
    st = MergeState(method="tome", prop_attn=True, protected=1)
    st.reset()
    out, s_out = TokenMerge(st, r)(x, metric, size)
    assert out.dtype == torch.float16 and s_out.dtype == torch.float32 and torch.isfinite(out).all()
    plan = merging.plan("tome", metric.float(), r, 1)
    assign = plan.assign[0]
    xd, sd = x.double()[0], size.double()[0]
    for j in range(plan.n_out):
        members = (assign == j).nonzero().flatten()
        want = (xd[members] * sd[members]).sum(0) / sd[members].sum()
        torch.testing.assert_close(out[0, j].double(), want, rtol=1e-3, atol=0)  # float16 rounding of the result
        assert float(s_out[0, j, 0]) == float(sd[members].sum())
    # the same merge done in float16 overflows: what the float32 step is for
    naive, _ = plan.merge(x, size.half())
    assert not torch.isfinite(naive).all()


def test_decision_rule_excludes_flipped_images_but_fails_below_the_share():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10))
    out = ref + 1e-4
    out[2] += 5.0  # one image's decisions flipped: its logits moved a lot
    dec_ref = [np.arange(40).reshape(4, 10) % 7]
    dec_out = [d.copy() for d in dec_ref]
    dec_out[0][2, 3] = 99  # 1 of 40 decisions differs (97.5 %)
    c = batch_check(4, ref, out, 1e-2, 2e-2, dec_ref, dec_out, rule="decisions", min_decisions=0.97)
    assert c.ok and c.images_compared == 3 and c.decisions_identical == pytest.approx(39 / 40)
    assert c.top1_agreement <= 1.0 and c.max_abs_diff < 1e-3
    strict = batch_check(4, ref, out, 1e-2, 2e-2, dec_ref, dec_out, rule="decisions", min_decisions=0.99)
    assert not strict.ok  # below the required share of identical decisions
    flat = batch_check(4, ref, out, 1e-2, 2e-2, dec_ref, dec_out, rule="max")
    assert not flat.ok and flat.max_abs_diff > 4  # float32's rule takes every image


def test_forced_decisions_compare_every_image_and_pool_the_share():
    """Rule "decisions" with the file's decisions forced into PyTorch: an image whose decisions flipped is compared
    with PyTorch's run on the file's decisions (not left out), so a flipped image whose logits are wrong even for
    those decisions fails; the share of identical decisions is checked over all images of the report, not per batch."""
    from vitmerge.exporter import _raise_unless_ok
    from vitmerge.exporter.verify import MIN_FORCED_DECISIONS, VerifyReport, forced_share

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10))
    out = ref + 1e-4
    out[2] += 5.0  # image 2 took other decisions: its logits moved a lot
    dec_ref = [np.arange(40).reshape(4, 10) % 7]
    dec_out = [d.copy() for d in dec_ref]
    dec_out[0][2, 3] = 99
    forced = {"logits": out - 2e-4}  # PyTorch on the file's decisions: what the file computed, to rounding
    c = batch_check(4, ref, out, 1e-2, 2e-2, dec_ref, dec_out, rule="decisions", forced=forced,
                    min_decisions=MIN_FORCED_DECISIONS)
    assert c.ok and c.forced_images == 1 and c.images_compared == 4 and c.max_abs_diff == pytest.approx(2e-4)
    wrong = dict(forced, logits=forced["logits"].copy())
    wrong["logits"][2] -= 1.0  # the file's arithmetic on image 2 is off even for its own decisions
    bad = batch_check(4, ref, out, 1e-2, 2e-2, dec_ref, dec_out, rule="decisions", forced=wrong,
                      min_decisions=MIN_FORCED_DECISIONS)
    assert not bad.ok and bad.max_abs_diff == pytest.approx(1.0 + 2e-4)
    # the floor over all images: a batch of 1 whose only image flipped half its decisions, beside 8 clean images
    half = [np.where(np.arange(10) < 5, d[:1], 99) for d in dec_ref]
    one = batch_check(1, ref[:1], out[:1], 1e-2, 2e-2, [d[:1] for d in dec_ref], half, rule="decisions",
                      forced={"logits": out[:1]}, min_decisions=MIN_FORCED_DECISIONS)
    clean = batch_check(8, np.tile(ref, (2, 1)), np.tile(ref, (2, 1)), 1e-2, 2e-2, [np.tile(dec_ref[0], (2, 1))],
                        [np.tile(dec_ref[0], (2, 1))], rule="decisions", forced={"logits": np.tile(ref, (2, 1))},
                        min_decisions=MIN_FORCED_DECISIONS)
    assert one.ok and one.decisions_identical == 0.5  # per batch, only the arithmetic counts
    rep = VerifyReport("f.onnx", [one, clean], dtype="fp16")
    assert forced_share(rep.checks) == pytest.approx(((0.5 + 8) / 9, MIN_FORCED_DECISIONS)) and rep.ok
    worse = VerifyReport("f.onnx", [one, clean.__class__(**dict(clean.__dict__, batch=1))], dtype="fp16")
    assert forced_share(worse.checks)[0] == pytest.approx(0.75) and not worse.ok  # 0.75 < 0.9 over 2 images
    with pytest.raises(vitmerge.errors.VerificationError, match="identical 75.00% over all 2 images"):
        _raise_unless_ok(worse)
    assert "file's own merge decisions" in rep.describe_rule()


def test_forcing_runs_the_model_on_given_decisions():
    """``forcing`` makes the merge steps take the given assignments: its own decisions give its own output, other
    decisions (another image's) give another output and are what the steps then record."""
    from vitmerge.models.vit import forcing, recording, run_with_decisions

    m = tiny("tome", r=6)
    x, y = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).unbind(0)
    own, dec_x = run_with_decisions(m, x[None])
    _, dec_y = run_with_decisions(m, y[None])
    assert any(not torch.equal(a, b) for a, b in zip(dec_x, dec_y))
    with torch.no_grad(), forcing(m, dec_x):
        torch.testing.assert_close(m(x[None]), own, atol=1e-5, rtol=0)
    with torch.no_grad(), forcing(m, dec_y), recording(m):
        other = m(x[None])
        taken = list(m._vm_state.decisions)
    assert (other - own).abs().max() > 1e-3 and all(torch.equal(a, b) for a, b in zip(taken, dec_y))
    with pytest.raises(RuntimeError, match="forced assignments for more merge steps"), forcing(m, dec_x[:1]):
        m(x[None])


def test_plan_from_an_assignment_merges_as_the_plan_did():
    """``MergePlan.from_assign`` rebuilds a plan from its [B, N] assignment alone: the same assignment, and the same
    merged tokens and sizes as the method's own plan (whichever member of a slot it keeps)."""
    from vitmerge.merging.base import MergePlan

    g = torch.Generator().manual_seed(0)
    for method in ("tome", "hash", "importance"):
        metric, x = torch.randn(3, 17, 8, generator=g), torch.randn(3, 17, 8, generator=g)
        size = torch.rand(3, 17, 1, generator=g) + 0.5
        extra = {"cls_attn": torch.rand(3, 17, generator=g)} if method == "importance" else {}
        p = merging.plan(method, metric, 5, 1, **extra)
        q = MergePlan.from_assign(p.assign, p.n_out, p.weight)
        assert torch.equal(q.assign, p.assign) and q.r == p.r == 5
        for a, b in zip(p.merge(x, size), q.merge(x, size)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="leaves a slot empty"):
        MergePlan.from_assign(torch.tensor([[0, 0, 2]]), 3)
    with pytest.raises(ValueError, match="slots from 0 to 3"):
        MergePlan.from_assign(torch.tensor([[0, 1, 3]]), 3)


def test_fp16_digits_file_passes_where_rounding_flips_decisions(digits_model, tmp_path):
    """The digits model with tome at 0.5 of the FLOPs in float16: on the verifier's random images ONNX Runtime's and
    PyTorch's float16 rounding flip near-tied merge decisions (the former per-batch 99 % rule refused this file);
    every image, flipped or not, matches PyTorch run on the file's own decisions, and on the real test digits the
    file agrees with the float32 model."""
    from vitmerge.backends import OrtRunner
    from vitmerge.models.budget import resolve_schedule
    from vitmerge.profiling.accuracy import evaluate
    from vitmerge.profiling.compare import open_eval_data
    from vitmerge.backends import TorchRunner

    model = digits_model.build().eval()
    vitmerge.apply(model, "tome", resolve_schedule(model, "tome", None, budget=0.5))
    res = export(model, tmp_path / "f16.onnx", dtype="fp16", batch_sizes=(1, 4, 16))
    rep = res.verification
    assert rep.ok and all(c.forced_images is not None and c.images_compared == c.batch for c in rep.checks)
    assert rep.decisions_identical < 1.0 or all(c.forced_images == 0 for c in rep.checks)  # reported as measured
    ds, _ = open_eval_data(model, digits_model.test_dir, limit=300)
    got = evaluate({"fp32": TorchRunner(model, device="cpu"), "fp16 file": OrtRunner(res.path)}, ds, progress=False)
    assert got.models["fp16 file"].agreement >= 0.99


def test_a_wrong_fp16_file_fails_verification(tmp_path, monkeypatch):
    """One perturbed weight in the float16 graph (a realistic corruption) must fail the decision rule."""
    from vitmerge.exporter import onnx_export

    real_proto = onnx_export.program_proto  # the exported model, in memory, before any check reads it

    def corrupt(program, model):
        proto = real_proto(program, model)
        t = max((t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16),
                key=lambda t: np.prod(t.dims))
        arr = onnx.numpy_helper.to_array(t).copy()
        arr.flat[0] += np.float16(4.0)
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        return proto

    monkeypatch.setattr("vitmerge.exporter.program_proto", corrupt)
    with pytest.raises(vitmerge.errors.VerificationError, match="merge decisions identical|max\\|diff\\|"):
        export(tiny("tome"), tmp_path / "bad.onnx", dtype="fp16", batch_sizes=(2,))
    assert not (tmp_path / "bad.onnx").exists()


@pytest.fixture(scope="module")
def tome_fp16(tmp_path_factory):
    return export(tiny("tome"), tmp_path_factory.mktemp("fp16") / "std.onnx", dtype="fp16", batch_sizes=(2,)).path


@pytest.mark.parametrize("form", ["native", "plugin"])
def test_graph_forms_in_fp16(form, tome_fp16, tmp_path):
    """The surgery forms cast the float16 boundary tensors to float32 around the merge, as the exported step does."""
    std = tome_fp16
    other = export(tiny("tome"), tmp_path / f"{form}.onnx", dtype="fp16", merge_op=form, batch_sizes=(2,)).path
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    a, b = ort_session(std).run(None, {"images": x})[0], ort_session(other).run(None, {"images": x})[0]
    assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max()


def test_cast_model_and_dtype_names():
    m = tiny("tome")
    assert model_dtype(cast_model(m, "bf16")) == torch.bfloat16
    assert m.patch_embed.proj.weight.dtype == torch.float32  # the float32 island of the patch embedding
    assert model_dtype(cast_model(m, "fp32")) == torch.float32 and type(m.patch_embed.proj) is torch.nn.Conv2d
    assert resolve_dtype("half") == torch.float16
    with pytest.raises(vitmerge.errors.UsageError, match="unknown dtype"):
        resolve_dtype("int4")


def test_cli_dtype(tmp_path):
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(app, ["export", "vit_tiny_patch16_224", "--img-size", "64", "--model-kwargs",
                                   json.dumps({"depth": 2}), "--r", "4", "--dtype", "fp16", "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "merge decisions identical" in text and "fp16 vs float32" in text
    proto = onnx.load(str(out))
    assert {e.key: e.value for e in proto.metadata_props}["vitmerge.dtype"] == "fp16"


@pytest.mark.slow  # calibrates a whole model (about 20 s alone): INT8 and fp16 each have default-suite tests
def test_int8_qdq_composes_with_fp16(digits_model, tmp_path):
    """Calibrating a float16 export gives quantized MatMuls, merge steps still float32 (untouched), the rest float16;
    ONNX Runtime runs it and top-1 on held-out digits stays within a point of the float16 file."""
    from vitmerge.backends import OrtRunner
    from vitmerge.calibration.quantize import quantize
    from vitmerge.data import CALIBRATION_SPLITS, open_dataset, transform_for
    from vitmerge.profiling.accuracy import evaluate

    model = digits_model.build()
    vitmerge.apply(model, method="tome", r=8)
    f16 = export(model, tmp_path / "d16.onnx", dtype="fp16", batch_sizes=(2,)).path
    tf = transform_for(model)
    calib = open_dataset(digits_model.data_dir, prefer=CALIBRATION_SPLITS, transform=tf, limit=64)
    q = quantize(f16, tmp_path / "d16.int8.onnx", calib)
    assert q.quantized_nodes > 0 and q.excluded_nodes
    proto = onnx.load(str(q.path))
    assert {e.key: e.value for e in proto.metadata_props}["vitmerge.dtype"] == "fp16"
    types = elem_types(proto)
    assert types[onnx.TensorProto.FLOAT16] > 0 and types[onnx.TensorProto.INT8] > 0  # fp16 weights + int8 weights
    merge_ops = [n for n in scoped(proto) if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert not merge_ops  # the merge steps' MatMuls decide which tokens merge: not quantized
    test = open_dataset(digits_model.test_dir, transform=tf, limit=160)
    res = evaluate({"fp16": OrtRunner(f16), "int8+fp16": OrtRunner(q.path)}, test, progress=False)
    assert res.models["int8+fp16"].top1 >= res.models["fp16"].top1 - 0.01
    assert res.models["int8+fp16"].agreement >= 0.97
