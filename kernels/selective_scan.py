"""Triton kernels for the selective scan: the plain Mamba scan and the fused four-route SS2D scan.

Both kernels come in two strategies (TensorRT tactics of the SS2DScan plugin), chosen with ``strategy=``:

- ``"stepwise"``: one program per (channel block, image) walks L one position at a time with the
  state (BLOCK_D, N) in registers. Little work per step, so it relies on many programs (large batch
  × channels) to hide memory latency.
- ``"blockwise"``: the same program walks L in blocks of CHUNK positions. Inside a chunk the recurrence
  h_t = a_t ⊙ h_{t−1} + b_t is an associative scan over (BLOCK_D, N, CHUNK) (``tl.associative_scan``
  with the composition of affine maps), so one iteration loads CHUNK positions at once and does their
  work in parallel: far fewer dependent steps, which is what a small batch needs.

The SS2D kernel reads x (B, D, H, W) and the per-route projections in spatial order and follows each
route by index arithmetic: no route-ordered copy of the inputs and no per-route output is ever built.
One program owns a channel block of one image and runs the four routes one after the other; route 0
stores into the output, routes 1–3 add to what is there. The tile has a single owner, so there are no
atomics and the result is deterministic. Each route's positions come from :func:`kernels.routes.route_pixel`,
the one definition of the route geometry, compiled here by ``triton.jit``.

:mod:`pdd.ssm` and :mod:`pdd.ss2d` call these kernels for ``impl="triton"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kernels.selective_scan needs Triton: pip install 'triton>=3.2' (or pip install -e '.[gpu]')"
    ) from exc

from kernels.contract import check_scan_inputs, check_ss2d
from kernels.routes import route_pixel

__all__ = ["STRATEGIES", "scan_config", "selective_scan_triton", "ss2d_scan_triton"]

STRATEGIES = ("stepwise", "blockwise")
# exp(x) = exp2(x·log2 e): A is pre-scaled once so each step costs one ex2.
_LOG2E = tl.constexpr(math.log2(math.e))
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _softplus(x):
    """F.softplus with threshold 20. log1p via the (1+e)−1 correction: keeps small δ exact to ~1 ulp."""
    e = tl.exp(x)
    one_e = 1.0 + e
    log1p = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / (one_e - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _compose(a_prev, b_prev, a_next, b_next):
    """Affine maps h ↦ a·h + b, applied prev then next: the associative operator of the recurrence."""
    return a_prev * a_next, a_next * b_prev + b_next


# The route geometry of kernels/routes.py, compiled as a Triton device function.
_route_pixel = triton.jit(route_pixel)


@triton.jit
def _store_out(y, out_ptrs, z_ptrs, mask, HAS_Z: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Store y (fp32) into out, first adding out's current value (ACCUMULATE) and gating by SiLU(z) (HAS_Z)."""
    if ACCUMULATE:
        y += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _route_stepwise(u_rows, dl_rows, z_rows, out_rows, b_row, c_row, A2, bias, Dv, mask_d, mask_n,
                      length, height, width, ROUTE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                      ACCUMULATE: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr):
    """Scan one route one step at a time; returns the last state (BLOCK_D, N_PAD) fp32.

    u/dl/z/out_rows: (BLOCK_D,) pointers to each channel's row of L; b/c_row: (N_PAD,) pointers;
    A2: (BLOCK_D, N_PAD) fp32 = A·log2(e); bias, Dv: (BLOCK_D,) fp32.
    """
    h = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    for t in range(length):
        p = _route_pixel(t, length, height, width, ROUTE)
        u = tl.load(u_rows + p, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(dl_rows + p, mask=mask_d, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        bv = tl.load(b_row + p, mask=mask_n, other=0.0).to(tl.float32)
        cv = tl.load(c_row + p, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * bv[None, :]
        y = tl.sum(h * cv[None, :], axis=1) + Dv * u
        _store_out(y, out_rows + p, z_rows + p, mask_d, HAS_Z, ACCUMULATE)
    return h


@triton.jit
def _route_blockwise(u_rows, dl_rows, z_rows, out_rows, b_row, c_row, A2, bias, Dv, mask_d, mask_n,
                   length, height, width, ROUTE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                   ACCUMULATE: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Scan one route CHUNK positions at a time (an associative scan per block); arguments and result of
    :func:`_route_stepwise`."""
    h = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    steps = tl.arange(0, CHUNK)
    is_last = (steps == CHUNK - 1)[None, None, :]
    for start in range(0, length, CHUNK):
        t = start + steps
        mask_t = t < length
        p = _route_pixel(t, length, height, width, ROUTE)[None, :]
        m2 = mask_d[:, None] & mask_t[None, :]
        mn = mask_n[:, None] & mask_t[None, :]
        u = tl.load(u_rows[:, None] + p, mask=m2, other=0.0).to(tl.float32)
        dt = tl.load(dl_rows[:, None] + p, mask=m2, other=0.0).to(tl.float32) + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        # Steps past the end must be identities (decay 1, input 0) so the chunk's last column is the state.
        dt = tl.where(m2, dt, 0.0)
        bv = tl.load(b_row[:, None] + p, mask=mn, other=0.0).to(tl.float32)  # (N_PAD, CHUNK)
        cv = tl.load(c_row[:, None] + p, mask=mn, other=0.0).to(tl.float32)
        decay = tl.exp2(dt[:, None, :] * A2[:, :, None])                       # (BLOCK_D, N_PAD, CHUNK)
        inc = (dt * u)[:, None, :] * bv[None, :, :]
        decay, inc = tl.associative_scan((decay, inc), axis=2, combine_fn=_compose)
        hs = decay * h[:, :, None] + inc
        y = tl.sum(hs * cv[None, :, :], axis=1) + Dv[:, None] * u
        _store_out(y, out_rows[:, None] + p, z_rows[:, None] + p, m2, HAS_Z, ACCUMULATE)
        h = tl.sum(tl.where(is_last, hs, 0.0), axis=2)
    return h


@triton.heuristics({
    "HAS_D": lambda args: args["D_ptr"] is not None,
    "HAS_Z": lambda args: args["z_ptr"] is not None,
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "STORE_STATE": lambda args: args["state_ptr"] is not None,
})
@triton.jit
def _scan_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                 dim, length, groups_b, groups_c,
                 out_ptr, state_ptr,
                 N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                 STEPWISE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, STORE_STATE: tl.constexpr):
    """Plain selective scan; grid (cdiv(dim, BLOCK_D), batch).

    u, delta, z, out: (batch, dim, L); A: (dim, N) fp32; B: (batch, groups_b, N, L); C: (batch, groups_c, N, L);
    D, bias: (dim,) fp32; state: (batch, dim, N) fp32. A channel block never straddles a B or C group.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    rows = (b * dim + offs_d) * length
    u_rows = u_ptr + rows
    g_b = (pid_d * BLOCK_D) // (dim // groups_b)
    g_c = (pid_d * BLOCK_D) // (dim // groups_c)
    b_row = B_ptr + ((b * groups_b + g_b) * N + offs_n) * length
    c_row = C_ptr + ((b * groups_c + g_c) * N + offs_n) * length
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * _LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_Z:
        z_rows = z_ptr + rows
    else:
        z_rows = u_rows  # never read: HAS_Z is off
    if STEPWISE:
        h = _route_stepwise(u_rows, delta_ptr + rows, z_rows, out_ptr + rows, b_row, c_row, A2, bias, Dv,
                              mask_d, mask_n, length, 1, length, 0, SOFTPLUS, HAS_Z, False, BLOCK_D, N_PAD)
    else:
        h = _route_blockwise(u_rows, delta_ptr + rows, z_rows, out_ptr + rows, b_row, c_row, A2, bias, Dv,
                           mask_d, mask_n, length, 1, length, 0, SOFTPLUS, HAS_Z, False, BLOCK_D, N_PAD, CHUNK)
    if STORE_STATE:
        tl.store(state_ptr + (b * dim + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _ss2d_kernel(x_ptr, delta_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr,
                 dim, height, width,
                 out_ptr,
                 N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                 STEPWISE: tl.constexpr):
    """Fused SS2D scan, four routes merged in place; grid (cdiv(dim, BLOCK_D), batch).

    x, out: (batch, dim, H, W); delta: (batch, 4, dim, H, W); B, C: (batch, 4, N, H, W), all spatial order;
    A: (4·dim, N) fp32; D, bias: (4·dim,) fp32. Parameters are ordered inputs, int32 sizes, output (AOT contract).
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    length = height * width
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    rows = (b * dim + offs_d) * length
    x_rows = x_ptr + rows
    out_rows = out_ptr + rows
    # Every route reads the same u = x, so the four D skips fold into one term added by route 0.
    d_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(4):
        d_sum += tl.load(D_ptr + k * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for k in tl.static_range(4):
        ch = k * dim + offs_d
        dl_rows = delta_ptr + ((b * 4 + k) * dim + offs_d) * length
        b_row = B_ptr + ((b * 4 + k) * N + offs_n) * length
        c_row = C_ptr + ((b * 4 + k) * N + offs_n) * length
        A2 = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * _LOG2E
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
        if k == 0:
            Dv = d_sum
        else:
            Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
            # Routes after the first read back what earlier routes stored, possibly from other threads.
            tl.debug_barrier()
        if STEPWISE:
            _route_stepwise(x_rows, dl_rows, x_rows, out_rows, b_row, c_row, A2, bias, Dv, mask_d, mask_n,
                              length, height, width, k, True, False, k > 0, BLOCK_D, N_PAD)
        else:
            _route_blockwise(x_rows, dl_rows, x_rows, out_rows, b_row, c_row, A2, bias, Dv, mask_d, mask_n,
                           length, height, width, k, True, False, k > 0, BLOCK_D, N_PAD, CHUNK)


def scan_config(strategy: str, d_state: int, block_d: int | None = None, chunk: int | None = None) -> dict[str, int]:
    """Constexpr launch parameters (N_PAD, BLOCK_D, CHUNK, STEPWISE, num_warps) for a strategy and d_state.

    The sizes are picked by hand from register budgets (checked with ``ptxas -v`` for sm_90: no spills at
    d_state 16 and 1) rather than autotuned, so that the AOT tactics and the JIT launches are the same
    kernels and export needs no tuning run. Stepwise keeps BLOCK_D·N ≈ 512 fp32 of state (4 values per
    thread at 4 warps) and leaves batch·d_inner/32 programs to fill the GPU. Blockwise uses CHUNK = 32 and
    BLOCK_D·N ≈ 128, so the (BLOCK_D, N, CHUNK) scan tile is 4096 fp32 at d_state 16 (16 per thread per
    live tensor at 8 warps) and 1024 at d_state 1 (4 warps).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown scan strategy {strategy!r}; expected one of {STRATEGIES}")
    n_pad = triton.next_power_of_2(d_state)
    stepwise = strategy == "stepwise"
    if stepwise:
        block_d, chunk = block_d or max(16, min(128, 512 // n_pad)), 1
    else:
        block_d, chunk = block_d or max(4, min(32, 128 // n_pad)), chunk or 32
    for name, value in (("block_d", block_d), ("chunk", chunk)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    num_warps = 8 if not stepwise and block_d * n_pad * chunk >= 4096 else 4
    return {"N_PAD": n_pad, "BLOCK_D": block_d, "CHUNK": chunk, "STEPWISE": stepwise, "num_warps": num_warps}


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"triton scan: {name} must be fp16, bf16 or fp32 (fp32 compute), got {t.dtype}")
    # Kernels decorated under TRITON_INTERPRET=1 are interpreted on CPU tensors; compiled ones need CUDA.
    if t.device.type != "cuda" and isinstance(_ss2d_kernel, triton.runtime.JITFunction):
        raise ValueError(f"triton scan: {name} must be a CUDA tensor (CPU only under TRITON_INTERPRET=1), "
                         f"got {t.device}")


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False, strategy: str = "blockwise", block_d: int | None = None,
                          chunk: int | None = None, out: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with the Triton kernel; the arguments and results of :func:`pdd.ssm.selective_scan_ref`.

    u, delta, z: (batch, dim, L) fp16|bf16|fp32; A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Computes in fp32; returns out (batch, dim, L) in u's dtype (written into ``out``
    when given) and, with ``return_last_state``, the state (batch, dim, N) fp32.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None:
            _check_float(name, t)
    batch, dim, length = u.shape
    n = A.shape[1]
    Bg = B.unsqueeze(1) if B.dim() == 3 else B
    Cg = C.unsqueeze(1) if C.dim() == 3 else C
    cfg = scan_config(strategy, n, block_d, chunk)
    # A channel block must sit inside one B group and one C group: shrink it to a divisor of the group size.
    for g in (Bg.shape[1], Cg.shape[1]):
        if g > 1:
            cfg["BLOCK_D"] = min(cfg["BLOCK_D"], (dim // g) & -(dim // g))
    if out is None:
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
    elif out.shape != u.shape or out.dtype != u.dtype or not out.is_contiguous():
        raise ValueError(f"triton scan: out must be contiguous {tuple(u.shape)} {u.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    state = u.new_empty(batch, dim, n, dtype=torch.float32) if return_last_state else None
    if batch * dim * length:
        f32 = {"dtype": torch.float32}
        grid = (triton.cdiv(dim, cfg["BLOCK_D"]), batch)
        _scan_kernel[grid](
            u.contiguous(), delta.contiguous(), A.to(**f32).contiguous(), Bg.contiguous(), Cg.contiguous(),
            None if D is None else D.to(**f32).contiguous(), None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.to(**f32).contiguous(),
            dim, length, Bg.shape[1], Cg.shape[1], out, state,
            N=n, SOFTPLUS=bool(delta_softplus), **cfg,
        )
    elif state is not None:
        state.zero_()
    return (out, state) if return_last_state else out


def ss2d_scan_triton(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor, delta_bias: Tensor,
                     strategy: str = "blockwise", block_d: int | None = None, chunk: int | None = None,
                     out: Tensor | None = None) -> Tensor:
    """Fused SS2D scan: the arguments and result of :func:`pdd.ss2d.ss2d_scan`, in one kernel launch.

    x: (B, D, H, W) fp16|bf16|fp32; delta: (B, 4, D, H, W); B, C: (B, 4, N, H, W); A: (4·D, N);
    D, delta_bias: (4·D,). Returns (B, D, H, W) in x's dtype (written into ``out`` when given).
    """
    batch, dim, height, width, _ = check_ss2d(x, delta, B, C, A, D, delta_bias)
    for name, t in (("x", x), ("delta", delta), ("B", B), ("C", C)):
        _check_float(name, t)
    cfg = scan_config(strategy, A.shape[1], block_d, chunk)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"ss2d_scan: out must be contiguous {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if out.numel():
        f32 = {"dtype": torch.float32}
        grid = (triton.cdiv(dim, cfg["BLOCK_D"]), batch)
        _ss2d_kernel[grid](
            x.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous(), A.to(**f32).contiguous(),
            D.to(**f32).contiguous(), delta_bias.to(**f32).contiguous(), dim, height, width, out,
            N=A.shape[1], **cfg,
        )
    return out

