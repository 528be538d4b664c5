"""Detection: the position map of a merged model (unmerge), the dense detector, YOLOS; exported with
two outputs and checked in ONNX Runtime."""
import copy

import pytest
import torch

import vitmerge
from vitmerge.models.apply import apply


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _tiny_vit(seed: int = 0, img: int = 64):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, num_classes=5, depth=3).eval()


def _unmerge_by_source(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Reference: loop over ToMe's merge_source map [B, n, N0] (0/1): position j takes the token holding it."""
    B, n, N0 = source.shape
    out = torch.empty(B, N0, x.shape[-1], dtype=x.dtype)
    for b in range(B):
        for j in range(N0):
            holders = [i for i in range(n) if source[b, i, j] > 0]
            assert len(holders) == 1, f"position {j} is held by {holders}"
            out[b, j] = x[b, holders[0]]
    return out


@pytest.mark.parametrize("method,r,opts", [("tome", [6, 5, 4], {}), ("hash", [10, 6, 3], {}),
                                           ("importance", [5, 5, 5], {}), ("vwt", 9, {"mode": "intra"})])
def test_positions_unmerge_is_the_merge_source_inverse(method, r, opts):
    """MergeState.track_positions composes every step's assignment; unmerge gathers the final tokens back to
    all N0 positions, equal to the loop over the (independently tracked) merge_source map."""
    model = apply(_tiny_vit(), method, r, trace_source=True, **opts)
    model._vm_state.track_positions = True
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model._vm_state.reset()
        feats = model.forward_features(x)
    st = model._vm_state
    n0 = 16 + 1
    assert feats.shape[1] < n0 and st.positions.shape == (2, n0)
    torch.testing.assert_close(st.unmerge(feats), _unmerge_by_source(feats, st.source), rtol=0, atol=0)
    assert torch.equal(st.positions[:, 0], torch.zeros(2, dtype=torch.long))  # the class token stays token 0


def test_positions_slow_fast_keeps_every_token():
    """evo hands all N tokens on (its split is not a reduction): no position map, unmerge is the identity."""
    model = apply(_tiny_vit(), "evo", 4)
    model._vm_state.track_positions = True
    with torch.no_grad():
        model._vm_state.reset()
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert model._vm_state.positions is None and torch.equal(model._vm_state.unmerge(feats), feats)


def test_unmerge_without_tracking_is_refused():
    model = apply(_tiny_vit(), "tome", 4)
    with pytest.raises(RuntimeError, match="track_positions"):
        model._vm_state.unmerge(torch.zeros(1, 5, 192))


# --------------------------------------------------------------------------------------------
# The dense detector (ViT backbone + per-cell head): r = 0, merged vs an independent reference, export
# --------------------------------------------------------------------------------------------


def _detector(seed: int = 0, classes: int = 3):
    from vitmerge.models.dense import DenseDetector

    import timm

    torch.manual_seed(seed)
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=3)
    return DenseDetector(bb, classes).eval()


def _head_reference(det, tokens_at_positions: torch.Tensor):
    """The head written out in float64 from the documented formula: conv3x3 + GELU, 1x1 convs, per-cell
    (cx, cy) = cell centre + tanh(offset) * cell size, (w, h) = sigmoid, clipped to [0, 1]."""
    import torch.nn.functional as F

    t = tokens_at_positions.double()
    B, _, D = t.shape
    gh, gw = det.grid
    grid = t[:, 1:].reshape(B, gh, gw, D).permute(0, 3, 1, 2)
    conv, = [m for m in det.stem if isinstance(m, torch.nn.Conv2d)]
    h = F.gelu(F.conv2d(grid, conv.weight.double(), conv.bias.double(), padding=1))
    logits = F.conv2d(h, det.cls_head.weight.double(), det.cls_head.bias.double())
    raw = F.conv2d(h, det.box_head.weight.double(), det.box_head.bias.double())
    boxes = torch.empty(B, gh * gw, 4, dtype=torch.float64)
    for b in range(B):
        for row in range(gh):
            for col in range(gw):
                q = row * gw + col
                o = raw[b, :, row, col]
                boxes[b, q] = torch.stack([(col + 0.5) / gw + torch.tanh(o[0]) / gw,
                                           (row + 0.5) / gh + torch.tanh(o[1]) / gh,
                                           torch.sigmoid(o[2]), torch.sigmoid(o[3])]).clamp(0, 1)
    return logits.flatten(2).transpose(1, 2), boxes


def test_dense_r0_equals_the_unmerged_detector():
    det = _detector()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = det(x)
        vitmerge.apply(det, "tome", 0)
        out = det(x)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.boxes, ref.boxes)
    assert out.logits.shape == (2, 16, 3) and out.boxes.shape == (2, 16, 4)


@pytest.mark.parametrize("method,r", [("tome", [4, 4, 3]), ("hash", [6, 4, 2]), ("evo", 5)])
def test_dense_merged_head_reads_every_position_from_its_token(method, r):
    """The merged detector = its head on the merged backbone's tokens put back at each position by the
    merge_source map (the same backbone merged alone, traced); the head written out independently."""
    det = _detector()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    vitmerge.apply(det, method, r)
    with torch.no_grad():
        out = det(x)
        bb = _detector().backbone  # same seed: same weights
        vitmerge.apply(bb, method, r, trace_source=method != "evo")
        bb._vm_state.reset()
        tokens = bb.forward_features(x)
    if method == "evo":  # no reduction: every position keeps its own token
        at_positions = tokens
    else:
        assert tokens.shape[1] < 17
        at_positions = _unmerge_by_source(tokens, bb._vm_state.source)
    ref_logits, ref_boxes = _head_reference(det, at_positions)
    torch.testing.assert_close(out.logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.boxes.double(), ref_boxes, rtol=1e-5, atol=1e-5)
    assert bool(((out.boxes >= 0) & (out.boxes <= 1)).all())


@pytest.mark.parametrize("method,r", [("tome", [4, 4, 3]), ("hash", [6, 0, 0])])  # hash graphs export slowly: one step
def test_dense_export_two_outputs_ort_vs_pytorch(method, r, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from vitmerge.exporter import export

    det = vitmerge.apply(_detector(), method, r)
    res = export(det, tmp_path / "det.onnx", batch_sizes=(1, 3))
    assert res.verification.ok and set(res.verification.output_diffs) == {"boxes"}
    sess = ort.InferenceSession(str(tmp_path / "det.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "boxes"]  # decisions dropped after verification
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    logits, boxes = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = det(x)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(boxes, ref.boxes.numpy(), rtol=1e-4, atol=1e-5)


def test_dense_fp16_export_agreement_is_a_share_of_predictions(tmp_path):
    """An fp16 detector file: verified by the decision rule, and its agreement with float32 is the share of
    (image, cell) predictions whose class is unchanged, recomputed here from the two PyTorch models."""
    from vitmerge.exporter import export
    from vitmerge.models.precision import cast_model

    det = vitmerge.apply(_detector(), "tome", [4, 4, 3])
    res = export(det, tmp_path / "det16.onnx", batch_sizes=(1, 3), dtype="fp16")
    v = res.verification
    assert v.ok and v.dtype == "fp16" and set(v.output_diffs) == {"boxes"}
    low = cast_model(copy.deepcopy(det), "fp16")
    same, n = 0, 0
    gen = torch.Generator().manual_seed(0)  # verify's draw: the same images, batch 1 then 3
    for b in (1, 3):
        x = torch.randn(b, 3, 64, 64, generator=gen)
        with torch.no_grad():
            eq = det(x).logits.argmax(-1) == low(x.half()).logits.float().argmax(-1)
        same, n = same + int(eq.sum()), n + eq.numel()
    assert 0.0 <= v.vs_fp32["top1_agreement"] <= 1.0
    assert v.vs_fp32["top1_agreement"] == pytest.approx(same / n)


def test_verify_fails_when_only_the_boxes_differ(tmp_path):
    """The second output is checked on its own: a file whose logits match but whose boxes do not fails."""
    from vitmerge.exporter import export, verify

    det = vitmerge.apply(_detector(), "tome", [4, 0, 0])
    export(det, tmp_path / "det.onnx", batch_sizes=(1,))
    with torch.no_grad():
        det.box_head.bias += 0.5  # the boxes move, the logits do not
    rep = verify(det, tmp_path / "det.onnx", batch_sizes=(2,))
    c = rep.checks[0]
    assert c.max_abs_diff <= c.tolerance and c.outputs["boxes"][0] > c.outputs["boxes"][1]
    assert not rep.ok


def test_check_compares_every_output_of_two_detector_files(tmp_path):
    """`vitmerge check A B` on two detector files whose logits agree but whose boxes do not: exit 1, naming
    boxes, with the boxes' max |diff| in the table equal to the difference computed here in ONNX Runtime."""
    import numpy as np

    from vitmerge.exporter import export
    from vitmerge.exporter.verify import compare_files

    import onnx
    from onnx import numpy_helper

    export(_detector(), tmp_path / "a.onnx", batch_sizes=(1,))  # unmerged: what is compared is the files' outputs
    proto = onnx.load(str(tmp_path / "a.onnx"))
    (bias,) = [t for t in proto.graph.initializer if t.name.endswith("box_head.bias")]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.02), bias.name))
    onnx.save(proto, str(tmp_path / "b.onnx"))  # every box moves a little, the logits do not
    res = _cli("check", tmp_path / "a.onnx", tmp_path / "a.onnx")
    assert res.exit_code == 0, res.output
    res = _cli("check", tmp_path / "a.onnx", tmp_path / "b.onnx", "--batch", "2")
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "boxes max|diff|" in text and "logits max|diff|" not in text, text
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    (la, ba), (lb, bb) = _ort_outputs(tmp_path / "a.onnx", torch.from_numpy(x)), _ort_outputs(tmp_path / "b.onnx", torch.from_numpy(x))
    c = compare_files(tmp_path / "a.onnx", tmp_path / "b.onnx", (2,))[0]
    assert c.max_abs_diff == pytest.approx(float(np.abs(la - lb).max()), abs=1e-7)
    assert c.outputs["boxes"][0] == pytest.approx(float(np.abs(ba.astype(np.float64) - bb).max()), rel=1e-6)
    assert f"{c.outputs['boxes'][0]:.2e}" in text


def test_dense_bad_inputs():
    import timm

    from vitmerge.errors import ScheduleError, UnsupportedModelError
    from vitmerge.models.dense import DenseDetector

    with pytest.raises(ScheduleError, match="too large"):
        vitmerge.apply(_detector(), "tome", 20)
    with pytest.raises(UnsupportedModelError, match="vwt"):
        vitmerge.apply(_detector(), "vwt", 4, mode="intra")
    dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=1,
                            dynamic_img_size=True)
    with pytest.raises(UnsupportedModelError, match="dynamic_img_size"):
        DenseDetector(dyn, 3)
    with pytest.raises(UnsupportedModelError, match="num_classes"):
        DenseDetector(_detector().backbone, 0)
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        DenseDetector(torch.nn.Linear(2, 2), 3)


def test_dense_remove_restores_the_plain_detector():
    det = _detector()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = det(x)
        vitmerge.apply(det, "tome", 4)
        vitmerge.remove(det)
        out = det(x)
    assert torch.equal(out.boxes, ref.boxes) and not hasattr(det, "_vm_state")
    assert type(det.backbone).__name__ == "VisionTransformer"


# --------------------------------------------------------------------------------------------
# YOLOS (transformers): class + [DET] tokens protected (the [DET] tokens sit at the END of its sequence)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mid", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_yolos_r0_equals_transformers(mid, attn):
    pytest.importorskip("transformers")
    from support.reference_yolos import make_yolos

    model = make_yolos(mid, attn=attn)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        vitmerge.apply(model, "tome", 0)
        out = model(x)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.pred_boxes, ref.pred_boxes)


@pytest.mark.parametrize("mid,prop_attn,rs", [(False, True, [6, 4, 3]), (True, True, [6, 4, 3]),
                                               (True, False, [0, 8, 5])])
def test_yolos_matches_handwritten_tome(mid, prop_attn, rs):
    pytest.importorskip("transformers")
    from support.reference_yolos import make_yolos, yolos_tome_forward

    model = make_yolos(mid, attn="eager").double()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)).double()
    ref_logits, ref_boxes = yolos_tome_forward(model, x, rs, prop_attn=prop_attn)
    vitmerge.apply(model, "tome", rs, prop_attn=prop_attn)
    assert model.vitmerge.protected == 1 + 5
    with torch.no_grad():
        out = model(x)
        plain = vitmerge.remove(model)(x)
    assert type(model.base_model.encoder).__name__ == "YolosEncoder"  # remove restores transformers' classes
    assert type(model.base_model.encoder.layer[0]).__name__ == "YolosLayer"
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.pred_boxes, ref_boxes, rtol=1e-9, atol=1e-9)
    assert (out.pred_boxes - plain.pred_boxes).abs().max() > 1e-6  # the merge did change something


@pytest.mark.parametrize("method", ["tome", "hash", "importance"])
def test_yolos_det_tokens_never_merge(method):
    """The tokens the first merge step sees lead with the class token and the [DET] tokens (transformers'
    layer-0 values of its LAST d tokens, computed by the plain model), and every one of them ends the
    encoder alone: its token holds no other original position."""
    pytest.importorskip("transformers")
    from support.reference_yolos import make_yolos

    model = make_yolos(True)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    d, n0 = 5, 1 + 24 + 5
    layer0 = model.base_model.encoder.layer[0]
    with torch.no_grad():  # transformers' own layer 0, up to the merge point (attention + residual)
        emb = model.base_model.embeddings(x)
        plain = emb + layer0.attention(layer0.layernorm_before(emb))
    vitmerge.apply(model, method, [8, 6, 4], trace_source=True)
    seen = {}
    hook = layer0.token_merge.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    torch.testing.assert_close(seen["x"][:, :1], plain[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["x"][:, 1:1 + d], plain[:, -d:], rtol=1e-5, atol=1e-5)
    source = model._vm_state.source  # [B, n, N0] over the tokens the first step saw
    assert source.shape == (2, n0 - 18, n0)
    for j in range(1 + d):
        assert torch.equal(source[:, j, j], torch.ones(2)) and torch.equal(source[:, j].sum(-1), torch.ones(2))


@pytest.fixture(scope="module")
def yolos_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from support.reference_yolos import make_yolos

    root = tmp_path_factory.mktemp("yolos")
    out = {"mid": root / "mid", "plain": root / "plain"}
    make_yolos(True).save_pretrained(out["mid"])
    make_yolos(False).save_pretrained(out["plain"])
    return out


def _cli(*args):
    from typer.testing import CliRunner

    from vitmerge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _ort_outputs(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "boxes"]
    return sess.run(None, {"images": x.numpy()})


@pytest.mark.parametrize("method,r", [("tome", "6,4,3"), pytest.param("hash", "8,6,4", marks=pytest.mark.slow)])
def test_yolos_cli_export_merged_ort_vs_pytorch(yolos_folders, tmp_path, method, r):
    """`vitmerge export FOLDER` (YOLOS with mid position embeddings): logits and boxes, ORT vs PyTorch on a
    batch the exporter never saw."""
    import numpy as np

    from vitmerge.models.build import build_merged
    from vitmerge.request import MergeRequest

    out = tmp_path / "yolos.onnx"
    res = _cli("export", yolos_folders["mid"], "--method", method, "--r", r, "-o", out, "--verify-batch", "2")
    assert res.exit_code == 0, res.output
    assert "boxes max|diff|" in " ".join(res.output.split())
    model = build_merged(str(yolos_folders["mid"]), MergeRequest(method, r=[int(v) for v in r.split(",")]))
    x = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(7))
    logits, boxes = _ort_outputs(out, x)
    with torch.no_grad():
        ref = model(x)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(boxes, ref.pred_boxes.numpy(), rtol=1e-4, atol=1e-6)


def test_yolos_native_form_is_tensorrt_ready(yolos_folders, tmp_path):
    """--merge-op native on a YOLOS with mid position embeddings: their size-weighted sums outside the merge
    steps take the one-hot form too, so the file holds no ScatterND and passes the TensorRT readiness check
    (it held a ScatterND-add per mid layer before), and it still computes what PyTorch computes."""
    import numpy as np
    import onnx

    from vitmerge.exporter import check_tensorrt
    from vitmerge.models.build import build_merged
    from vitmerge.request import MergeRequest

    out = tmp_path / "yolos_native.onnx"
    res = _cli("export", yolos_folders["mid"], "--r", "6,4,3", "--merge-op", "native", "-o", out, "--verify-batch", "2")
    assert res.exit_code == 0, res.output
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "ScatterND" not in ops
    assert check_tensorrt(out).ok
    model = build_merged(str(yolos_folders["mid"]), MergeRequest("tome", r=[6, 4, 3]))
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(9))
    logits, boxes = _ort_outputs(out, x)
    with torch.no_grad():
        ref = model(x)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(boxes, ref.pred_boxes.numpy(), rtol=1e-4, atol=1e-6)


def test_yolos_cli_export_r0_equals_transformers(yolos_folders, tmp_path):
    """--r 0: the file computes what transformers' own YolosForObjectDetection computes (no vitmerge code)."""
    import numpy as np
    import transformers as tf

    out = tmp_path / "yolos0.onnx"
    res = _cli("export", yolos_folders["mid"], "--r", "0", "-o", out, "--verify-batch", "1")
    assert res.exit_code == 0, res.output
    plain = tf.YolosForObjectDetection.from_pretrained(str(yolos_folders["mid"])).eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(8))
    logits, boxes = _ort_outputs(out, x)
    with torch.no_grad():
        ref = plain(x)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(boxes, ref.pred_boxes.numpy(), rtol=1e-4, atol=1e-6)


def test_yolos_bad_inputs(yolos_folders, tmp_path):
    import transformers as tf

    from vitmerge.errors import ScheduleError, UnsupportedModelError
    from vitmerge.models.build import build_model
    from support.reference_yolos import make_yolos, yolos_config

    with pytest.raises(ScheduleError, match="too large"):  # 24 patches: one tome step removes at most 12
        vitmerge.apply(make_yolos(), "tome", 13)
    res = _cli("export", yolos_folders["plain"], "--img-size", "64", "-o", tmp_path / "x.onnx")
    assert res.exit_code == 2 and "image_size" in " ".join(res.output.split())
    tf.YolosModel(yolos_config(False)).save_pretrained(tmp_path / "backbone")  # no detection head
    with pytest.raises(UnsupportedModelError, match="YolosForObjectDetection"):
        build_model(str(tmp_path / "backbone"))
    assert not (tmp_path / "x.onnx").exists()


def test_dense_cli_export_from_checkpoint(tmp_path):
    """`vitmerge export dense:NAME --checkpoint det.pth`: the detector rebuilt from its state dict (classes and
    head width read from it), merged, exported with logits and boxes; ORT equals the detector merged here."""
    import numpy as np

    det = _detector(seed=4, classes=2)
    torch.save(det.state_dict(), tmp_path / "det.pth")
    out = tmp_path / "det.onnx"
    res = _cli("export", "dense:vit_tiny_patch16_224", "--checkpoint", tmp_path / "det.pth", "--img-size", "64",
               "--model-kwargs", '{"depth": 3}', "--method", "tome", "--r", "5,0,0", "-o", out, "--verify-batch", "2")
    assert res.exit_code == 0, res.output
    vitmerge.apply(det, "tome", [5, 0, 0])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    logits, boxes = _ort_outputs(out, x)
    with torch.no_grad():
        ref = det(x)
    assert logits.shape == (2, 16, 2)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(boxes, ref.boxes.numpy(), rtol=1e-4, atol=1e-6)


def test_dense_cli_bad_inputs(tmp_path):
    res = _cli("export", "dense:vit_tiny_patch16_224", "--img-size", "64", "-o", tmp_path / "a.onnx")
    assert res.exit_code == 2 and "--num-classes" in " ".join(res.output.split())
    torch.save(_tiny_vit().state_dict(), tmp_path / "cls.pth")  # a classifier's weights, not a detector's
    res = _cli("export", "dense:vit_tiny_patch16_224", "--checkpoint", tmp_path / "cls.pth", "--num-classes", "2",
               "--img-size", "64", "--model-kwargs", '{"depth": 3}', "-o", tmp_path / "b.onnx")
    assert res.exit_code == 2 and "DenseDetector state dict" in " ".join(res.output.split())
    res = _cli("export", "dense:vit_tinny_patch16_224", "--num-classes", "2", "-o", tmp_path / "c.onnx")
    assert res.exit_code == 2 and "vit_tiny_patch16_224" in res.output
    assert not list(tmp_path.glob("*.onnx"))


# --------------------------------------------------------------------------------------------
# The offline detection set and the metric
# --------------------------------------------------------------------------------------------


def test_digit_canvases_boxes_are_the_ink_boxes():
    """Without noise every labelled box is exactly the bounding box of the nonzero pixels inside it, boxes do
    not overlap, and the same seed gives the same set."""
    from vitmerge.data.detection import digit_canvases

    s = digit_canvases(12, size=64, max_digits=3, split="test", seed=5, noise=0.0)
    again = digit_canvases(12, size=64, max_digits=3, split="test", seed=5, noise=0.0)
    assert torch.equal(s.images, again.images) and all(torch.equal(a, b) for a, b in zip(s.boxes, again.boxes))
    for img, boxes, labels in zip(s.images, s.boxes, s.labels):
        ink = img[0] > 0
        assert 1 <= len(boxes) <= 3 and labels.min() >= 0 and labels.max() <= 9
        covered = torch.zeros_like(ink)
        for cx, cy, w, h in (boxes * 64).tolist():
            x0, y0, x1, y1 = round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2)
            assert abs(x0 - (cx - w / 2)) < 1e-4 and abs(y1 - (cy + h / 2)) < 1e-4  # whole pixels
            inside = ink[y0:y1, x0:x1]
            rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
            assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, y1 - y0 - 1, 0, x1 - x0 - 1)
            assert not covered[y0:y1, x0:x1].any()  # no overlap
            covered[y0:y1, x0:x1] = True
        assert not (ink & ~covered).any()  # all ink is inside some box


def test_map_via_torchmetrics():
    """The metric's plumbing (box format, keys): ground truth as predictions scores 1; boxes shifted to
    IoU 0.6 count at 0.5 but not at 0.75; a wrong class scores 0."""
    pytest.importorskip("torchmetrics")
    pytest.importorskip("pycocotools")
    from vitmerge.data.detection import mean_average_precision

    gt = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]]), "labels": torch.tensor([4])}]
    same = [{"boxes": gt[0]["boxes"], "scores": torch.tensor([0.9]), "labels": torch.tensor([4])}]
    assert mean_average_precision(same, gt) == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    # shift by dx along x: IoU = (w - dx) / (w + dx) = 0.6 for dx = w / 4
    shifted = [{"boxes": torch.tensor([[0.35, 0.3, 0.2, 0.2]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([4])}]
    m = mean_average_precision(shifted, gt)
    assert m["map_50"] == 1.0 and m["map_75"] == 0.0 and 0.0 < m["map"] < 1.0
    wrong = [{"boxes": gt[0]["boxes"], "scores": torch.tensor([0.9]), "labels": torch.tensor([3])}]
    assert mean_average_precision(wrong, gt)["map"] == 0.0


def test_detection_set_bad_inputs():
    from vitmerge.data.detection import digit_canvases, mean_average_precision
    from vitmerge.errors import UsageError

    with pytest.raises(UsageError, match="split"):
        digit_canvases(2, split="val")
    with pytest.raises(UsageError, match="scale"):
        digit_canvases(2, size=16, scale=(12, 24))
    with pytest.raises(UsageError, match="one per image"):
        mean_average_precision([], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])


def test_coco_folder_round_trip_and_errors(tmp_path):
    """write_coco -> read_coco gives the same images (8-bit) and boxes; the folder is plain COCO (checked by
    reading annotations.json directly); broken folders fail with a DataError that says what is missing."""
    import json

    from vitmerge.data.detection import digit_canvases, read_coco, write_coco
    from vitmerge.errors import DataError, UsageError

    s = digit_canvases(5, size=32, scale=(8, 16), split="test", seed=2)
    write_coco(s, tmp_path / "coco")
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    first = [a for a in coco["annotations"] if a["image_id"] == 0]
    cx, cy, w, h = s.boxes[0][0].tolist()
    assert first[0]["bbox"] == pytest.approx([(cx - w / 2) * 32, (cy - h / 2) * 32, w * 32, h * 32])
    assert first[0]["category_id"] == int(s.labels[0][0])
    back = read_coco(tmp_path / "coco")
    assert (back.images - s.images).abs().max() <= 0.5 / 255 + 1e-6
    for a, b, la, lb in zip(s.boxes, back.boxes, s.labels, back.labels):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert torch.equal(la, lb)
    assert read_coco(tmp_path / "coco", size=64).images.shape == (5, 3, 64, 64)
    with pytest.raises(UsageError, match="exists"):
        write_coco(s, tmp_path / "coco")
    with pytest.raises(DataError, match="annotations.json"):
        read_coco(tmp_path)
    (tmp_path / "coco" / "images" / "000003.png").unlink()
    with pytest.raises(DataError, match="000003.png"):
        read_coco(tmp_path / "coco")
