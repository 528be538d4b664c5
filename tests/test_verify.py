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
from vitmerge.errors import SurgeryError, VerificationError
from vitmerge.exporter.verify import BatchCheck, VerifyReport, batch_check, check_onnx, compare_files, verify

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
    vitmerge.export(model, path, check=False)  # these tests do the checking
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
    """The merge's ranking TopK flipped: the r *least* similar A tokens merge away (a wrong merge)."""
    flipped = 0
    for n in proto.graph.node:
        scope = {p.key: p.value for p in n.metadata_props}.get("namespace", "")
        if n.op_type == "TopK" and "blocks.0.token_merge" in scope:
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
    """export() runs verification on the staged file: a wrong graph (here: the merge flipped as the file
    is written) raises and leaves nothing behind."""
    model, _ = tiny
    from vitmerge import exporter

    real = exporter.save_program

    def save_wrong(*args, **kwargs):
        written = real(*args, **kwargs)
        _edited(written, written, merge_least_similar)
        return written

    monkeypatch.setattr(exporter, "save_program", save_wrong)
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
    with pytest.raises(SurgeryError, match="no ONNX file at '.*missing.onnx'"):
        compare_files(path, tmp_path / "missing.onnx")
    with pytest.raises(SurgeryError, match="no ONNX file at '.*missing.onnx'"):
        compare_files(tmp_path / "missing.onnx", path)
    small = _mean_pool_model(tmp_path / "small.onnx", 16)
    with pytest.raises(SurgeryError, match=r"different inputs: .*tiny.onnx \(3, 32, 32\), .*small.onnx \(3, 16, 16\)"):
        compare_files(path, small)


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
