"""The GPU the kernels are compiled for: compute capability and the highest PTX ISA its driver loads.

No Triton or torch needed at import (serving code reads engine metadata with it). The PTX ``.version`` a
driver accepts follows its CUDA version (driver 580 = CUDA 13.0: PTX ISA 9.0); a newer Triton emits a
newer ISA by default (3.8: 8.8, 3.9: 9.4), so :mod:`kernels.aot` caps it to the target's. From compute
capability 9.0 on, Triton emits the architecture-specific ``sm_90a`` code, which runs on 9.0 only.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_TARGET",
    "SM90_MAX_SHARED",
    "KernelTarget",
    "TargetError",
    "cuda_to_ptx_isa",
    "driver_ptx_isa",
    "parse_arch",
    "parse_ptx_isa",
    "resolve_target",
    "version_text",
]

SM90_MAX_SHARED = 227 * 1024  # per block, opt-in maximum; the SM has 228 KB
# Opt-in shared memory per block by compute capability (CUDA programming guide, compute capabilities table).
_MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: SM90_MAX_SHARED,
               100: 227 * 1024, 120: 99 * 1024}


class TargetError(ValueError):
    """The kernel target (compute capability, PTX ISA) is unknown, malformed or not what the GPU runs."""


def _major_minor(text: str, what: str) -> int:
    """'9.0' or '90' -> 90 (major·10 + minor), the form compute capabilities and PTX ISAs are kept in."""
    m = re.fullmatch(r"(\d+)\.(\d)|(\d{2,3})", text)
    if m is None:
        raise TargetError(f"{what}, got {text!r}")
    return int(m.group(1)) * 10 + int(m.group(2)) if m.group(1) else int(m.group(3))


def version_text(value: int) -> str:
    """90 -> '9.0': a compute capability or PTX ISA kept as major·10 + minor, as people write it."""
    return f"{value // 10}.{value % 10}"


def parse_arch(text: str | int) -> int:
    """'sm_90a', 'sm_90', '90' or '9.0' -> 90."""
    return _major_minor(str(text).strip().lower().removeprefix("sm_").removesuffix("a"),
                        "--arch must look like sm_90, 90 or 9.0")


def parse_ptx_isa(text: str | int) -> int:
    """'9.0' or '90' -> 90 (PTX ISA major·10 + minor)."""
    return _major_minor(str(text).strip(), "--ptx-isa must look like 9.0 or 90")


def cuda_to_ptx_isa(major: int, minor: int) -> int:
    """The highest PTX ISA a CUDA release (or a driver of that CUDA version) accepts, as major·10 + minor.

    From NVIDIA's PTX ISA release notes: CUDA 11.x -> 7.x, 12.0–12.5 -> 8.0–8.5, 12.6 -> 8.5, 12.7 -> 8.6,
    12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x.
    """
    if major >= 13:
        return 90 + 10 * (major - 13) + minor
    if major == 12:
        return 80 + (minor if minor < 6 else minor - 1)
    if major == 11:
        return 70 + minor
    raise TargetError(f"CUDA {major}.{minor} is older than the kernels support (11.0)")


def driver_ptx_isa() -> int | None:
    """The highest PTX ISA the installed NVIDIA driver accepts (``cuDriverGetVersion``), or None without one."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return cuda_to_ptx_isa(version.value // 1000, (version.value % 1000) // 10)


@dataclass(frozen=True)
class KernelTarget:
    """What the PTX is for: compute capability ``arch`` (90 = 9.0) and the highest PTX ISA its driver loads
    (``ptx_isa`` 90 = 9.0; the PTX ``.version`` is capped to it)."""

    arch: int = 90
    ptx_isa: int = 90

    @property
    def sm(self) -> str:
        """The PTX ``.target``: Triton emits the architecture-specific 'a' variant from sm_90 on."""
        return f"sm_{self.arch}{'a' if self.arch >= 90 else ''}"

    @property
    def ptx_isa_text(self) -> str:
        return version_text(self.ptx_isa)

    @property
    def max_shared(self) -> int:
        return _MAX_SHARED.get(self.arch, 48 * 1024)

    def describe(self) -> str:
        return f"{self.sm}, PTX ISA <= {self.ptx_isa_text}"


# The deployment GPU of this project's measurements (H200, driver 580 = CUDA 13.0): the default for dry runs
# on machines without a GPU.
DEFAULT_TARGET = KernelTarget(90, 90)


def resolve_target(arch: str | int | None = None, ptx_isa: str | int | None = None, *,
                   require_gpu: bool = False) -> KernelTarget:
    """The kernel target: from the visible GPU and its driver, overridden by ``arch`` / ``ptx_isa``.

    Without a GPU (a CPU dry run) the missing parts come from :data:`DEFAULT_TARGET`, unless
    ``require_gpu``. With a GPU, an ``arch`` other than the GPU's is refused: TensorRT times the plugin
    kernels on this GPU while it builds.
    """
    gpu_arch = None
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            gpu_arch = major * 10 + minor
    except ImportError:
        pass
    if require_gpu and gpu_arch is None:
        raise TargetError("no CUDA GPU is visible: building an engine needs the GPU it will run on")
    want = parse_arch(arch) if arch is not None else None
    if gpu_arch is not None and want is not None and want != gpu_arch:
        raise TargetError(f"--arch sm_{want} does not match this GPU (compute capability "
                          f"{version_text(gpu_arch)}); build on the deployment GPU or drop --arch")
    driver = driver_ptx_isa()
    isa = parse_ptx_isa(ptx_isa) if ptx_isa is not None else driver
    if driver is not None and isa > driver:
        raise TargetError(f"--ptx-isa {version_text(isa)} is newer than this driver accepts "
                          f"({version_text(driver)}); the engine would not load here")
    return KernelTarget(want or gpu_arch or DEFAULT_TARGET.arch, isa or DEFAULT_TARGET.ptx_isa)
