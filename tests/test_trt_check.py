"""``vitmerge check F.onnx --target tensorrt``: the static TensorRT readiness check (issue 10, item 12).

Every rule is hit by a small hand-built graph, next to a graph that differs only in what the rule
is about and passes; the exports of every method are checked in tests/test_portability.py.
"""
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from vitmerge.cli import app
from vitmerge.errors import ModelFileError, ModelNotFoundError
from vitmerge.exporter import trt_check
from vitmerge.exporter.trt_check import check_tensorrt
from vitmerge.merging.topk import TOPK_LIMIT

runner = CliRunner()
F, L = TensorProto.FLOAT, TensorProto.INT64


def model(nodes, inputs, outputs, initializers=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def findings(m):
    return [(f.op, f.node, f.reason) for f in check_tensorrt(m).findings]


def topk_model(k, n=5000, sorted_=1, dtype=F, k_const=True):
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top", axis=-1, sorted=sorted_)]
    inputs = [vi("x", dtype, [2, n])]
    inits = [const("k", [k])] if k_const else []
    if not k_const:
        inputs.append(vi("k", L, [1]))
    return model(nodes, inputs, [vi("v", dtype, [2, k]), vi("i", L, [2, k])], inits)


# ---------------------------------------------------------------- clean graphs pass


def test_clean_graph_passes():
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
               helper.make_node("Relu", ["y"], ["z"], name="relu")],
              [vi("x", F, [2, 3])], [vi("z", F, [2, 4])], [const("w", np.ones((3, 4)), np.float32)])
    report = check_tensorrt(m)
    assert report.ok and report.findings == [] and report.nodes == 2
    assert "96e781103cfc4adf4a6bb557e94bac8e693f6f4c" in report.table


# ---------------------------------------------------------------- DOUBLE


def test_double_cast_and_tensors():
    m = model([helper.make_node("Cast", ["x"], ["d"], name="to64", to=TensorProto.DOUBLE),
               helper.make_node("Mul", ["d", "d"], ["dd"], name="square"),
               helper.make_node("Cast", ["dd"], ["y"], name="to32", to=F)],
              [vi("x", F, [4])], [vi("y", F, [4])])
    got = {node: reason for _, node, reason in findings(m)}
    assert set(got) == {"to64", "square", "to32"}  # every node that touches float64
    assert "to=DOUBLE" in got["to64"] and "no float64 layers" in got["square"]


def test_double_initializer_input_output_and_constant():
    m = model([helper.make_node("Constant", [], ["c"], name="c64", value=helper.make_tensor("v", TensorProto.DOUBLE, [1], [2.0])),
               helper.make_node("Add", ["x", "x"], ["y"], name="add")],
              [vi("x", TensorProto.DOUBLE, [1])], [vi("y", TensorProto.DOUBLE, [1])],
              [numpy_helper.from_array(np.zeros(3), "unused64")])
    got = {(op, node) for op, node, _ in findings(m)}
    assert got == {("Constant", "c64"), ("Add", "add"), ("initializer", "unused64")}


def test_double_inside_a_subgraph():
    body = helper.make_graph([helper.make_node("Cast", ["x"], ["b"], name="inner64", to=TensorProto.DOUBLE),
                              helper.make_node("Cast", ["b"], ["o"], name="inner32", to=F)], "body", [], [vi("o", F, [2])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["o2"], name="same")], "other", [], [vi("o2", F, [2])])
    m = model([helper.make_node("If", ["c"], ["y"], name="branch", then_branch=body, else_branch=other)],
              [vi("c", TensorProto.BOOL, []), vi("x", F, [2])], [vi("y", F, [2])])
    assert {node for _, node, _ in findings(m)} == {"inner64", "inner32"}


# ---------------------------------------------------------------- TopK


def test_topk_limit():
    assert findings(topk_model(TOPK_LIMIT)) == []
    (op, node, reason), = findings(topk_model(TOPK_LIMIT + 1))
    assert (op, node) == ("TopK", "top") and f"K={TOPK_LIMIT + 1}" in reason and "3840" in reason
    assert TOPK_LIMIT == trt_check.TOPK_MAX_K == 3839


def test_topk_sorted_and_runtime_k():
    (_, _, reason), = findings(topk_model(10, sorted_=0))
    assert "sorted=1" in reason
    (_, _, reason), = findings(topk_model(10, k_const=False))
    assert "computed at run time" in reason


def test_topk_key_types():
    assert findings(topk_model(10, dtype=L)) == []  # TensorRT 10 sorts INT64 keys
    (_, _, reason), = findings(topk_model(10, dtype=TensorProto.DOUBLE))
    assert "DOUBLE" in reason


# ---------------------------------------------------------------- Scatter reductions


def scatter_model(op, reduction=None):
    attrs = {} if reduction is None else {"reduction": reduction}
    if op == "ScatterND":
        idx = vi("i", L, [2, 1])
        upd = vi("u", F, [2, 3])
    else:
        idx = vi("i", L, [2, 3])
        upd = vi("u", F, [2, 3])
    return model([helper.make_node(op, ["x", "i", "u"], ["y"], name="sc", **attrs)],
                 [vi("x", F, [4, 3]), idx, upd], [vi("y", F, [4, 3])])


@pytest.mark.parametrize("op", ["ScatterElements", "ScatterND"])
def test_scatter_reductions(op):
    assert findings(scatter_model(op)) == []
    assert findings(scatter_model(op, "none")) == []
    (got_op, node, reason), = findings(scatter_model(op, "add"))
    assert (got_op, node) == (op, "sc") and "reduction='add'" in reason
    assert ("plugin" in reason and "TensorRT#3750" in reason) if op == "ScatterElements" else "#957" in reason


# ---------------------------------------------------------------- ops, types, constants, opset


def test_unsupported_and_unknown_ops():
    m = model([helper.make_node("Unique", ["x"], ["y"], name="uniq"),
               helper.make_node("MadeUpOp", ["x"], ["z"], name="madeup")],
              [vi("x", F, [4])], [vi("y", F, [None]), vi("z", F, [4])])
    got = {node: reason for _, node, reason in findings(m)}
    assert "marked N" in got["uniq"] and "not in TensorRT's ONNX operator table" in got["madeup"]


@pytest.mark.parametrize("op,dtype,bad", [
    ("Clip", L, True), ("Clip", F, False),  # TensorRT's Clip takes floats only
    ("Relu", L, False), ("Abs", L, False),  # these take INT64
    ("Floor", L, True), ("Softmax", L, True),  # floats only (the types are read as declared)
])
def test_int64_where_it_matters(op, dtype, bad):
    m = model([helper.make_node(op, ["x"], ["y"], name="n")], [vi("x", dtype, [4])], [vi("y", dtype, [4])])
    got = findings(m)
    if bad:
        (_, _, reason), = got
        assert "INT64 input 'x'" in reason and "FP32, FP16, BF16" in reason
    else:
        assert got == []


def test_cumsum_int64_and_computed_axes():
    m = model([helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")],
              [vi("x", L, [4])], [vi("y", L, [4])], [const("axis", 0)])
    (_, _, reason), = findings(m)
    assert "INT64" in reason and "CumSum" in reason
    m = model([helper.make_node("Shape", ["x"], ["s"], name="shape"),
               helper.make_node("Slice", ["s", "zero", "one"], ["ax"], name="slice"),
               helper.make_node("ReduceSum", ["x", "ax"], ["y"], name="rs", keepdims=0)],
              [vi("x", F, [4, 4])], [vi("y", F, None)], [const("zero", [0]), const("one", [1])])
    got = {node: reason for _, node, reason in findings(m)}
    assert set(got) == {"rs"} and "needs it as an initializer" in got["rs"]


def test_opset_outside_tensorrt_range():
    m = model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", F, [2])], [vi("y", F, [2])], opset=8)
    (op, _, reason), = findings(m)
    assert op == "model" and "opset 8" in reason


def test_unnamed_nodes_are_named_by_their_output():
    m = model([helper.make_node("Clip", ["x"], ["clipped"])], [vi("x", L, [4])], [vi("clipped", L, [4])])
    (_, node, _), = findings(m)
    assert "clipped" in node


# ---------------------------------------------------------------- custom domains and plugins


def custom_model(domain, op, **attrs):
    return model([helper.make_node(op, ["x"], ["y"], name="custom", domain=domain, **attrs)],
                 [vi("x", F, [2, 3])], [vi("y", F, [2, 3])], extra_opsets=[helper.make_opsetid(domain, 1)])


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_tokenmerge_needs_its_plugin(no_tensorrt):
    (op, node, reason), = findings(custom_model("vitmerge", "TokenMerge", r=2))
    assert (op, node) == ("vitmerge::TokenMerge", "custom")
    assert "TokenMerge TensorRT plugin" in reason and "TensorRT is not installed" in reason


def test_other_custom_domains(no_tensorrt):
    (op, _, reason), = findings(custom_model("com.example", "Fancy"))
    assert op == "com.example::Fancy" and "plugin named 'Fancy'" in reason
    (_, _, reason), = findings(custom_model("ai.onnx.ml", "LabelEncoder"))
    assert "ONNX-ML" in reason


def _fake_tensorrt(monkeypatch, registered):
    """A stand-in `tensorrt` module whose plugin registry knows ``registered`` (name, namespace) pairs."""
    class Registry:
        def get_creator(self, name, version, namespace=""):
            return object() if (name, namespace) in registered and version == "1" else None

    fake = types.SimpleNamespace(__version__="10.9-fake", get_plugin_registry=Registry)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)


def test_registered_plugin_is_a_note_not_a_finding(monkeypatch):
    _fake_tensorrt(monkeypatch, {("TokenMerge", "vitmerge")})
    report = check_tensorrt(custom_model("vitmerge", "TokenMerge"))
    assert report.ok and len(report.notes) == 1 and "registered in this process" in report.notes[0]
    report = check_tensorrt(custom_model("vitmerge", "TokenMergeCls"))  # installed, but this one is not registered
    (f,) = report.findings
    assert "not registered in this process" in f.reason and "10.9-fake" in f.reason


# ---------------------------------------------------------------- files and the CLI


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no ONNX file"):
        check_tensorrt(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        check_tensorrt(bad)


def test_cli_readiness(tmp_path):
    clean, dirty = tmp_path / "clean.onnx", tmp_path / "dirty.onnx"
    onnx.save(topk_model(100), str(clean))
    m = topk_model(TOPK_LIMIT + 161)
    m.graph.node.append(helper.make_node("Cast", ["v"], ["v64"], name="cast64", to=TensorProto.DOUBLE))
    m.graph.output.append(vi("v64", TensorProto.DOUBLE, [2, TOPK_LIMIT + 161]))
    onnx.save(m, str(dirty))

    res = runner.invoke(app, ["check", str(clean), "--target", "tensorrt"])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output
    res = runner.invoke(app, ["check", str(dirty), "--target", "tensorrt"])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("TopK", "Cast"))]
    assert len(lines) == 2  # one line per offending node: the TopK, the Cast
    assert lines[0].startswith("TopK  top: K=4000 > 3839") and "cast64" in lines[1] and "FAILED" in res.output


def test_cli_argument_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(topk_model(10), str(path))
    res = runner.invoke(app, ["check", str(path), "--target", "openvino"])
    assert res.exit_code == 2 and "unknown --target" in res.output
    res = runner.invoke(app, ["check", str(path)])
    assert res.exit_code == 2 and "give two files" in res.output
    res = runner.invoke(app, ["check", str(path), str(path), "--target", "tensorrt"])
    assert res.exit_code == 2 and "checks one file" in res.output
    res = runner.invoke(app, ["check", str(tmp_path / "nope.onnx"), "--target", "tensorrt"])
    assert res.exit_code == 2 and "no ONNX file" in res.output
