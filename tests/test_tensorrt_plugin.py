"""vitmerge's TokenMerge plugins run through TensorRT's own ``tensorrt.plugin`` Python sources.

Each test runs for every TensorRT source tree ``make install`` fetched (10.16, the oldest supported and
the newest 10.x; 11.4): the real ``tensorrt_bindings/__init__.py`` and ``plugin/*.py`` on a
stand-in for the compiled module (tests/support/trt_standin.py; no GPU, no libnvinfer). The plugins are
registered through those sources, created from plugin fields built exactly as TensorRT's ONNX parser
builds them (every TokenMerge attribute is a STRING -> bytes + NUL), asked for output types, shapes
and type combinations as the builder asks, and enqueued on host buffers (the merge runs in Triton's
CPU interpreter). Outputs are compared with the float64 loop reference of tests/support/reference_tome.py.
"""
import contextlib
import importlib.abc
import importlib.util
import os
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from support import trt_standin
from support.reference_tome import bipartite_groups, merge_rows
from vitmerge import merging
from vitmerge.errors import EngineBuildError, ModelFileError, RuntimeMissingError
from vitmerge.plugins import tensorrt_plugin

SOURCES = trt_standin.available_sources()
NO_SOURCES = ("TensorRT's Python sources not found: `make install` fetches the tensorrt-cu12/cu13-bindings wheels "
              "(about 1.2 MB each, from PyPI) into .venv/trt-bindings/; or set VITMERGE_TRT_BINDINGS to such a folder")
# the supported versions (older source trees, if a folder still holds them, only serve the refusal tests)
VERSIONS = sorted((v for v in SOURCES if trt_standin.version_tuple(v) >= tensorrt_plugin.SUPPORTED[0]),
                  key=trt_standin.version_tuple) or [pytest.param(None, marks=pytest.mark.skip(reason=NO_SOURCES))]
HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None


@pytest.fixture(params=VERSIONS)
def trt(request):
    """(tensorrt, tensorrt.plugin) of one TensorRT version: its real Python sources on the stand-in."""
    with trt_standin.loaded(SOURCES[request.param]) as mods:
        yield mods


@pytest.fixture
def host_buffers(monkeypatch):
    """Run the plugins' impl on host memory: Triton's CPU interpreter, no CUDA stream."""
    if not HAS_TRITON:
        pytest.skip("triton not installed (pip install triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    class HostArray:  # the Tensor's own __cuda_array_interface__, read as host memory
        def __init__(self, t):
            desc = dict(t.__cuda_array_interface__)
            desc.pop("stream", None)
            self.__array_interface__ = desc

    monkeypatch.setattr(tensorrt_plugin, "_as_torch", lambda t: torch.from_numpy(np.asarray(HostArray(t))))
    monkeypatch.setattr(tensorrt_plugin, "_on_stream", lambda stream: contextlib.nullcontext())


# ---------------------------------------------------------------------------------------------
# ONNX nodes and what the parser and builder do with them
# ---------------------------------------------------------------------------------------------


def _model(N, C, D, r, protected, method="tome", options="{}", cls=False, dtype=TensorProto.FLOAT):
    ins = [helper.make_tensor_value_info("x", dtype, ["B", N, D]),
           helper.make_tensor_value_info("metric", dtype, ["B", N, C]),
           helper.make_tensor_value_info("size", dtype, ["B", N, 1])]
    if cls:
        ins.append(helper.make_tensor_value_info("cls_attn", dtype, ["B", N]))
    node = helper.make_node("TokenMergeCls" if cls else "TokenMerge", [i.name for i in ins], ["x_out", "size_out"],
                            name="merge0", domain="vitmerge", r=str(r), protected=str(protected), method=method,
                            options=options)
    outs = [helper.make_tensor_value_info("x_out", dtype, ["B", N - r, D]),
            helper.make_tensor_value_info("size_out", dtype, ["B", N - r, 1])]
    return helper.make_model(helper.make_graph([node], "tm", ins, outs),
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("vitmerge", 1)])


def _prepared_node(model):
    """The node as TensorRT's parser sees it: after prepare_onnx (plugin_namespace added)."""
    return onnx.load_from_string(tensorrt_plugin.prepare_onnx(model)).graph.node[0]


def _creator(trt_mod, node):
    ns = helper.get_attribute_value(next(a for a in node.attribute if a.name == "plugin_namespace")).decode()
    creator = trt_mod.get_plugin_registry().get_creator(node.op_type, "1", ns)
    assert creator is not None, f"no creator for {node.op_type} in namespace {ns!r}"
    return creator, ns


def _create(trt_mod, node, request=None):
    """creator.create_plugin as the ONNX parser calls it, from the parser's fields."""
    creator, ns = _creator(trt_mod, node)
    fc = trt_mod.PluginFieldCollection(trt_standin.parser_fields(trt_mod, node, creator.field_names))
    args = [node.op_type, ns, fc, trt_mod.TensorRTPhase.BUILD]  # plugin name (tensorrt.plugin looks up ns::name)
    if hasattr(trt_mod, "QuickPluginCreationRequest"):
        args.append(trt_mod.QuickPluginCreationRequest.UNKNOWN if request is None else request)
    return creator.create_plugin(*args)


def _desc(trt_mod, a):
    d = trt_mod.PluginTensorDesc()
    d.dims = trt_mod.Dims(a.shape)
    d.type = {np.dtype(np.float32): trt_mod.float32, np.dtype(np.float16): trt_mod.float16}[a.dtype]
    d.format, d.scale = trt_mod.TensorFormat.LINEAR, 1.0
    return d


def _enqueue(trt_mod, plugin, inputs, out_shapes, stream=0):
    """What TensorRT does at run time: descriptors, device pointers and element strides per I/O, the stream."""
    ins = [np.ascontiguousarray(a) for a in inputs]
    outs = [np.full(s, np.nan, dtype=ins[0].dtype) for s in out_shapes]
    strides = lambda a: tuple(s // a.itemsize for s in a.strides)  # noqa: E731
    plugin.enqueue([_desc(trt_mod, a) for a in ins], [_desc(trt_mod, o) for o in outs],
                   [a.ctypes.data for a in ins], [o.ctypes.data for o in outs],
                   [strides(a) for a in ins], [strides(o) for o in outs], stream)
    return outs


def _inputs(B, N, C, D, seed, dtype=np.float32):
    g = np.random.default_rng(seed)
    return (g.standard_normal((B, N, D)).astype(dtype), g.standard_normal((B, N, C)).astype(dtype),
            g.integers(1, 5, (B, N, 1)).astype(dtype))


def _tome_reference(x, metric, size, r, protected):
    """float64 loops: (x' [B, n_out, D], size' [B, n_out]). r = 0 merges nothing: tokens stay as they are."""
    if r == 0:
        return x.astype(np.float64), size[..., 0].astype(np.float64)
    xs, ss = [], []
    for b in range(x.shape[0]):
        _, groups = bipartite_groups(torch.from_numpy(metric[b]).double(), r, protected)
        rx, rs = merge_rows(torch.from_numpy(x[b]).double(), torch.from_numpy(size[b, :, 0]).double(), groups)
        xs.append(rx.numpy())
        ss.append(rs.numpy())
    return np.stack(xs), np.stack(ss)


@pytest.mark.parametrize("version", VERSIONS)
def test_standin_offers_what_that_compiled_module_offers(version):
    """The stand-in's version-dependent names match the names in that wheel's tensorrt.so (as `strings`
    shows them): the AOT plugin API from 10.9, BuilderFlag.FP16 / EXPLICIT_BATCH / calibrators in 10.x only."""
    import re

    so = (SOURCES[version] / "tensorrt_bindings" / "tensorrt.so").read_bytes()

    def in_so(name):
        return re.search(rb"(?<![\x20-\x7e])" + name.encode() + rb"(?![\x20-\x7e])", so) is not None

    m = trt_standin.compiled_module(version)
    checks = {"QuickPluginCreationRequest": hasattr(m, "QuickPluginCreationRequest"),
              "IPluginV3QuickAOTBuild": hasattr(m, "IPluginV3QuickAOTBuild"),
              "IInt8EntropyCalibrator2": hasattr(m, "IInt8EntropyCalibrator2"),
              "EXPLICIT_BATCH": hasattr(m.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"),
              "FP16": hasattr(m.BuilderFlag, "FP16"),
              "STRONGLY_TYPED": hasattr(m.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
              "IPluginCreatorV3Quick": hasattr(m, "IPluginCreatorV3Quick")}
    assert {k: in_so(k) for k in checks} == checks


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def test_registers_through_tensorrt_plugin(trt):
    """Item 1: the plugin module's annotations are classes, so tensorrt.plugin's validators take them."""
    trt_mod, trtp = trt
    assert tensorrt_plugin.register() == ("vitmerge::TokenMerge", "vitmerge::TokenMergeCls")
    assert tensorrt_plugin.register() == ("vitmerge::TokenMerge", "vitmerge::TokenMergeCls")  # idempotent
    for name in ("TokenMerge", "TokenMergeCls"):
        creator = trt_mod.get_plugin_registry().get_creator(name, "1", "vitmerge")
        fields = {f.name: f.type for f in creator.field_names}
        # what the ONNX parser will match the node's attributes against
        # every attribute is text: the one field type every supported TensorRT reads right on Python 3.11-3.13
        assert fields == {"r": trt_mod.PluginFieldType.CHAR, "protected": trt_mod.PluginFieldType.CHAR,
                          "method": trt_mod.PluginFieldType.CHAR, "options": trt_mod.PluginFieldType.CHAR}
    assert not [m for s, m in trt_mod.log_messages if s == trt_mod.ILogger.Severity.ERROR]  # no duplicate creators


def test_registration_refused_by_tensorrt_is_one_clear_error(trt, monkeypatch):
    """tensorrt.plugin's own exception for a definition it rejects becomes one EngineBuildError line.
    Here the rejected definition is the old module's: string annotations (from __future__ import annotations)."""
    trt_mod, trtp = trt

    def old_style(trtp_):
        @trtp_.register("vitmerge::TokenMerge")
        def _desc(x: "trtp.TensorDesc", r: "int") -> "trtp.TensorDesc":
            return x.like()

    monkeypatch.setattr(tensorrt_plugin, "_define_token_merge", old_style)
    with pytest.raises(EngineBuildError, match=r"tensorrt\.plugin rejected the vitmerge::TokenMerge plugin") as e:
        tensorrt_plugin.register()
    assert "\n" not in str(e.value) and trt_mod.__version__ in str(e.value)


def test_registration_refusal_quotes_the_error_on_one_line(trt, monkeypatch):
    """The refusal's own text, whitespace collapsed to one line, after its type; a text-less one by its type alone."""
    trt_mod, _ = trt

    def refusing(text):
        def define(trtp_):
            raise ValueError(text)
        return define

    head = f"TensorRT {trt_mod.__version__}'s tensorrt.plugin rejected the vitmerge::TokenMerge plugin "
    tail = "; use TensorRT 10.16 to 11.x or use the default plugin-free file (vitmerge export)"
    monkeypatch.setattr(tensorrt_plugin, "_define_token_merge", refusing("annotation of 'r':\n    must be a class,  not str"))
    with pytest.raises(EngineBuildError) as e:
        tensorrt_plugin.register()
    assert str(e.value) == head + "(ValueError: annotation of 'r': must be a class, not str)" + tail
    monkeypatch.setattr(tensorrt_plugin, "_define_token_merge", refusing(""))
    with pytest.raises(EngineBuildError) as e:
        tensorrt_plugin.register()
    assert str(e.value) == head + "(ValueError)" + tail


def test_register_after_a_refusal_defines_what_is_still_missing(trt, monkeypatch):
    """TokenMerge defined, TokenMergeCls refused: a later register() skips the first and defines the second."""
    trt_mod, _ = trt
    registry = trt_mod.get_plugin_registry()
    define_cls = tensorrt_plugin._define_token_merge_cls

    def refuse(trtp_):
        raise TypeError("refused")

    monkeypatch.setattr(tensorrt_plugin, "_define_token_merge_cls", refuse)
    with pytest.raises(EngineBuildError, match=r"rejected the vitmerge::TokenMergeCls plugin \(TypeError: refused\)"):
        tensorrt_plugin.register()
    assert registry.get_creator("TokenMerge", "1", "vitmerge") is not None
    assert registry.get_creator("TokenMergeCls", "1", "vitmerge") is None
    monkeypatch.setattr(tensorrt_plugin, "_define_token_merge_cls", define_cls)
    assert tensorrt_plugin.register() == ("vitmerge::TokenMerge", "vitmerge::TokenMergeCls")
    assert registry.get_creator("TokenMergeCls", "1", "vitmerge") is not None
    assert not [m for s, m in trt_mod.log_messages if s == trt_mod.ILogger.Severity.ERROR]  # TokenMerge not defined twice


def test_unsupported_or_missing_tensorrt_is_a_clear_error():
    with trt_standin.fake_tensorrt("10.3.0"):
        with pytest.raises(RuntimeMissingError, match=r"TensorRT 10\.3\.0 is not supported.*10\.16 to 11\.x"):
            tensorrt_plugin.register()
    with trt_standin.fake_tensorrt("10.16.1.11"):  # a tensorrt without its tensorrt.plugin package
        with pytest.raises(RuntimeMissingError, match="tensorrt.plugin module cannot be imported"):
            tensorrt_plugin.register()


def test_missing_tensorrt_message_in_full(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(RuntimeMissingError) as e:
        tensorrt_plugin.require_tensorrt()
    assert str(e.value) == ("TensorRT not installed: TensorRT engines need an NVIDIA GPU machine with TensorRT 10.16 to "
                            "11.x (pip install 'vitmerge[tensorrt]'); run the ONNX file in ONNX Runtime instead")


def test_unsupported_tensorrt_messages_in_full(monkeypatch):
    """Below 10.16 (10.8-10.15 with the reason: NumPy 2 corrupts their string fields), 12.0 itself (the range ends
    before it) and a tensorrt without a version are refused, whole text; a tensorrt.plugin that fails to import is
    quoted on one line."""
    def unsupported(shown, why=""):
        return (f"TensorRT {shown} is not supported by the TokenMerge plugin (needs TensorRT 10.16 to 11.x){why}: pip "
                "install 'vitmerge[tensorrt]', or use the default plugin-free file (vitmerge export)")

    for version, why in (("10.7.1", ""), ("12.0.0", ""), ("10.8.0.43", f" ({tensorrt_plugin.WHY_10_16})"),
                         ("10.15.1", f" ({tensorrt_plugin.WHY_10_16})")):
        with trt_standin.fake_tensorrt(version):
            with pytest.raises(RuntimeMissingError) as e:
                tensorrt_plugin.require_plugin_api()
        assert str(e.value) == unsupported(version, why)
    with trt_standin.fake_tensorrt("10.16.1.11") as m:
        del m.__version__
        with pytest.raises(RuntimeMissingError) as e:
            tensorrt_plugin.require_plugin_api()
    assert str(e.value) == unsupported("?")

    class BrokenPlugin(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # tensorrt.plugin's import fails
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "tensorrt.plugin" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise OSError("libnvrtc.so.12: cannot open shared object file:\n    No such file or directory")

    with trt_standin.fake_tensorrt("10.16.1.11") as m, monkeypatch.context() as mp:
        m.__path__ = []  # a package, as the real tensorrt is
        mp.setattr(sys, "meta_path", [BrokenPlugin(), *sys.meta_path])
        with pytest.raises(RuntimeMissingError) as e:
            tensorrt_plugin.require_plugin_api()
    assert str(e.value) == ("TensorRT 10.16.1.11's tensorrt.plugin module cannot be imported (OSError: libnvrtc.so.12: "
                            "cannot open shared object file: No such file or directory); reinstall TensorRT (pip install "
                            "'vitmerge[tensorrt]') or use the default plugin-free file (vitmerge export)")


def test_tensorrt_version_reads_major_minor_or_zero():
    """(major, minor) from __version__; (0, 0), below every release, when there is none or it is not numeric."""
    assert tensorrt_plugin.tensorrt_version(types.SimpleNamespace(__version__="10.16.1.11")) == (10, 16)
    assert tensorrt_plugin.tensorrt_version(types.SimpleNamespace()) == (0, 0)
    assert tensorrt_plugin.tensorrt_version(types.SimpleNamespace(__version__="dev")) == (0, 0)


# ---------------------------------------------------------------------------------------------
# Created from the parser's fields, asked what the builder asks
# ---------------------------------------------------------------------------------------------


def test_created_from_parser_fields_describes_its_outputs(trt):
    """Every attribute as the parser hands a STRING over: bytes + NUL (r and protected as decimal text)."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    N, C, D, r = 17, 8, 24, 5
    node = _prepared_node(_model(N, C, D, r, 1, options="{}"))
    plugin = _create(trt_mod, node)
    f32, f16 = trt_mod.float32, trt_mod.float16
    assert list(plugin.get_output_data_types([f32, f32, f32], [3, 3, 3])) == [f32, f32]
    builder = trt_mod.IExprBuilder()

    def exprs(*dims):
        return trt_standin.dims_exprs(trt_mod, builder, *dims)

    out = plugin.get_output_shapes([exprs(None, N, D), exprs(None, N, C), exprs(None, N, 1)], [], builder)
    for b in (1, 7):
        assert [[e.evaluate({"batch": b}) for e in o] for o in out] == [[b, N - r, D], [b, N - r, 1]]
    # FP16 graphs: the outputs follow the inputs
    plugin16 = _create(trt_mod, node)
    assert list(plugin16.get_output_data_types([f16, f16, f16], [3, 3, 3])) == [f16, f16]


@pytest.mark.parametrize("cls", [False, True], ids=["TokenMerge", "TokenMergeCls"])
def test_type_combinations_the_builder_sees(trt, cls):
    """The autotune descriptor: all FP32, linear (never FP16: a weakly typed --fp16 build must not run the merge
    plan in half precision); the builder configures it and gets tactics."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    node = _prepared_node(_model(9, 4, 8, 2, 1, method="importance" if cls else "tome", cls=cls))
    network = trt_mod.Builder(trt_mod.Logger()).create_network(0)
    parser = trt_mod.OnnxParser(network, trt_mod.Logger())
    model = _model(9, 4, 8, 2, 1, method="importance" if cls else "tome", cls=cls)
    assert parser.parse(tensorrt_plugin.prepare_onnx(model)), [str(e) for e in parser.errors]
    (p,) = network.plugins
    assert p["op"] == node.op_type
    n_io = (4 if cls else 3) + 2
    err = trt_standin._drive_plugin(trt_mod, p, {"min": 1, "opt": 4, "max": 8})
    assert err is None
    assert p["combinations"] == [[trt_mod.float32] * n_io]
    assert p["tactics"] == []  # the default tactic only


@pytest.mark.parametrize("B,N,r,protected", [(2, 17, 4, 1), (3, 30, 7, 2), (1, 12, 0, 1), (2, 10, 3, 0)])
def test_enqueue_merges_like_the_loop_reference(trt, host_buffers, B, N, r, protected):
    """The whole path: parser fields -> create_plugin -> descriptors -> enqueue on TensorRT's buffers."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    C, D = 8, 24
    plugin = _create(trt_mod, _prepared_node(_model(N, C, D, r, protected)))
    plugin.get_output_data_types([trt_mod.float32] * 3, [3, 3, 3])
    x, metric, size = _inputs(B, N, C, D, seed=N + r)
    x_out, s_out = _enqueue(trt_mod, plugin, [x, metric, size], [(B, N - r, D), (B, N - r, 1)])
    ref_x, ref_s = _tome_reference(x, metric, size, r, protected)
    np.testing.assert_allclose(x_out, ref_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s_out[..., 0], ref_s)


def test_merge_runs_on_the_stream_tensorrt_gives(trt, host_buffers, monkeypatch):
    """enqueue's stream argument is the one the PyTorch work is put on."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    seen = []
    monkeypatch.setattr(tensorrt_plugin, "_on_stream", lambda stream: seen.append(stream) or contextlib.nullcontext())
    plugin = _create(trt_mod, _prepared_node(_model(9, 4, 8, 2, 1)))
    plugin.get_output_data_types([trt_mod.float32] * 3, [3, 3, 3])
    _enqueue(trt_mod, plugin, _inputs(1, 9, 4, 8, seed=2), [(1, 7, 8), (1, 7, 1)], stream=0x7E57)
    assert seen == [0x7E57]


def test_malformed_int_field_is_a_clear_error_at_the_builders_first_question(trt):
    """A node that reaches the parser without prepare_onnx's check with r an INT (a file of an older vitmerge):
    the parser hands r over as an int32 array, the plugin reads its bytes as text; asking the plugin for its
    outputs names the attribute and the way out."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    node = _model(9, 4, 8, 2, 1).graph.node[0]
    (i,) = [j for j, a in enumerate(node.attribute) if a.name == "r"]
    del node.attribute[i]
    node.attribute.extend([helper.make_attribute("r", 2), helper.make_attribute("plugin_namespace", "vitmerge")])
    plugin = _create(trt_mod, node)
    with pytest.raises(ModelFileError) as e:
        plugin.get_output_data_types([trt_mod.float32] * 3, [3, 3, 3])
    assert str(e.value) == ("TokenMerge attribute 'r' must be an integer, got '\\x02'; "
                            "re-create the plugin form with vitmerge export --merge-op plugin")


def test_serialized_plugin_deserializes_and_runs_the_same(trt, host_buffers):
    """An engine stores the plugin's fields (get_fields_to_serialize) and re-creates it at load time
    (phase RUNTIME): strings then come back without the parser's NUL, r as the int32 array."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    B, N, C, D, r = 2, 13, 4, 16, 3
    node = _prepared_node(_model(N, C, D, r, 1))
    built = _create(trt_mod, node)
    built.get_output_data_types([trt_mod.float32] * 3, [3, 3, 3])
    fields = built.get_fields_to_serialize()
    by_name = {f.name: f for f in fields}
    assert set(by_name) == {"r", "protected", "method", "options"}
    creator, ns = _creator(trt_mod, node)
    loaded = creator.create_plugin(node.op_type, ns, fields, trt_mod.TensorRTPhase.RUNTIME)
    inputs = _inputs(B, N, C, D, seed=5)
    shapes = [(B, N - r, D), (B, N - r, 1)]
    a = _enqueue(trt_mod, built, inputs, shapes)
    b = _enqueue(trt_mod, loaded, inputs, shapes)
    ref_x, _ = _tome_reference(*inputs, r, 1)
    np.testing.assert_allclose(b[0], ref_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_options_and_class_attention_reach_the_merge(trt, host_buffers):
    """options JSON (bytes + NUL) reaches the method; TokenMergeCls passes its fourth input as cls_attn."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    B, N, C, D, r = 2, 15, 8, 12, 6
    x, metric, size = _inputs(B, N, C, D, seed=11)
    shapes = [(B, N - r, D), (B, N - r, 1)]
    opts = {"bits": 6, "rounds": 1, "seed": 3}
    node = _prepared_node(_model(N, C, D, r, 1, method="hash", options='{"bits": 6, "rounds": 1, "seed": 3}'))
    got = _enqueue(trt_mod, _create(trt_mod, node), [x, metric, size], shapes)
    want = merging.plan("hash", torch.from_numpy(metric), r, 1, **opts).merge(torch.from_numpy(x), torch.from_numpy(size))
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-5)
    default = merging.plan("hash", torch.from_numpy(metric), r, 1).merge(torch.from_numpy(x), torch.from_numpy(size))
    assert not np.allclose(default[0].numpy(), want[0].numpy())  # the options change the result: they got through

    # importance: the N-1-r most attended unprotected tokens stay, each other joins its most similar kept one
    cls = np.random.default_rng(4).random((B, N)).astype(np.float32)
    cls /= cls.sum(1, keepdims=True)
    node = _prepared_node(_model(N, C, D, r, 1, method="importance", cls=True))
    x_out, s_out = _enqueue(trt_mod, _create(trt_mod, node), [x, metric, size, cls], shapes)
    for b in range(B):
        keep = 1 + np.argsort(-cls[b, 1:].astype(np.float64), kind="stable")[: N - 1 - r]
        unit = metric[b].astype(np.float64) / np.linalg.norm(metric[b].astype(np.float64), axis=1, keepdims=True)
        w = size[b, :, 0].astype(np.float64) * np.maximum(cls[b].astype(np.float64), 1e-12)
        groups = {int(k): [int(k)] for k in keep}
        for i in sorted(set(range(1, N)) - set(groups)):
            groups[int(keep[np.argmax(unit[keep] @ unit[i])])].append(i)
        for j, k in enumerate(sorted(groups), start=1):
            g = groups[k]
            np.testing.assert_allclose(x_out[b, j], sum(x[b, i] * w[i] for i in g) / sum(w[i] for i in g),
                                       rtol=1e-5, atol=1e-5)
            assert s_out[b, j, 0] == sum(size[b, i, 0] for i in g)
        np.testing.assert_allclose(x_out[b, 0], x[b, 0], rtol=1e-6)


def test_jit_only(trt):
    """No AOT implementation: a parser or network that insists on one gets TensorRT's refusal; the
    default request (no `aot` attribute on the node) and PREFER_AOT fall back to the JIT plugin."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    node = _prepared_node(_model(9, 4, 8, 2, 1))
    assert not any(a.name == "aot" for a in node.attribute)
    assert hasattr(_create(trt_mod, node), "enqueue")  # the JIT plugin class
    if not hasattr(trt_mod, "QuickPluginCreationRequest"):
        pytest.skip(f"TensorRT {trt_mod.__version__} has no AOT plugin API")
    Q = trt_mod.QuickPluginCreationRequest
    assert hasattr(_create(trt_mod, node, Q.PREFER_AOT), "enqueue")
    with pytest.raises(ValueError, match="AOT implementation requested, but not defined"):
        _create(trt_mod, node, Q.STRICT_AOT)


# ---------------------------------------------------------------------------------------------
# The node's attributes (no TensorRT needed)
# ---------------------------------------------------------------------------------------------


def test_attribute_readers_take_every_form():
    assert tensorrt_plugin.int_attr("7", "r") == 7 and tensorrt_plugin.int_attr(b"16\x00", "r") == 16
    assert tensorrt_plugin.int_attr(np.frombuffer(b"12\x00", dtype=np.int8), "r") == 12
    int32 = np.array([7], dtype=np.int32)
    assert tensorrt_plugin.int_attr(int32, "r") == 7 and type(tensorrt_plugin.int_attr(int32, "r")) is int
    assert tensorrt_plugin.int_attr(np.int64(3), "r") == 3 and tensorrt_plugin.int_attr(4, "r") == 4
    assert tensorrt_plugin.str_attr("tome\x00", "method") == "tome"
    assert tensorrt_plugin.str_attr(np.frombuffer(b"hash\x00", dtype=np.int8), "method") == "hash"
    assert tensorrt_plugin.str_attr(b"{}", "options") == "{}"
    assert tensorrt_plugin.merge_attrs(int32, np.array([1], np.int32), "tome\x00", '{"a": 1}\x00') == (7, 1, "tome", {"a": 1})
    with pytest.raises(ModelFileError, match="'r' must be one integer"):
        tensorrt_plugin.int_attr(np.array([1, 2], np.int32), "r")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        tensorrt_plugin.merge_attrs(1, 1, "tome", "{'a': 1}")
    with pytest.raises(ModelFileError, match="must be a JSON object"):
        tensorrt_plugin.merge_attrs(1, 1, "tome", "[1]")
    with pytest.raises(ModelFileError, match="not a vitmerge method"):
        tensorrt_plugin.merge_attrs(1, 1, "nope\x00", "{}")


def test_attribute_errors_name_the_attribute_in_full():
    """Each reader's error names the attribute it read and says what to do; the whole text is checked."""
    redo = "; re-create the plugin form with vitmerge export --merge-op plugin"

    def error(fn, *args):
        with pytest.raises(ModelFileError) as e:
            fn(*args)
        return str(e.value)

    assert error(tensorrt_plugin.int_attr, 2.5, "r") == "TokenMerge attribute 'r' must be one integer, got 2.5" + redo
    assert error(tensorrt_plugin.merge_attrs, 2.5, 1, "tome", "{}") == \
        "TokenMerge attribute 'r' must be one integer, got 2.5" + redo
    assert error(tensorrt_plugin.merge_attrs, 2, "x1", "tome", "{}") == \
        "TokenMerge attribute 'protected' must be an integer, got 'x1'" + redo
    assert error(tensorrt_plugin.int_attr, b"2.5\x00", "r") == "TokenMerge attribute 'r' must be an integer, got '2.5'" + redo
    for r, p in ((-1, 1), (2, -1)):  # either one negative is enough
        assert error(tensorrt_plugin.merge_attrs, r, p, "tome", "{}") == \
            f"TokenMerge attributes r={r}, protected={p} must not be negative"
    # a bad byte first, then 50 more: the message quotes the first 40 bytes
    assert error(tensorrt_plugin.merge_attrs, 2, 1, b"\xff" + b"a" * 50, "{}") == \
        "TokenMerge attribute 'method' is not UTF-8 text (b'\\xff" + "a" * 39 + "')"
    assert error(tensorrt_plugin.merge_attrs, 2, 1, "tome", b"{\xff}") == \
        "TokenMerge attribute 'options' is not UTF-8 text (b'{\\xff}')"
    assert error(tensorrt_plugin.str_attr, 5, "method") == "TokenMerge attribute 'method' must be a string, got 5"
    assert error(tensorrt_plugin.merge_attrs, 2, 1, "nope\x00", "{}") == (
        f"TokenMerge attribute method='nope' is not a vitmerge method ({', '.join(merging.available_methods())}); "
        "the file was written by another vitmerge: re-export it")


def test_attribute_values_at_their_edges():
    """protected = 0 (no class token) is valid; empty options (the parser's lone NUL) mean no options; only
    NULs are stripped from a string's end."""
    assert tensorrt_plugin.merge_attrs(2, 0, "tome", "{}") == (2, 0, "tome", {})
    assert tensorrt_plugin.merge_attrs(2, 1, "tome", "") == (2, 1, "tome", {})
    assert tensorrt_plugin.merge_attrs(2, 1, "tome", b"\x00") == (2, 1, "tome", {})
    assert tensorrt_plugin.str_attr(b"MAX\x00", "method") == "MAX"


def test_check_node_says_what_is_wrong_in_full():
    model = _model(9, 4, 8, 2, 1)
    node = model.graph.node[0]
    (i,) = [j for j, a in enumerate(node.attribute) if a.name == "method"]
    del node.attribute[i]
    with pytest.raises(ModelFileError) as e:
        tensorrt_plugin.check_node(node)
    assert str(e.value) == ("TokenMerge node 'merge0': attribute 'method' must be STRING, it is missing; "
                            "re-create the plugin form with vitmerge export --merge-op plugin")
    for cls, drop_input, drop_output, message in (
            (False, True, False, "has 2 inputs and 2 outputs; TokenMerge takes 3 and gives 2"),
            (False, False, True, "has 3 inputs and 1 outputs; TokenMerge takes 3 and gives 2"),
            (True, True, False, "has 3 inputs and 2 outputs; TokenMergeCls takes 4 and gives 2")):
        node = _model(9, 4, 8, 2, 1, method="importance" if cls else "tome", cls=cls).graph.node[0]
        if drop_input:
            del node.input[-1]
        if drop_output:
            del node.output[-1]
        with pytest.raises(ModelFileError) as e:
            tensorrt_plugin.check_node(node)
        assert str(e.value) == "TokenMerge node 'merge0' " + message


def test_prepare_onnx_twice_and_foreign_nodes():
    """A prepared model prepared again keeps one plugin_namespace; a TokenMerge op of another domain, or another
    op of the vitmerge domain, is not a TokenMerge node (not checked, not marked)."""
    once = onnx.load_from_string(tensorrt_plugin.prepare_onnx(_model(9, 4, 8, 2, 1)))
    twice = onnx.load_from_string(tensorrt_plugin.prepare_onnx(once))
    assert [a.name for a in twice.graph.node[0].attribute].count("plugin_namespace") == 1
    for field, value in (("domain", "com.example"), ("op_type", "TokenPrune")):
        model = _model(9, 4, 8, 2, 1, options="{not json")  # not a valid TokenMerge node: it must not be checked
        setattr(model.graph.node[0], field, value)
        assert tensorrt_plugin.token_merge_nodes(model) == [] and not tensorrt_plugin.has_token_merge(model)
        prepared = onnx.load_from_string(tensorrt_plugin.prepare_onnx(model))
        assert not any(a.name == "plugin_namespace" for a in prepared.graph.node[0].attribute)


def test_prepare_onnx_checks_nodes_before_tensorrt_sees_them():
    model = _model(9, 4, 8, 2, 1)
    prepared = onnx.load_from_string(tensorrt_plugin.prepare_onnx(model))
    attrs = {a.name: helper.get_attribute_value(a) for a in prepared.graph.node[0].attribute}
    assert attrs["plugin_namespace"] == b"vitmerge" and attrs["r"] == b"2" and "aot" not in attrs
    assert not any(a.name == "plugin_namespace" for a in model.graph.node[0].attribute)  # original untouched
    bad = _model(9, 4, 8, 2, 1, options="{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        tensorrt_plugin.prepare_onnx(bad)
    wrong = _model(9, 4, 8, 2, 1)
    node = wrong.graph.node[0]
    del node.attribute[0]  # r
    node.attribute.append(helper.make_attribute("r", 2))  # an INT, as an older vitmerge wrote it
    with pytest.raises(ModelFileError) as e:
        tensorrt_plugin.prepare_onnx(wrong)
    assert str(e.value) == ("TokenMerge node 'merge0': attribute 'r' must be STRING, it is INT (an INT r / protected: "
                            "the file was written by an older vitmerge); re-create the plugin form with vitmerge export "
                            "--merge-op plugin")


# ---------------------------------------------------------------------------------------------
# A real exported model in plugin form
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_form(tmp_path_factory, one_torch_thread):
    """A tiny timm ViT merged with ToMe (r = 4 in both blocks), exported and rewritten to the plugin form."""
    import timm

    import vitmerge
    from vitmerge.exporter import surgery

    d = tmp_path_factory.mktemp("plugin_form")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    vitmerge.apply(model, r=4)
    src = vitmerge.export(model, d / "t.onnx", check=False, merge_op="standard").path
    surgery.rewrite(src, d / "tp.onnx", "plugin")
    return onnx.load(str(d / "tp.onnx"))


@pytest.mark.slow
def test_exported_plugin_form_parses_and_runs(trt, host_buffers, plugin_form):
    """surgery's plugin form, prepared for TensorRT, through the parser emulation: every TokenMerge node
    becomes a plugin with N - r tokens out, and runs the loop reference's merge on its real shapes."""
    trt_mod, _ = trt
    tensorrt_plugin.register()
    network = trt_mod.Builder(trt_mod.Logger()).create_network(0)
    parser = trt_mod.OnnxParser(network, trt_mod.Logger())
    assert parser.parse(tensorrt_plugin.prepare_onnx(plugin_form)), [str(e) for e in parser.errors]
    assert [p["op"] for p in network.plugins] == ["TokenMerge", "TokenMerge"]
    n = 17  # 16 patches + class token
    for p in network.plugins:
        (xe, me, se), (xo, so) = p["input_exprs"], p["output_exprs"]
        N, D, C = xe[1].value, xe[2].value, me[2].value
        assert N == n and xo[1].evaluate({"batch": 2}) == n - 4 and so[1].evaluate({"batch": 2}) == n - 4
        x, metric, size = _inputs(2, N, C, D, seed=N)
        got_x, got_s = _enqueue(trt_mod, p["plugin"], [x, metric, size], [(2, N - 4, D), (2, N - 4, 1)])
        ref_x, ref_s = _tome_reference(x, metric, size, 4, 1)
        np.testing.assert_allclose(got_x, ref_x, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got_s[..., 0], ref_s)
        n -= 4


# ---------------------------------------------------------------------------------------------
# What the compiled module does with NumPy 2 (item 1 of the second TensorRT reading)
# ---------------------------------------------------------------------------------------------


def test_string_field_probe_sees_numpy_abi_corruption(monkeypatch):
    """TensorRT 10.8-10.15's tensorrt.so (pybind11 < 2.12) reads NumPy 2 arrays with an item size of 0: every
    element of PluginField.data repeats element 0. The probe tells such a module from a NumPy-2-aware one, and the
    plugin refuses to register on it, saying why and what to install."""
    with trt_standin.fake_tensorrt("10.16.1.11") as m:
        assert tensorrt_plugin.string_fields_intact(m)  # the stand-in, like 10.16: bytes come back as they went in

        real = m.PluginField

        class NumPy1Layout(real):  # what 10.8-10.15 return under NumPy 2
            @property
            def data(self):
                d = np.asarray(real.data.fget(self))
                return np.full_like(d, d.reshape(-1)[0])

        monkeypatch.setattr(m, "PluginField", NumPy1Layout)
        assert NumPy1Layout("m", np.frombuffer(b"tome\x00", np.int8).copy(), m.PluginFieldType.CHAR).data.tobytes() == b"ttttt"
        assert not tensorrt_plugin.string_fields_intact(m)
        with pytest.raises(RuntimeMissingError) as e:
            tensorrt_plugin.require_plugin_api()
    assert str(e.value) == (
        f"TensorRT 10.16.1.11's PluginField returns string data corrupted under NumPy {np.__version__} "
        f"({tensorrt_plugin.WHY_10_16}): install a NumPy-2-aware TensorRT (pip install 'tensorrt>=10.16'), or use "
        "the default plugin-free file (vitmerge export)")


def _python313():
    """An interpreter of Python 3.13 with numpy and onnx: VITMERGE_PY313, or the venv `make install` makes."""
    import shutil

    cand = os.environ.get("VITMERGE_PY313") or str(trt_standin.REPO / ".venv313" / "bin" / "python")
    return cand if shutil.which(cand) or os.path.isfile(cand) else None


def test_plugin_registers_under_python_313():
    """Item 2 of the second TensorRT reading: on Python 3.13, TensorRT 10.9-10.16's validators call issubclass on
    every annotation; the plugin's attributes are plain str, so registration, creation from the parser's fields
    and the output shapes work there too, for every fetched TensorRT version (tests/support/plugin_py313_check.py)."""
    import subprocess

    py = _python313()
    if py is None:
        pytest.skip("no Python 3.13 with numpy and onnx: `make install` makes .venv313 where a python3.13 exists "
                    "(pyenv or PATH), or set VITMERGE_PY313")
    if not SOURCES:
        pytest.skip(NO_SOURCES)
    out = subprocess.run([py, str(trt_standin.REPO / "tests" / "support" / "plugin_py313_check.py")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines and all(ln.startswith("OK ") and "(Python 3.13" in ln for ln in lines), out.stdout
    assert {ln.split()[1] for ln in lines} == {v for v in SOURCES if trt_standin.version_tuple(v) >= (10, 16)}
