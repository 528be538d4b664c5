"""Run under another Python (3.13): register vitmerge's TokenMerge plugins through TensorRT's own
``tensorrt.plugin`` sources of every fetched version, create them from the ONNX parser's fields and ask
for their outputs, as the builder does. Prints one ``OK <version>`` or ``FAIL <version>: <error>`` line
per TensorRT version; exit 1 on any FAIL.

Needs numpy and onnx only (no torch): what the plugin does at registration, creation and shape inference.
tests/test_tensorrt_plugin.py::test_plugin_registers_under_python_313 runs it (TensorRT 10.9-10.16's
validators call ``issubclass`` on every annotation, a TypeError on Python >= 3.13 for a
``numpy.typing.NDArray[...]`` one: the plugin declares plain ``str`` attributes).
"""
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]  # tests/ (for `support`) and the repository root

import numpy as np  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from support import trt_standin  # noqa: E402
from vitmerge.plugins import tensorrt_plugin  # noqa: E402


def node(r=5, protected=1, N=17, C=8, D=24):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", N, w]) for n, w in (("x", D), ("metric", C), ("size", 1))]
    n = helper.make_node("TokenMerge", [i.name for i in ins], ["x_out", "size_out"], name="merge0", domain="vitmerge",
                         r=str(r), protected=str(protected), method="tome", options="{}")
    n.attribute.append(helper.make_attribute("plugin_namespace", "vitmerge"))
    return n


def check(version: str, folder: Path) -> None:
    with trt_standin.loaded(folder) as (trt, trtp):
        assert tensorrt_plugin.register() == tensorrt_plugin.PLUGIN_IDS
        nd = node()
        creator = trt.get_plugin_registry().get_creator("TokenMerge", "1", "vitmerge")
        fc = trt.PluginFieldCollection(trt_standin.parser_fields(trt, nd, creator.field_names))
        args = [nd.op_type, "vitmerge", fc, trt.TensorRTPhase.BUILD]
        if hasattr(trt, "QuickPluginCreationRequest"):
            args.append(trt.QuickPluginCreationRequest.UNKNOWN)
        plugin = creator.create_plugin(*args)
        f32 = trt.float32
        assert list(plugin.get_output_data_types([f32] * 3, [3, 3, 3])) == [f32, f32]
        builder = trt.IExprBuilder()
        exprs = [trt_standin.dims_exprs(trt, builder, None, 17, w) for w in (24, 8, 1)]
        out = plugin.get_output_shapes(exprs, [], builder)
        got = [[e.evaluate({"batch": 3}) for e in o] for o in out]
        assert got == [[3, 12, 24], [3, 12, 1]], got
        assert tensorrt_plugin.int_attr(np.frombuffer(b"5\x00", np.int8), "r") == 5


def main() -> int:
    sources = trt_standin.available_sources()
    if not sources:
        print("NONE: no TensorRT Python sources found")
        return 1
    bad = 0
    for version in sorted(sources, key=trt_standin.version_tuple):
        if trt_standin.version_tuple(version) < tensorrt_plugin.SUPPORTED[0]:
            continue
        try:
            check(version, sources[version])
            print(f"OK {version} (Python {sys.version.split()[0]})")
        except Exception as e:  # noqa: BLE001 - reported, then exit 1
            bad += 1
            print(f"FAIL {version}: {type(e).__name__}: {e}")
            traceback.print_exc()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
