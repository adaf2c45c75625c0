"""Selective scan (the S6 recurrence of Mamba / VMamba): one API, several implementations.

For every batch b, channel d and position t::

    δ_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t = exp(δ_t · A) ⊙ h_{t−1} + δ_t · B_t · u_t   (h holds N values per channel, h_{−1} = 0)
    y_t = ⟨h_t, C_t⟩ + D · u_t                       (D optional)
    out = y · SiLU(z)                                (z optional)

The signature and semantics are those of mamba-ssm's ``selective_scan_fn``.

Implementations (chosen explicitly with ``impl=``, never by silent fall back):

- ``"reference"``: the sequential recurrence, one step per position. float64-capable; the oracle.
- ``"chunked"``: pure PyTorch, vectorised over chunks of L; exports to standard ONNX ops (CumSum,
  Exp, Mul, Concat; no Loop over L and no per-step unrolling).
- ``"triton"``: the Triton-lang kernel of ``kernels/`` (registered when that package imports).
- ``"mamba_ssm"``: the CUDA kernel of the mamba-ssm package, where it is installed.

Example::

    >>> import torch
    >>> from pdd.ssm import selective_scan
    >>> u = torch.randn(1, 8, 32); delta = torch.rand(1, 8, 32)
    >>> A = -torch.rand(8, 16); B = torch.randn(1, 16, 32); C = torch.randn(1, 16, 32)
    >>> y = selective_scan(u, delta, A, B, C, impl="chunked")
    >>> y.shape
    torch.Size([1, 8, 32])
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SCAN_IMPLS",
    "SS2D_ROUTES",
    "ScanImplUnavailable",
    "cross_merge",
    "cross_scan",
    "has_fused_ss2d",
    "is_tracing",
    "merge_routes",
    "register_scan_impl",
    "register_ss2d_impl",
    "resolve_scan_impl",
    "route_order",
    "route_positions",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "ss2d_positions",
    "ss2d_scan",
    "traced_scan_graph",
    "tracing_sequential",
]

log = logging.getLogger(__name__)

SCAN_IMPLS = ("reference", "chunked", "triton", "cpu_kernel", "mamba_ssm")

# Chunk length of traced/exported graphs, which cannot adapt to the data: 16 steps keep |A|·Σδ over a
# chunk far inside float32's exponent range for trained VMamba weights.
TRACE_CHUNK_SIZE = 16
# How a traced chunked scan joins its chunks (see traced_scan_graph).
TRACE_SCAN_GRAPHS = ("parallel", "sequential")
_trace_graph: ContextVar[str] = ContextVar("pdd_traced_scan_graph", default="parallel")
# Largest |exponent| the chunked path lets exp() see. float32 overflows past e^88.7.
_EXP_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}

_registry: dict[str, Callable[..., Tensor | tuple[Tensor, Tensor]]] = {}
# Modules that register an implementation when imported, tried on first use of that name.
_providers = {"triton": "kernels.selective_scan", "cpu_kernel": "pdd._cpu_kernel", "mamba_ssm": "pdd._mamba_ssm"}
_announced: set[str] = set()


class ScanImplUnavailable(RuntimeError):
    """The requested scan implementation cannot run here (missing package, no GPU)."""


def register_scan_impl(name: str, fn: Callable[..., Tensor | tuple[Tensor, Tensor]]) -> None:
    """Make ``selective_scan(..., impl=name)`` call ``fn`` (same signature as the API, no ``impl``)."""
    if name not in SCAN_IMPLS:
        raise ValueError(f"unknown scan implementation {name!r}; expected one of {SCAN_IMPLS}")
    _registry[name] = fn


def _lookup(impl: str) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown scan implementation {impl!r}; expected one of {SCAN_IMPLS}")
    if impl not in _registry and impl in _providers:
        try:
            importlib.import_module(_providers[impl])
        except ImportError as exc:
            raise ScanImplUnavailable(
                f"selective_scan impl={impl!r} is not available: {exc}. "
                f"Use impl='chunked' on CPU, or install the GPU extra: pip install -e '.[gpu]'"
            ) from exc
    if impl not in _registry:
        raise ScanImplUnavailable(f"selective_scan impl={impl!r} did not register itself")
    return _registry[impl]


def resolve_scan_impl(impl: str, device: torch.device | str = "cpu") -> str:
    """Turn ``"auto"`` into a concrete implementation for ``device`` and log the choice.

    ``auto`` means the Triton kernel on a CUDA device and the compiled CPU kernel (``cpu_kernel``) on a
    CPU, each where it can run, else the chunked PyTorch path with a warning saying why. Both kernels are
    for inference; the scan only runs in the frozen VMamba teacher, so training needs no backward through
    it. Any other name is checked and returned unchanged.
    """
    if impl != "auto":
        _lookup(impl)
        return impl
    device = torch.device(device)
    chosen = "chunked"
    preferred = {"cuda": "triton", "cpu": "cpu_kernel"}.get(device.type)
    if preferred is not None:
        try:
            _lookup(preferred)
            chosen = preferred
        except ScanImplUnavailable as exc:
            log.warning("scan impl 'auto' on %s: %s unavailable (%s); using 'chunked'", device, preferred, exc)
    log.info("scan impl 'auto' resolved to %r on %s", chosen, device)
    return chosen


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape == (batch, n, length)
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2:] == (n, length) and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (batch={batch}, N={n}, L={length}) or "
                f"(batch, groups dividing dim={dim}, N, L), got {tuple(t.shape)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _grouped(t: Tensor) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, G, N, L)."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool, dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if softplus and is_tracing():
        delta = _graph_softplus(delta)
    elif softplus:
        delta = F.softplus(delta)  # threshold 20, as mamba-ssm and VMamba
    return delta


def _graph_softplus(t: Tensor) -> Tensor:
    """Softplus in a stable form that exported graphs run fast (ONNX Runtime's Softplus node is ~4x slower
    than these five element-wise ops); equal to softplus within float rounding."""
    return F.relu(t) + torch.log1p(torch.exp(-t.abs()))


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential recurrence, one step per position: the oracle.

    u, delta, z: (batch, dim, L) fp16|fp32|fp64; A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Computes in float64 for float64 input, float32 otherwise; returns u's dtype
    (and the last state (batch, dim, N) in the compute dtype when ``return_last_state``).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    uc = u.to(dtype)
    dl = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    Ac = A.to(dtype)
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)
    per_group = dim // Bg.shape[1]
    Bd = Bg.repeat_interleave(per_group, dim=1)  # (batch, dim, N, L)
    Cd = Cg.repeat_interleave(dim // Cg.shape[1], dim=1)
    h = uc.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = dl[:, :, t, None]
        h = torch.exp(dt * Ac) * h + dt * Bd[..., t] * uc[:, :, t, None]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uc.new_zeros(batch, dim, 0)
    out = _finish(y, uc, D, z, u.dtype)
    return (out, h) if return_last_state else out


def is_tracing() -> bool:
    """True while a graph is being captured (jit trace, torch.compile, torch.export, ONNX export)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting or torch.onnx.is_in_onnx_export()


def _safe_chunk_size(delta: Tensor, A: Tensor, chunk: int, nonnegative: bool = False) -> int:
    """Largest power-of-two chunk ≤ ``chunk`` whose in-chunk decay exponents stay finite.

    Inside a chunk the state is written as exp(A·Δ_t)·cumsum(exp(−A·Δ_s)·x_s), Δ the running sum of δ
    measured from the chunk's reference step (its middle), so |A|·|Δ_t| must stay inside the float
    range (80 in float32: e^80 ≈ 5.5e34) for every step of every chunk. Real VMamba weights sit far
    below it; extreme δ·|A| gets smaller chunks. NaN or inf in δ or A is refused here. With
    ``nonnegative`` δ (after softplus) Δ is monotone, so the reach is the larger of the two half-chunk
    sums, one read of δ.
    """
    limit = _EXP_LIMIT[delta.dtype]
    a_max = A.abs().amax(dim=1)                                    # per channel
    while delta.shape[-1]:
        pad = (-delta.shape[-1]) % chunk
        windows = (F.pad(delta, (0, pad)) if pad else delta).unflatten(-1, (-1, chunk))
        ref = (chunk - 1) // 2
        if nonnegative:
            reach = torch.maximum(windows[..., 1:ref + 1].sum(-1), windows[..., ref + 1:].sum(-1)).amax(-1)
        else:
            cum = windows.cumsum(-1)
            reach = (cum - cum[..., ref:ref + 1]).abs_().amax(dim=(-2, -1))  # max |Δ_t − Δ_ref|: (batch, dim)
        worst = (reach * a_max).amax().item()
        if not math.isfinite(worst):  # a NaN or inf anywhere in δ or A ends up here
            raise ValueError("selective_scan: delta or A contains NaN or inf")
        if worst <= limit or chunk == 1:
            break
        chunk //= 2
    return chunk


def _scan_over_chunks(decay: Tensor, inc: Tensor) -> Tensor:
    """Inclusive scan of h_c = decay_c ⊙ h_{c−1} + inc_c along the last dim (Hillis–Steele, log2 steps)."""
    step = 1
    while step < inc.shape[-1]:
        inc = torch.cat([inc[..., :step], decay[..., step:] * inc[..., :-step] + inc[..., step:]], dim=-1)
        decay = torch.cat([decay[..., :step], decay[..., step:] * decay[..., :-step]], dim=-1)
        step *= 2
    return inc


def _chunked_core(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Whole-sequence graph: u, dl (b, G, dg, L); A (G, dg, N); B, C (b, G, N, L); L a multiple of ``chunk``.

    Works in the layout (b, G, dg, N, chunks, T) so that B and C broadcast without copies; one fixed
    graph of standard ops (what tracing, export and autograd see). Returns y (b, G, dg, L) and the
    last state (b, G, dg, N).
    """
    b, g, dg, length = u.shape
    n = A.shape[-1]
    nc = length // chunk
    ref = (chunk - 1) // 2
    dl = dl.reshape(b, g, dg, 1, nc, chunk)
    cum = torch.cumsum(dl, dim=-1)                                 # Δ_t within each chunk
    mid = cum[..., ref:ref + 1]                                    # Δ at the chunk's reference step
    E = torch.exp(A[None, :, :, :, None, None] * (cum - mid))      # exp(A(Δ_t − Δ_ref)): (b, G, dg, N, nc, T)
    Bc = B.reshape(b, g, 1, n, nc, chunk)
    Cc = C.reshape(b, g, 1, n, nc, chunk)
    x = (dl * u.reshape(b, g, dg, 1, nc, chunk)) * Bc              # δ_t B_t u_t
    acc = torch.cumsum(x / E, dim=-1)                              # Σ_{s≤t} exp(−A(Δ_s − Δ_ref)) x_s
    A5 = A[None, :, :, :, None]                                    # (1, G, dg, N, 1)
    local_end = E[..., -1] * acc[..., -1]                          # chunk end state from a zero start
    ends = _scan_over_chunks(torch.exp(A5 * cum[..., -1]), local_end)  # (b, G, dg, N, nc)
    carry = torch.cat([torch.zeros_like(ends[..., :1]), ends[..., :-1]], dim=-1)
    entering = (torch.exp(A5 * mid[..., 0]) * carry).unsqueeze(-1)   # state entering each chunk
    y = ((acc + entering) * E * Cc).sum(3)
    return y.reshape(b, g, dg, length), ends[..., -1]


def _chunked_eager(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
                   elements: int = 1 << 17) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`_chunked_core`, for eager inference (no autograd, no tracing).

    Walks the chunks in order, carrying the state (b, G, dg, N) from one chunk to the next, so there
    is no scan across chunks at all. Each step updates a cache-sized tile of about ``elements``
    values (a block of channels × one chunk) in reused buffers: eight passes over the tile.
    """
    b, g, dg, length = u.shape
    n = A.shape[-1]
    nc = length // chunk
    ref = (chunk - 1) // 2

    def by_chunk(t: Tensor) -> Tensor:  # (..., nc·T) -> (nc, ..., T), a view
        return t.unflatten(-1, (nc, chunk)).movedim(-2, 0)

    dl = by_chunk(dl).contiguous()                                  # (nc, b, G, dg, T), contiguous per chunk
    xs = dl * by_chunk(u)                                           # δ_t u_t, laid out like dl
    cum = dl.cumsum(-1)
    rel = cum - cum[..., ref:ref + 1]                               # Δ_t − Δ_ref
    A5 = A[None, :, :, :, None]                                     # (1, G, dg, N, 1)
    to_ref = torch.exp(A * cum[..., ref, None])                     # decay from chunk start to ref: (nc, b, G, dg, N)
    Bc = by_chunk(B).unsqueeze(3).contiguous()                      # (nc, b, G, 1, N, T)
    Cc = by_chunk(C).unsqueeze(3).contiguous()
    y = u.new_empty(b, g, dg, nc, chunk)
    last = u.new_zeros(b, g, dg, n)
    block = max(1, min(dg, elements // max(1, b * g * n * chunk)))
    E_buf = u.new_empty(b, g, block, n, chunk)
    h_bufs = (torch.empty_like(E_buf), torch.empty_like(E_buf))  # this chunk's states and the previous chunk's
    y_buf = u.new_empty(nc, b, g, block, chunk)  # one block's outputs, each chunk's slice contiguous
    for start in range(0, dg, block):
        ch = slice(start, min(dg, start + block))
        width = ch.stop - start
        E, y_blk = E_buf[:, :, :width], y_buf[:, :, :, :width]
        hs = tuple(buf[:, :, :width] for buf in h_bufs)
        # This block's slices, taken once: the chunk loop then only picks chunk c.
        A_b, rel_b, xs_b, to_ref_b = A5[:, :, ch], rel[:, :, :, ch, None], xs[:, :, :, ch, None], to_ref[:, :, :, ch]
        prev = None
        for c in range(nc):
            h = hs[c % 2]
            torch.mul(A_b, rel_b[c], out=E).exp_()                                  # exp(A(Δ_t − Δ_ref))
            torch.mul(Bc[c], xs_b[c], out=h).div_(E)
            if prev is not None:  # the entering state, added to every cumulative sum via the first term
                h[..., 0].addcmul_(to_ref_b[c], prev[..., -1])
            h.cumsum_(-1).mul_(E)                                                   # the states h_t
            torch.sum(torch.mul(h, Cc[c], out=E), 3, out=y_blk[c])                 # Σ_n C_t h_t
            prev = h
        last[:, :, ch] = prev[..., -1]  # nc ≥ 1: empty sequences take the whole-sequence graph
        y[:, :, ch] = y_blk.permute(1, 2, 3, 0, 4)
    return y.reshape(b, g, dg, length), last


def _chunked_sequential(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`_chunked_core`, as a graph of standard ops that walks the chunks in order
    (:func:`_sequential_positions` on position-major copies of the inputs)."""
    # One swap of the last two axes each: graph runtimes transpose that fast, unlike 5-D permutations.
    y, state = _sequential_positions(u.transpose(2, 3), dl.transpose(2, 3), A, B.transpose(2, 3), C.transpose(2, 3),
                                     chunk)
    return y.transpose(2, 3), state.transpose(2, 3)


def _sequential_positions(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The chunked scan walking the chunks in order, position-major: u, dl (b, G, L, dg); A (G, dg, N);
    B, C (b, G, L, N); L a multiple of ``chunk``. Returns y (b, G, L, dg) and the last state (b, G, N, dg).

    The eager walk of :func:`_chunked_eager` written without in-place updates, for export: one step of
    about ten ops per chunk (the graph grows with L / chunk, not with L), each on one chunk of all
    channels, so temporaries stay chunk-sized at any batch. The layout (b, G, chunk, N, T, channels)
    keeps channels innermost, so every broadcast runs over long contiguous spans and the in-chunk
    cumulative sum is one GEMM with a constant lower-triangular matrix; every per-chunk slice keeps its
    axis, so a step needs no reshapes.
    """
    length = u.shape[2]
    nc = length // chunk
    ref = (chunk - 1) // 2

    def by_chunk(t: Tensor) -> Tensor:  # (b, G, nc·T, X) -> (b, G, nc, T, X), a reshape
        return t.unflatten(2, (nc, chunk))

    def steps(t: Tensor) -> tuple[Tensor, ...]:  # one slice per chunk along axis 2, the axis kept
        return t.split(1, dim=2)

    dl = by_chunk(dl)
    xs = (dl * by_chunk(u)).unsqueeze(3)                            # δ_t u_t: (b, G, nc, 1, T, dg)
    cum = dl.cumsum(3).unsqueeze(3)
    rel = cum - cum[..., ref:ref + 1, :]                            # Δ_t − Δ_ref
    At = A.transpose(1, 2)[None, :, None, :, None, :]               # (1, G, 1, N, 1, dg)
    to_ref = torch.exp(At * cum[..., ref:ref + 1, :])               # chunk start to ref: (b, G, nc, N, 1, dg)
    Bc, Cc = (by_chunk(t).transpose(3, 4).unsqueeze(-1) for t in (B, C))  # (b, G, nc, N, T, 1)
    lower = torch.ones(chunk, chunk, dtype=u.dtype, device=u.device).tril()   # lower @ x = cumsum(x) over T
    ys, state = [], None
    for rel_c, xs_c, B_c, C_c, to_ref_c in zip(steps(rel), steps(xs), steps(Bc), steps(Cc), steps(to_ref)):
        E = torch.exp(At * rel_c)                                   # (b, G, 1, N, T, dg)
        h = torch.matmul(lower, B_c * xs_c / E)
        if state is not None:
            h = h + to_ref_c * state
        h = h * E                                                   # the states h_t
        state = h[..., -1:, :]                                      # (b, G, 1, N, 1, dg)
        ys.append((C_c * h).sum(3))                                 # Σ_n C_t h_t: (b, G, 1, T, dg)
    return torch.cat(ys, dim=2).flatten(2, 3), state.flatten(2, 4)


def ss2d_positions(x: Tensor, xs: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor,
                   delta_bias: Tensor) -> Tensor:
    """The four-route scan in position-major layout, as one graph of standard ops (what a traced SS2D
    exports with the sequential scan graph): no transpose of the channel and position axes anywhere.

    x: (B, H, W, d) channels-last; xs: :func:`route_positions` of x (the scan input u); delta, B, C: each
    route's projections in that route's order, (B, 4, L, d) and (B, 4, L, N); A: (4·d, N); D, delta_bias:
    (4·d,). Returns (B, H, W, d): the routes merged back on the grid plus the D skips. Exact while
    |A|·Σδ over half a chunk of ``TRACE_CHUNK_SIZE`` stays below float32's exponent range (see
    :func:`selective_scan_chunked`).
    """
    b, h, w, d = x.shape
    n = A.shape[-1]
    chunk = TRACE_CHUNK_SIZE
    dtype = _compute_dtype(x)
    dl = delta.to(dtype) + delta_bias.to(dtype).view(SS2D_ROUTES, 1, d)
    dl = _graph_softplus(dl)
    pad = (-h * w) % chunk

    def padded(t: Tensor) -> Tensor:  # δ = 0 on padding leaves the state untouched
        return F.pad(t.to(dtype), (0, 0, 0, pad)) if pad else t.to(dtype)

    y, _ = _sequential_positions(padded(xs), padded(dl), A.to(dtype).view(SS2D_ROUTES, d, n), padded(B), padded(C),
                                 chunk)
    y = y[:, :, :h * w]                                             # (B, 4, L, d)
    # Step s of route k read grid position order[k, s]: scatter each route back by the inverse order.
    back = route_order(h, w, y.device).view(SS2D_ROUTES, h * w).argsort(dim=1)
    back = back + torch.arange(SS2D_ROUTES, device=y.device)[:, None] * (h * w)
    grid = y.reshape(b, SS2D_ROUTES * h * w, d).index_select(1, back.flatten()).view(b, SS2D_ROUTES, h * w, d).sum(1)
    skip = D.to(dtype).view(SS2D_ROUTES, d).sum(0)
    return (grid.view(b, h, w, d) + x.to(dtype) * skip).to(x.dtype)


def route_order(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(4·L,) int64: the row-major grid position that each step of the four routes reads, route after route
    (0 row-major, 1 column-major, 2 and 3 the same reversed; cf. :func:`route`)."""
    rows = torch.arange(height * width, device=device)
    cols = rows.view(height, width).t().flatten()
    return torch.cat([rows, cols, rows.flip(0), cols.flip(0)])


def route_positions(x: Tensor) -> Tensor:
    """(B, H, W, C) channels-last -> (B, 4, L, C): positions read along the four routes (cf. :func:`cross_scan`).

    One gather of whole channel vectors by :func:`route_order` (a constant in a traced graph). Built from
    transposes instead, graph optimisers merge the grid transpose of the column routes with the NCHW→NHWC
    one before it into a permutation that moves single floats (ONNX Runtime: 20x slower than this gather).
    """
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c).index_select(1, route_order(h, w, x.device)).view(b, SS2D_ROUTES, h * w, c)


def tracing_sequential() -> bool:
    """True while a graph is being captured inside ``traced_scan_graph("sequential")``."""
    return is_tracing() and _trace_graph.get() == "sequential"


@contextlib.contextmanager
def traced_scan_graph(kind: str) -> Iterator[None]:
    """Choose the graph a traced (exported, compiled) chunked scan builds inside this block.

    ``"parallel"`` (default): the whole sequence at once, chunks joined by a log-depth scan; suits
    GPUs (TensorRT), but its temporaries hold every chunk of every channel. ``"sequential"``: the
    chunks in order, one chunk-sized step each (:func:`_chunked_sequential`); suits CPU runtimes, and
    its memory does not grow with L. Both are standard ops and give the same numbers.
    """
    if kind not in TRACE_SCAN_GRAPHS:
        raise ValueError(f"unknown traced scan graph {kind!r}; expected one of {TRACE_SCAN_GRAPHS}")
    token = _trace_graph.set(kind)
    try:
        yield
    finally:
        _trace_graph.reset(token)


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                           z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, chunk_size: int = 64) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked pure-PyTorch scan: cumulative sums inside chunks of ``chunk_size`` positions.

    Same arguments, dtypes and results as :func:`selective_scan_ref`. Eager inference (no autograd)
    walks the chunks in order over cache-sized tiles (:func:`_chunked_eager`); with autograd, and
    under tracing or export, one whole-sequence graph joins the chunks by a log-depth scan
    (:func:`_chunked_core`), of fixed chunk ``min(chunk_size, TRACE_CHUNK_SIZE)`` when traced. In
    eager mode the chunk shrinks (logged) when δ·|A| is so large that the in-chunk exponentials would
    overflow; the traced graph is exact while |A|·Σδ over a chunk stays below ~80.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"selective_scan: chunk_size must be a power of two, got {chunk_size}")
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    uc = u.to(dtype)
    dl = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    Ac = A.to(dtype)
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)
    if Bg.shape[1] != Cg.shape[1]:
        # Different group counts: bring both to one group per channel.
        Bg = Bg.repeat_interleave(dim // Bg.shape[1], dim=1)
        Cg = Cg.repeat_interleave(dim // Cg.shape[1], dim=1)
    groups = Bg.shape[1]
    per_group = dim // groups
    n = A.shape[1]
    tracing = is_tracing()
    if tracing:
        chunk = min(chunk_size, TRACE_CHUNK_SIZE)
    else:
        chunk = _safe_chunk_size(dl, Ac, chunk_size, nonnegative=delta_softplus)
    if chunk != chunk_size:
        log.debug("selective_scan chunked: δ·|A| too large for chunk %d, using chunk %d", chunk_size, chunk)
    pad = (-length) % chunk

    def padded(t: Tensor) -> Tensor:  # δ = 0 on padding leaves the state, so the last state too, untouched
        return F.pad(t, (0, pad)) if pad else t

    up = padded(uc).reshape(batch, groups, per_group, -1)
    dp = padded(dl).reshape(batch, groups, per_group, -1)
    Ag = Ac.reshape(groups, per_group, n)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias))
    if tracing and length and _trace_graph.get() == "sequential":
        y, state = _chunked_sequential(up, dp, Ag, padded(Bg), padded(Cg), chunk)
    elif tracing or needs_grad or length == 0:
        y, state = _chunked_core(up, dp, Ag, padded(Bg), padded(Cg), chunk)
    else:
        y, state = _chunked_eager(up, dp, Ag, padded(Bg), padded(Cg), chunk)
    y = y.reshape(batch, dim, -1)[..., :length]
    out = _finish(y, uc, D, z, u.dtype)
    return (out, state.reshape(batch, dim, n)) if return_last_state else out


register_scan_impl("reference", selective_scan_ref)
register_scan_impl("chunked", selective_scan_chunked)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, impl: str = "chunked") -> Tensor | tuple[Tensor, Tensor]:
    """Run the selective scan with the implementation named by ``impl``.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, groups, N, L);
    D, delta_bias: (dim,). Returns out (batch, dim, L) in u's dtype, plus the last state
    (batch, dim, N) when ``return_last_state``. Raises :class:`ScanImplUnavailable` if ``impl``
    cannot run here: there is no silent fall back.
    """
    fn = _lookup(impl)
    if impl not in _announced:
        _announced.add(impl)
        log.info("selective_scan: using impl=%r", impl)
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state)


# --- SS2D: the four-route scan of a VMamba block ------------------------------------------------

SS2D_ROUTES = 4

_ss2d_registry: dict[str, Callable[..., Tensor]] = {}


def register_ss2d_impl(name: str, fn: Callable[..., Tensor]) -> None:
    """Make ``ss2d_scan(..., impl=name)`` call a fused ``fn`` (same arguments, no ``impl``)."""
    if name not in SCAN_IMPLS:
        raise ValueError(f"unknown scan implementation {name!r}; expected one of {SCAN_IMPLS}")
    _ss2d_registry[name] = fn


def has_fused_ss2d(impl: str) -> bool:
    """True if ``impl`` has a fused SS2D implementation (it reads spatial-order inputs by index arithmetic)."""
    if impl not in _ss2d_registry and impl in _providers:
        with contextlib.suppress(ScanImplUnavailable):
            _lookup(impl)  # importing the provider registers its fused SS2D kernel too
    return impl in _ss2d_registry


def merge_routes(ys: Tensor, x: Tensor, D: Tensor) -> Tensor:
    """Scan outputs of the four routes (B, 4, C, L) back on the grid of x (B, C, H, W), summed, plus the
    D skips: route k reads x, so undoing it on u_k·D_k gives x·D_k, and the four skips are one x·Σ_k D_k."""
    c = ys.shape[2]
    h, w = x.shape[-2:]
    skip = D.to(ys.dtype).view(SS2D_ROUTES, c).sum(0)
    return torch.addcmul(cross_merge(ys, h, w), x.to(ys.dtype), skip[:, None, None])


def route(x: Tensor, k: int) -> Tensor:
    """(B, C, H, W) -> (B, C, L) read along SS2D route k: 0 row-major, 1 column-major, 2 and 3 reversed."""
    seq = x.flatten(2) if k % 2 == 0 else x.transpose(2, 3).flatten(2)
    return seq.flip(-1) if k >= 2 else seq


def cross_scan(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4, C, L): the input read along all four routes (one transpose for routes 1, 3)."""
    rows, cols = route(x, 0), route(x, 1)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(y: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, C, L) -> (B, C, H, W): undo each route and sum the four."""
    b, _, c, _ = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    cols = cols.view(b, c, width, height).transpose(2, 3)
    return rows.view(b, c, height, width) + cols


def ss2d_scan(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor, delta_bias: Tensor,
              impl: str = "chunked") -> Tensor:
    """Selective scan of an SS2D block along its four routes, merged back to the image grid.

    All per-pixel inputs are given in spatial (row-major) order; route k reads them along its path:

    x: (B, D, H, W) conv output (the scan input u); delta: (B, 4, D, H, W) before bias and softplus;
    B, C: (B, 4, N, H, W); A: (4·D, N) (already −exp(A_logs)); D, delta_bias: (4·D,).
    Returns (B, D, H, W) in x's dtype: Σ_k route_k⁻¹(scan_k). Softplus is always applied to δ.

    ``reference`` and ``chunked`` build the route-ordered copies and call :func:`selective_scan`;
    a fused implementation (``triton``) walks the routes by index arithmetic instead.
    """
    if has_fused_ss2d(impl):
        return _ss2d_registry[impl](x, delta, B, C, A, D, delta_bias)
    b, d, h, w = x.shape

    def routed(t: Tensor) -> Tensor:  # (B, 4, ·, H, W) -> (B, 4, ·, L), route k of slice k
        return torch.stack([route(t[:, k], k) for k in range(SS2D_ROUTES)], dim=1)

    ys = selective_scan(cross_scan(x).reshape(b, SS2D_ROUTES * d, h * w),
                        routed(delta).reshape(b, SS2D_ROUTES * d, h * w), A, routed(B), routed(C),
                        delta_bias=delta_bias, delta_softplus=True, impl=impl)
    return merge_routes(ys.view(b, SS2D_ROUTES, d, h * w), x, D)
