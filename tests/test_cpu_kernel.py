"""The compiled CPU scan (kernels/cpu/scan.c) against the float64 reference, and behind the scan API.

Tolerances as the other kernels' fp32 tables (relative to the reference's largest magnitude).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pdd.ss2d import ss2d_scan
from pdd.ssm import selective_scan

cpu_scan = pytest.importorskip("kernels.cpu_scan")
cpu_lib = pytest.importorskip("kernels.cpu_lib")
try:
    cpu_scan.load()
except cpu_scan.CpuKernelUnavailable as exc:  # no C compiler on this machine
    pytest.skip(f"the CPU scan kernel cannot be built here: {exc}", allow_module_level=True)

RTOL = 2e-5  # of the output's largest magnitude; fp32 accumulation over a few hundred steps


def _ss2d_inputs(b: int, d: int, h: int, w: int, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, h, w, generator=g)
    delta = torch.randn(b, 4, d, h, w, generator=g) * 0.5
    B, C = torch.randn(b, 4, n, h, w, generator=g), torch.randn(b, 4, n, h, w, generator=g)
    A = -(torch.rand(4 * d, n, generator=g) * 2 + 0.1)
    D, bias = torch.randn(4 * d, generator=g), torch.randn(4 * d, generator=g) * 0.3
    return x, delta, B, C, A, D, bias


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize(("b", "d", "h", "w", "n"), [(1, 8, 4, 4, 16), (2, 13, 5, 7, 16), (3, 9, 3, 11, 1),
                                                     (1, 17, 1, 6, 16), (2, 8, 6, 1, 4)])
def test_ss2d_matches_the_float64_reference(b: int, d: int, h: int, w: int, n: int) -> None:
    args = _ss2d_inputs(b, d, h, w, n)
    ref = ss2d_scan(*(t.double() for t in args), impl="reference")
    got = cpu_scan.ss2d_scan_cpu(*args)
    assert got.dtype == torch.float32 and got.shape == (b, d, h, w)
    assert _rel(got, ref) < RTOL
    # The numpy entry (ONNX Runtime's custom op) is the same kernel.
    np.testing.assert_array_equal(cpu_scan.ss2d_scan_numpy(*(t.numpy() for t in args)), got.numpy())


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "strided"])
def test_ss2d_reads_and_writes_x_in_its_layout(layout: str) -> None:
    """A channels-last x (the VMamba block's convolution output) is read and answered channels-last without a
    copy; other layouts go through a contiguous copy; every result equals the contiguous call's."""
    args = _ss2d_inputs(2, 19, 5, 6, 16)
    want = cpu_scan.ss2d_scan_cpu(*args)
    x = args[0]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # dense, stored (W, B, H, D): neither layout the kernel walks
        x = x.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0)
    else:
        x = torch.stack([x, -x], dim=-1)[..., 0]  # every other float of a wider tensor
        assert torch.equal(x, args[0])
    got = cpu_scan.ss2d_scan_cpu(x, *args[1:])
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    if layout == "channels_last":
        assert got.stride() == x.stride()


@pytest.mark.parametrize(("groups", "n", "with_z"), [(1, 16, True), (2, 4, False), (1, 1, False)])
def test_selective_scan_matches_the_float64_reference(groups: int, n: int, with_z: bool) -> None:
    g = torch.Generator().manual_seed(1)
    b, d, length = 2, 12, 37
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    A = -torch.rand(d, n, generator=g)
    B, C = torch.randn(b, groups, n, length, generator=g), torch.randn(b, groups, n, length, generator=g)
    if groups == 1:
        B, C = B[:, 0], C[:, 0]
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    z = torch.randn(b, d, length, generator=g) if with_z else None
    ref, ref_state = selective_scan(u.double(), delta.double(), A.double(), B.double(), C.double(), D.double(),
                                    None if z is None else z.double(), bias.double(), delta_softplus=True,
                                    return_last_state=True, impl="reference")
    got, state = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True,
                                impl="cpu_kernel")
    assert _rel(got, ref) < RTOL and _rel(state, ref_state) < RTOL
    plain = selective_scan(u, delta, A, B, C, impl="cpu_kernel")  # no D, z, bias, softplus
    assert _rel(plain, selective_scan(u.double(), delta.double(), A.double(), B.double(), C.double(),
                                      impl="reference")) < RTOL


def test_fp16_inputs_compute_in_fp32_and_return_their_dtype() -> None:
    args = _ss2d_inputs(1, 8, 4, 5, 16)
    half = [t.half() if i < 4 else t for i, t in enumerate(args)]
    got = ss2d_scan(*half, impl="cpu_kernel")
    ref = ss2d_scan(*(t.double() for t in half), impl="reference")
    assert got.dtype == torch.float16 and _rel(got, ref) < 1e-3


# bf16 inputs: the reference scans the same bf16-rounded inputs in float64, so what remains is the kernel's
# fp32 arithmetic and the rounding of its result to bf16 (2^-9 of the output's magnitude, half an ulp).
BF16_RTOL = 2.0**-8


@pytest.mark.parametrize(("b", "d", "h", "w", "n", "layout"), [(1, 16, 4, 4, 16, "contiguous"),
                                                               (2, 13, 5, 7, 16, "contiguous"),
                                                               (2, 19, 5, 6, 16, "channels_last"),
                                                               (3, 9, 3, 11, 1, "contiguous"),
                                                               (1, 17, 1, 6, 16, "channels_last")])
def test_bf16_inputs_are_read_as_bf16_with_fp32_states(b: int, d: int, h: int, w: int, n: int, layout: str) -> None:
    """The policy's scan in bf16 (pdd.precision): bf16 x, δ, B, C and result, fp32 A, D, bias and states."""
    x, delta, B, C, A, D, bias = _ss2d_inputs(b, d, h, w, n, seed=3)
    x, delta, B, C = (t.bfloat16() for t in (x, delta, B, C))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = ss2d_scan(*(t.double() for t in (x, delta, B, C, A, D, bias)), impl="reference")
    got = cpu_scan.ss2d_scan_cpu(x, delta, B, C, A, D, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (b, d, h, w)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert _rel(got, ref) < BF16_RTOL
    # Bit for bit the fp32 kernel's result on the same (widened) inputs, rounded once to bf16.
    f32 = cpu_scan.ss2d_scan_cpu(*(t.float() for t in (x, delta, B, C)), A, D, bias)
    assert torch.equal(got, f32.bfloat16())


def test_autograd_and_bad_shapes_are_refused_with_the_reason() -> None:
    x, delta, B, C, A, D, bias = _ss2d_inputs(1, 8, 4, 4, 16)
    with pytest.raises(RuntimeError, match="inference"):
        cpu_scan.ss2d_scan_cpu(x.requires_grad_(), delta, B, C, A, D, bias)
    with torch.no_grad():
        assert cpu_scan.ss2d_scan_cpu(x, delta, B, C, A, D, bias).shape == x.shape
    with pytest.raises(ValueError, match=r"delta must be \(1, 4, 8, 4, 4\)"):
        cpu_scan.ss2d_scan_cpu(x.detach(), delta[:, :3], B, C, A, D, bias)
    with pytest.raises(ValueError, match=r"d_state 1\.\.16"):
        cpu_scan.ss2d_scan_cpu(x.detach(), delta, B, C, torch.zeros(32, 17), D, bias)


@pytest.mark.parametrize(("h", "w"), [(3, 5), (4, 2)])
def test_the_c_kernel_walks_the_routes_of_kernels_routes(h: int, w: int) -> None:
    """The C kernel keeps its own index arithmetic; on non-square grids each of its routes, isolated (C = 0 on
    the other routes, D = 0), equals the reference's, which reads positions by kernels.routes.route_order, and
    differs from what the same data gives along any other route (so the input tells the orders apart)."""
    g = torch.Generator().manual_seed(3)
    b, d, n = 1, 3, 2
    x = torch.randn(b, d, h, w, generator=g)
    A = -(torch.rand(d, n, generator=g) + 0.5).repeat(4, 1)  # the same on every route: only the order differs
    D, bias = torch.zeros(4 * d), torch.zeros(4 * d)

    def one_route(k: int, delta: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        deltas, Bs, Cs = torch.zeros(b, 4, d, h, w), torch.zeros(b, 4, n, h, w), torch.zeros(b, 4, n, h, w)
        deltas[:, k], Bs[:, k], Cs[:, k] = delta, B, 1.0
        return x, deltas, Bs, Cs, A, D, bias

    delta, B = torch.randn(b, d, h, w, generator=g) * 2, torch.randn(b, n, h, w, generator=g)
    for k in range(4):
        got = cpu_scan.ss2d_scan_cpu(*one_route(k, delta, B))
        ref = ss2d_scan(*(t.double() for t in one_route(k, delta, B)), impl="reference")
        assert _rel(got, ref) < RTOL, f"route {k}"
        for other in set(range(4)) - {k}:
            elsewhere = ss2d_scan(*(t.double() for t in one_route(other, delta, B)), impl="reference")
            assert _rel(got, elsewhere) > 1e-2, f"route {k} looks like route {other}"


def test_the_model_runs_the_kernel_it_was_built_with(small_pdd: torch.nn.Module) -> None:
    """Teacher features with the kernel equal those of the eager scan (same weights)."""
    x = torch.randn(2, 3, 64, 64)
    vmamba = small_pdd.teachers.vmamba
    with torch.no_grad():
        vmamba.set_scan_impl("eager")
        expected = vmamba(x)
        vmamba.set_scan_impl("cpu_kernel")
        try:
            got = vmamba(x)
        finally:
            vmamba.set_scan_impl("eager")
    for e, g in zip(expected, got):
        assert float((g - e).abs().max() / e.abs().max()) < 1e-4


def test_a_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PDD_CACHE_DIR", str(tmp_path))  # nothing cached: it would have to build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cpu_scan.CpuKernelUnavailable, match="does not run"):
        cpu_scan.library_path()


_OPENMP_RUNTIMES_LOADED = """
import torch
from kernels import cpu_lib

def runtimes():
    return {line.split()[-1] for line in open("/proc/self/maps") if "omp" in line.split()[-1].rsplit("/", 1)[-1]}

torch.ones(64, 64) @ torch.ones(64, 64)
before = runtimes()
cpu_lib.load()
print(len(before), before == runtimes())
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_the_kernel_runs_on_torchs_openmp_team() -> None:
    """The kernel's threads are PyTorch's own OpenMP pool (loading it brings no second OpenMP runtime into a
    PyTorch process), not threads of its own next to PyTorch's idle, spinning ones."""
    if not cpu_lib.uses_openmp():
        pytest.skip("the kernel was built with PDD_CPU_KERNEL_THREADING=pthreads")
    run = subprocess.run([sys.executable, "-c", _OPENMP_RUNTIMES_LOADED], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1", "True"], run.stdout


def test_the_pthreads_build_is_a_named_choice_and_agrees(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$PDD_CPU_KERNEL_THREADING=pthreads (for compilers without OpenMP) builds the kernel with threads of its
    own; its results equal the OpenMP build's bit for bit (every item owns its outputs). An unknown choice is
    refused."""
    want_args = [t.numpy() for t in _ss2d_inputs(2, 37, 6, 5, 16)]
    want = cpu_scan.ss2d_scan_numpy(*want_args, threads=3)
    monkeypatch.setenv("PDD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(cpu_lib.THREADING_ENV, "pthreads")
    cpu_lib.load.cache_clear()
    try:
        lib = cpu_lib.load()
        assert not cpu_lib.uses_openmp()
        assert cpu_lib.library_path().is_relative_to(tmp_path)
        np.testing.assert_array_equal(cpu_scan.ss2d_scan_numpy(*want_args, threads=3), want)
    finally:
        cpu_lib.load.cache_clear()  # the next caller loads this machine's real build again
    assert lib.pdd_scan_openmp() == 0
    monkeypatch.setenv(cpu_lib.THREADING_ENV, "tbb")
    with pytest.raises(ValueError, match="PDD_CPU_KERNEL_THREADING='tbb'"):
        cpu_lib.library_path()


def test_an_openmp_build_the_compiler_refuses_names_the_pthreads_choice(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """A compiler without OpenMP (here: one that rejects the flag) is a clear error naming both ways out."""
    monkeypatch.setitem(cpu_lib.THREADING, "openmp", ("-fno-such-openmp-flag",))
    expected = r"no-such-openmp-flag(.|\n)*PDD_CPU_KERNEL_THREADING=pthreads"
    with pytest.raises(cpu_lib.CpuKernelUnavailable, match=expected):
        cpu_lib._build(tmp_path / "libpddscan.so")
    assert not (tmp_path / "libpddscan.so").exists()
