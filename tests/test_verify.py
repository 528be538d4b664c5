"""Verification is what the product's name rests on: a file that computes the wrong thing must fail it.

Every "wrong" file here is wrong by a realistic amount (one head weight off by a quarter of a
typical weight, a merge that picks the least similar tokens instead of the most similar ones, a
graph cut by a botched rewrite), and every expected difference is computed in the test from the
outputs themselves (numpy max over all entries), not taken from vitmerge.
"""
import copy
import importlib

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import vitmerge
from vitmerge.backends.ort import OrtRunner
from vitmerge.cli import app
from vitmerge.errors import ModelNotFoundError, SurgeryError, VerificationError
from vitmerge.exporter.verify import (BatchCheck, VerifyReport, batch_check, check_onnx, compare_files, decision_share,
                                     upcast_copy, verify)

verify_mod = importlib.import_module("vitmerge.exporter.verify")  # the module (the package re-exports the function)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()

CLASSES = 100  # one wrong logit column among 100: its mean |diff| is ~1/100 of its max
K, J, DELTA = 7, 3, 0.005  # head weight [K, J] off by DELTA (timm initialises head weights with std 0.02)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-block ViT merged with ToMe (block 0's merge changes what block 1 attends to), exported once."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                              num_heads=2, num_classes=CLASSES).eval()
    vitmerge.apply(model, "tome", r=4)
    path = tmp_path_factory.mktemp("verify") / "tiny.onnx"
    vitmerge.export(model, path, check=False)  # these tests do the checking (the default, lean form)
    return model, path


def _edited(path, out, edit):
    proto = onnx.load(str(path))
    edit(proto)
    onnx.save(proto, str(out))
    return out


def perturb_head_weight(proto):
    w = next(t for t in proto.graph.initializer if t.name.endswith("head.weight"))
    arr = numpy_helper.to_array(w).copy()
    assert arr.shape == (CLASSES, 48)
    arr[K, J] += DELTA
    w.CopyFrom(numpy_helper.from_array(arr, w.name))


def merge_least_similar(proto):
    """The merge's ranking TopK flipped: the r *least* similar tokens merge away (a wrong merge). The ranking
    is the step's first descending TopK (the second one orders the kept tokens)."""
    flipped = 0
    for n in proto.graph.node:
        scope = {p.key: p.value for p in n.metadata_props}.get("namespace", "")
        if n.op_type == "TopK" and "blocks.0.token_merge" in scope and not flipped:
            largest = next(a for a in n.attribute if a.name == "largest")
            if largest.i == 1:
                largest.i = 0
                flipped += 1
    assert flipped == 1


class Recording(OrtRunner):
    """An OrtRunner that keeps the inputs it was given, so the test can recompute the comparison."""

    seen = []

    def _infer(self, images):
        Recording.seen.append((self.path, images.copy()))
        return super()._infer(images)

    def _infer_all(self, images):  # every output at once (compare_files)
        Recording.seen.append((self.path, images.copy()))
        return super()._infer_all(images)


def _ort(path, x):
    return OrtRunner(path)(x).numpy().astype(np.float64)


# ------------------------------------------------------------------------- verify (ORT vs PyTorch)


def test_faithful_file_passes(tiny):
    model, path = tiny
    rep = verify(model, path, batch_sizes=(1, 3))
    assert rep.ok and [c.batch for c in rep.checks] == [1, 3]
    assert 0 < rep.max_abs_diff < 1e-5 and rep.top1_agreement == 1.0


def test_one_perturbed_weight_fails_verification(tiny, tmp_path):
    model, path = tiny
    bad = _edited(path, tmp_path / "bad.onnx", perturb_head_weight)
    Recording.seen = []
    rep = verify(model, bad, batch_sizes=(2, 3), runner=Recording(bad))
    assert not rep.ok and not any(c.ok for c in rep.checks)
    for c, (_, x) in zip(rep.checks, Recording.seen):
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).double().numpy()
        diff = np.abs(_ort(bad, x) - ref)
        # only column K is wrong: its mean |diff| over the batch is far below the tolerance, its max above it
        assert diff.mean() < c.tolerance < diff.max()
        assert c.max_abs_diff == pytest.approx(diff.max(), rel=1e-6)
        assert c.max_abs_ref == pytest.approx(np.abs(ref).max(), rel=1e-6)
        assert c.tolerance == pytest.approx(1e-4 + 1e-3 * np.abs(ref).max(), rel=1e-9)
        assert c.top1_agreement == np.mean(_ort(bad, x).argmax(-1) == ref.argmax(-1))
    # the same perturbation in the PyTorch model: verification passes again (it compares, not guesses)
    fixed = copy.deepcopy(model)
    with torch.no_grad():
        fixed.head.weight[K, J] += DELTA
    assert verify(fixed, bad, batch_sizes=(2,)).ok


def test_wrong_merge_fails_verification(tiny, tmp_path):
    model, path = tiny
    bad = _edited(path, tmp_path / "swapped.onnx", merge_least_similar)
    check_onnx(bad)  # a valid graph: only comparing the outputs can catch it
    rep = verify(model, bad, batch_sizes=(1, 4))
    assert not rep.ok
    assert rep.max_abs_diff > 10 * max(c.tolerance for c in rep.checks)


@pytest.mark.slow
def test_export_refuses_to_write_a_file_that_fails_verification(tiny, tmp_path, monkeypatch):
    """export() runs verification on the exported model before anything is written: a wrong graph (here: the
    merge flipped as the exporter's model comes into being, before any check reads it) raises and leaves
    nothing behind."""
    model, _ = tiny
    from vitmerge import exporter

    real = exporter.program_proto  # the exported model, in memory (the file is written once, at the end)

    def wrong(*args, **kwargs):
        proto = real(*args, **kwargs)
        merge_least_similar(proto)
        return proto

    monkeypatch.setattr(exporter, "program_proto", wrong)
    with pytest.raises(VerificationError, match="differs from PyTorch.*not written"):
        vitmerge.export(model, tmp_path / "out.onnx", batch_sizes=(2,))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- the ONNX checker


def test_checker_accepts_the_export_and_rejects_broken_graphs(tiny, tmp_path):
    _, path = tiny
    check_onnx(path)

    def cut_a_node(proto):  # a rewrite that dropped a node its consumers still read
        i = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Softmax")
        del proto.graph.node[i]

    def wrong_output_shape(proto):  # a rewrite that declared the logits with the wrong width
        proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = CLASSES + 1

    def wrong_input_type(proto):  # an integer tensor where the graph computes in float
        proto.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64

    for name, edit in (("cut", cut_a_node), ("shape", wrong_output_shape), ("dtype", wrong_input_type)):
        bad = _edited(path, tmp_path / f"{name}.onnx", edit)
        with pytest.raises(VerificationError, match=f"ONNX checker rejected .*{name}.onnx"):
            check_onnx(bad)


def test_checker_runs_full_shape_inference(tmp_path):
    """A graph whose declared shapes contradict its ops passes the structural check alone; the full check
    (strict shape inference) rejects it."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g", [a, b], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "mm.onnx"))
    onnx.checker.check_model(str(tmp_path / "mm.onnx"))  # structurally fine
    with pytest.raises(VerificationError, match="Incompatible dimensions"):
        check_onnx(tmp_path / "mm.onnx")


# ------------------------------------------------------------------------- file vs file (vitmerge check)


def test_compare_files_reports_the_largest_difference(tiny, tmp_path, monkeypatch):
    _, path = tiny
    bad = _edited(path, tmp_path / "bad.onnx", perturb_head_weight)
    monkeypatch.setattr(verify_mod, "OrtRunner", Recording)
    Recording.seen = []
    checks = compare_files(path, bad, batch_sizes=(1, 4))
    assert [c.batch for c in checks] == [1, 4] and not any(c.ok for c in checks)
    xs = [x for p, x in Recording.seen if p == path]
    assert [x.shape[0] for x in xs] == [1, 4]
    assert all(np.array_equal(x, y) for x, y in zip(xs, [x for p, x in Recording.seen if p == bad]))  # same images
    for c, x in zip(checks, xs):
        a, b = _ort(path, x), _ort(bad, x)
        diff = np.abs(b - a)
        assert diff.mean() < c.tolerance < diff.max()
        assert c.max_abs_diff == pytest.approx(diff.max(), rel=1e-6)
        assert c.tolerance == pytest.approx(1e-4 + 1e-3 * np.abs(a).max(), rel=1e-9)


def _mean_pool_model(path, hw):
    """images [batch, 3, hw, hw] -> logits [batch, 3] (per-channel mean): a valid model of another input size."""
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, hw, hw])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", ["images", "axes"], ["logits"], keepdims=0)
    onnx.save(helper.make_model(helper.make_graph([node], "g", [inp], [out], [axes]),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_compare_files_same_and_wrong_merge(tiny, tmp_path):
    _, path = tiny
    same = compare_files(path, path, batch_sizes=(2,))
    assert same[0].ok and same[0].max_abs_diff == 0.0 and same[0].top1_agreement == 1.0
    bad = _edited(path, tmp_path / "swapped.onnx", merge_least_similar)
    checks = compare_files(path, bad, batch_sizes=(1, 4))
    assert not any(c.ok for c in checks)
    # the images are a function of the seed: the same seed gives the same numbers, another seed others
    again = compare_files(path, bad, batch_sizes=(1, 4))
    assert [c.max_abs_diff for c in again] == [c.max_abs_diff for c in checks]
    other = compare_files(path, bad, batch_sizes=(1, 4), seed=1)
    assert [c.max_abs_diff for c in other] != [c.max_abs_diff for c in checks]
    with pytest.raises(ModelNotFoundError, match="no ONNX file at '.*missing.onnx'"):  # a missing file, not surgery
        compare_files(path, tmp_path / "missing.onnx")
    with pytest.raises(ModelNotFoundError, match="no ONNX file at '.*missing.onnx'"):
        compare_files(tmp_path / "missing.onnx", path)
    small = _mean_pool_model(tmp_path / "small.onnx", 16)
    with pytest.raises(SurgeryError, match=r"different inputs: .*tiny.onnx \(3, 32, 32\), .*small.onnx \(3, 16, 16\)"):
        compare_files(path, small)
    # same input, other outputs (a detector's extra output): named, with both files' output lists
    det = tmp_path / "two.onnx"
    proto = onnx.load(str(path))
    first = proto.graph.output[0]
    proto.graph.node.append(helper.make_node("Identity", [first.name], ["boxes"]))
    proto.graph.output.append(helper.make_tensor_value_info("boxes", first.type.tensor_type.elem_type, None))
    onnx.save(proto, str(det))
    with pytest.raises(SurgeryError, match=rf"^the two graphs have different outputs: tiny.onnx \['{first.name}'\], "
                                           rf"two.onnx \['{first.name}', 'boxes'\]: compare two forms of the same "
                                           rf"model$"):
        compare_files(path, det)


def test_compare_files_runs_both_files_with_the_given_threads(tiny, monkeypatch):
    _, path = tiny
    made = []

    class Counting(OrtRunner):
        def __init__(self, p, threads=None, **kw):
            made.append(threads)
            super().__init__(p, threads=threads, **kw)

    monkeypatch.setattr(verify_mod, "OrtRunner", Counting)
    compare_files(path, path, batch_sizes=(1,), threads=2)
    compare_files(path, path, batch_sizes=(1,))
    assert made == [2, 2, 0, 0]  # 0: ONNX Runtime's own default, the documented default of `check --threads`


def test_check_command_fails_on_one_wrong_column(tiny, tmp_path):
    _, path = tiny
    bad = _edited(path, tmp_path / "bad.onnx", perturb_head_weight)
    res = runner.invoke(app, ["check", str(path), str(bad), "--batch", "1,4"])
    assert res.exit_code == 1 and "over" in res.output and "outputs differ" in res.output
    res = runner.invoke(app, ["check", str(path), str(path), "--batch", "2"])
    assert res.exit_code == 0 and "same outputs" in res.output


# ------------------------------------------------------------------------- the comparison itself


def test_batch_check_arithmetic():
    ref = np.array([[1.0, -4.0, 2.0], [0.5, 0.0, 3.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    out = ref.copy()
    out[1, 0] += 2.75  # row 1's top-1 moves from column 2 to column 0 (3.25 > 3.0)
    out[2, 2] -= 0.25
    c = batch_check(4, ref, out, atol=0.5, rtol=0.25)
    assert c.batch == 4 and c.max_abs_diff == 2.75 and c.max_abs_ref == 4.0
    assert c.tolerance == 0.5 + 0.25 * 4.0 and not c.ok  # 2.75 > 1.5
    assert c.top1_agreement == 0.75
    assert batch_check(4, ref, out, atol=1.25, rtol=0.4).ok  # 2.75 <= 1.25 + 1.6
    assert not batch_check(4, ref, out, atol=1.0, rtol=0.4).ok  # 2.75 > 2.6
    assert batch_check(4, ref, out, atol=2.75, rtol=0.0).ok  # the bound itself passes
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not batch_check(4, ref, nan, atol=1e9, rtol=1e9).ok  # NaN never passes
    inf = ref.copy()
    inf[3, 1] = np.inf
    assert not batch_check(4, ref, inf, atol=1e9, rtol=1e9).ok
    with pytest.raises(VerificationError, match=r"output shape \(4, 2\) != reference \(4, 3\) at batch 4"):
        batch_check(4, ref, out[:, :2], 1.0, 0.0)


def test_report_combines_batches():
    checks = [BatchCheck(1, 0.5, 2.0, 1.0, 1.0), BatchCheck(4, 0.25, 2.0, 0.75, 1.0)]
    rep = VerifyReport("f.onnx", checks)
    assert rep.ok and rep.max_abs_diff == 0.5 and rep.top1_agreement == 0.75
    rep.checks.append(BatchCheck(8, 3.0, 2.0, 1.0, 1.0))
    assert not rep.ok and rep.max_abs_diff == 3.0


def test_decision_share_against_a_loop():
    """Share of identical merge decisions over all steps, and which images have every decision identical,
    recomputed with plain Python loops over the entries."""
    g = np.random.default_rng(3)
    ref = [g.integers(0, 5, size=(4, 6)), g.integers(0, 3, size=(4, 2, 3)), g.integers(0, 9, size=(4, 1))]
    out = [a.copy() for a in ref]
    out[0][1, 4] += 1  # image 1 differs in step 0
    out[1][3, 1, 2] += 1  # image 3 differs in step 1 (a 3-d decision)
    out[1][3, 0, 0] += 1
    share, per_image = decision_share(ref, out)
    entries = [(r.reshape(4, -1), o.reshape(4, -1)) for r, o in zip(ref, out)]
    same = sum(int(a == b) for r, o in entries for rr, oo in zip(r, o) for a, b in zip(rr, oo))
    total = sum(r.size for r, _ in entries)
    assert total == 24 + 24 + 4 and share == same / total == (total - 3) / total
    want = [all((r[i] == o[i]).all() for r, o in entries) for i in range(4)]
    assert per_image.tolist() == want == [True, False, True, False]
    assert decision_share(ref, [a.copy() for a in ref])[0] == 1.0
    share0, img0 = decision_share([], [])
    assert share0 == 1.0 and img0.dtype == bool and img0.shape == (0,)
    with pytest.raises(VerificationError, match=r"^2 merge-decision outputs, but the model has 3 merge steps$"):
        decision_share(ref, out[:2])


def test_batch_check_decisions_rule_and_other_outputs():
    """Rule "decisions": max |diff| and top-1 only over the images whose decisions all match; rule "max"
    over all of them; every other output compared with its own tolerance on the same images."""
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    out = ref.copy()
    out[1] = [5.0, 2.0, 0.0]  # image 1: a different merge, big difference and another top-1
    out[3, 2] += 0.5  # image 3: same decisions, within the tolerance below
    rd = [np.array([[0, 1], [2, 3], [1, 1], [0, 0]])]
    od = [rd[0].copy()]
    od[0][1, 0] = 5  # 1 of 8 decisions differs, in image 1
    boxes_ref = np.zeros((4, 2, 4)) + 0.5
    boxes_out = boxes_ref.copy()
    boxes_out[1, 0, 0] = 0.9  # only on image 1 (excluded by the decisions rule)
    boxes_out[2, 1, 3] = 0.52
    kw = dict(atol=0.25, rtol=0.1, extra={"boxes": (boxes_ref, boxes_out)})
    c = batch_check(4, ref, out, ref_decisions=rd, out_decisions=od, rule="decisions", min_decisions=0.8, **kw)
    assert c.decisions_identical == 7 / 8 and c.images_compared == 3 and c.top1_compared == 1.0
    assert c.max_abs_diff == 0.5 and c.tolerance == 0.25 + 0.1 * 4.0 and c.top1_agreement == 0.75
    assert c.outputs["boxes"] == (pytest.approx(0.02), 0.25 + 0.1 * 0.5)
    assert c.ok  # 7/8 >= 0.8, 0.5 <= 0.65, 0.02 <= 0.3, top-1 agrees on the compared images
    assert not batch_check(4, ref, out, ref_decisions=rd, out_decisions=od, rule="decisions",
                           min_decisions=0.9, **kw).ok  # 7/8 < 0.9
    m = batch_check(4, ref, out, ref_decisions=rd, out_decisions=od, rule="max", **kw)
    assert m.images_compared == 4 and m.max_abs_diff == 5.0 and m.top1_compared == 0.75
    assert m.outputs["boxes"][0] == pytest.approx(0.4) and m.decisions_identical == 7 / 8 and not m.ok
    # the same numbers, but a boxes difference beyond its own tolerance on a compared image fails alone
    far = boxes_out.copy()
    far[0, 0, 0] = 0.85
    bad = batch_check(4, ref, out, ref_decisions=rd, out_decisions=od, rule="decisions", min_decisions=0.8,
                      atol=0.25, rtol=0.1, extra={"boxes": (boxes_ref, far)})
    assert bad.max_abs_diff == 0.5 and bad.outputs["boxes"][0] == pytest.approx(0.35) and not bad.ok
    nan = boxes_out.copy()
    nan[0, 0, 0] = np.nan
    assert not batch_check(4, ref, ref, atol=0.25, rtol=0.1, extra={"boxes": (boxes_ref, nan)}).ok
    # top-1 must agree on every compared image under the decisions rule, even within the tolerance
    flip = ref.copy()
    flip[3] = [3.0, 0.0, 3.5]
    f = batch_check(4, ref, flip, atol=3.0, rtol=0.0, ref_decisions=rd, out_decisions=rd, rule="decisions")
    assert f.max_abs_diff == 2.5 and f.top1_compared == 0.75 and not f.ok
    assert batch_check(4, ref, flip, atol=3.0, rtol=0.0, rule="max").ok
    # a model without merge steps: no share, every image compared
    e = batch_check(4, ref, out, atol=9.0, rtol=0.0, ref_decisions=[], out_decisions=[], rule="decisions")
    assert e.decisions_identical is None and e.images_compared == 4 and e.top1_compared == 0.75
    # every image's decisions differ: nothing to compare the logits on, and the share decides
    od_all = [rd[0] + 1]
    n = batch_check(4, ref, out, atol=0.0, rtol=0.0, ref_decisions=rd, out_decisions=od_all, rule="decisions",
                    min_decisions=0.0, extra={"boxes": (boxes_ref, boxes_out)})
    assert n.images_compared == 0 and n.max_abs_diff == 0.0 and n.top1_compared is None
    assert n.outputs["boxes"][0] == 0.0 and n.ok
    with pytest.raises(VerificationError, match=r"^output 'boxes' shape \(4, 2, 3\) != reference \(4, 2, 4\) "
                                                r"at batch 4$"):
        batch_check(4, ref, out, atol=1.0, rtol=0.0, extra={"boxes": (boxes_ref, boxes_out[..., :3])})


def test_report_rule_lines_and_output_diffs():
    assert VerifyReport("f.onnx").describe_rule() == "not verified"
    c = BatchCheck(1, 0.0, 2.0, 1.0, 3e-4, outputs={"boxes": (0.25, 1.0)})
    rep = VerifyReport("f.onnx", [c, BatchCheck(4, 0.0, 2.0, 1.0, 1e-4, outputs={"boxes": (0.5, 1.0)})])
    assert rep.describe_rule() == ("fp32, ONNX Runtime CPU vs PyTorch: max|logit diff| <= atol + rtol * max|ref| "
                                   "(3.0e-04 at batch 1), max|boxes diff| <= its own atol + rtol * max|ref| "
                                   "at every batch")
    assert rep.output_diffs == {"boxes": 0.5}
    two = VerifyReport("f.onnx", [BatchCheck(1, 0.0, 2.0, 1.0, 3e-4, outputs={"boxes": (0.0, 1.0),
                                                                            "scores": (0.0, 1.0)})])
    assert "max|ref| (3.0e-04 at batch 1), max|boxes diff| <= its own atol + rtol * max|ref|, max|scores diff| <= its " \
           "own atol + rtol * max|ref| at every batch" in two.describe_rule()
    rep.checks[0].decisions_identical = 1.0
    assert rep.describe_rule().endswith("at every batch; merge decisions compared and reported")
    d = VerifyReport("g.onnx", [BatchCheck(2, 0.0, 1.0, 1.0, 0.015, decisions_identical=0.995, rule="decisions")],
                     dtype="fp16", how="H")
    assert d.describe_rule() == ("fp16, H: >= 99% of merge decisions identical, and on images whose decisions all "
                                 "match max|logit diff| <= atol + rtol * max|ref| (1.5e-02 at batch 2) and top-1 "
                                 "agrees")
    assert d.decisions_identical == 0.995 and VerifyReport("h.onnx", [BatchCheck(1, 0.0, 1.0, 1.0, 1.0)]).decisions_identical is None
    none = VerifyReport("u.onnx", [BatchCheck(2, 0.0, 1.0, 1.0, 0.015, rule="decisions")], dtype="fp16", how="H")
    assert none.describe_rule() == ("fp16, H: no merge decisions to compare; on every image max|logit diff| <= atol + "
                                    "rtol * max|ref| (1.5e-02 at batch 2) and top-1 agrees")  # an unmerged fp16 file


def test_upcast_copy_makes_every_bfloat16_float32(tmp_path):
    """Initializers, graph inputs/outputs/value_info, Cast targets, Constant tensors and subgraphs (If
    branches): none stays bfloat16, and the values are the bfloat16 values exactly (torch's rounding)."""
    bf = TensorProto.BFLOAT16
    w = torch.tensor([[1.1, -2.3], [0.7, 3.14159]])
    c = torch.tensor([0.3, -0.6])

    def bf16_tensor(t, name):
        bits = t.to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16)
        return helper.make_tensor(name, bf, list(t.shape), bits.tobytes(), raw=True)

    then_g = helper.make_graph([helper.make_node("Constant", [], ["t"], value=bf16_tensor(c, "tc"))], "then", [],
                               [helper.make_tensor_value_info("t", bf, [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["cst"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", bf, [2])])
    # a Cast to another type and an int attribute that happens to equal BFLOAT16's code (16) stay as they are
    nodes = [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT32),
             helper.make_node("Cast", ["xi"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["sixteen"], value_int=bf),
             helper.make_node("Cast", ["xf"], ["xb"], to=bf),
             helper.make_node("MatMul", ["xb", "w"], ["y"]),
             helper.make_node("Constant", [], ["cst"], value=bf16_tensor(c, "c")),
             helper.make_node("If", ["flag"], ["branch"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["y", "branch"], ["z"]),
             helper.make_node("Cast", ["z"], ["out"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
                                       helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2]),
                           helper.make_tensor_value_info("sixteen", TensorProto.INT64, [])],
                          initializer=[bf16_tensor(w, "w")],
                          value_info=[helper.make_tensor_value_info("y", bf, [1, 2])])
    src = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = upcast_copy(src, tmp_path / "up.onnx")
    assert dst == tmp_path / "up.onnx"
    text = str(onnx.load(str(dst)))
    assert "BFLOAT16" not in text and f"data_type: {bf}\n" not in text and f"elem_type: {bf}\n" not in text
    onnx.checker.check_model(str(dst), full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    x = np.array([[0.5, -1.75]], dtype=np.float32)  # the int32 round trip truncates: [0, -1]
    wb, cb = w.to(torch.bfloat16).double(), c.to(torch.bfloat16).double()
    xb = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    for flag, add in ((True, cb), (False, -cb)):
        got, sixteen = sess.run(None, {"x": x, "flag": np.array(flag)})
        np.testing.assert_allclose(got, (xb @ wb + add).numpy(), rtol=1e-6, atol=1e-6)
        assert sixteen == 16


def test_verify_compares_the_merge_decisions_of_a_debug_export(tiny, tmp_path):
    """A file with merge_decisions.* outputs (what export verifies before dropping them): PyTorch's decisions
    are recorded and compared. Faithful: every decision identical; the merge flipped to the least similar
    tokens: the report's share is the one recomputed from the file's decisions and PyTorch's own."""
    from vitmerge.exporter.onnx_export import export_onnx_program, save_program
    from vitmerge.models.vit import run_with_decisions

    model, _ = tiny
    path = save_program(export_onnx_program(model, decisions=True), model, tmp_path, "dec.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output][1:] == ["merge_decisions.0", "merge_decisions.1"]
    rep = verify(model, path, batch_sizes=(2,))
    assert rep.ok and rep.decisions_identical == 1.0 and rep.checks[0].images_compared == 2
    wrong = _edited(path, tmp_path / "wrong.onnx", merge_least_similar)
    bad = verify(model, wrong, batch_sizes=(3,), seed=5)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    _, want = run_with_decisions(model, x)
    run = OrtRunner(wrong)
    got = run.session.run(None, {run.input_name: x.numpy()})[1:]
    share = np.mean(np.concatenate([(w.numpy() == g).ravel() for w, g in zip(want, got)]))
    assert bad.decisions_identical == pytest.approx(share) and share < 0.9 and not bad.ok


def test_reference_forward_runs_in_the_model_dtype():
    """verify's PyTorch side casts the float32 images to the model's dtype (here float16 on CPU) and returns
    float32 outputs and the decisions of that forward."""
    from vitmerge.exporter.verify import _torch_outputs

    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                              num_heads=2, num_classes=10).eval()
    vitmerge.apply(model, "tome", r=4)
    model.half()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # as verify calls it
        outs, dec = _torch_outputs(model, x, True)
        want = model(x.half()).float().numpy()
        assert _torch_outputs(model, x, False)[1] is None
    (name, logits), = outs.items()
    assert logits.dtype == np.float32 and np.array_equal(logits, want)
    assert len(dec) == 2 and all(d.shape == (2, n) for d, n in zip(dec, (17, 13)))


def test_verify_default_seed_and_tolerances(tiny):
    """The default images are seed 0's (the same numbers as seed=0, others with seed=1); the default tolerance
    is float32's (1e-4 + 1e-3 * max|ref|)."""
    model, path = tiny
    rep, zero, one = verify(model, path, batch_sizes=(2,)), verify(model, path, batch_sizes=(2,), seed=0), \
        verify(model, path, batch_sizes=(2,), seed=1)
    assert rep.max_abs_diff == zero.max_abs_diff != one.max_abs_diff
    c = rep.checks[0]
    assert c.tolerance == pytest.approx(1e-4 + 1e-3 * c.max_abs_ref, rel=1e-12) and c.rule == "max"


def test_compare_files_compares_every_other_output(tiny, tmp_path):
    """Two files with equal logits and boxes 0.5 apart: the boxes difference is measured and fails alone."""
    _, path = tiny

    def with_boxes(out, shift):
        proto = onnx.load(str(path))
        first = proto.graph.output[0]
        proto.graph.initializer.append(numpy_helper.from_array(np.array(shift, dtype=np.float32), "shift"))
        proto.graph.node.append(helper.make_node("Add", [first.name, "shift"], ["boxes"]))
        proto.graph.output.append(helper.make_tensor_value_info("boxes", first.type.tensor_type.elem_type, None))
        onnx.save(proto, str(out))
        return out

    a, b = with_boxes(tmp_path / "a.onnx", 0.0), with_boxes(tmp_path / "b.onnx", 0.5)
    c, = compare_files(a, b, batch_sizes=(2,))
    logits = _ort(path, np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32))
    assert c.max_abs_diff == 0.0 and c.outputs["boxes"][0] == pytest.approx(0.5, abs=1e-6)
    assert c.outputs["boxes"][1] == pytest.approx(1e-4 + 1e-3 * np.abs(logits).max(), rel=1e-5) and not c.ok
    assert compare_files(a, a, batch_sizes=(2,))[0].ok


# ------------------------------------------------------------------------- verify's other paths


def _gen_images(batch_sizes, seed=0):
    """The images verify draws: one torch.randn per batch size from a generator seeded once (its docstring)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=gen) for b in batch_sizes]


@pytest.fixture(scope="module")
def reduced(tiny, tmp_path_factory):
    """tiny's float16 and bfloat16 files (no decision outputs) and the models they came from."""
    from vitmerge.models.precision import cast_model

    model, _ = tiny
    d = tmp_path_factory.mktemp("reduced")
    out = {}
    for name in ("fp16", "bf16"):
        low = cast_model(copy.deepcopy(model), name)
        vitmerge.export(low, d / f"tiny_{name}.onnx", check=False)
        out[name] = (low, d / f"tiny_{name}.onnx")
    return out


def test_fp16_verify_uses_the_decision_rule_and_measures_agreement_with_float32(tiny, reduced):
    from vitmerge.models.vit import run_with_decisions

    model, _ = tiny
    m16, p16 = reduced["fp16"]
    rep = verify(m16, p16, batch_sizes=(1, 3), reference_fp32=model)
    assert rep.ok and rep.dtype == "fp16" and rep.how == "ONNX Runtime CPU vs PyTorch" and rep.path == str(p16)
    assert [c.rule for c in rep.checks] == ["decisions", "decisions"]
    assert all(c.tolerance == pytest.approx(1e-2 + 2e-2 * c.max_abs_ref, rel=1e-12) for c in rep.checks)
    agree, n, shares = 0, 0, []
    for x in _gen_images((1, 3)):
        lo, dlo = run_with_decisions(m16, x)
        hi, dhi = run_with_decisions(model, x)
        agree += int((lo.argmax(-1) == hi.argmax(-1)).sum())
        n += x.shape[0]
        eq = [(a == b).numpy() for a, b in zip(dhi, dlo)]
        shares.append(sum(int(e.sum()) for e in eq) / sum(e.size for e in eq))
    assert rep.vs_fp32 == {"top1_agreement": pytest.approx(agree / n, abs=1e-12),
                           "decisions_identical": pytest.approx(float(np.mean(shares)), abs=1e-12)}
    assert verify(m16, p16, batch_sizes=(1,)).vs_fp32 == {}  # no reference given: nothing measured
    assert verify(model, tiny[1], batch_sizes=(1,), reference_fp32=model).vs_fp32 == {}  # float32 itself


def test_bf16_verify_runs_an_upcast_copy_and_removes_it(tiny, reduced):
    """bfloat16: ONNX Runtime CPU has no bfloat16 kernels, so an upcast copy of the file runs, against the model
    upcast in PyTorch, by the max rule; the copy is gone afterwards; the caller's model stays bfloat16."""
    from vitmerge.models.precision import cast_model, model_dtype
    from vitmerge.models.vit import run_with_decisions

    model, _ = tiny
    mb, pb = reduced["bf16"]
    before = sorted(p.name for p in pb.parent.iterdir())
    rep = verify(mb, pb, batch_sizes=(2,), reference_fp32=model)
    assert sorted(p.name for p in pb.parent.iterdir()) == before and model_dtype(mb) == torch.bfloat16
    assert rep.ok and rep.dtype == "bf16" and rep.checks[0].rule == "max"
    assert rep.how == ("float32 upcast copy in ONNX Runtime CPU vs the model upcast in PyTorch (no bfloat16 CPU "
                       "kernels)")
    x, = _gen_images((2,))
    up = cast_model(copy.deepcopy(mb), torch.float32)
    with torch.no_grad():
        ref = up(x).numpy()
    assert rep.checks[0].max_abs_ref == pytest.approx(np.abs(ref).max(), rel=1e-6)
    got = OrtRunner(upcast_copy(pb, pb.parent / "mine.onnx"))(x.numpy()).numpy()
    assert rep.checks[0].max_abs_diff == pytest.approx(np.abs(got.astype(np.float64) - ref).max(), rel=1e-5, abs=1e-9)
    lo, hi = run_with_decisions(mb, x)[0], run_with_decisions(model, x)[0]  # the bfloat16 model itself vs float32
    assert rep.vs_fp32["top1_agreement"] == float((lo.argmax(-1) == hi.argmax(-1)).float().mean())


def test_verify_explicit_tolerance_and_output_mismatch(tiny, tmp_path):
    model, path = tiny
    c = verify(model, path, batch_sizes=(1,), atol=0.5, rtol=0.0).checks[0]
    assert c.tolerance == 0.5
    assert verify(model, path, batch_sizes=(1,), atol=0.0, rtol=0.5).checks[0].tolerance == \
        pytest.approx(0.5 * c.max_abs_ref, rel=1e-12)
    proto = onnx.load(str(path))
    first = proto.graph.output[0]
    proto.graph.node.append(helper.make_node("Identity", [first.name], ["boxes"]))
    proto.graph.output.append(helper.make_tensor_value_info("boxes", first.type.tensor_type.elem_type, None))
    two = tmp_path / "two.onnx"
    onnx.save(proto, str(two))
    with pytest.raises(VerificationError, match=rf"^{two} has outputs \['{first.name}', 'boxes'\], but the model gives "
                                                rf"\['{first.name}'\]: export it again from this model$"):
        verify(model, two, batch_sizes=(1,))


def test_verify_compares_a_detectors_boxes(tmp_path):
    """A dense detector's file: the boxes are compared too, each with its own tolerance; a file whose boxes are
    off (logits untouched) fails on the boxes alone."""
    from vitmerge.models.dense import DenseDetector

    torch.manual_seed(0)
    bb = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                           num_classes=0)
    det = DenseDetector(bb, 3, hidden=16).eval()
    vitmerge.apply(det, "tome", r=3)
    path = tmp_path / "det.onnx"
    vitmerge.export(det, path, check=False)
    rep = verify(det, path, batch_sizes=(2,))
    x, = _gen_images((2,))
    with torch.no_grad():
        boxes = det(x).boxes.numpy()
    got = OrtRunner(path).outputs(x.numpy())["boxes"].numpy()
    d, tol = rep.checks[0].outputs["boxes"]
    assert rep.ok and d == pytest.approx(np.abs(got.astype(np.float64) - boxes).max(), rel=1e-5, abs=1e-12)
    assert tol == pytest.approx(1e-4 + 1e-3 * np.abs(boxes).max(), rel=1e-6)
    proto = onnx.load(str(path))
    out = next(o for o in proto.graph.output if o.name == "boxes")
    for n in proto.graph.node:  # the boxes output now comes out of an Add of 0.01
        n.output[:] = [f"{o}_pre" if o == "boxes" else o for o in n.output]
    proto.graph.initializer.append(numpy_helper.from_array(np.array(0.01, dtype=np.float32), "off"))
    proto.graph.node.append(helper.make_node("Add", ["boxes_pre", "off"], ["boxes"]))
    onnx.save(proto, str(tmp_path / "off.onnx"))
    bad = verify(det, tmp_path / "off.onnx", batch_sizes=(2,))
    assert bad.max_abs_diff == rep.max_abs_diff and bad.checks[0].outputs["boxes"][0] > 0.009 and not bad.ok
    assert out.name == "boxes"


@pytest.mark.slow  # a 12-block export: ~20 s
def test_verify_orders_the_decisions_of_twelve_merge_steps_numerically(tmp_path):
    """merge_decisions.10 and .11 come after .9, not after .1: a 12-block model (ViT-B's depth) verified with its
    decisions compares each step with its own PyTorch step."""
    from vitmerge.exporter.onnx_export import export_onnx_program, save_program

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=12, embed_dim=32,
                              num_heads=1, num_classes=5).eval()
    vitmerge.apply(model, "tome", r=1)
    path = save_program(export_onnx_program(model, decisions=True), model, tmp_path, "d12.onnx")
    assert len([o for o in onnx.load(str(path)).graph.output if o.name.startswith("merge_decisions.")]) == 12
    rep = verify(model, path, batch_sizes=(1,))
    assert rep.ok and rep.decisions_identical == 1.0


def test_batch_check_one_sided_decisions_and_empty_outputs():
    """Decisions are compared only when both sides give them; an output with no elements (a detector that
    found nothing) compares as equal with the bare atol as its tolerance."""
    g = np.random.default_rng(3)
    ref = g.standard_normal((3, 10)).astype(np.float32)
    out = ref + np.float32(1e-3)
    plain = batch_check(3, ref, out, atol=0.01, rtol=0.0)
    dec = [np.arange(12).reshape(3, 4)]
    for kw in (dict(ref_decisions=dec), dict(out_decisions=dec)):
        one = batch_check(3, ref, out, atol=0.01, rtol=0.0, **kw)
        assert one.ok and one.decisions_identical == plain.decisions_identical and one.images_compared == 3
    empty = np.zeros((3, 0, 4), dtype=np.float32)
    res = batch_check(3, ref, out, atol=0.01, rtol=0.5, extra={"boxes": (empty, empty)})
    assert res.ok and res.outputs["boxes"] == (0.0, 0.01)


def test_torch_outputs_of_a_model_vitmerge_never_patched():
    from vitmerge.exporter.verify import _torch_outputs

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # as verify() calls it
        outs, dec = _torch_outputs(model, x, with_decisions=False)
        assert dec is None and len(outs) == 1
        np.testing.assert_array_equal(next(iter(outs.values())), model(x).numpy())
