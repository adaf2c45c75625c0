"""Shapes and launch parameters of the TensorRT plugins' kernels, generic over ints and TensorRT shape
expressions: what :mod:`export.trt_plugins` evaluates at build time and the contract tests check on CPU."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LaunchPlan",
    "head_blur_output_shapes",
    "head_blur_sizes",
    "head_cosine_output_shapes",
    "head_cosine_sizes",
    "int_cdiv",
    "launch_plan",
    "ss2d_output_shape",
    "ss2d_sizes",
]


# --- shapes: generic over ints and TensorRT shape expressions -------------------------------------------

def ss2d_output_shape(x_shape: Sequence[Any]) -> tuple[Any, ...]:
    """SS2DScan: y has x's shape (B, D, H, W)."""
    if len(x_shape) != 4:
        raise ValueError(f"SS2DScan: x must be (B, D, H, W), got rank {len(x_shape)}")
    return tuple(x_shape)


def head_cosine_output_shapes(teacher_shapes: Sequence[Sequence[Any]]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """HeadCosine: cos (B, Σ_l H_l·W_l) and seed (B,), from each level's teacher shape (B, C_l, H_l, W_l)."""
    if not teacher_shapes or any(len(s) != 4 for s in teacher_shapes):
        raise ValueError(f"HeadCosine: features must be (B, C, H, W) each, got {[len(s) for s in teacher_shapes]} dims")
    batch = teacher_shapes[0][0]
    total = teacher_shapes[0][2] * teacher_shapes[0][3]
    for s in teacher_shapes[1:]:
        total = total + s[2] * s[3]
    return (batch, total), (batch,)


def head_blur_output_shapes(cos_shape: Sequence[Any], height: int, width: int) -> tuple[tuple[Any, ...], ...]:
    """HeadBlurMax: map (B, height, width) and tile_max (B,), from cos (B, Σ H_l·W_l)."""
    if len(cos_shape) != 2:
        raise ValueError(f"HeadBlurMax: cos must be (B, Σ H_l·W_l), got rank {len(cos_shape)}")
    return (cos_shape[0], height, width), (cos_shape[0],)


# --- kernel sizes and launch parameters -----------------------------------------------------------------

def ss2d_sizes(x_shape: Sequence[Any]) -> dict[str, Any]:
    """Names the SS2D kernel's scalars and grid use, from x (B, D, H, W)."""
    batch, dim, height, width = x_shape
    return {"batch": batch, "dim": dim, "height": height, "width": width}


def head_cosine_sizes(teacher_shapes: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Names the cosine kernel uses: per-level channels, heights, widths and the batch."""
    return {"batch": teacher_shapes[0][0], "channels": tuple(s[1] for s in teacher_shapes),
            "heights": tuple(s[2] for s in teacher_shapes), "widths": tuple(s[3] for s in teacher_shapes)}


def head_blur_sizes(batch: Any, level_sizes: Sequence[int], height: int, width: int) -> dict[str, Any]:
    """Names the blur-max kernel uses; level_sizes = (H_1, W_1, H_2, W_2, …)."""
    sizes = [int(v) for v in level_sizes]
    return {"batch": batch, "heights": tuple(sizes[0::2]), "widths": tuple(sizes[1::2]),
            "height": int(height), "width": int(width)}


def int_cdiv(a: int, b: int) -> int:
    """Ceiling division of ints (TensorRT expressions use tensorrt.plugin.cdiv)."""
    return -(-a // b)


def _evaluate(expr: str, scope: Mapping[str, Any]) -> Any:
    # The expressions are the kernels' own launch contracts (kernels.aot), not user input.
    return eval(expr, {"__builtins__": {}}, dict(scope))


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: grid and int32 scalars (ints, or TensorRT expressions), block, shared memory."""

    tactic: str
    kernel_name: str
    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_mem: int
    scalar_names: tuple[str, ...]
    scalars: tuple[Any, ...]


def launch_plan(kernel: Any, sizes: Mapping[str, Any], cdiv: Callable[[Any, Any], Any] = int_cdiv) -> LaunchPlan:
    """Evaluate an :class:`kernels.aot.AotKernel`'s grid and scalar parameters for ``sizes``.

    ``sizes`` maps the contract's names ('batch', 'dim', 'heights', …) to ints, or to TensorRT shape
    expressions together with ``cdiv=tensorrt.plugin.cdiv``.
    """
    scope = {"cdiv": cdiv, **sizes}
    names = tuple(p.name for p in kernel.params if p.role == "scalar")
    try:
        grid = tuple(_evaluate(e, scope) for e in kernel.grid)
        scalars = tuple(_evaluate(n, scope) for n in names)
    except (NameError, IndexError, TypeError) as exc:
        raise ValueError(f"{kernel.tactic}: cannot evaluate its launch contract (grid {kernel.grid}, scalars "
                         f"{names}) with sizes {sorted(sizes)}: {exc}") from exc
    return LaunchPlan(kernel.tactic, kernel.name, grid, kernel.block, kernel.shared, names, scalars)
