"""Selective scan (the S6 recurrence of Mamba / VMamba): one 1-D API, implementations chosen by name.

For every batch b, channel d and position t::

    δ_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t = exp(δ_t · A) ⊙ h_{t−1} + δ_t · B_t · u_t   (h holds N values per channel, h_{−1} = 0)
    y_t = ⟨h_t, C_t⟩ + D · u_t                       (D optional)
    out = y · SiLU(z)                                (z optional)

The signature and semantics are those of mamba-ssm's ``selective_scan_fn``. ``impl=`` names the
implementation (the names of :mod:`pdd.impl_names`; nothing is chosen behind the caller's back):

============================  ==================================================================
``reference``                 :func:`selective_scan_ref`, one step per position; the oracle
``eager``                     :func:`selective_scan_eager`: chunks walked over tiles, safe chunk size; inference
``graph-parallel``            :func:`selective_scan_graph_parallel`: whole sequence, fixed chunk of 16; autograd
``graph-sequential``          :func:`selective_scan_graph_sequential`: chunks of 16 walked in order
``triton``                    ``kernels.selective_scan.selective_scan_triton`` (needs Triton)
``cpu_kernel``                ``kernels.cpu_scan.selective_scan_cpu`` (needs a C compiler once)
``mamba_ssm``                 mamba-ssm's ``selective_scan_fn`` (needs mamba-ssm and CUDA)
============================  ==================================================================

(``plugin`` is a four-route implementation only: see :mod:`pdd.ss2d`.)

Example::

    >>> import torch
    >>> from pdd.ssm import selective_scan
    >>> u = torch.randn(1, 8, 32); delta = torch.rand(1, 8, 32)
    >>> A = -torch.rand(8, 16); B = torch.randn(1, 16, 32); C = torch.randn(1, 16, 32)
    >>> y = selective_scan(u, delta, A, B, C, impl="eager")
    >>> y.shape
    torch.Size([1, 8, 32])
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu_scan
from kernels.contract import check_scan_inputs
from pdd.chunked_scan import (
    GRAPH_CHUNK_SIZE,
    graph_softplus,
    safe_chunk_size,
    sequential_positions,
    tile_walk,
    whole_sequence_scan,
)
from pdd.impl_names import SCAN_IMPLS, canonical_scan_impl

__all__ = [
    "SCAN_IMPLS",
    "ScanImplUnavailable",
    "check_scan_impl",
    "resolve_scan_impl",
    "selective_scan",
    "selective_scan_eager",
    "selective_scan_graph_parallel",
    "selective_scan_graph_sequential",
    "selective_scan_ref",
    "triton_kernels",
]

log = logging.getLogger(__name__)

_announced: set[str] = set()


class ScanImplUnavailable(RuntimeError):
    """The requested scan implementation cannot run here (missing package, compiler or GPU)."""


# --- the optional kernels: loaded on first use, a failure is ScanImplUnavailable --------------------

def triton_kernels() -> ModuleType:
    """:mod:`kernels.selective_scan` (the Triton kernels); ScanImplUnavailable where Triton is missing."""
    try:
        from kernels import selective_scan as module  # optional: needs Triton
    except ImportError as exc:
        raise ScanImplUnavailable(f"scan impl 'triton' is not available: {exc}. Use 'eager' (any device) or "
                                  f"'cpu_kernel' on CPUs, or install the GPU extra: pip install -e '.[gpu]'") from exc
    return module


def cpu_kernel() -> ModuleType:
    """:mod:`kernels.cpu_scan` with its library built and loaded; ScanImplUnavailable where it cannot be."""
    try:
        cpu_scan.load()
    except cpu_scan.CpuKernelUnavailable as exc:
        raise ScanImplUnavailable(f"scan impl 'cpu_kernel' is not available: {exc}. Use 'eager'.") from exc
    return cpu_scan


def _mamba_scan_fn() -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as exc:
        raise ScanImplUnavailable(f"scan impl 'mamba_ssm' needs the mamba-ssm package and a CUDA toolchain "
                                  f"({exc}): pip install mamba-ssm --no-build-isolation") from exc
    return selective_scan_fn


# --- shared steps ---------------------------------------------------------------------------------

def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _grouped(t: Tensor) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, G, N, L)."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, softplus: Callable[[Tensor], Tensor] | None,
                   dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return softplus(delta) if softplus is not None else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


# --- implementations --------------------------------------------------------------------------------

def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential recurrence, one step per position: the oracle.

    u, delta, z: (batch, dim, L) fp16|fp32|fp64; A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Computes in float64 for float64 input, float32 otherwise; returns u's dtype
    (and the last state (batch, dim, N) in the compute dtype when ``return_last_state``).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    uc = u.to(dtype)
    dl = _prepare_delta(delta, delta_bias, F.softplus if delta_softplus else None, dtype)
    Ac = A.to(dtype)
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)
    Bd = Bg.repeat_interleave(dim // Bg.shape[1], dim=1)  # (batch, dim, N, L)
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


def _walk_in_order(u: Tensor, dl: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """:func:`sequential_positions` in the channel-major layout of :func:`whole_sequence_scan`."""
    if u.shape[-1] == 0:
        return whole_sequence_scan(u, dl, A, B, C, chunk)
    # One swap of the last two axes each: graph runtimes transpose that fast, unlike 5-D permutations.
    y, state = sequential_positions(u.transpose(2, 3), dl.transpose(2, 3), A, B.transpose(2, 3),
                                    C.transpose(2, 3), chunk)
    return y.transpose(2, 3), state.transpose(2, 3)


def _chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
             delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool, chunk: int | None,
             softplus: Callable[[Tensor], Tensor], core: Callable[..., tuple[Tensor, Tensor]]
             ) -> Tensor | tuple[Tensor, Tensor]:
    """The chunked implementations' common frame: checks, δ, padding to whole chunks, D and z.

    ``chunk``: a fixed chunk length (graphs), or None for the largest safe power of two ≤ 64 (eager).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    uc = u.to(dtype)
    dl = _prepare_delta(delta, delta_bias, softplus if delta_softplus else None, dtype)
    Ac = A.to(dtype)
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)
    if Bg.shape[1] != Cg.shape[1]:
        # Different group counts: bring both to one group per channel.
        Bg = Bg.repeat_interleave(dim // Bg.shape[1], dim=1)
        Cg = Cg.repeat_interleave(dim // Cg.shape[1], dim=1)
    groups = Bg.shape[1]
    n = A.shape[1]
    if chunk is None:
        chunk = safe_chunk_size(dl, Ac, 64, nonnegative=delta_softplus)
        if chunk != 64:
            log.debug("selective_scan eager: δ·|A| too large for chunk 64, using chunk %d", chunk)
    pad = (-length) % chunk

    def padded(t: Tensor) -> Tensor:  # δ = 0 on padding leaves the state, so the last state too, untouched
        return F.pad(t, (0, pad)) if pad else t

    y, state = core(padded(uc).reshape(batch, groups, dim // groups, -1),
                    padded(dl).reshape(batch, groups, dim // groups, -1), Ac.reshape(groups, dim // groups, n),
                    padded(Bg), padded(Cg), chunk)
    out = _finish(y.reshape(batch, dim, -1)[..., :length], uc, D, z, u.dtype)
    return (out, state.reshape(batch, dim, n)) if return_last_state else out


def selective_scan_eager(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``eager``: the chunks walked in order over cache-sized tiles (:func:`tile_walk`), with the largest
    chunk (≤ 64) the data allows.

    Same arguments, dtypes and results as :func:`selective_scan_ref`, for inference: it refuses inputs that
    need gradients (``graph-parallel`` is the differentiable formulation). The chunk shrinks (logged) when
    δ·|A| is so large that the in-chunk exponentials would overflow; NaN or inf in δ or A is a ValueError.
    Reads δ once on the host (``.item()``), so it is for eager runs, not for graphs.
    """
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ValueError("selective_scan impl='eager' is for inference (in-place tiles, no autograd); use "
                         "impl='graph-parallel' for gradients, or run under torch.no_grad()")
    return _chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, None, F.softplus,
                    tile_walk)


def selective_scan_graph_parallel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                                  delta_softplus: bool = False,
                                  return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``graph-parallel``: the formulation of :func:`selective_scan_eager` with the fixed chunk
    ``GRAPH_CHUNK_SIZE`` and the graph softplus, for export to GPU runtimes (TensorRT without plugins).
    Exact while |A|·Σδ over half a chunk stays below ~80."""
    return _chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, GRAPH_CHUNK_SIZE,
                    graph_softplus, whole_sequence_scan)


def selective_scan_graph_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                    D: Tensor | None = None, z: Tensor | None = None,
                                    delta_bias: Tensor | None = None, delta_softplus: bool = False,
                                    return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``graph-sequential``: chunks of ``GRAPH_CHUNK_SIZE`` walked in order (:func:`sequential_positions`),
    graph softplus, for export to CPU runtimes: the graph grows per chunk, its temporaries stay chunk-sized."""
    return _chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, GRAPH_CHUNK_SIZE,
                    graph_softplus, _walk_in_order)


def _selective_scan_triton(*args: object, **kwargs: object) -> Tensor | tuple[Tensor, Tensor]:
    return triton_kernels().selective_scan_triton(*args, **kwargs)


def _selective_scan_cpu(*args: object, **kwargs: object) -> Tensor | tuple[Tensor, Tensor]:
    return cpu_kernel().selective_scan_cpu(*args, **kwargs)


def _selective_scan_mamba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_scan_fn``: CUDA tensors, a unit stride along L and fp32 parameters."""
    scan_fn = _mamba_scan_fn()
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cuda":
        raise ValueError(f"impl='mamba_ssm' runs on CUDA tensors only; u is on {u.device}")
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    z = None if z is None else z.contiguous()
    D = None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    return scan_fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus, return_last_state)


_IMPLS: dict[str, Callable[..., Tensor | tuple[Tensor, Tensor]]] = {
    "reference": selective_scan_ref,
    "eager": selective_scan_eager,
    "graph-parallel": selective_scan_graph_parallel,
    "graph-sequential": selective_scan_graph_sequential,
    "triton": _selective_scan_triton,
    "cpu_kernel": _selective_scan_cpu,
    "mamba_ssm": _selective_scan_mamba,
}
# What makes an implementation unavailable here, checked when a model is built with it.
_AVAILABILITY: dict[str, Callable[[], object]] = {"triton": triton_kernels, "cpu_kernel": cpu_kernel,
                                                   "mamba_ssm": _mamba_scan_fn}


def check_scan_impl(impl: str) -> str:
    """The canonical name of ``impl`` (``chunked`` -> ``eager``, deprecated) after checking that it runs here.

    ValueError for unknown names; :class:`ScanImplUnavailable` (saying what to install) for one whose
    package, compiler or kernel is missing. ``auto`` is not a name here: see :func:`resolve_scan_impl`.
    """
    impl = canonical_scan_impl(impl)
    if impl in _AVAILABILITY:
        _AVAILABILITY[impl]()
    return impl


def resolve_scan_impl(impl: str, device: torch.device | str = "cpu") -> str:
    """Turn ``"auto"`` into a concrete implementation for ``device``; check any other name (:func:`check_scan_impl`).

    ``auto`` means the Triton kernel on a CUDA device and the compiled CPU kernel on a CPU, each where it
    can run, else ``eager`` with a warning saying why. Both kernels are for inference; the scan only runs
    in the frozen VMamba teacher, so training needs no backward through it.
    """
    impl = canonical_scan_impl(impl, allow_auto=True)
    if impl != "auto":
        return check_scan_impl(impl)
    device = torch.device(device)
    chosen = "eager"
    preferred = {"cuda": "triton", "cpu": "cpu_kernel"}.get(device.type)
    if preferred is not None:
        try:
            chosen = check_scan_impl(preferred)
        except ScanImplUnavailable as exc:
            log.warning("scan impl 'auto' on %s: %s unavailable (%s); using 'eager'", device, preferred, exc)
    log.info("scan impl 'auto' resolved to %r on %s", chosen, device)
    return chosen


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, impl: str = "eager") -> Tensor | tuple[Tensor, Tensor]:
    """Run the selective scan with the implementation named by ``impl``.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, groups, N, L);
    D, delta_bias: (dim,). Returns out (batch, dim, L) in u's dtype, plus the last state
    (batch, dim, N) when ``return_last_state``. Raises :class:`ScanImplUnavailable` if ``impl``
    cannot run here: there is no silent fall back.
    """
    impl = canonical_scan_impl(impl)
    if impl not in _IMPLS:
        raise ValueError(f"scan impl {impl!r} has no 1-D form (it is a four-route SS2D implementation); "
                         f"expected one of {tuple(_IMPLS)}")
    if impl not in _announced:
        _announced.add(impl)
        log.info("selective_scan: using impl=%r", impl)
    return _IMPLS[impl](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                        return_last_state=return_last_state)
