"""A stand-in for TensorRT's compiled Python module, so that TensorRT's own Python sources run here.

There is no GPU and no TensorRT library on the machines these tests run on. TensorRT's Python package
is two parts: the compiled bindings (``tensorrt_bindings/tensorrt.so``, which needs libnvinfer and a
GPU) and plain Python on top of them: ``tensorrt_bindings/__init__.py`` and the whole
``tensorrt.plugin`` package (``tensorrt_bindings/plugin/*.py``), which registers plugins, parses their
signatures, creates them from plugin fields and answers TensorRT's descriptor calls. The
``tensorrt-cu12-bindings`` (10.x) and ``tensorrt-cu13-bindings`` (11.x) wheels hold those sources;
``make install`` puts them under ``.venv/trt-bindings/<version>/``.

:func:`loaded` puts :func:`compiled_module` where the ``.so`` would be and imports the *real* Python
sources of one version on top of it, as ``tensorrt`` / ``tensorrt.plugin`` (what the ``tensorrt``
meta-package does with ``from tensorrt_bindings import *``). :func:`fake_tensorrt` installs the
stand-in alone (for build and runner logic that does not touch ``tensorrt.plugin``).

What the stand-in reproduces, and where from:

* ``PluginField``: pybind's ``(name, buffer, type)`` constructor keeps the buffer and its *element*
  count; ``.data`` returns that many elements of the field's type as a new array (TensorRT's
  ``pyPlugin.cpp``: ``py::array(self.length, static_cast<T const*>(self.data))``; CHAR is ``char``, int8).
* :func:`parser_fields`: the fields TensorRT's ONNX parser builds for a plugin node (onnx-tensorrt
  ``loadFields``): for each field the creator declares that the node has, INT -> one-element int32
  array, STRING -> the bytes plus a terminating NUL counted in the length; declared fields the node
  lacks are skipped, node attributes the creator does not declare (``plugin_namespace``) are not passed.
* Shape expressions: ``IExprBuilder.constant``/``operation`` over ``IDimensionExpr`` (constants fold,
  the batch stays symbolic); like the bindings, ``operation`` takes only dimension expressions.
* Version features (checked against the names in each wheel's ``tensorrt.so``): the AOT plugin API
  (``QuickPluginCreationRequest``, ``IPluginV3QuickAOTBuild``) from 10.9; ``BuilderFlag.FP16``/``INT8``,
  ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` and the INT8 calibrators in 10.x only.
* Builder / parser / engine: enough of a network for ``vitmerge build`` and ``TrtRunner``. The parser
  maps graph inputs and outputs, and hands every non-ONNX node to the plugin registry as TensorRT's
  parser does (op = plugin name, ``plugin_namespace``, version "1"), creating the plugin and asking it
  for output types and shapes. The builder refuses precision flags on strongly typed networks, walks
  every plugin through ``get_supported_format_combinations`` / ``configure_plugin`` /
  ``get_valid_tactics`` with the profile's shapes, and serializes a JSON "engine". The engine
  computes one thing, the mean over H and W of each input channel (the tests' tiny ONNX graph), on
  host memory at the addresses bound to each execution context.
"""
from __future__ import annotations

import contextlib
import ctypes
import enum
import importlib
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BINDINGS_ENV = "VITMERGE_TRT_BINDINGS"
STANDIN_MAGIC = "vitmerge-standin-engine"


# ============================================================================================
# Where the real sources are
# ============================================================================================


def bindings_roots() -> List[Path]:
    """Folders that may hold ``<version>/tensorrt_bindings`` (``make install`` fills the first)."""
    roots = []
    if os.environ.get(BINDINGS_ENV):
        roots.append(Path(os.environ[BINDINGS_ENV]))
    roots += [REPO / ".venv" / "trt-bindings", Path(sys.prefix) / "trt-bindings"]
    return roots


def source_version(folder: Path) -> str:
    text = (folder / "tensorrt_bindings" / "__init__.py").read_text()
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise RuntimeError(f"no __version__ in {folder}/tensorrt_bindings/__init__.py")
    return m.group(1)


def available_sources() -> Dict[str, Path]:
    """{version: folder} for every TensorRT Python source tree found (first root wins)."""
    found: Dict[str, Path] = {}
    for root in bindings_roots():
        if not root.is_dir():
            continue
        for sub in sorted(root.iterdir()):
            if (sub / "tensorrt_bindings" / "plugin" / "_lib.py").is_file():
                found.setdefault(source_version(sub), sub)
    return found


def version_tuple(version: str) -> Tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# ============================================================================================
# The compiled module
# ============================================================================================


def _enum(name: str, members, start: int = 0):
    return enum.IntEnum(name, [(m, i) for i, m in enumerate(members, start)])


class IDimensionExpr:
    """A dimension expression: a constant, a named symbol (the batch) or an operation on two."""

    def __init__(self, value: Optional[int] = None, symbol: Optional[str] = None, op=None, args=()):
        self.value, self.symbol, self.op, self.args = value, symbol, op, args

    def is_constant(self) -> bool:
        return self.value is not None

    def get_constant_value(self) -> int:
        if self.value is None:
            raise RuntimeError("not a constant")
        return self.value

    def is_size_tensor(self) -> bool:
        return False

    def evaluate(self, env: Dict[str, int]) -> int:
        if self.value is not None:
            return self.value
        if self.symbol is not None:
            return env[self.symbol]
        a, b = (x.evaluate(env) for x in self.args)
        return _apply(self.op, a, b)

    def __repr__(self):
        return f"Dim({self.value if self.value is not None else self.symbol or self.op.name})"


_OPS = {"SUM": lambda a, b: a + b, "PROD": lambda a, b: a * b, "MAX": max, "MIN": min, "SUB": lambda a, b: a - b,
        "EQUAL": lambda a, b: int(a == b), "LESS": lambda a, b: int(a < b), "FLOOR_DIV": lambda a, b: a // b,
        "CEIL_DIV": lambda a, b: -(-a // b)}


def _apply(op, a: int, b: int) -> int:
    return _OPS[op.name](a, b)


def compiled_module(version: str) -> types.ModuleType:
    """A fresh stand-in for ``tensorrt_bindings.tensorrt`` of TensorRT ``version``."""
    major, minor = version_tuple(version)
    has_aot = (major, minor) >= (10, 9)
    has_weak = major < 11  # BuilderFlag.FP16/INT8, calibrators
    m = types.ModuleType("tensorrt_bindings.tensorrt")
    m.STANDIN = True
    m.log_messages = []

    # ---------------------------------------------------------------- enums
    m.DataType = _enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64",
                                    "INT4", "FP4"])
    D = m.DataType
    m.float32, m.float16, m.int8, m.int32, m.bool, m.uint8 = D.FLOAT, D.HALF, D.INT8, D.INT32, D.BOOL, D.UINT8
    m.fp8, m.bfloat16, m.int64, m.int4, m.fp4 = D.FP8, D.BF16, D.INT64, D.INT4, D.FP4
    m.TensorFormat = _enum("TensorFormat", ["LINEAR", "CHW2", "HWC8", "CHW4", "CHW16", "CHW32", "DHWC8", "CDHW32",
                                            "HWC", "DLA_LINEAR", "DLA_HWC4", "HWC16", "DHWC"])
    m.PluginFieldType = _enum("PluginFieldType", ["FLOAT16", "FLOAT32", "FLOAT64", "INT8", "INT16", "INT32", "CHAR",
                                                  "DIMS", "UNKNOWN", "BF16", "INT64", "FP8", "INT4", "FP4"])
    m.DimensionOperation = _enum("DimensionOperation", ["SUM", "PROD", "MAX", "MIN", "SUB", "EQUAL", "LESS",
                                                        "FLOOR_DIV", "CEIL_DIV"])
    m.TensorRTPhase = _enum("TensorRTPhase", ["BUILD", "RUNTIME"])
    m.PluginArgType = _enum("PluginArgType", ["INT"])
    m.PluginArgDataType = _enum("PluginArgDataType", ["INT8", "INT16", "INT32"])
    m.TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    m.MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM",
                                                "DLA_GLOBAL_DRAM", "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"])
    net_flags = (["EXPLICIT_BATCH"] if has_weak else ["_RESERVED"]) + ["STRONGLY_TYPED"]
    if has_aot:
        net_flags += ["PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"]
    m.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", net_flags)
    builder_flags = (["FP16", "INT8"] if has_weak else []) + ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE",
                                                              "TF32", "SPARSE_WEIGHTS", "STRIP_PLAN"]
    if has_weak:
        builder_flags += ["BF16", "FP8", "INT4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    m.BuilderFlag = _enum("BuilderFlag", builder_flags)
    if has_aot:
        m.QuickPluginCreationRequest = _enum("QuickPluginCreationRequest",
                                             ["UNKNOWN", "PREFER_JIT", "PREFER_AOT", "STRICT_JIT", "STRICT_AOT"])

    # ---------------------------------------------------------------- logging
    class ILogger:
        Severity = _enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

    class Logger(ILogger):
        def __init__(self, min_severity=None):
            self.min_severity = min_severity if min_severity is not None else ILogger.Severity.WARNING

        def log(self, severity, msg):
            m.log_messages.append((severity, msg))

    m.ILogger, m.Logger = ILogger, Logger

    # ---------------------------------------------------------------- shapes and descriptors
    class Dims(list):
        MAX_DIMS = 8

        def __init__(self, shape=()):
            super().__init__([0] * shape if isinstance(shape, int) else [int(d) for d in shape])

    class DimsExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    class PluginTensorDesc:
        def __init__(self):
            self.dims, self.type, self.format, self.scale = Dims(), m.float32, m.TensorFormat.LINEAR, 1.0

    class DynamicPluginTensorDesc:
        def __init__(self):
            self.desc, self.min, self.opt, self.max = PluginTensorDesc(), Dims(), Dims(), Dims()

    class IExprBuilder:
        def constant(self, value):
            return IDimensionExpr(value=int(value.__index__()))  # pybind's int caster takes __index__

        def operation(self, op, first, second):
            if not isinstance(op, m.DimensionOperation):
                raise TypeError(f"operation(): incompatible op {op!r}")
            for x in (first, second):
                if not isinstance(x, IDimensionExpr):
                    raise TypeError(f"operation(): incompatible function arguments; got {type(x).__name__}, "
                                    "expected tensorrt.IDimensionExpr")
            if first.is_constant() and second.is_constant():
                return IDimensionExpr(value=_apply(op, first.value, second.value))
            return IDimensionExpr(op=op, args=(first, second))

    m.Dims, m.DimsExprs, m.PluginTensorDesc, m.DynamicPluginTensorDesc = Dims, DimsExprs, PluginTensorDesc, DynamicPluginTensorDesc
    m.IDimensionExpr, m.IExprBuilder = IDimensionExpr, IExprBuilder

    class ISymExpr:
        def __init__(self):
            pass

    m.ISymExpr = ISymExpr

    # ---------------------------------------------------------------- plugin fields and registry
    field_dtypes = {m.PluginFieldType.INT8: np.int8, m.PluginFieldType.INT16: np.int16,
                    m.PluginFieldType.INT32: np.int32, m.PluginFieldType.INT64: np.int64,
                    m.PluginFieldType.FLOAT16: np.float16, m.PluginFieldType.FLOAT32: np.float32,
                    m.PluginFieldType.FLOAT64: np.float64, m.PluginFieldType.CHAR: np.int8}

    class PluginField:
        def __init__(self, name="", data=None, type=m.PluginFieldType.UNKNOWN):
            self.name, self.type = name, type
            if data is None:
                self._raw, self.size = b"", 0
            else:
                view = memoryview(data)  # what py::buffer accepts: bytes, NumPy arrays
                self._raw, self.size = view.tobytes(), view.nbytes // max(view.itemsize, 1)

        @property
        def data(self):
            dtype = field_dtypes.get(self.type)
            if dtype is None:
                raise TypeError(f"No known conversion for returning data from PluginField of type {self.type!r}")
            return np.frombuffer(self._raw, dtype=dtype, count=self.size).copy()

    class PluginFieldCollection:
        def __init__(self, fields=()):
            self._fields = list(fields)

        def __len__(self):
            return len(self._fields)

        def __getitem__(self, i):
            if i >= len(self._fields):
                raise IndexError(i)
            return self._fields[i]

    m.PluginField, m.PluginFieldCollection = PluginField, PluginFieldCollection

    class _Base:
        def __init__(self):
            pass

    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginCreatorV3Quick", "IPluginCapability"):
        setattr(m, name, type(name, (_Base,), {}))
    if has_aot:
        m.IPluginV3QuickAOTBuild = type("IPluginV3QuickAOTBuild", (_Base,), {})

    class IPluginRegistry:
        def __init__(self):
            self.creators: Dict[Tuple[str, str, str], object] = {}

        def register_creator(self, creator, plugin_namespace=""):
            key = (creator.name, creator.plugin_version, plugin_namespace)
            if key in self.creators:  # TensorRT logs an error and refuses a second creator
                m.log_messages.append((ILogger.Severity.ERROR, f"creator {key} already registered"))
                return False
            self.creators[key] = creator
            return True

        def get_creator(self, type, version, plugin_namespace=""):
            return self.creators.get((type, version, plugin_namespace))

        get_plugin_creator = get_creator

        @property
        def all_creators(self):
            return list(self.creators.values())

    registry = IPluginRegistry()
    m.IPluginRegistry = IPluginRegistry
    m.get_plugin_registry = lambda: registry
    m.init_libnvinfer_plugins = lambda logger, namespace: True

    # ---------------------------------------------------------------- network, parser, builder
    class ITensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, Dims(shape), dtype

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags = flags
            self.inputs: List[ITensor] = []
            self.outputs: List[ITensor] = []
            self.plugins: List[dict] = []  # what the parser made of each plugin node

        def get_flag(self, flag):
            return bool(self.flags & (1 << int(flag)))

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class ParserError:
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

        def __str__(self):
            return self.text

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse(self, model, path=None):
            import onnx

            proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(bytes(model)))
            known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
            inits = {i.name for i in proto.graph.initializer}
            for v in proto.graph.input:
                if v.name not in inits:
                    self.network.inputs.append(ITensor(v.name, _onnx_dims(v), _onnx_dtype(m, v)))
            for node in proto.graph.node:
                if node.domain not in ("", "ai.onnx"):
                    if not self._plugin(node, known):
                        return False
            for v in proto.graph.output:
                self.network.outputs.append(ITensor(v.name, _onnx_dims(v), _onnx_dtype(m, v)))
            return not self.errors

        def _plugin(self, node, known) -> bool:
            """TensorRT's fallback for a node it has no importer for: a plugin creator of the same name."""
            attrs = {a.name: a for a in node.attribute}
            ns = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else ""
            version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
            creator = registry.get_creator(node.op_type, version, ns)
            if creator is None:
                self.errors.append(ParserError(f"No importer registered for op: {node.op_type}; plugin not found "
                                               f"(name {node.op_type}, version {version}, namespace {ns!r})"))
                return False
            fields = PluginFieldCollection(parser_fields(m, node, creator.field_names))
            args = [node.op_type, ns, fields, m.TensorRTPhase.BUILD]  # a quick creator is asked by plugin name
            if has_aot:
                args.append(_creation_request(m, attrs, self.network))
            plugin = creator.create_plugin(*args)
            in_types = [_onnx_dtype(m, known[n]) for n in node.input]
            ranks = [len(known[n].type.tensor_type.shape.dim) for n in node.input]
            out_types = plugin.get_output_data_types(in_types, ranks)
            builder = IExprBuilder()
            in_exprs = []
            for n in node.input:
                exprs = DimsExprs(len(known[n].type.tensor_type.shape.dim))
                for j, d in enumerate(_onnx_dims(known[n])):
                    exprs[j] = IDimensionExpr(symbol="batch") if d < 0 else builder.constant(d)
                in_exprs.append(exprs)
            out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
            self.network.plugins.append({"node": node.name, "op": node.op_type, "plugin": plugin,
                                         "input_types": in_types, "input_exprs": in_exprs,
                                         "output_types": list(out_types), "output_exprs": list(out_exprs)})
            return True

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class IBuilderConfig:
        def __init__(self):
            # TensorRT turns TF32 on by default in every new builder config
            self.flags, self.profiles, self.pools = {m.BuilderFlag.TF32}, [], {}

        def set_flag(self, flag):
            if not isinstance(flag, m.BuilderFlag):
                raise TypeError(f"set_flag(): incompatible argument {flag!r}")
            self.flags.add(flag)

        def clear_flag(self, flag):
            if not isinstance(flag, m.BuilderFlag):
                raise TypeError(f"clear_flag(): incompatible argument {flag!r}")
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class IHostMemory:
        def __init__(self, data: bytes):
            self._data = data

        def __bytes__(self):
            return self._data

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            def fail(msg):
                m.log_messages.append((ILogger.Severity.ERROR, msg))
                return None

            strong = network.get_flag(m.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            precision = {f.name for f in config.flags} & {"FP16", "INT8", "BF16", "FP8", "INT4"}
            if strong and precision:
                return fail(f"precision flags {sorted(precision)} are not allowed on a strongly typed network")
            if len(config.profiles) != 1:
                return fail("one optimization profile expected")
            shapes = config.profiles[0].shapes
            for t in network.inputs:
                if -1 in t.shape and t.name not in shapes:
                    return fail(f"input {t.name} is dynamic and has no profile")
            batch = {k: shapes[network.inputs[0].name][i][0] for i, k in enumerate(("min", "opt", "max"))}
            for p in network.plugins:
                err = _drive_plugin(m, p, batch)
                if err:
                    return fail(err)
            spec = {STANDIN_MAGIC: 1, "version": version, "strongly_typed": strong,
                    "flags": sorted(f.name for f in config.flags),
                    "inputs": [[t.name, list(t.shape), t.dtype.name] for t in network.inputs],
                    "outputs": [[t.name, list(t.shape), t.dtype.name] for t in network.outputs],
                    "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
                    "plugins": [p["op"] for p in network.plugins]}
            return IHostMemory(json.dumps(spec).encode())

    m.ITensor, m.INetworkDefinition, m.OnnxParser, m.Builder = ITensor, INetworkDefinition, OnnxParser, Builder
    m.IBuilderConfig, m.IOptimizationProfile, m.IHostMemory = IBuilderConfig, IOptimizationProfile, IHostMemory
    if has_weak:
        m.IInt8Calibrator = type("IInt8Calibrator", (_Base,), {})
        m.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (m.IInt8Calibrator,), {})

    # ---------------------------------------------------------------- engines
    class IExecutionContext:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.executions = engine, {}, {}, []

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def get_tensor_shape(self, name):
            inp = self.engine.input
            if name == inp[0]:
                return Dims(self.shapes.get(name, inp[1]))
            b = self.shapes[inp[0]][0] if inp[0] in self.shapes else -1
            return Dims([b, *self.engine.outputs[name][1:]])

        def execute_async_v3(self, stream_handle):
            name, _, _ = self.engine.input
            if name not in self.shapes or set(self.addresses) != {name, *self.engine.outputs}:
                return False
            shape = self.shapes[name]
            n = int(np.prod(shape))
            x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses[name])).reshape(shape)
            y = x.reshape(shape[0], shape[1], -1).mean(axis=2)  # the tiny graph: ReduceMean over H, W
            for out in self.engine.outputs:
                dst = np.ctypeslib.as_array((ctypes.c_float * y.size).from_address(self.addresses[out]))
                dst[:] = y.reshape(-1)
            self.executions.append({"shape": shape, "addresses": dict(self.addresses), "stream": stream_handle})
            return True

    class ICudaEngine:
        def __init__(self, spec):
            self.spec = spec
            (name, shape, dtype), = spec["inputs"]
            self.input = (name, shape, dtype)
            self.outputs = {n: s for n, s, _ in spec["outputs"]}
            self.dtypes = {n: getattr(m.DataType, d) for n, _, d in spec["inputs"] + spec["outputs"]}
            self.contexts: List[IExecutionContext] = []

        @property
        def num_io_tensors(self):
            return 1 + len(self.outputs)

        def get_tensor_name(self, i):
            return [self.input[0], *self.outputs][i]

        def get_tensor_mode(self, name):
            return m.TensorIOMode.INPUT if name == self.input[0] else m.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return Dims(self.input[1] if name == self.input[0] else self.outputs[name])

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def get_tensor_profile_shape(self, name, profile_index):
            return tuple(Dims(s) for s in self.spec["profile"][name])

        def create_execution_context(self):
            ctx = IExecutionContext(self)
            self.contexts.append(ctx)
            return ctx

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                spec = json.loads(bytes(data))
            except ValueError:
                return None
            if not isinstance(spec, dict) or spec.get(STANDIN_MAGIC) != 1 or spec.get("version") != version:
                return None  # like TensorRT: another version's (or no) engine does not load
            return ICudaEngine(spec)

    m.IExecutionContext, m.ICudaEngine, m.Runtime = IExecutionContext, ICudaEngine, Runtime
    return m


def _onnx_dims(value_info) -> List[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def _onnx_dtype(m, value_info):
    elem = value_info.type.tensor_type.elem_type
    table = {1: m.float32, 10: m.float16, 16: m.bfloat16, 3: m.int8, 6: m.int32, 7: m.int64, 9: m.bool, 2: m.uint8}
    if elem not in table:
        raise TypeError(f"tensor {value_info.name}: ONNX element type {elem} has no TensorRT type")
    return table[elem]


def _creation_request(m, attrs, network):
    """Which implementation the parser asks for: the node's ``aot`` attribute, else the network's
    preference flags, else none (as the QDP sample describes them)."""
    Q = m.QuickPluginCreationRequest
    if "aot" in attrs:
        return Q.STRICT_AOT if attrs["aot"].i else Q.STRICT_JIT
    if network.get_flag(m.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS):
        return Q.PREFER_AOT
    if network.get_flag(m.NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS):
        return Q.PREFER_JIT
    return Q.UNKNOWN


def dims_exprs(m, builder, *dims):
    """A ``DimsExprs`` of constants, with None standing for the symbolic batch dimension (what the builder
    hands a plugin's ``get_output_shapes``)."""
    e = m.DimsExprs(len(dims))
    for j, d in enumerate(dims):
        e[j] = m.IDimensionExpr(symbol="batch") if d is None else builder.constant(d)
    return e


def parser_fields(m, node, field_names) -> list:
    """The plugin fields TensorRT's ONNX parser builds for ``node`` (onnx-tensorrt ``loadFields``)."""
    import onnx

    attrs = {a.name: a for a in node.attribute}
    fields = []
    for declared in field_names:
        a = attrs.get(declared.name)
        if a is None:  # the parser warns and leaves the field out
            continue
        if a.type == onnx.AttributeProto.INT:
            fields.append(m.PluginField(a.name, np.array([a.i], dtype=np.int32), m.PluginFieldType.INT32))
        elif a.type == onnx.AttributeProto.FLOAT:
            fields.append(m.PluginField(a.name, np.array([a.f], dtype=np.float32), m.PluginFieldType.FLOAT32))
        elif a.type == onnx.AttributeProto.STRING:
            fields.append(m.PluginField(a.name, a.s + b"\x00", m.PluginFieldType.CHAR))
        elif a.type == onnx.AttributeProto.INTS:
            fields.append(m.PluginField(a.name, np.array(a.ints, dtype=np.int32), m.PluginFieldType.INT32))
        elif a.type == onnx.AttributeProto.FLOATS:
            fields.append(m.PluginField(a.name, np.array(a.floats, dtype=np.float32), m.PluginFieldType.FLOAT32))
        else:
            raise NotImplementedError(f"attribute type {a.type} of {a.name}")
    return fields


def _drive_plugin(m, p, batch: Dict[str, int]) -> Optional[str]:
    """What the builder asks a plugin: format combinations for the profile's shapes, configuration, tactics."""
    plugin = p["plugin"]

    def dims(exprs, b):
        return m.Dims([e.evaluate({"batch": b}) for e in exprs])

    descs = []
    for exprs, dtype in list(zip(p["input_exprs"], p["input_types"])) + list(zip(p["output_exprs"], p["output_types"])):
        d = m.DynamicPluginTensorDesc()
        d.desc.dims = m.Dims([-1 if (e.value is None) else e.value for e in exprs])
        d.desc.type, d.desc.format = dtype, m.TensorFormat.LINEAR
        d.min, d.opt, d.max = (dims(exprs, batch[k]) for k in ("min", "opt", "max"))
        descs.append(d)
    n_in = len(p["input_types"])
    combos = plugin.get_supported_format_combinations(descs, n_in)
    n = len(descs)
    rows = [combos[i:i + n] for i in range(0, len(combos), n)]
    want = [d.desc.type for d in descs]
    chosen = next((r for r in rows if [c.type for c in r] == want and all(c.format == m.TensorFormat.LINEAR for c in r)), None)
    p["combinations"] = [[c.type for c in r] for r in rows]
    if chosen is None:
        return f"plugin {p['node']}: no supported format combination for types {[t.name for t in want]}"
    ins, outs = [], []
    for i, d in enumerate(descs):
        d.desc.type = chosen[i].type
        (ins if i < n_in else outs).append(d)
    plugin.configure_plugin(ins, outs)
    p["tactics"] = plugin.get_valid_tactics()
    return None


# ============================================================================================
# Installing it as `tensorrt`
# ============================================================================================


def _names(prefixes=("tensorrt", "tensorrt_bindings")) -> List[str]:
    return [k for k in sys.modules if k.split(".")[0] in prefixes]


@contextlib.contextmanager
def _isolated_modules() -> Iterator[None]:
    saved = {k: sys.modules.pop(k) for k in _names()}
    try:
        yield
    finally:
        for k in _names():
            del sys.modules[k]
        sys.modules.update(saved)


@contextlib.contextmanager
def loaded(folder: Path):
    """TensorRT's real Python sources from ``folder`` (holding ``tensorrt_bindings/``) on the
    stand-in compiled module, importable as ``tensorrt`` and ``tensorrt.plugin`` inside the block.
    Yields ``(tensorrt, tensorrt.plugin)``."""
    folder = Path(folder)
    version = source_version(folder)
    with _isolated_modules():
        sys.modules["tensorrt_bindings.tensorrt"] = compiled_module(version)
        pkg_dir = folder / "tensorrt_bindings"
        spec = importlib.util.spec_from_file_location("tensorrt_bindings", pkg_dir / "__init__.py",
                                                      submodule_search_locations=[str(pkg_dir)])
        bindings = importlib.util.module_from_spec(spec)
        sys.modules["tensorrt_bindings"] = bindings
        spec.loader.exec_module(bindings)  # the real __init__: `from .tensorrt import *`, nptype, Logger, ...
        sys.modules["tensorrt"] = bindings  # the meta-package's `from tensorrt_bindings import *`
        plugin = importlib.import_module("tensorrt_bindings.plugin")  # the real tensorrt.plugin
        sys.modules["tensorrt.plugin"] = plugin
        assert bindings.__version__ == version and bindings.STANDIN
        yield bindings, plugin


@contextlib.contextmanager
def fake_tensorrt(version: str):
    """The stand-in alone as ``tensorrt`` (no ``tensorrt.plugin``): for build and runner logic."""
    with _isolated_modules():
        m = compiled_module(version)
        m.__name__ = "tensorrt"
        m.__version__ = version
        for name, value in m.ILogger.Severity.__members__.items():  # as tensorrt_bindings/__init__.py does
            setattr(m.Logger, name, value)
        sys.modules["tensorrt"] = m
        yield m
