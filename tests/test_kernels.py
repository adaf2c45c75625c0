"""Triton kernels against the PyTorch oracles: selective_scan_ref / ss2d_scan reference in float64, anomaly_head_ref.

On a CUDA GPU the kernels run natively. Without one they run in Triton's CPU interpreter, which has to be
on before any kernel is decorated, so :func:`test_kernels_in_interpreter` re-runs this file in a child
pytest with TRITON_INTERPRET=1. The parent process (and the AOT tests sharing it) keeps compiler-backed
kernels. Inputs are fresh random each run; failures print the seed, and PDD_TEST_SEED replays it.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from kernels import anomaly_head as head_kernels
from kernels import selective_scan as scan_kernels
from kernels.routes import route_order
from pdd.anomaly import anomaly_head, anomaly_head_ref, cosine_distance
from pdd.ss2d import ss2d_scan
from pdd.ssm import ScanImplUnavailable, selective_scan, selective_scan_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-4, torch.float16: 3e-3}

runs_kernels = pytest.mark.skipif(DEVICE is None, reason="no CUDA: these run in test_kernels_in_interpreter's child")


class Rand:
    """Fresh random tensors on DEVICE from one recorded seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale + shift).to(DEVICE)

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen).to(DEVICE)


@pytest.fixture
def rand() -> Rand:
    return Rand(int(os.environ.get("PDD_TEST_SEED", secrets.randbelow(2**31))))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    """Relative tolerance per dtype, with an absolute floor at the same fraction of the largest value."""
    tol = TOL[dtype]
    expected = expected.double().cpu()
    assert not actual.isnan().any(), f"output has unwritten (NaN) elements; seed={seed}"
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()),
                               msg=lambda m: f"{m}\nseed={seed} (replay: PDD_TEST_SEED={seed})")


def as64(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.double() for t in ts]


# --- plain selective scan ------------------------------------------------------------------------

SCAN_CASES = {
    # name: (batch, dim, L, N, groups, D, z, bias, softplus, last_state, block_d, chunk)
    "full": (2, 5, 13, 16, None, True, True, True, True, True, None, None),
    "grouped_n1_tail": (1, 6, 37, 1, 2, False, False, False, False, True, 2, 8),
    "blocks_tail": (2, 7, 20, 16, None, True, False, True, True, False, 4, 16),
}


@runs_kernels
@pytest.mark.parametrize("strategy", scan_kernels.STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_selective_scan_matches_reference(rand: Rand, strategy: str, dtype: torch.dtype, case: str) -> None:
    b, d, length, n, groups, has_d, has_z, has_bias, softplus, last, block_d, chunk = SCAN_CASES[case]
    bc_shape = (b, n, length) if groups is None else (b, groups, n, length)
    u = rand.normal(b, d, length).to(dtype)
    delta = rand.normal(b, d, length, scale=0.5)
    delta = (delta if softplus else delta.abs()).to(dtype)  # without softplus δ is used as is: keep it ≥ 0
    A = -torch.exp(rand.uniform(d, n) * 2)
    B, C = rand.normal(*bc_shape).to(dtype), rand.normal(*bc_shape).to(dtype)
    D = rand.normal(d) if has_d else None
    z = rand.normal(b, d, length).to(dtype) if has_z else None
    bias = rand.normal(d, scale=0.5, shift=-1.0) if has_bias else None
    out = torch.full_like(u, float("nan"))
    got = scan_kernels.selective_scan_triton(u, delta, A, B, C, D, z, bias, softplus, last, strategy=strategy,
                                             block_d=block_d, chunk=chunk, out=out)
    want = selective_scan_ref(*as64(u, delta, A, B, C, D, z, bias), delta_softplus=softplus, return_last_state=last)
    if last:
        assert got[0] is out
        assert_close(got[0], want[0], dtype, rand.seed)
        assert_close(got[1], want[1], dtype, rand.seed)
        assert got[1].dtype == torch.float32 and got[1].shape == (b, d, n)
    else:
        assert got is out
        assert_close(got, want, dtype, rand.seed)


@runs_kernels
def test_selective_scan_api_dispatches_to_triton(rand: Rand) -> None:
    u, delta = rand.normal(1, 4, 9), rand.uniform(1, 4, 9)
    A, B, C = -rand.uniform(4, 16), rand.normal(1, 16, 9), rand.normal(1, 16, 9)
    got = selective_scan(u, delta, A, B, C, impl="triton")
    assert_close(got, selective_scan_ref(*as64(u, delta, A, B, C)), torch.float32, rand.seed)


# --- fused SS2D scan -----------------------------------------------------------------------------

SS2D_CASES = {
    # name: (batch, dim, H, W, N, block_d, chunk)
    "n16_blocks_chunks": (2, 5, 3, 5, 16, 4, 4),
    "n1_defaults": (1, 6, 4, 7, 1, None, None),
    "tall_defaults": (2, 3, 5, 3, 16, None, None),
}


def ss2d_inputs(rand: Rand, b: int, d: int, h: int, w: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """VMamba-like inputs: x, delta (pre-softplus), B, C in ``dtype``; A < 0, D, delta_bias fp32."""
    k = 4
    x = rand.normal(b, d, h, w).to(dtype)
    delta = rand.normal(b, k, d, h, w, scale=0.5).to(dtype)
    B, C = rand.normal(b, k, n, h, w).to(dtype), rand.normal(b, k, n, h, w).to(dtype)
    A = -torch.exp(rand.uniform(k * d, n) * 2)
    return [x, delta, B, C, A, rand.normal(k * d), rand.normal(k * d, scale=0.5, shift=-1.0)]


@runs_kernels
@pytest.mark.parametrize("strategy", scan_kernels.STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(SS2D_CASES))
def test_ss2d_matches_reference(rand: Rand, strategy: str, dtype: torch.dtype, case: str) -> None:
    b, d, h, w, n, block_d, chunk = SS2D_CASES[case]
    inputs = ss2d_inputs(rand, b, d, h, w, n, dtype)
    out = torch.full_like(inputs[0], float("nan"))
    got = scan_kernels.ss2d_scan_triton(*inputs, strategy=strategy, block_d=block_d, chunk=chunk, out=out)
    assert got is out and got.dtype == dtype
    assert_close(got, ss2d_scan(*as64(*inputs), impl="reference"), dtype, rand.seed)


@runs_kernels
def test_ss2d_api_dispatches_to_fused_kernel(rand: Rand) -> None:
    inputs = ss2d_inputs(rand, 1, 4, 3, 4, 16, torch.float32)
    assert_close(ss2d_scan(*inputs, impl="triton"), ss2d_scan(*as64(*inputs), impl="reference"), torch.float32,
                 rand.seed)


# --- route geometry ------------------------------------------------------------------------------

@triton.jit
def _route_index_kernel(out_ptr, length, height, width, ROUTE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.arange(0, BLOCK)
    tl.store(out_ptr + t, scan_kernels._route_pixel(t, length, height, width, ROUTE), mask=t < length)


@runs_kernels
@pytest.mark.parametrize(("h", "w"), [(2, 3), (3, 5), (5, 2), (1, 7)])
def test_jitted_route_pixel_gives_route_order(h: int, w: int) -> None:
    """The kernels' route arithmetic is kernels.routes.route_pixel compiled by triton.jit: same indices."""
    length = h * w
    got = []
    for k in range(4):
        out = torch.full((16,), -1, dtype=torch.int32, device=DEVICE)
        _route_index_kernel[(1,)](out, length, h, w, k, 16)
        got += out[:length].cpu().tolist()
    assert got == route_order(h, w).tolist()


# --- anomaly head --------------------------------------------------------------------------------

HEAD_CASES = {
    # name: (batch, [(C, H_l, W_l), ...], image (H, W), sigma)
    "odd_two_levels": (2, [(8, 3, 5), (4, 7, 4)], (13, 17), 4.0),
    "pdd_like_nonsquare": (2, [(8, 16, 12), (16, 8, 6), (32, 4, 3)] * 2, (64, 48), 4.0),
    "downsample_sigma2": (1, [(3, 9, 9), (5, 1, 1)], (40, 33), 2.0),
}


def head_pairs(rand: Rand, batch: int, levels: list[tuple[int, int, int]],
               dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Students near the teachers, as after training, plus one exact copy (cosine distance 0)."""
    pairs = []
    for c, h, w in levels:
        t = rand.normal(batch, c, h, w)
        pairs.append((t.to(dtype), (t + rand.normal(batch, c, h, w, scale=0.7)).to(dtype)))
    t0 = pairs[0][0]
    pairs[0] = (t0, t0.clone())
    return pairs


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cosine_maps_match_reference(rand: Rand, dtype: torch.dtype) -> None:
    batch, levels, _, _ = HEAD_CASES["pdd_like_nonsquare"]
    pairs = head_pairs(rand, batch, levels, dtype)
    total = sum(h * w for _, h, w in levels)
    out = torch.full((batch, total), float("nan"), device=DEVICE)
    got = head_kernels.cosine_maps(pairs, out=out)
    want = torch.cat([cosine_distance(t, s).flatten(1) for t, s in pairs], dim=1)
    assert got is out
    assert_close(got, want, torch.float32, rand.seed)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_anomaly_head_matches_reference(rand: Rand, dtype: torch.dtype, case: str) -> None:
    batch, levels, size, sigma = HEAD_CASES[case]
    pairs = head_pairs(rand, batch, levels, dtype)
    nan = float("nan")
    out = (torch.full((batch, *size), nan, device=DEVICE), torch.full((batch,), nan, device=DEVICE))
    amap, score = head_kernels.anomaly_head_triton(pairs, size, sigma, out=out)
    want_map, want_score = anomaly_head_ref(pairs, size, sigma)
    assert amap is out[0] and score is out[1]
    # fp16 features are upcast exactly by both sides: the fp32 tolerance applies.
    assert_close(amap, want_map, torch.float32, rand.seed)
    assert_close(score, want_score, torch.float32, rand.seed)


@runs_kernels
def test_anomaly_head_api_dispatches_to_triton(rand: Rand) -> None:
    pairs = head_pairs(rand, 1, [(4, 5, 6)], torch.float32)
    amap, score = anomaly_head(pairs, 20, impl="triton")
    want_map, want_score = anomaly_head_ref(pairs, (20, 20))
    assert_close(amap, want_map, torch.float32, rand.seed)
    assert_close(score, want_score, torch.float32, rand.seed)


# --- checks that launch nothing ------------------------------------------------------------------

def test_ss2d_rejects_bad_shapes() -> None:
    x = torch.zeros(1, 4, 3, 5)
    good = [x, torch.zeros(1, 4, 4, 3, 5), torch.zeros(1, 4, 16, 3, 5), torch.zeros(1, 4, 16, 3, 5),
            -torch.ones(16, 16), torch.zeros(16), torch.zeros(16)]
    bad_delta = [*good[:1], torch.zeros(1, 4, 3, 5), *good[2:]]
    with pytest.raises(ValueError, match=r"delta must be \(1, 4, 4, 3, 5\)"):
        scan_kernels.ss2d_scan_triton(*bad_delta)
    with pytest.raises(ValueError, match=r"A must be \(4·D=16, N\)"):
        scan_kernels.ss2d_scan_triton(*good[:4], -torch.ones(4, 16), *good[5:])
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        scan_kernels.ss2d_scan_triton(x.double(), *good[1:])


def test_scan_config_block_sizes() -> None:
    for strategy in scan_kernels.STRATEGIES:
        for n in (1, 16):
            cfg = scan_kernels.scan_config(strategy, n)
            assert cfg["N_PAD"] == n and cfg["STEPWISE"] == (strategy == "stepwise")
            assert all(v & (v - 1) == 0 for k, v in cfg.items() if k in ("BLOCK_D", "CHUNK"))
    with pytest.raises(ValueError, match="unknown scan strategy"):
        scan_kernels.scan_config("parallel", 16)
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        scan_kernels.scan_config("blockwise", 16, block_d=6)


def test_anomaly_head_rejects_mismatched_pair() -> None:
    pairs = [(torch.zeros(1, 4, 5, 5), torch.zeros(1, 4, 5, 6))]
    with pytest.raises(ValueError, match="pair 0 teacher"):
        head_kernels.anomaly_head_triton(pairs, (10, 10))


@pytest.mark.skipif(INTERPRET, reason="interpreted kernels accept CPU tensors")
def test_compiled_kernels_reject_cpu_tensors() -> None:
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        scan_kernels.ss2d_scan_triton(torch.zeros(1, 4, 3, 5), torch.zeros(1, 4, 4, 3, 5), torch.zeros(1, 4, 1, 3, 5),
                                      torch.zeros(1, 4, 1, 3, 5), -torch.ones(16, 1), torch.zeros(16), torch.zeros(16))
    with pytest.raises(ValueError, match="pair 0 must be CUDA tensors"):
        head_kernels.anomaly_head_triton([(torch.zeros(1, 4, 5, 5), torch.zeros(1, 4, 5, 5))], (10, 10))


@pytest.mark.parametrize("module", ["selective_scan", "anomaly_head", "aot"])
def test_missing_triton_names_the_fix(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    for name in ("triton", "triton.language", "triton.backends.compiler"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import triton…` raise ImportError
    spec = importlib.util.spec_from_file_location(f"_probe_{module}", ROOT / "kernels" / f"{module}.py")
    with pytest.raises(ImportError, match=r"pip install 'triton>=3\.2'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_mamba_ssm_peer(rand: Rand) -> None:
    """impl='mamba_ssm' is the mamba-ssm CUDA kernel where installed, a clear ScanImplUnavailable elsewhere."""
    u, delta = rand.normal(1, 4, 9), rand.uniform(1, 4, 9)
    A, B, C = -rand.uniform(4, 16), rand.normal(1, 16, 9), rand.normal(1, 16, 9)
    if importlib.util.find_spec("mamba_ssm") is None:
        with pytest.raises(ScanImplUnavailable, match="pip install mamba-ssm"):
            selective_scan(u, delta, A, B, C, impl="mamba_ssm")
        return
    if DEVICE != "cuda":
        pytest.skip("mamba-ssm is installed but its kernel needs CUDA")
    D = rand.normal(4)
    got = selective_scan(u, delta, A, B, C, D=D, delta_softplus=True, impl="mamba_ssm")
    want = selective_scan_ref(*as64(u, delta, A, B, C), D=D.double(), delta_softplus=True)
    assert_close(got, want, torch.float32, rand.seed)


@pytest.mark.skipif(DEVICE is not None, reason="the kernels run in this process")
def test_kernels_in_interpreter() -> None:
    """Run this file's kernel tests in a child process with Triton's CPU interpreter switched on."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
    print(tail)
    assert result.returncode == 0, f"interpreter run failed (rc={result.returncode}):\n{tail}"
