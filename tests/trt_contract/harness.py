"""Runs the project's TensorRT plugins through NVIDIA's own ``tensorrt.plugin`` code on a CPU machine.

The plugin package is taken unmodified from TensorRT's Python bindings wheels (pinned in ``WHEELS``),
which pip downloads from PyPI; only their compiled module cannot load here, so :mod:`standin_tensorrt`
takes its place (see its docstring). The calls below are the ones TensorRT's ONNX parser and builder make,
in their order:

1. the parser finds the creator by (op type, version "1", ``plugin_namespace``) and builds a
   ``PluginFieldCollection`` from the node's attributes: only the fields the creator declares, in its
   declaration order, FLOAT as a 1-element float32 array, INT as a 1-element int32 array, INTS as int32
   (onnx-tensorrt's ``loadFields``); ``aot = 1`` asks for the AOT implementation (``STRICT_AOT``);
2. the builder asks for output types and shapes (with the batch a symbol), the supported type/format
   combinations, configures the one matching the strongly typed network, lists the tactics, and for each
   tactic gets the launch parameters and the kernel.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
from onnx import TensorProto, helper

# TensorRT release -> bindings wheel holding that release's tensorrt.plugin package.
WHEELS = {"10.13": "tensorrt-cu12-bindings==10.13.3.9", "11.4": "tensorrt-cu13-bindings==11.4.0.106"}
WHEEL_DIR_ENV = "PDD_TRT_WHEELS"
REQUIRED_ENV = "PDD_TRT_WHEELS_REQUIRED"
_STANDIN = Path(__file__).with_name("standin_tensorrt.py")
BATCH = "batch"


class WheelsUnavailable(RuntimeError):
    """The bindings wheel is not cached and could not be downloaded."""


def wheel_dir() -> Path:
    return Path(os.environ.get(WHEEL_DIR_ENV) or Path.home() / ".cache" / "pdd" / "tensorrt-bindings")


def fetch_wheel(release: str) -> Path:
    """The cached bindings wheel of ``release``, downloaded with pip (no dependencies) when missing."""
    spec = WHEELS[release]
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    folder = wheel_dir()
    found = sorted(folder.glob(f"{stem}*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(folder), spec]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        found = sorted(folder.glob(f"{stem}*.whl"))
        if result.returncode != 0 or not found:
            raise WheelsUnavailable(f"could not download {spec} into {folder} ({' '.join(cmd)}): "
                                    f"{result.stderr.strip()[-500:]}")
    return found[-1]


def install(release: str, root: Path) -> Path:
    """``root/<release>/tensorrt``: the stand-in as ``__init__.py`` and NVIDIA's ``plugin/`` under it."""
    target = root / release
    package = target / "tensorrt"
    if package.is_dir():
        return target
    with zipfile.ZipFile(fetch_wheel(release)) as whl:
        members = [m for m in whl.namelist() if "/plugin/" in m and m.endswith(".py")
                   and m.split("/")[0].startswith("tensorrt")]
        if not members:
            raise WheelsUnavailable(f"{whl.filename} holds no tensorrt/plugin/*.py")
        for m in members:
            dest = package / "plugin" / Path(m).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(whl.read(m))
    shutil.copyfile(_STANDIN, package / "__init__.py")
    return target


def _purge() -> None:
    for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
        del sys.modules[name]


@contextlib.contextmanager
def nvidia_plugin_package(path: Path) -> Iterator[tuple[ModuleType, ModuleType]]:
    """(tensorrt, tensorrt.plugin) imported from ``path``; every trace removed on exit."""
    _purge()
    sys.path.insert(0, str(path))
    try:
        trt = importlib.import_module("tensorrt")
        if not getattr(trt, "IS_STANDIN", False):
            raise RuntimeError(f"import tensorrt found {trt.__file__}, not the stand-in under {path}")
        yield trt, importlib.import_module("tensorrt.plugin")
    finally:
        sys.path.remove(str(path))
        _purge()


# --- the ONNX parser's part --------------------------------------------------------------------------------

def parser_fields(trt: ModuleType, creator: Any, node: onnx.NodeProto) -> Any:
    """onnx-tensorrt's ``loadFields``: the node's attributes the creator declares, in declaration order."""
    import numpy as np

    attrs = {a.name: a for a in node.attribute}
    fields = []
    for declared in creator.field_names:
        a = attrs.get(declared.name)
        if a is None:
            continue
        if a.type == onnx.AttributeProto.FLOAT:
            fields.append(trt.PluginField(a.name, np.array([a.f], np.float32), trt.PluginFieldType.FLOAT32))
        elif a.type == onnx.AttributeProto.INT:
            fields.append(trt.PluginField(a.name, np.array([a.i], np.int32), trt.PluginFieldType.INT32))
        elif a.type == onnx.AttributeProto.INTS:
            fields.append(trt.PluginField(a.name, np.array(a.ints, np.int32), trt.PluginFieldType.INT32))
        elif a.type == onnx.AttributeProto.FLOATS:
            fields.append(trt.PluginField(a.name, np.array(a.floats, np.float32), trt.PluginFieldType.FLOAT32))
        elif a.type == onnx.AttributeProto.STRING:
            fields.append(trt.PluginField(a.name, a.s, trt.PluginFieldType.CHAR))
        else:
            raise ValueError(f"attribute {a.name} of type {a.type} is not a plugin field type")
    return trt.PluginFieldCollection(fields)


def parse_node(trt: ModuleType, node: onnx.NodeProto) -> Any:
    """The plugin TensorRT's parser creates for ``node`` (a plugin node of a lowered graph)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    namespace = attrs.get("plugin_namespace", b"").decode()
    creator = trt.get_plugin_registry().get_creator(node.op_type, "1", namespace)
    if creator is None:
        raise LookupError(f"no plugin creator for {namespace}::{node.op_type} v1 in the registry")
    request = (trt.QuickPluginCreationRequest.STRICT_AOT if attrs.get("aot") == 1
               else trt.QuickPluginCreationRequest.UNKNOWN)
    return creator.create_plugin(node.op_type, namespace, parser_fields(trt, creator, node), trt.TensorRTPhase.BUILD,
                                 request)


# --- the builder's part -------------------------------------------------------------------------------------

_TRT_TYPES = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF"}


@dataclass
class Launch:
    """What the plugin gave TensorRT for one tactic."""

    tactic: int
    grid: tuple[Any, Any, Any]
    block: tuple[Any, Any, Any]
    shared_mem: Any
    scalars: list[Any]
    kernel_name: str
    ptx: str


@dataclass
class BuildRecord:
    """The builder-side view of one plugin node: types, shape expressions, combinations, launches."""

    output_types: list[Any]
    output_shapes: list[list[Any]]
    combinations: list[list[tuple[Any, Any]]]
    matching: list[int]
    tactics: list[int]
    launches: list[Launch] = field(default_factory=list)

    def shapes_at(self, batch: int) -> list[tuple[int, ...]]:
        return [tuple(d.evaluate({BATCH: batch}) for d in s) for s in self.output_shapes]


class _LaunchParams:
    """TensorRT's launch parameter struct, filled by the plugin."""

    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None


class _SymExprSetter:
    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.values: dict[int, Any] = {}

    def __setitem__(self, index: int, value: Any) -> None:
        self.values[index] = value


def _dyn_desc(trt: ModuleType, shape: Sequence[int | str], dtype: Any, opt_batch: int) -> Any:
    d = trt.DynamicPluginTensorDesc()
    dims = trt.Dims([opt_batch if isinstance(s, str) else s for s in shape])
    d.desc.dims, d.desc.type, d.desc.format = dims, dtype, trt.TensorFormat.LINEAR
    d.min = d.opt = d.max = dims
    return d


def build(trt: ModuleType, plugin: Any, in_types: Sequence[int], in_shapes: Sequence[Sequence[int | str]],
          out_types: Sequence[int], opt_batch: int = 2) -> BuildRecord:
    """The builder's calls on ``plugin`` for a strongly typed network with these ONNX input/output types."""
    dtype = {k: getattr(trt.DataType, v) for k, v in _TRT_TYPES.items()}
    in_dt = [dtype[t] for t in in_types]
    net_out_dt = [dtype[t] for t in out_types]
    out_dt = list(plugin.get_output_data_types(in_dt, [len(s) for s in in_shapes]))
    builder = trt.IExprBuilder()
    in_exprs = [trt.DimsExprs([builder.symbol(d) if isinstance(d, str) else builder.constant(d) for d in s])
                for s in in_shapes]
    out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
    out_shapes = [[d.evaluate({BATCH: opt_batch}) for d in s] for s in out_exprs]
    in_out = ([_dyn_desc(trt, s, t, opt_batch) for s, t in zip(in_shapes, in_dt)]
              + [_dyn_desc(trt, s, t, opt_batch) for s, t in zip(out_shapes, out_dt)])
    flat = plugin.get_supported_format_combinations(in_out, len(in_shapes))
    n = len(in_out)
    if len(flat) % n:
        raise AssertionError(f"{len(flat)} descriptors returned for {n} inputs and outputs")
    combos = [[(d.type, d.format) for d in flat[i:i + n]] for i in range(0, len(flat), n)]
    wanted = [(t, trt.TensorFormat.LINEAR) for t in in_dt + net_out_dt]
    matching = [i for i, c in enumerate(combos) if c == wanted]
    record = BuildRecord(out_dt, [list(s) for s in out_exprs], combos, matching, [])
    if len(matching) != 1:
        return record
    plugin.configure_plugin(in_out[:len(in_shapes)], in_out[len(in_shapes):])
    record.tactics = sorted(plugin.get_valid_tactics())
    in_descs, out_descs = [d.desc for d in in_out[:len(in_shapes)]], [d.desc for d in in_out[len(in_shapes):]]
    for tactic in record.tactics or [0]:
        plugin.set_tactic(tactic)
        params, setter = _LaunchParams(), _SymExprSetter()
        plugin.get_launch_params(in_exprs, in_out, len(in_shapes), params, setter, builder)
        name, ptx = plugin.get_kernel(in_descs, out_descs)
        scalars = [setter.values[i] for i in range(setter.nbSymExprs)]
        record.launches.append(Launch(
            tactic, (params.grid_x, params.grid_y, params.grid_z), (params.block_x, params.block_y, params.block_z),
            params.shared_mem, scalars, name.decode() if isinstance(name, bytes) else name,
            ptx.decode() if isinstance(ptx, bytes) else ptx))
    return record


def value(sym: Any, batch: int) -> int:
    """An ISymExpr handed to TensorRT, evaluated at ``batch``."""
    return sym.expr.evaluate({BATCH: batch})


def graph_types(model: onnx.ModelProto) -> Mapping[str, tuple[int, tuple[int | str, ...]]]:
    """tensor name -> (ONNX elem type, shape with the symbolic batch named ``BATCH``)."""
    out = {}
    for v in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, tuple(BATCH if d.dim_param else d.dim_value for d in t.shape.dim))
    for t in model.graph.initializer:
        out[t.name] = (t.data_type, tuple(t.dims))
    return out
