"""The four SS2D routes: the one definition every scan implementation reads its positions from.

Route k visits the H×W grid (row-major positions 0..L−1, L = H·W) as follows:

- 0: row-major, 1: column-major, 2: row-major reversed, 3: column-major reversed.

:func:`route_pixel` is written with ``+ - * // %`` and a branch on a constexpr route only, so the same
function runs on Python ints, on torch tensors (:func:`route_order`) and, wrapped by ``triton.jit``, inside
the Triton kernels of :mod:`kernels.selective_scan`. The C kernel (``kernels/cpu/scan.c``) keeps its own
arithmetic; tests/test_cpu_kernel.py checks it walks these routes.

Example::

    >>> route_order(2, 3).view(4, 6).tolist()[1]
    [0, 3, 1, 4, 2, 5]
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.contract import SS2D_ROUTES

try:  # The Triton interpreter looks for triton.language in the globals of a jitted function.
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is optional; route_order needs only torch
    tl = None

__all__ = ["SS2D_ROUTES", "route_order", "route_pixel"]


def route_pixel(t, length, height, width, ROUTE: tl.constexpr):
    """Row-major grid position that route ROUTE visits at step t (t: int, int tensor or Triton tensor)."""
    if ROUTE >= 2:
        t = length - 1 - t
    if ROUTE % 2 == 1:
        t = (t % height) * width + t // height
    return t


def route_order(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(4·L,) int64: the grid position each step of the four routes reads, route after route."""
    length = height * width
    steps = torch.arange(length, device=device)
    return torch.cat([route_pixel(steps, length, height, width, k) for k in range(SS2D_ROUTES)])
