"""``impl="cpu_kernel"``: the compiled CPU selective scan of :mod:`kernels.cpu_scan`, for inference on CPUs.

Importing this module builds the kernel if needed (a C compiler is required once) and registers both the
1-D scan and the fused SS2D scan. Without a compiler it raises ImportError naming what to install, which
:func:`pdd.ssm.selective_scan` turns into ScanImplUnavailable. Inference only: with autograd the kernel
raises, and training uses ``chunked``.
"""

from __future__ import annotations

from torch import Tensor

from kernels.cpu_scan import CpuKernelUnavailable, load, selective_scan_cpu, ss2d_scan_cpu
from pdd.ssm import _check_inputs, register_scan_impl, register_ss2d_impl

try:
    load()
except CpuKernelUnavailable as exc:
    raise ImportError(f"impl='cpu_kernel': {exc}") from exc

__all__ = ["selective_scan_cpu_kernel"]


def selective_scan_cpu_kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                              z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                              return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`kernels.cpu_scan.selective_scan_cpu` behind the checks of :func:`pdd.ssm.selective_scan`."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


register_scan_impl("cpu_kernel", selective_scan_cpu_kernel)
register_ss2d_impl("cpu_kernel", ss2d_scan_cpu)
