"""The compiled CPU selective scan (``kernels/cpu/scan.c``) without torch: build, load, numpy entry point.

The C source is compiled on first use for this machine's CPU (``-O3 -march=native -ffast-math``, and
``-fopenmp`` unless ``$PDD_CPU_KERNEL_THREADING=pthreads``: :data:`THREADING`) into
``$PDD_CACHE_DIR/cpu-kernels`` (default ``~/.cache/pdd/cpu-kernels``), keyed by the source, the compiler and
the CPU's feature flags, and reused afterwards; ``python -m kernels.cpu_scan`` builds it ahead of time.
Building needs a C compiler (``cc``, or ``$CC``); without one :class:`CpuKernelUnavailable` says what to install.

This module needs numpy and the standard library only, so a server's Python environment without torch
(the Triton Python backend's) runs the kernel through :func:`ss2d_scan_numpy`; :mod:`kernels.cpu_scan`
adds the torch entry points. A served model repository carries a copy of it beside the C source
(:data:`kernels.ort_ops.BUNDLE`), hence the relative import. The kernel's threads: ``$PDD_CPU_THREADS``, else
the CPUs the process may run on (:func:`default_threads`).

Example::

    >>> y = ss2d_scan_numpy(x, delta, B, C, A, D, delta_bias)     # doctest: +SKIP
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

from .contract import check_ss2d

__all__ = ["MAX_STATE", "CpuKernelUnavailable", "check_code", "default_threads", "library_path", "load", "open_library",
           "pointer", "ss2d_kernel_shapes", "ss2d_scan_numpy", "threading_choice", "uses_openmp"]

SOURCE = Path(__file__).resolve().parent / "cpu" / "scan.c"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-pthread",
         # x86: one 512-bit vector holds a channel's 16 states where the CPU has AVX-512 (ignored elsewhere).
         *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))
# How the kernel runs its threads, chosen by $PDD_CPU_KERNEL_THREADING: "openmp" (default), the process's
# OpenMP team (in a PyTorch process PyTorch's own, already loaded under the same soname), or "pthreads",
# threads started per call (for compilers without OpenMP; slower next to PyTorch's spinning pool).
THREADING = {"openmp": ("-fopenmp",), "pthreads": ("-fopenmp-simd",)}
THREADING_ENV = "PDD_CPU_KERNEL_THREADING"
MAX_STATE = 16
_ABI = 4


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
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
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
    # The source's encoding named: a server's Python-backend stub runs in the C locale (ASCII).
    key = hashlib.sha256("\0".join([SOURCE.read_text(encoding="utf-8"), cc, version,
                                    " ".join(FLAGS + THREADING[threading_choice()]), _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return _cache_dir() / key / "libpddscan.so"


def threading_choice() -> str:
    """The kernel's threading (:data:`THREADING`): ``$PDD_CPU_KERNEL_THREADING``, default ``openmp``."""
    choice = os.environ.get(THREADING_ENV, "openmp")
    if choice not in THREADING:
        raise ValueError(f"${THREADING_ENV}={choice!r}: choose one of {sorted(THREADING)}")
    return choice


def _build(target: Path) -> None:
    """Compile the source into ``target`` atomically: a concurrent build or reader never sees half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    choice = threading_choice()
    cmd = [_compiler(), *FLAGS, *THREADING[choice], str(SOURCE), "-o", tmp, "-lm"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            hint = (f"\nIf the compiler has no OpenMP: install its OpenMP runtime (libgomp, libomp), or set "
                    f"{THREADING_ENV}=pthreads (threads started per call; slower next to PyTorch's thread pool)"
                    if choice == "openmp" else "")
            raise CpuKernelUnavailable(f"building the CPU scan kernel failed ({' '.join(cmd)}):\n"
                                       f"{result.stderr.strip()[-2000:]}{hint}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def load() -> Any:
    """The loaded library (built first if needed, with the threading :func:`threading_choice` names); raises
    :class:`CpuKernelUnavailable`."""
    if not SOURCE.is_file():
        raise CpuKernelUnavailable(f"the CPU scan kernel's source {SOURCE} is missing from this installation")
    path = library_path()
    if not path.is_file():
        _build(path)
    return open_library(path)


def open_library(path: Path) -> Any:
    """A built library loaded from ``path``, its entry points typed."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise CpuKernelUnavailable(f"cannot load {path}: {exc}; delete it to rebuild") from exc
    if lib.pdd_scan_abi_version() != _ABI:
        raise CpuKernelUnavailable(f"{path} has ABI {lib.pdd_scan_abi_version()}, expected {_ABI}; delete it")
    f, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pdd_ss2d_scan.argtypes = [f] * 7 + [i64] * 4 + [i32, f, i32, i32, i32]
    lib.pdd_ss2d_scan.restype = i32
    lib.pdd_selective_scan.argtypes = [f] * 8 + [i64] * 4 + [i32, i32, f, f, i32]
    lib.pdd_selective_scan.restype = i32
    lib.pdd_scan_openmp.restype = i32
    return lib


def uses_openmp() -> bool:
    """Whether the loaded kernel runs its threads as the process's OpenMP team (see :data:`THREADING`)."""
    return bool(load().pdd_scan_openmp())


def default_threads() -> int:
    """Threads the kernel uses unless told: ``$PDD_CPU_THREADS``, else the CPUs this process may run on."""
    given = os.environ.get("PDD_CPU_THREADS")
    if given:
        return max(1, int(given))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pointer(a: Any) -> int | None:
    """The address of a contiguous array: a numpy array, or anything with ``data_ptr()`` (a torch tensor)."""
    if a is None:
        return None
    return a.data_ptr() if hasattr(a, "data_ptr") else a.ctypes.data


_ERRORS = {-1: "d_state outside 1..16", -2: "a sequence over 2³¹ positions, or dim not a multiple of the groups",
           -3: "out of memory for its scratch rows"}


def check_code(code: int, what: str) -> None:
    if code == -3:
        raise MemoryError(f"{what}: the CPU kernel ran {_ERRORS[code]}")
    if code != 0:
        raise ValueError(f"{what}: the CPU kernel refused its arguments: {_ERRORS.get(code, f'code {code}')}")


def ss2d_kernel_shapes(x: Any, delta: Any, B: Any, C: Any, A: Any, D: Any, bias: Any) -> tuple[int, int, int, int, int]:
    if len(A.shape) == 2 and not 1 <= int(A.shape[1]) <= MAX_STATE:
        raise ValueError(f"ss2d_scan: the CPU kernel takes d_state 1..{MAX_STATE}, got {int(A.shape[1])}")
    return check_ss2d(x, delta, B, C, A, D, bias)


def ss2d_scan_numpy(x: np.ndarray, delta: np.ndarray, B: np.ndarray, C: np.ndarray, A: np.ndarray, D: np.ndarray,
                    delta_bias: np.ndarray, threads: int | None = None) -> np.ndarray:
    """The fused SS2D scan on numpy arrays (any float dtype in, fp32 out): the ONNX Runtime custom op.

    The arguments of :func:`kernels.cpu_scan.ss2d_scan_cpu`; ``threads``: default :func:`default_threads`.
    """
    batch, dim, height, width, n = ss2d_kernel_shapes(x, delta, B, C, A, D, delta_bias)
    args = [np.ascontiguousarray(t, dtype=np.float32) for t in (x, delta, B, C, A, D, delta_bias)]
    out = np.empty((batch, dim, height, width), np.float32)
    check_code(load().pdd_ss2d_scan(*(pointer(a) for a in args), batch, dim, height, width, n, pointer(out),
                                    threads or default_threads(), 0, 0), "ss2d_scan")
    return out
