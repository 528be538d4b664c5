"""Kernels behind vitmerge::TokenMerge: the ONNX Runtime custom op, the Triton kernel (in Triton's CPU
interpreter here, on CUDA where there is a GPU), the TensorRT plugin and `vitmerge build`'s error paths.

References are float64 loops written for the tests (tests/support/reference_tome.py), not vitmerge code.
"""
import importlib.util
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from vitmerge import merging

from vitmerge.cli import app
from vitmerge.errors import RuntimeMissingError
from vitmerge.merging.base import MergePlan

from support.reference_tome import bipartite_groups, merge_rows

runner = CliRunner()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None

CASES = [(2, 17, 4, 1), (3, 30, 7, 2), (1, 12, 6, 0), (2, 197, 16, 1), (2, 9, 0, 1)]  # B, N, r, protected


def _inputs(B, N, C, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g), torch.randn(B, N, C, generator=g),
            torch.randint(1, 5, (B, N, 1), generator=g).float())


def _loop_reference(x, metric, size, r, protected):
    """float64 loops: (x' [B, n_out, D], size' [B, n_out]). r = 0 merges nothing: tokens stay as they are."""
    if r == 0:
        return x.double(), size[..., 0].double()
    xs, ss = [], []
    for b in range(x.shape[0]):
        _, groups = bipartite_groups(metric[b].double(), r, protected)
        rx, rs = merge_rows(x[b].double(), size[b, :, 0].double(), groups)
        xs.append(rx)
        ss.append(rs)
    return torch.stack(xs), torch.stack(ss)


def _token_merge_model(N, C, D, r, protected, method="tome", cls=False):
    """A one-node ONNX model: vitmerge::TokenMerge(x, metric, size[, cls_attn]) -> (x', size')."""
    n_out = N - r
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", N, D]),
           helper.make_tensor_value_info("metric", TensorProto.FLOAT, ["B", N, C]),
           helper.make_tensor_value_info("size", TensorProto.FLOAT, ["B", N, 1])]
    if cls:
        ins.append(helper.make_tensor_value_info("cls_attn", TensorProto.FLOAT, ["B", N]))
    node = helper.make_node("TokenMergeCls" if cls else "TokenMerge", [i.name for i in ins], ["x_out", "size_out"],
                            domain="vitmerge", r=str(r), protected=str(protected), method=method, options="{}")
    outs = [helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["B", n_out, D]),
            helper.make_tensor_value_info("size_out", TensorProto.FLOAT, ["B", n_out, 1])]
    model = helper.make_model(helper.make_graph([node], "token_merge", ins, outs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("vitmerge", 1)])
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------
# ONNX Runtime custom op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,N,r,protected", CASES)
def test_ort_custom_op_matches_loop_reference(tmp_path, B, N, r, protected):
    from vitmerge.backends.ort import session as ort_session

    C, D = 8, 24
    path = tmp_path / "tm.onnx"
    onnx.save(_token_merge_model(N, C, D, r, protected), str(path))
    sess = ort_session(path)  # registers the kernel: the graph imports the vitmerge domain
    for b in (1, B + 1):
        x, metric, size = _inputs(b, N, C, D, seed=N + r + b)
        x_out, s_out = sess.run(None, {"x": x.numpy(), "metric": metric.numpy(), "size": size.numpy()})
        ref_x, ref_s = _loop_reference(x, metric, size, r, protected)
        assert x_out.shape == (b, N - r, D) and s_out.shape == (b, N - r, 1)
        np.testing.assert_allclose(x_out, ref_x.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s_out[..., 0], ref_s.numpy())


def test_ort_custom_op_runs_any_method_with_class_attention(tmp_path):
    """TokenMergeCls carries the class-attention row: the importance method through the ORT kernel."""
    from vitmerge.backends.ort import session as ort_session

    B, N, C, D, r = 2, 17, 8, 16, 5
    path = tmp_path / "tmc.onnx"
    onnx.save(_token_merge_model(N, C, D, r, 1, method="importance", cls=True), str(path))
    x, metric, size = _inputs(B, N, C, D, seed=3)
    cls = torch.softmax(torch.randn(B, N, generator=torch.Generator().manual_seed(4)), -1)
    x_out, s_out = ort_session(path).run(None, {"x": x.numpy(), "metric": metric.numpy(), "size": size.numpy(),
                                                "cls_attn": cls.numpy()})
    # importance: the N-1-r most attended unprotected tokens stay; each other one joins its most similar kept token
    imp = cls[:, 1:].double()
    for b in range(B):
        keep = 1 + torch.topk(imp[b], N - 1 - r).indices
        gone = [i for i in range(1, N) if i not in set(keep.tolist())]
        unit = metric[b].double() / metric[b].double().norm(dim=-1, keepdim=True)
        w = size[b, :, 0].double() * cls[b].double().clamp_min(1e-12)
        groups = {int(k): [int(k)] for k in keep}
        for i in gone:
            groups[int(keep[torch.argmax(unit[keep] @ unit[i])])].append(i)
        # kept tokens keep their original order, after the class token
        for j, k in enumerate(sorted(groups), start=1):
            g = groups[k]
            want = sum(x[b, i].double() * w[i] for i in g) / sum(w[i] for i in g)
            np.testing.assert_allclose(x_out[b, j], want.numpy(), rtol=1e-5, atol=1e-5)
            assert s_out[b, j, 0] == sum(float(size[b, i, 0]) for i in g)
        np.testing.assert_allclose(x_out[b, 0], x[b, 0].numpy(), rtol=1e-6)  # the class token stays first


def test_ort_kernel_without_extensions_says_what_to_install(monkeypatch):
    import builtins

    from vitmerge.plugins import ort_tokenmerge

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("onnxruntime_extensions"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(RuntimeMissingError, match="pip install onnxruntime-extensions"):
        ort_tokenmerge.library_path()


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def triton_cpu(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton not installed (pip install triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter: no GPU on this machine
    from vitmerge.plugins import triton_kernel

    return triton_kernel


@pytest.mark.parametrize("B,N,r,protected", CASES)
def test_triton_kernel_matches_loop_reference(triton_cpu, B, N, r, protected):
    C, D = 8, 40  # D not a power of two: the channel mask is exercised
    x, metric, size = _inputs(B, N, C, D, seed=N * 7 + r)
    x_out, s_out = triton_cpu.merge_tokens(x, metric, size, r, protected)
    ref_x, ref_s = _loop_reference(x, metric, size, r, protected)
    torch.testing.assert_close(x_out.double(), ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_out[..., 0].double(), ref_s, rtol=0, atol=0)
    # and the same numbers as the PyTorch merge the exported graphs compute
    want_x, want_s = merging.plan("tome", metric, r, protected).merge(x, size)
    torch.testing.assert_close(x_out, want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_out, want_s)


def test_triton_kernel_weighted_plan(triton_cpu):
    """Plans with an extra averaging weight (importance-style): x' = sum(x w size) / sum(w size), size' = sum(size)."""
    g = torch.Generator().manual_seed(11)
    B, N, D = 2, 10, 7
    x = torch.randn(B, N, D, generator=g)
    size = torch.randint(1, 4, (B, N, 1), generator=g).float()
    weight = torch.rand(B, N, 1, generator=g) + 0.1
    keep = torch.tensor([[0, 2, 3, 5, 7, 9], [0, 1, 4, 6, 8, 9]])
    src = torch.tensor([[1, 4, 6, 8], [2, 3, 5, 7]])
    dst = torch.tensor([[1, 1, 5, 2], [3, 3, 0, 5]])
    plan = MergePlan(keep=keep, src=src, dst=dst, weight=weight)
    x_out, s_out = triton_cpu.triton_merge(plan, x, size)
    for b in range(B):
        for j in range(keep.shape[1]):
            members = [int(keep[b, j])] + [int(s) for s, d in zip(src[b], dst[b]) if int(d) == j]
            w = [float(size[b, i, 0] * weight[b, i, 0]) for i in members]
            want = sum(x[b, i].double() * wi for i, wi in zip(members, w)) / sum(w)
            torch.testing.assert_close(x_out[b, j].double(), want, rtol=1e-5, atol=1e-5)
            assert float(s_out[b, j, 0]) == sum(float(size[b, i, 0]) for i in members)


def test_triton_kernel_float16_accumulates_in_float32(triton_cpu):
    """fp16 storage (what TensorRT hands the plugin in an FP16 engine): sums run in float32.

    Deep in a merged model tokens stand for dozens of patches and activations reach hundreds, so the
    weighted sums x * size of a slot overflow float16 (max 65504): with a half-precision accumulator
    the slot would be inf. Reference: float64 sums of the same fp16 inputs, rounded once to fp16
    (1 unit in the last place allowed)."""
    g = torch.Generator().manual_seed(21)
    B, N, C, D, p = 2, 40, 8, 24, 1
    x = (1200 * torch.rand(B, N, D, generator=g) - 600).half()
    size = torch.randint(40, 100, (B, N, 1), generator=g).half()
    metric = torch.randn(B, N, C, generator=g)
    metric[:, 1:] = metric[:, 1:5].repeat(1, 10, 1)[:, :N - 1]  # 4 directions: the hash method makes big groups
    plan = merging.plan("hash", metric, 30, p)
    x_out, s_out = triton_cpu.triton_merge(plan, x, size)
    assert x_out.dtype == torch.float16 and s_out.dtype == torch.float16
    want_x, want_s = plan.merge(x.double(), size.double())  # float64 merge of the same inputs
    assert float((want_x * want_s).abs().max()) > torch.finfo(torch.float16).max  # sums fp16 cannot hold
    assert torch.isfinite(x_out).all()
    torch.testing.assert_close(x_out.double(), want_x.half().double(), rtol=torch.finfo(torch.float16).eps, atol=0)
    torch.testing.assert_close(s_out.double(), want_s.half().double(), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled Triton kernel needs one")
def test_triton_kernel_on_gpu_matches_pytorch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vitmerge.plugins.triton_kernel import merge_tokens

    for dtype in (torch.float32, torch.float16):
        x, metric, size = (t.cuda() for t in _inputs(8, 197, 64, 384, seed=1))
        x, metric = x.to(dtype), metric.to(dtype)
        got = merge_tokens(x, metric, size.to(dtype), 16, 1)
        want = merging.plan("tome", metric, 16, 1).merge(x, size.to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)


def test_triton_kernel_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton not installed (pip install triton)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vitmerge.plugins.triton_kernel import merge_tokens

    x, metric, size = _inputs(1, 9, 4, 8, seed=0)
    with pytest.raises(RuntimeMissingError, match="CUDA GPU"):
        merge_tokens(x, metric, size, 2, 1)


# ---------------------------------------------------------------------------------------------
# TensorRT plugin and `vitmerge build`
# ---------------------------------------------------------------------------------------------


def test_onnx_prepared_for_tensorrt_names_the_plugin():
    from vitmerge.plugins.tensorrt_plugin import has_token_merge, prepare_onnx

    model = _token_merge_model(9, 4, 8, 2, 1)
    assert has_token_merge(model)
    prepared = onnx.load_from_string(prepare_onnx(model))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in prepared.graph.node[0].attribute}
    assert attrs["plugin_namespace"] == b"vitmerge" and attrs["r"] == b"2"
    assert not any(a.name == "plugin_namespace" for a in model.graph.node[0].attribute)  # original untouched


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")
def test_tensorrt_plugin_without_tensorrt_is_a_clear_error():
    from vitmerge.plugins import tensorrt_plugin

    with pytest.raises(RuntimeMissingError, match="TensorRT not installed"):
        tensorrt_plugin.register()


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed")
def test_tensorrt_plugin_registers():
    import tensorrt as trt

    from vitmerge.plugins import tensorrt_plugin

    ids = tensorrt_plugin.register()
    assert tensorrt_plugin.register() == ids  # idempotent
    names = {(c.name, c.plugin_namespace) for c in trt.get_plugin_registry().all_creators}
    assert ("TokenMerge", "vitmerge") in names and ("TokenMergeCls", "vitmerge") in names


def _tiny_images_model(path):
    """A minimal graph with the exporter's input/output names (no export needed)."""
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    node = helper.make_node("ReduceMean", ["images", "axes"], ["logits"], keepdims=0)
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    onnx.save(helper.make_model(helper.make_graph([node], "g", [inp], [out], [axes]),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")
def test_build_without_tensorrt_fails_cleanly(tmp_path):
    model = tmp_path / "m.onnx"
    _tiny_images_model(model)
    res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "m.engine"), "--fp16"])
    assert res.exit_code == 2
    assert "TensorRT not installed" in res.output
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no engine, no metadata, no partial files


@pytest.mark.parametrize("args,message", [
    (["--max-batch", "4", "--opt-batch", "8"], "batch profile"),
    (["--int8"], "--int8 needs a file with Q/DQ nodes"),
    (["--int8", "--calib-dir", "NOPE"], "vitmerge calibrate"),  # implicit calibration is gone: Q/DQ files instead
    (["--calib-dir", "."], "vitmerge calibrate"),
], ids=["batch-range", "int8-no-qdq", "calib-dir-int8", "calib-dir"])
def test_build_rejects_bad_requests_before_any_work(tmp_path, args, message):
    model = tmp_path / "m.onnx"
    _tiny_images_model(model)
    res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "m.engine"), *args])
    assert res.exit_code == 2 and message in res.output
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_build_rejects_bad_paths(tmp_path):
    model = tmp_path / "m.onnx"
    _tiny_images_model(model)
    res = runner.invoke(app, ["build", str(tmp_path / "none.onnx"), "--output", str(tmp_path / "m.engine")])
    squeezed = "".join(res.output.replace("│", " ").split())  # typer's error box folds a long path anywhere
    assert res.exit_code == 2 and str(tmp_path / "none.onnx") in squeezed and "doesnotexist" in squeezed
    res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "m.onnx2")])
    assert res.exit_code == 2 and ".engine" in res.output
    res = runner.invoke(app, ["build", str(model), "--output", str(tmp_path / "no" / "m.engine")])
    assert res.exit_code == 2 and "doesnotexist" in "".join(res.output.replace("│", " ").split())
