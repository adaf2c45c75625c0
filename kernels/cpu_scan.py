"""The compiled CPU selective scan (``kernels/cpu/scan.c``): built with the machine's C compiler, used by ctypes.

Two entry points with the semantics of the Triton kernels and of the SS2DScan plugin node:

- :func:`ss2d_scan_cpu` — the fused four-route SS2D scan, the contract of :func:`kernels.contract.check_ss2d`;
- :func:`selective_scan_cpu` — the 1-D scan, the contract of :func:`kernels.contract.check_scan_inputs`;

both fp32 and inference-only (no autograd), on torch CPU tensors or numpy arrays (the ONNX Runtime custom op).

The C source is compiled on first use for this machine's CPU (``-O3 -march=native -ffast-math``) into
``$PDD_CACHE_DIR/cpu-kernels`` (default ``~/.cache/pdd/cpu-kernels``), keyed by the source, the compiler and
the CPU's feature flags, and reused afterwards; ``python -m kernels.cpu_scan`` builds it ahead of time.
Building needs a C compiler (``cc``, or ``$CC``); without one :class:`CpuKernelUnavailable` says what to install.

Example::

    >>> from kernels.cpu_scan import ss2d_scan_cpu
    >>> y = ss2d_scan_cpu(x, delta, B, C, A, D, delta_bias)     # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kernels.contract import check_scan_inputs, check_ss2d

__all__ = ["CpuKernelUnavailable", "library_path", "load", "selective_scan_cpu", "ss2d_scan_cpu", "ss2d_scan_numpy"]

SOURCE = Path(__file__).resolve().parent / "cpu" / "scan.c"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared", "-pthread",
         # x86: one 512-bit vector holds a channel's 16 states where the CPU has AVX-512 (ignored elsewhere).
         *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))
MAX_STATE = 16
_ABI = 1


class CpuKernelUnavailable(RuntimeError):
    """The CPU scan kernel cannot be built or loaded here."""


def _cache_dir() -> Path:
    root = os.environ.get("PDD_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "pdd") / "cpu-kernels"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise CpuKernelUnavailable("the CPU scan kernel is compiled on first use and no C compiler was found: "
                                   "install one (Debian/Ubuntu: apt-get install gcc) or set CC")
    return cc


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (a cached build must not move to another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path() -> Path:
    """Where the compiled library for this source, compiler and CPU lives (built or not)."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CpuKernelUnavailable(f"the C compiler {cc} does not run: {exc}") from exc
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return _cache_dir() / key / "libpddscan.so"


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    cmd = [_compiler(), *FLAGS, str(SOURCE), "-o", tmp, "-lm"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise CpuKernelUnavailable(f"building the CPU scan kernel failed ({' '.join(cmd)}):\n"
                                       f"{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build or reader never sees half a library
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def load() -> Any:
    """The loaded library (built first if needed); raises :class:`CpuKernelUnavailable`."""
    if not SOURCE.is_file():
        raise CpuKernelUnavailable(f"the CPU scan kernel's source {SOURCE} is missing from this installation")
    path = library_path()
    if not path.is_file():
        _build(path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise CpuKernelUnavailable(f"cannot load {path}: {exc}; delete it to rebuild") from exc
    if lib.pdd_scan_abi_version() != _ABI:
        raise CpuKernelUnavailable(f"{path} has ABI {lib.pdd_scan_abi_version()}, expected {_ABI}; delete it")
    f, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pdd_ss2d_scan.argtypes = [f] * 7 + [i64] * 4 + [i32, f, i32]
    lib.pdd_ss2d_scan.restype = i32
    lib.pdd_selective_scan.argtypes = [f] * 8 + [i64] * 4 + [i32, i32, f, f, i32]
    lib.pdd_selective_scan.restype = i32
    return lib


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(a: np.ndarray | Tensor | None) -> int | None:
    if a is None:
        return None
    return a.data_ptr() if isinstance(a, Tensor) else a.ctypes.data


_ERRORS = {-1: "d_state outside 1..16", -2: "a sequence over 2³¹ positions, or dim not a multiple of the groups",
           -3: "out of memory for its scratch rows"}


def _check(code: int, what: str) -> None:
    if code == -3:
        raise MemoryError(f"{what}: the CPU kernel ran {_ERRORS[code]}")
    if code != 0:
        raise ValueError(f"{what}: the CPU kernel refused its arguments: {_ERRORS.get(code, f'code {code}')}")


def _ss2d_shapes(x: Any, delta: Any, B: Any, C: Any, A: Any, D: Any, bias: Any) -> tuple[int, int, int, int, int]:
    if len(A.shape) == 2 and not 1 <= int(A.shape[1]) <= MAX_STATE:
        raise ValueError(f"ss2d_scan: the CPU kernel takes d_state 1..{MAX_STATE}, got {int(A.shape[1])}")
    return check_ss2d(x, delta, B, C, A, D, bias)


def ss2d_scan_numpy(x: np.ndarray, delta: np.ndarray, B: np.ndarray, C: np.ndarray, A: np.ndarray, D: np.ndarray,
                    delta_bias: np.ndarray, threads: int | None = None) -> np.ndarray:
    """:func:`ss2d_scan_cpu` on numpy arrays (any float dtype in, fp32 out): the ONNX Runtime custom op."""
    batch, dim, height, width, n = _ss2d_shapes(x, delta, B, C, A, D, delta_bias)
    args = [np.ascontiguousarray(t, dtype=np.float32) for t in (x, delta, B, C, A, D, delta_bias)]
    out = np.empty((batch, dim, height, width), np.float32)
    _check(load().pdd_ss2d_scan(*(_ptr(a) for a in args), batch, dim, height, width, n, _ptr(out),
                                threads or _threads()), "ss2d_scan")
    return out


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
    D, delta_bias: (4·D,). Computed in fp32; returns (B, D, H, W) in x's dtype.
    """
    _inference_only("ss2d_scan", x, delta, B, C, A, D, delta_bias)
    out = ss2d_scan_numpy(*(t.detach().to(torch.float32).numpy() for t in (x, delta, B, C, A, D, delta_bias)))
    return torch.from_numpy(out).to(x.dtype)


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
    _check(load().pdd_selective_scan(*(_ptr(t) for t in f32), batch, dim, groups, length, n, int(delta_softplus),
                                     _ptr(out), _ptr(state), _threads()), "selective_scan")
    out = out.to(u.dtype)
    return (out, state) if return_last_state else out


def main() -> None:
    """Build (or find) the library for this machine and print where it is."""
    load()
    print(library_path())


if __name__ == "__main__":
    main()
