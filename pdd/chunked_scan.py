"""The three chunked formulations of the selective scan in PyTorch ops, one per target (see :mod:`pdd.ssm`).

Inside a chunk of T positions the state is written as exp(A·Δ_t)·cumsum(exp(−A·Δ_s)·x_s), Δ the running
sum of δ measured from the chunk's reference step (its middle), so a chunk is a few element-wise ops and
one cumulative sum instead of T dependent steps. The chunks are then joined in one of three ways:

- :func:`tile_walk` (``eager``): the chunks walked in order over cache-sized tiles of channels, in place
  in reused buffers; the fastest in PyTorch on a CPU, inference only (no autograd, no graph).
- :func:`whole_sequence_scan` (``graph-parallel``): all chunks at once, joined by a log-depth scan across
  chunks; one fixed graph of standard ops, what autograd and GPU graph runtimes want.
- :func:`sequential_positions` (``graph-sequential``): the chunks walked in order, position-major, about
  ten standard ops per chunk with chunk-sized temporaries, what CPU graph runtimes want.

Both are exact while |A|·|Δ_t − Δ_ref| stays inside the float range; :func:`safe_chunk_size` picks the
chunk for eager runs from the data, graphs use the fixed :data:`GRAPH_CHUNK_SIZE`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GRAPH_CHUNK_SIZE", "graph_softplus", "safe_chunk_size", "sequential_positions", "tile_walk",
           "whole_sequence_scan"]

# Chunk length of exported graphs, which cannot adapt to the data: 16 steps keep |A|·Σδ over a chunk far
# inside float32's exponent range for trained VMamba weights.
GRAPH_CHUNK_SIZE = 16
# Largest |exponent| the chunked formulations let exp() see. float32 overflows past e^88.7.
_EXP_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}


def graph_softplus(t: Tensor) -> Tensor:
    """Softplus in a stable form that exported graphs run fast (ONNX Runtime's Softplus node is ~4x slower
    than these five element-wise ops); equal to softplus within float rounding."""
    return F.relu(t) + torch.log1p(torch.exp(-t.abs()))


def safe_chunk_size(delta: Tensor, A: Tensor, chunk: int, nonnegative: bool = False) -> int:
    """Largest power-of-two chunk ≤ ``chunk`` whose in-chunk decay exponents stay finite.

    delta: (..., dim, L) δ after bias and softplus; A: (dim, N). |A|·|Δ_t − Δ_ref| must stay inside the
    float range (80 in float32: e^80 ≈ 5.5e34) for every step of every chunk. Real VMamba weights sit far
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


def whole_sequence_scan(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """All chunks at once: u, dl (b, G, dg, L); A (G, dg, N); B, C (b, G, N, L); L a multiple of ``chunk``.

    Works in the layout (b, G, dg, N, chunks, T) so that B and C broadcast without copies; one fixed
    graph of standard ops (what autograd and export see). Returns y (b, G, dg, L) and the last state
    (b, G, dg, N).
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
    last = ends[..., -1] if nc else u.new_zeros(b, g, dg, n)
    return y.reshape(b, g, dg, length), last


def sequential_positions(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The chunks walked in order, position-major: u, dl (b, G, L, dg); A (G, dg, N); B, C (b, G, L, N);
    L a positive multiple of ``chunk``. Returns y (b, G, L, dg) and the last state (b, G, N, dg).

    One step of about ten ops per chunk (the graph grows with L / chunk, not with L), each on one chunk of
    all channels, so temporaries stay chunk-sized at any batch. The layout (b, G, chunk, N, T, channels)
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


def tile_walk(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
              elements: int = 1 << 17) -> tuple[Tensor, Tensor]:
    """The contract of :func:`whole_sequence_scan` for eager inference: u, dl (b, G, dg, L); A (G, dg, N);
    B, C (b, G, N, L); L a multiple of ``chunk``. Returns y (b, G, dg, L) and the last state (b, G, dg, N).

    Walks the chunks in order carrying the state, so nothing is scanned across chunks. Each step updates a
    tile of about ``elements`` values (a block of channels × one chunk) in buffers reused from step to step:
    eight passes over a cache-sized tile. In-place updates: no autograd (use ``graph-parallel``).
    """
    b, g, dg, length = u.shape
    n = A.shape[-1]
    nc = length // chunk
    if nc == 0:
        return u.new_zeros(b, g, dg, 0), u.new_zeros(b, g, dg, n)
    ref = (chunk - 1) // 2

    def by_chunk(t: Tensor) -> Tensor:  # (..., nc·T) -> (nc, ..., T), a view
        return t.unflatten(-1, (nc, chunk)).movedim(-2, 0)

    dl = by_chunk(dl).contiguous()                                  # (nc, b, G, dg, T), contiguous per chunk
    xs = dl * by_chunk(u)                                           # δ_t u_t, laid out like dl
    cum = dl.cumsum(-1)
    rel = cum - cum[..., ref:ref + 1]                               # Δ_t − Δ_ref
    to_ref = torch.exp(A * cum[..., ref, None])                     # chunk start to ref: (nc, b, G, dg, N)
    Bc, Cc = (by_chunk(t).unsqueeze(3).contiguous() for t in (B, C))  # (nc, b, G, 1, N, T)
    y = u.new_empty(b, g, dg, nc, chunk)
    last = u.new_zeros(b, g, dg, n)
    block = max(1, min(dg, elements // max(1, b * g * n * chunk)))
    E_buf = u.new_empty(b, g, block, n, chunk)
    h_bufs = (torch.empty_like(E_buf), torch.empty_like(E_buf))    # this chunk's states and the previous one's
    y_buf = u.new_empty(nc, b, g, block, chunk)                      # one block's outputs, contiguous per chunk
    A5 = A[None, :, :, :, None]                                     # (1, G, dg, N, 1)
    for start in range(0, dg, block):
        ch = slice(start, min(dg, start + block))
        width = ch.stop - start
        E, y_blk = E_buf[:, :, :width], y_buf[:, :, :, :width]
        hs = tuple(buf[:, :, :width] for buf in h_bufs)
        A_b, rel_b, xs_b, to_ref_b = A5[:, :, ch], rel[:, :, :, ch, None], xs[:, :, :, ch, None], to_ref[:, :, :, ch]
        prev = None
        for c in range(nc):
            h = hs[c % 2]
            torch.mul(A_b, rel_b[c], out=E).exp_()                  # exp(A(Δ_t − Δ_ref))
            torch.mul(Bc[c], xs_b[c], out=h).div_(E)
            if prev is not None:  # the entering state joins every cumulative sum through the first term
                h[..., 0].addcmul_(to_ref_b[c], prev[..., -1])
            h.cumsum_(-1).mul_(E)                                   # the states h_t
            torch.sum(torch.mul(h, Cc[c], out=E), 3, out=y_blk[c])  # Σ_n C_t h_t
            prev = h
        last[:, :, ch] = prev[..., -1]
        y[:, :, ch] = y_blk.permute(1, 2, 3, 0, 4)
    return y.reshape(b, g, dg, length), last
