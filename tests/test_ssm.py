"""Selective scan: the chunked implementations against the sequential oracle, values and gradients; the
explicit choice of implementation; the route geometry."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_scan
from kernels.routes import route_order, route_pixel
from pdd.chunked_scan import tile_walk, whole_sequence_scan
from pdd.ss2d import along_routes, merge_routes, route_positions, ss2d_scan
from pdd.ssm import (
    ScanImplUnavailable,
    _walk_in_order,
    resolve_scan_impl,
    selective_scan,
    selective_scan_eager,
    selective_scan_graph_parallel,
    selective_scan_graph_sequential,
    selective_scan_ref,
)


def make_inputs(batch=2, dim=12, length=37, n=16, groups=4, dtype=torch.float64, delta_scale=1.0):
    g = torch.Generator().manual_seed(1234 + length + n)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    return dict(
        u=r(batch, dim, length), delta=r(batch, dim, length) * delta_scale,
        A=-torch.rand(dim, n, generator=g, dtype=dtype) * 4, B=r(*bc_shape), C=r(*bc_shape),
        D=r(dim), z=r(batch, dim, length), delta_bias=r(dim) * 0.5,
    )


CHUNKED = {"eager": selective_scan_eager, "graph-parallel": selective_scan_graph_parallel,
           "graph-sequential": selective_scan_graph_sequential}


@pytest.mark.parametrize("impl", list(CHUNKED))
@pytest.mark.parametrize("n", [16, 1])
@pytest.mark.parametrize("groups", [None, 1, 4])
@pytest.mark.parametrize("length", [1, 37, 64, 130])
def test_chunked_equals_reference_float64(impl, n, groups, length):
    x = make_inputs(length=length, n=n, groups=groups)
    ref, ref_state = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    out, state = CHUNKED[impl](**x, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(),
    dict(D=True),
    dict(z=True),
    dict(delta_bias=True, delta_softplus=True),
    dict(D=True, z=True, delta_bias=True, delta_softplus=True),
])
def test_chunked_equals_reference_float32_options(options):
    full = make_inputs(length=75, dtype=torch.float32)
    x = {k: full[k] for k in ("u", "delta", "A", "B", "C")}
    if not options.get("delta_softplus"):
        x["delta"] = x["delta"].abs() * 0.3  # plain δ must be positive for a decaying state
    for key in ("D", "z", "delta_bias"):
        if options.get(key):
            x[key] = full[key]
    soft = options.get("delta_softplus", False)
    ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=soft)
    for impl, fn in CHUNKED.items():
        out = fn(**x, delta_softplus=soft)
        assert out.dtype == torch.float32, impl
        scale = ref.abs().max()
        assert (out.double() - ref).abs().max() <= 1e-4 * scale, impl


def test_chunked_gradients_match_reference():
    """graph-parallel is the differentiable formulation; eager (in-place tiles) refuses to take part."""
    x = make_inputs(batch=1, dim=6, length=21, n=4, groups=2)
    ins = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    ins_ref = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    w = torch.randn(1, 6, 21, dtype=torch.float64)
    (selective_scan_graph_parallel(**ins, delta_softplus=True) * w).sum().backward()
    (selective_scan_ref(**ins_ref, delta_softplus=True) * w).sum().backward()
    for k in x:
        torch.testing.assert_close(ins[k].grad, ins_ref[k].grad, rtol=1e-6, atol=1e-6, msg=f"gradient of {k}")
    with pytest.raises(ValueError, match="graph-parallel"):
        selective_scan_eager(**ins, delta_softplus=True)
    with torch.no_grad():
        torch.testing.assert_close(selective_scan_eager(**ins, delta_softplus=True),
                                   selective_scan_ref(**ins_ref, delta_softplus=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("elements", [1, 1 << 17])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_the_chunked_formulations_equal_reference(chunk, elements):
    """The tile walk (eager; tiles of one channel, or all), the whole sequence (graph-parallel) and the
    chunks walked in order position-major (graph-sequential) at any chunk length: the recurrence's
    numbers, last state included."""
    batch, groups, per_group, n, length = 2, 3, 5, 16, 128
    x = make_inputs(batch=batch, dim=groups * per_group, length=length, n=n, groups=groups)
    ref_y, ref_state = selective_scan_ref(**{**x, "D": None, "z": None}, delta_softplus=True,
                                          return_last_state=True)
    dl = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])
    args = (x["u"].reshape(batch, groups, per_group, length), dl.reshape(batch, groups, per_group, length),
            x["A"].reshape(groups, per_group, n), x["B"], x["C"], chunk)
    paths = (("tile walk", tile_walk(*args, elements=elements)), ("whole sequence", whole_sequence_scan(*args)),
             ("chunks in order", _walk_in_order(*args)))
    for name, (y, state) in paths:
        torch.testing.assert_close(y.reshape(batch, -1, length), ref_y, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(state.reshape(batch, -1, n), ref_state, rtol=0, atol=1e-6, msg=name)


def test_chunked_shrinks_chunk_for_large_decay():
    """δ·|A| far beyond float32's exponent range over a chunk still gives the reference's answer."""
    x = make_inputs(length=200, dtype=torch.float32, delta_scale=1.0)
    x["A"] = x["A"] * 10  # |A| up to 40, δ up to ~3 → 120 per step
    ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    out = selective_scan_eager(**x, delta_softplus=True)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fp16_inputs_compute_in_fp32():
    x = make_inputs(length=50, dtype=torch.float32)
    x16 = {k: v.half() for k, v in x.items()}
    out = selective_scan(**x16, delta_softplus=True, impl="eager")
    assert out.dtype == torch.float16
    ref = selective_scan_ref(**{k: v.double() for k, v in x16.items()}, delta_softplus=True)
    assert (out.double() - ref).abs().max() <= 3e-3 * ref.abs().max()


def test_dispatch_is_explicit():
    x = make_inputs(length=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown scan implementation"):
        selective_scan(**x, impl="fast")
    with pytest.raises(ScanImplUnavailable, match="mamba_ssm"):
        selective_scan(**x, impl="mamba_ssm")
    with pytest.raises(ValueError, match="no 1-D form"):
        selective_scan(**x, impl="plugin")
    # auto on a CPU: the compiled kernel where this machine can build it, else eager (with a warning).
    try:
        cpu_scan.load()
        expected = "cpu_kernel"
    except cpu_scan.CpuKernelUnavailable:
        expected = "eager"
    assert resolve_scan_impl("auto", "cpu") == expected
    assert resolve_scan_impl("auto", "meta") == "eager"


def test_chunked_is_a_deprecated_alias_of_eager():
    x = make_inputs(length=20, dtype=torch.float32)
    with pytest.warns(DeprecationWarning, match="'chunked' is deprecated; use 'eager'"):
        old = selective_scan(**x, delta_softplus=True, impl="chunked")
    torch.testing.assert_close(old, selective_scan(**x, delta_softplus=True, impl="eager"), rtol=0, atol=0)
    with pytest.warns(DeprecationWarning):
        assert resolve_scan_impl("chunked", "cpu") == "eager"


def test_auto_falls_back_to_eager_with_a_warning_when_the_cpu_kernel_cannot_build(
        monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture,
        request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv("PDD_CACHE_DIR", str(tmp_path))  # nothing cached: it would have to build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_scan.load.cache_clear()
    request.addfinalizer(cpu_scan.load.cache_clear)  # later tests load the real library again
    with caplog.at_level("WARNING", logger="pdd.ssm"):
        assert resolve_scan_impl("auto", "cpu") == "eager"
    assert "cpu_kernel unavailable" in caplog.text
    with pytest.raises(ScanImplUnavailable, match=r"cpu_kernel.*does not run"):
        resolve_scan_impl("cpu_kernel", "cpu")


@pytest.mark.parametrize("bad, match", [
    (dict(u=torch.zeros(2, 12)), "u must be"),
    (dict(A=torch.zeros(11, 16)), "A must be"),
    (dict(B=torch.zeros(2, 5, 16, 37)), "B must be"),
    (dict(D=torch.zeros(3)), "D must be"),
])
def test_bad_shapes_are_named(bad, match):
    x = make_inputs(dtype=torch.float32)
    x.update(bad)
    with pytest.raises(ValueError, match=match):
        selective_scan(**x, impl="eager")


def test_nan_delta_is_refused():
    x = make_inputs(dtype=torch.float32)
    x["delta"][0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        selective_scan(**x, delta_softplus=True, impl="eager")


def test_routes_gather_and_merge():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    routes = along_routes(x)[0, :, 0]
    assert routes[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert routes[1].tolist() == [0, 3, 1, 4, 2, 5]
    assert routes[2].tolist() == [5, 4, 3, 2, 1, 0]
    assert routes[3].tolist() == [5, 2, 4, 1, 3, 0]
    torch.testing.assert_close(merge_routes(along_routes(x), x, torch.zeros(4)), 4 * x)
    torch.testing.assert_close(merge_routes(along_routes(x), x, torch.ones(4)), 8 * x)


@pytest.mark.parametrize("h, w", [(2, 3), (3, 5), (5, 2), (1, 7), (4, 4)])
def test_route_pixel_is_route_order(h, w):
    """route_pixel, step by step on Python ints, gives the gather indices of route_order (non-square grids)."""
    length = h * w
    by_step = [route_pixel(t, length, h, w, k) for k in range(4) for t in range(length)]
    assert by_step == route_order(h, w).tolist()
    # Route 1 is column-major: step t reads row t % h of column t // h.
    grid = torch.arange(length).view(h, w)
    assert route_order(h, w)[length:2 * length].tolist() == grid.t().flatten().tolist()


def test_route_positions_gather_the_routes():
    x = torch.randn(2, 5, 3, 4)  # (B, C, H, W), a grid that is not square
    assert route_order(2, 3).tolist() == [0, 1, 2, 3, 4, 5, 0, 3, 1, 4, 2, 5, 5, 4, 3, 2, 1, 0, 5, 2, 4, 1, 3, 0]
    positions = route_positions(x.permute(0, 2, 3, 1))                    # (B, 4, L, C)
    torch.testing.assert_close(positions, along_routes(x).transpose(2, 3), rtol=0, atol=0)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 5)])
def test_ss2d_scan_equals_reference(h, w):
    b, d, n = 2, 6, 16
    g = torch.Generator().manual_seed(7)
    args = (torch.randn(b, d, h, w, generator=g), torch.randn(b, 4, d, h, w, generator=g),
            torch.randn(b, 4, n, h, w, generator=g), torch.randn(b, 4, n, h, w, generator=g),
            -torch.rand(4 * d, n, generator=g), torch.randn(4 * d, generator=g), torch.randn(4 * d, generator=g))
    ref = ss2d_scan(*(a.double() for a in args), impl="reference")
    for impl in ("eager", "graph-parallel", "graph-sequential", "plugin"):
        out = ss2d_scan(*args, impl=impl)
        assert out.shape == (b, d, h, w)
        assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max(), impl
