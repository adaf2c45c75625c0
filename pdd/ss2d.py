"""SS2D: the selective scan of a VMamba block along four routes over the image grid, merged back.

Two entry points, one per level:

- :func:`ss2d` ``(x, weights, impl)``: what :class:`pdd.backbones.vmamba.SS2D` calls. Each implementation
  computes its own δ/B/C projections from x and :class:`SS2DWeights`, in the layout it wants:

  ======================================  ==============================================================
  ``reference``, ``eager``,               route-ordered copies of x (one gather by
  ``graph-parallel``, ``mamba_ssm``       :func:`kernels.routes.route_order`), projections on them, one
                                          1-D :func:`pdd.ssm.selective_scan` over the 4·d sequences
  ``graph-sequential``                    position-major (B, 4, L, d) throughout: no channel/position
                                          transposes in the exported graph (:func:`ss2d_positions`)
  ``triton``, ``cpu_kernel``              spatial-order projections, the fused kernel walks the routes
  ``plugin``                              spatial-order projections, the ``pdd::ss2d_scan`` custom op
  ======================================  ==============================================================

- :func:`ss2d_scan` ``(x, delta, B, C, A, D, delta_bias, impl)``: the kernel-level contract (spatial order,
  :func:`kernels.contract.check_ss2d`) of the Triton kernel, the C kernel and the ``SS2DScan`` ONNX node;
  what the custom op and ONNX Runtime's SS2DScan op run.

The route geometry is :func:`kernels.routes.route_pixel`, here through :func:`kernels.routes.route_order`.

The custom op ``pdd::ss2d_scan`` is defined here, not in ``export/``, because a model built with
``scan_impl="plugin"`` calls it in its forward: building must not depend on importing the exporter.
:mod:`export.custom_ops` gives it its ONNX schema, translation and ONNX Runtime op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import cpu_scan
from kernels.contract import check_ss2d
from kernels.routes import SS2D_ROUTES, route_order
from pdd.chunked_scan import GRAPH_CHUNK_SIZE, graph_softplus, sequential_positions
from pdd.impl_names import canonical_scan_impl
from pdd.ssm import selective_scan, triton_kernels

__all__ = [
    "SS2D_ROUTES",
    "SS2DWeights",
    "along_routes",
    "merge_routes",
    "route_positions",
    "spatial_projections",
    "ss2d",
    "ss2d_positions",
    "ss2d_scan",
    "ss2d_scan_op",
]


@dataclass(frozen=True)
class SS2DWeights:
    """The SS2D parameters a scan needs (d = d_inner, R = dt_rank, N = d_state).

    x_proj_weight (4, R + 2N, d); dt_projs_weight (4, d, R); A (4·d, N) fp32 = −exp(A_logs);
    D (4·d,) fp32 (the skips Ds); delta_bias (4·d,) fp32 (dt_projs_bias flattened).
    """

    x_proj_weight: Tensor
    dt_projs_weight: Tensor
    A: Tensor
    D: Tensor
    delta_bias: Tensor

    @property
    def split(self) -> list[int]:
        """Sizes of δ-rank, B and C in the x projection."""
        n = self.A.shape[1]
        return [self.dt_projs_weight.shape[-1], n, n]


# --- route gathers ------------------------------------------------------------------------------------

def _route_index(height: int, width: int, device: torch.device, inverse: bool = False) -> Tensor:
    """(1, 4, 1, L): per route, the grid position of each step (or, ``inverse``, the step of each position)."""
    order = route_order(height, width, device).view(SS2D_ROUTES, height * width)
    return (order.argsort(dim=1) if inverse else order).view(1, SS2D_ROUTES, 1, height * width)


def along_routes(t: Tensor) -> Tensor:
    """(B, C, H, W) (every route reads it) or (B, 4, C, H, W) (route k reads slice k) -> (B, 4, C, L)."""
    h, w = t.shape[-2:]
    seq = t.flatten(-2)
    if seq.dim() == 3:
        seq = seq.unsqueeze(1).expand(-1, SS2D_ROUTES, -1, -1)
    index = _route_index(h, w, t.device).expand(seq.shape[0], -1, seq.shape[2], -1)
    return seq.gather(3, index)


def merge_routes(ys: Tensor, x: Tensor, D: Tensor) -> Tensor:
    """Scan outputs of the four routes (B, 4, C, L) back on the grid of x (B, C, H, W), summed, plus the
    D skips: route k reads x, so undoing it on u_k·D_k gives x·D_k, and the four skips are one x·Σ_k D_k."""
    b, _, c, _ = ys.shape
    h, w = x.shape[-2:]
    index = _route_index(h, w, ys.device, inverse=True).expand(b, -1, c, -1)
    skip = D.to(ys.dtype).view(SS2D_ROUTES, c).sum(0)
    return torch.addcmul(ys.gather(3, index).sum(1).view(b, c, h, w), x.to(ys.dtype), skip[:, None, None])


def route_positions(x: Tensor) -> Tensor:
    """(B, H, W, C) channels-last -> (B, 4, L, C): positions read along the four routes.

    One gather of whole channel vectors by :func:`kernels.routes.route_order` (a constant in a graph).
    Built from transposes instead, graph optimisers merge the grid transpose of the column routes with the
    NCHW→NHWC one before it into a permutation that moves single floats (ONNX Runtime: 20x slower).
    """
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c).index_select(1, route_order(h, w, x.device)).view(b, SS2D_ROUTES, h * w, c)


# --- the kernel-level contract ------------------------------------------------------------------------

def _ss2d_scan_routed(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor, delta_bias: Tensor,
                      impl: str) -> Tensor:
    b, d, h, w = x.shape
    ys = selective_scan(along_routes(x).reshape(b, SS2D_ROUTES * d, h * w),
                        along_routes(delta).reshape(b, SS2D_ROUTES * d, h * w), A, along_routes(B), along_routes(C),
                        delta_bias=delta_bias, delta_softplus=True, impl=impl)
    return merge_routes(ys.view(b, SS2D_ROUTES, d, h * w), x, D).to(x.dtype)


def ss2d_scan(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor, delta_bias: Tensor,
              impl: str = "eager") -> Tensor:
    """The four-route scan on spatial-order inputs, merged back to the image grid (the SS2DScan contract).

    x: (B, D, H, W) conv output (the scan input u); delta: (B, 4, D, H, W) before bias and softplus;
    B, C: (B, 4, N, H, W); A: (4·D, N) (already −exp(A_logs)); D, delta_bias: (4·D,).
    Returns (B, D, H, W) in x's dtype: Σ_k route_k⁻¹(scan_k) + x·Σ_k D_k. Softplus is always applied to δ.
    ``triton`` and ``cpu_kernel`` walk the routes in one fused kernel, ``plugin`` is the custom op, the
    1-D implementations run on route-ordered copies.
    """
    impl = canonical_scan_impl(impl)
    check_ss2d(x, delta, B, C, A, D, delta_bias)
    if impl == "triton":
        return triton_kernels().ss2d_scan_triton(x, delta, B, C, A, D, delta_bias)
    if impl == "cpu_kernel":
        # Built and loaded when the model was built (resolve_scan_impl); inside the op, opaque to torch.compile.
        return cpu_scan.ss2d_scan_cpu(x, delta, B, C, A, D, delta_bias)
    if impl == "plugin":
        return ss2d_scan_op(x.contiguous(), delta, B, C, A, D, delta_bias)
    return _ss2d_scan_routed(x, delta, B, C, A, D, delta_bias, impl)


# The eager body of the custom op (eager calls of a plugin-built model; ONNX Runtime reads its node attribute).
PLUGIN_EAGER_IMPL = "eager"


@torch.library.custom_op("pdd::ss2d_scan", mutates_args=())
def ss2d_scan_op(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor, delta_bias: Tensor) -> Tensor:
    """:func:`ss2d_scan` as one opaque op (one ONNX node per block). x (B, D, H, W) -> (B, D, H, W) in x's dtype."""
    return _ss2d_scan_routed(x, delta, B, C, A, D, delta_bias, PLUGIN_EAGER_IMPL)


@ss2d_scan_op.register_fake
def _ss2d_scan_fake(x: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, D: Tensor,
                    delta_bias: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --- the model-level entry point ----------------------------------------------------------------------

def spatial_projections(x: Tensor, w: SS2DWeights) -> tuple[Tensor, Tensor, Tensor]:
    """δ before bias (B, 4, d, H, W), B and C (B, 4, N, H, W) from x (B, d, H, W), all in spatial order
    (they are pointwise; a fused scan reads them per route).

    Two matrix products (what einsum "bdhw,kcd->bkchw" and "bkrhw,kdr->bkdhw" compute), which export as
    MatMul nodes rather than Einsum.
    """
    height, width = x.shape[-2:]
    proj = torch.matmul(w.x_proj_weight.flatten(0, 1), x.flatten(2))        # (B, 4·(R + 2N), L)
    dt_r, Bs, Cs = proj.unflatten(1, (SS2D_ROUTES, -1)).split(w.split, dim=2)
    delta = torch.matmul(w.dt_projs_weight, dt_r)                            # (B, 4, d, L)
    return tuple(t.unflatten(-1, (height, width)).contiguous() for t in (delta, Bs, Cs))


def _spatial(impl: str) -> Callable[[Tensor, SS2DWeights], Tensor]:
    def run(x: Tensor, w: SS2DWeights) -> Tensor:
        delta, Bs, Cs = spatial_projections(x, w)
        return ss2d_scan(x, delta, Bs, Cs, w.A, w.D, w.delta_bias, impl=impl).permute(0, 2, 3, 1)
    return run


def _plugin(x: Tensor, w: SS2DWeights) -> Tensor:
    """The custom op called directly: the shape check of :func:`ss2d_scan` reads sizes as ints, which would
    make an exported graph's symbolic batch a constant (the op's contract is checked by its schema)."""
    delta, Bs, Cs = spatial_projections(x, w)
    return ss2d_scan_op(x.contiguous(), delta, Bs, Cs, w.A, w.D, w.delta_bias).permute(0, 2, 3, 1)


def _routed(impl: str) -> Callable[[Tensor, SS2DWeights], Tensor]:
    def run(x: Tensor, w: SS2DWeights) -> Tensor:
        """VMamba v0's way: x read along each route, the δ/B/C projections of each route on its
        route-ordered copy (so δ, B and C need no reordering of their own), one 1-D scan, routes merged."""
        b, d, height, width = x.shape
        xs = along_routes(x)                                                 # (B, 4, d, L)
        dt_r, Bs, Cs = torch.matmul(w.x_proj_weight, xs).split(w.split, dim=2)  # (B, 4, R + 2N, L)
        delta = torch.matmul(w.dt_projs_weight, dt_r)                         # (B, 4, d, L)
        ys = selective_scan(xs.flatten(1, 2), delta.flatten(1, 2), w.A, Bs, Cs, delta_bias=w.delta_bias,
                            delta_softplus=True, impl=impl)
        return merge_routes(ys.view(b, SS2D_ROUTES, d, height * width), x, w.D).permute(0, 2, 3, 1)
    return run


def ss2d_positions(x: Tensor, w: SS2DWeights) -> Tensor:
    """``graph-sequential``: the four-route scan position-major, x and result (B, H, W, d) channels-last.

    No transpose of the channel and position axes anywhere; the chunks of 16 walked in order
    (:func:`pdd.chunked_scan.sequential_positions`). Exact while |A|·Σδ over half a chunk stays below
    float32's exponent range.
    """
    b, h, width, d = x.shape
    n = w.A.shape[-1]
    chunk = GRAPH_CHUNK_SIZE
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = route_positions(x)                                                  # (B, 4, L, d)
    dt_r, Bs, Cs = torch.matmul(xs, w.x_proj_weight.transpose(1, 2)).split(w.split, dim=3)  # (B, 4, L, R + 2N)
    delta = torch.matmul(dt_r, w.dt_projs_weight.transpose(1, 2))            # (B, 4, L, d)
    dl = graph_softplus(delta.to(dtype) + w.delta_bias.to(dtype).view(SS2D_ROUTES, 1, d))
    pad = (-h * width) % chunk

    def padded(t: Tensor) -> Tensor:  # δ = 0 on padding leaves the state untouched
        return torch.nn.functional.pad(t.to(dtype), (0, 0, 0, pad)) if pad else t.to(dtype)

    y, _ = sequential_positions(padded(xs), padded(dl), w.A.to(dtype).view(SS2D_ROUTES, d, n), padded(Bs),
                                padded(Cs), chunk)
    y = y[:, :, :h * width]                                                  # (B, 4, L, d)
    # Step s of route k read grid position order[k, s]: scatter each route back by the inverse order.
    back = _route_index(h, width, y.device, inverse=True).view(SS2D_ROUTES, h * width)
    back = back + torch.arange(SS2D_ROUTES, device=y.device)[:, None] * (h * width)
    grid = y.reshape(b, SS2D_ROUTES * h * width, d).index_select(1, back.flatten())
    grid = grid.view(b, SS2D_ROUTES, h * width, d).sum(1)
    skip = w.D.to(dtype).view(SS2D_ROUTES, d).sum(0)
    return (grid.view(b, h, width, d) + x.to(dtype) * skip).to(x.dtype)


_SS2D: dict[str, Callable[[Tensor, SS2DWeights], Tensor]] = {
    "reference": _routed("reference"),
    "eager": _routed("eager"),
    "graph-parallel": _routed("graph-parallel"),
    "mamba_ssm": _routed("mamba_ssm"),
    "graph-sequential": lambda x, w: ss2d_positions(x.permute(0, 2, 3, 1), w),  # position-major throughout
    "triton": _spatial("triton"),
    "cpu_kernel": _spatial("cpu_kernel"),
    "plugin": _plugin,
}


def ss2d(x: Tensor, weights: SS2DWeights, impl: str) -> Tensor:
    """The four-route scan of one SS2D block with the implementation ``impl`` (see the module docstring).

    x: (B, d, H, W) the conv output; returns (B, H, W, d) channels-last in x's dtype. Raises
    :class:`pdd.ssm.ScanImplUnavailable` when ``impl`` cannot run here.
    """
    return _SS2D[canonical_scan_impl(impl)](x, weights)
