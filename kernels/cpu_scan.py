"""The compiled CPU selective scan (``kernels/cpu/scan.c``): built with the machine's C compiler, used by ctypes.

Two entry points with the semantics of the Triton kernels and of the SS2DScan plugin node:

- :func:`ss2d_scan_cpu` — the fused four-route SS2D scan, the contract of :func:`kernels.contract.check_ss2d`;
- :func:`selective_scan_cpu` — the 1-D scan, the contract of :func:`kernels.contract.check_scan_inputs`;

inference-only (no autograd), on torch CPU tensors, with torch's thread count; computed in fp32 (the fused
scan also takes bf16 inputs, widened in the kernel, and writes a bf16 result). The fused scan
runs as the custom op ``pdd_cpu::ss2d_scan``, one opaque node to ``torch.compile``. Building and loading
the library, and the numpy entry point (the ONNX Runtime custom op, servers without torch), are
:mod:`kernels.cpu_lib`; ``python -m kernels.cpu_scan`` builds it ahead of time.

Example::

    >>> from kernels.cpu_scan import ss2d_scan_cpu
    >>> y = ss2d_scan_cpu(x, delta, B, C, A, D, delta_bias)     # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.contract import check_scan_inputs
from kernels.cpu_lib import (
    MAX_STATE,
    CpuKernelUnavailable,
    check_code,
    library_path,
    load,
    pointer,
    ss2d_kernel_shapes,
    ss2d_scan_numpy,
)

__all__ = ["CpuKernelUnavailable", "library_path", "load", "selective_scan_cpu", "ss2d_scan_cpu", "ss2d_scan_numpy"]


def _inference_only(name: str, *tensors: Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name}: the CPU kernel is for inference (no backward); use impl='graph-parallel' "
                           f"for gradients, or run under torch.no_grad()")
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name}: the CPU kernel takes CPU tensors, got one on {t.device}")


def ss2d_scan_cpu(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor,
                  delta_bias: Tensor) -> Tensor:
    """Fused SS2D scan on the CPU: the arguments and result of :func:`pdd.ss2d.ss2d_scan`.

    x: (B, D, H, W); delta: (B, 4, D, H, W) before bias and softplus; B, C: (B, 4, N, H, W); A: (4·D, N);
    D, delta_bias: (4·D,). fp32 states and sums; x, delta, B, C fp32 or bf16 (read as they are), A, D, delta_bias
    fp32; returns (B, D, H, W) in x's dtype.
    """
    _inference_only("ss2d_scan", x, delta, B, C, A, D, delta_bias)
    ss2d_kernel_shapes(x, delta, B, C, A, D, delta_bias)
    return _ss2d_scan_op(x, delta, B, C, A, D, delta_bias)


@torch.library.custom_op("pdd_cpu::ss2d_scan", mutates_args=(), device_types="cpu")
def _ss2d_scan_op(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor, delta_bias: Tensor) -> Tensor:
    """The kernel call. x may be channels-last (as the VMamba block's depthwise convolution leaves it): the
    kernel reads it, and writes the result, in that layout without a copy. The result has x's layout.

    The kernel reads and writes bf16 itself (states and sums in fp32): a bf16 x keeps x, delta, B, C and the
    result in bf16 (pdd.precision's policy); other dtypes are computed in fp32 and the result cast to x's."""
    io = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    channels_last = _channels_last(x)
    xs = x.detach().to(io)
    xs = xs if channels_last else xs.contiguous()
    ins = [t.detach().to(io).contiguous() for t in (delta, B, C)]
    params = [t.detach().to(torch.float32).contiguous() for t in (A, D, delta_bias)]
    out = _empty_result(x, io)
    writes_here = _channels_last(out) if channels_last else out.is_contiguous()
    target = out if writes_here else torch.empty_like(xs)
    batch, dim, height, width = x.shape
    check_code(load().pdd_ss2d_scan(pointer(xs), *(pointer(t) for t in (*ins, *params)), batch, dim, height, width,
                                    int(A.shape[1]), pointer(target), torch.get_num_threads(), int(channels_last),
                                    int(io == torch.bfloat16)), "ss2d_scan")
    if target is not out:
        out.copy_(target)
    return out if x.dtype == io else out.to(x.dtype)


def _channels_last(t: Tensor) -> bool:
    """Stored (B, H, W, D) — channels-last and not also plainly contiguous (a 1x1 image is both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _empty_result(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The result's memory: x's layout (what torch.empty_like keeps), so the fake and real ops agree."""
    return torch.empty_like(x, dtype=dtype)


@_ss2d_scan_op.register_fake
def _ss2d_scan_fake(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor,
                    delta_bias: Tensor) -> Tensor:
    return _empty_result(x, x.dtype)


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The 1-D selective scan on the CPU: the arguments and result of :func:`pdd.ssm.selective_scan_ref`.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (dim,).
    Computed in fp32; returns out (batch, dim, L) in u's dtype, plus the last state (batch, dim, N) fp32.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    _inference_only("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = (int(v) for v in u.shape)
    n = int(A.shape[1])
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"selective_scan: the CPU kernel takes d_state 1..{MAX_STATE}, got {n}")
    groups = 1 if B.dim() == 3 else int(B.shape[1])
    f32 = [None if t is None else t.detach().to(torch.float32).contiguous()
           for t in (u, delta, A, B, C, D, z, delta_bias)]
    out = torch.empty((batch, dim, length), dtype=torch.float32)
    state = torch.empty((batch, dim, n), dtype=torch.float32) if return_last_state else None
    check_code(load().pdd_selective_scan(*(pointer(t) for t in f32), batch, dim, groups, length, n, int(delta_softplus),
                                     pointer(out), pointer(state), torch.get_num_threads()), "selective_scan")
    out = out.to(u.dtype)
    return (out, state) if return_last_state else out


def main() -> None:
    """Build (or find) the library for this machine and print where it is."""
    load()
    print(library_path())


if __name__ == "__main__":
    main()
