"""STAND-IN for TensorRT's compiled module ``tensorrt.so``: not TensorRT, and never presented as it.

NVIDIA's ``tensorrt.plugin`` package (quickly deployable plugins) is plain Python that ships beside the
compiled bindings, which need libnvinfer and a GPU driver. The contract tests install this file as the
package ``tensorrt`` with NVIDIA's real ``plugin/`` folder, taken unmodified from the bindings wheels, under
it, so that NVIDIA's validators, plugin creator and plugin classes run for real on a CPU machine.

What is here is only what NVIDIA's plugin code touches: enums, plain records (fields, tensor descriptors),
base classes with no behaviour, a plugin registry keyed by (name, version, namespace), and a dimension
expression builder. The builder is the one piece with logic: expressions are trees over integer constants
and named symbols (the batch), folded when constant, so a test can evaluate what a plugin handed to
TensorRT at any batch. Nothing here builds, times or runs an engine.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__version__ = "0.0.0+standin"
IS_STANDIN = True


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity
        self.messages: list[tuple[int, str]] = []

    def log(self, severity: int, msg: str) -> None:
        self.messages.append((severity, msg))


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


# TensorRT's own names; ``bool`` shadows the builtin in this module, which therefore never calls it.
float32, float16, int8, int32, bool, uint8, bfloat16, int64 = (
    DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.BOOL, DataType.UINT8, DataType.BF16,
    DataType.INT64)
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dtype: DataType) -> type:
    return _NP[dtype]


TensorFormat = enum.Enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR DLA_HWC4 "
                                         "HWC16 DHWC")
PluginFieldType = enum.Enum("PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN BF16 "
                                               "INT64 FP8 INT4")
DimensionOperation = enum.Enum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV")
QuickPluginCreationRequest = enum.Enum("QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT "
                                                                     "STRICT_AOT")
TensorRTPhase = enum.Enum("TensorRTPhase", "BUILD RUNTIME")
PluginArgType = enum.Enum("PluginArgType", "INT")
PluginArgDataType = enum.Enum("PluginArgDataType", "INT8 INT16 INT32")


class PluginField:
    """name, data (a numpy array; bytes are viewed as uint8), type."""

    def __init__(self, name: str = "", data: Any = None, type: PluginFieldType = PluginFieldType.UNKNOWN) -> None:
        self.name = name
        self.data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
        self.type = type


class PluginFieldCollection(list):
    pass


class Dims(tuple):
    MAX_DIMS = 8

    def __new__(cls, shape: Iterable[int] | int = ()) -> Dims:
        return super().__new__(cls, [0] * shape if isinstance(shape, int) else shape)


class PluginTensorDesc:
    def __init__(self) -> None:
        self.dims, self.type, self.format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, 1.0


class DynamicPluginTensorDesc:
    def __init__(self) -> None:
        self.desc, self.min, self.max, self.opt = PluginTensorDesc(), Dims(), Dims(), Dims()


class IDimensionExpr:
    """A node of a dimension expression: an int constant, a named symbol, or (operation, left, right)."""

    def __init__(self, op: Any, left: Any = None, right: Any = None) -> None:
        self.op, self.left, self.right = op, left, right

    def is_constant(self) -> bool:
        return isinstance(self.op, int)

    def get_constant_value(self) -> int:
        if not self.is_constant():
            raise ValueError(f"{self!r} is not a build-time constant")
        return self.op

    def is_size_tensor(self) -> bool:
        return False

    def evaluate(self, symbols: Mapping[str, int]) -> int:
        """The expression's value with every symbol given (a test-side helper; not a TensorRT method)."""
        if isinstance(self.op, int):
            return self.op
        if isinstance(self.op, str):
            return symbols[self.op]
        return _apply(self.op, self.left.evaluate(symbols), self.right.evaluate(symbols))

    def __repr__(self) -> str:
        if isinstance(self.op, int | str):
            return str(self.op)
        return f"{self.op.name}({self.left!r}, {self.right!r})"


def _apply(op: DimensionOperation, a: int, b: int) -> int:
    return {DimensionOperation.SUM: a + b, DimensionOperation.PROD: a * b, DimensionOperation.MAX: max(a, b),
            DimensionOperation.MIN: min(a, b), DimensionOperation.SUB: a - b, DimensionOperation.EQUAL: int(a == b),
            DimensionOperation.LESS: int(a < b), DimensionOperation.FLOOR_DIV: a // b if b else 0,
            DimensionOperation.CEIL_DIV: -(-a // b) if b else 0}[op]


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(int(value))

    def symbol(self, name: str) -> IDimensionExpr:
        """A dimension unknown at build time, e.g. the dynamic batch (test-side helper)."""
        return IDimensionExpr(name)

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        if a.is_constant() and b.is_constant():
            return IDimensionExpr(_apply(op, a.op, b.op))
        return IDimensionExpr(op, a, b)


class DimsExprs(list):
    def __init__(self, n: int | Iterable[IDimensionExpr] = 0) -> None:
        super().__init__([None] * n if isinstance(n, int) else n)


class ISymExpr:
    def __init__(self) -> None:
        self.type = self.dtype = self.expr = None


class ITensor:
    pass


class _Interface:
    """TensorRT's plugin interfaces are C++ base classes; NVIDIA's Python classes only call their __init__."""

    def __init__(self) -> None:
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class _PluginRegistry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:  # TensorRT logs an error and keeps the first creator
            return False
        self.creators[key] = creator
        return True

    def deregister_creator(self, creator: Any) -> bool:
        keys = [k for k, c in self.creators.items() if c is creator]
        for k in keys:
            del self.creators[k]
        return len(keys) > 0

    def get_creator(self, name: str, version: str, namespace: str = "") -> Any:
        return self.creators.get((name, version, namespace))


_REGISTRY = _PluginRegistry()


def get_plugin_registry() -> _PluginRegistry:
    return _REGISTRY
