"""Selective scan: the chunked path against the sequential oracle, values and gradients."""

from __future__ import annotations

import pytest
import torch

from pdd.ssm import (
    ScanImplUnavailable,
    _chunked_core,
    _chunked_eager,
    _chunked_sequential,
    cross_merge,
    cross_scan,
    resolve_scan_impl,
    route_order,
    route_positions,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    ss2d_scan,
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


@pytest.mark.parametrize("n", [16, 1])
@pytest.mark.parametrize("groups", [None, 1, 4])
@pytest.mark.parametrize("length", [1, 37, 64, 130])
def test_chunked_equals_reference_float64(n, groups, length):
    x = make_inputs(length=length, n=n, groups=groups)
    ref, ref_state = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    out, state = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True)
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
    out = selective_scan_chunked(**x, delta_softplus=soft)
    assert out.dtype == torch.float32
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() <= 1e-4 * scale


def test_chunked_gradients_match_reference():
    x = make_inputs(batch=1, dim=6, length=21, n=4, groups=2)
    ins = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    ins_ref = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    w = torch.randn(1, 6, 21, dtype=torch.float64)
    (selective_scan_chunked(**ins, delta_softplus=True) * w).sum().backward()
    (selective_scan_ref(**ins_ref, delta_softplus=True) * w).sum().backward()
    for k in x:
        torch.testing.assert_close(ins[k].grad, ins_ref[k].grad, rtol=1e-6, atol=1e-6, msg=f"gradient of {k}")


@pytest.mark.parametrize("elements", [64, 1 << 18])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_both_chunked_paths_equal_reference(chunk, elements):
    """The eager chunk walk (tiles of a few channels, or all) and the two graphs tracing builds (whole
    sequence, as autograd uses too; chunk by chunk): the recurrence's numbers, last state included."""
    batch, groups, per_group, n, length = 2, 3, 5, 16, 128
    x = make_inputs(batch=batch, dim=groups * per_group, length=length, n=n, groups=groups)
    ref_y, ref_state = selective_scan_ref(**{**x, "D": None, "z": None}, delta_softplus=True,
                                          return_last_state=True)
    dl = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])
    args = (x["u"].reshape(batch, groups, per_group, length), dl.reshape(batch, groups, per_group, length),
            x["A"].reshape(groups, per_group, n), x["B"], x["C"], chunk)
    paths = (("eager", _chunked_eager(*args, elements=elements)), ("parallel graph", _chunked_core(*args)),
             ("sequential graph", _chunked_sequential(*args)))
    for name, (y, state) in paths:
        torch.testing.assert_close(y.reshape(batch, -1, length), ref_y, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(state.reshape(batch, -1, n), ref_state, rtol=0, atol=1e-6, msg=name)


def test_chunked_shrinks_chunk_for_large_decay():
    """δ·|A| far beyond float32's exponent range over a chunk still gives the reference's answer."""
    x = make_inputs(length=200, dtype=torch.float32, delta_scale=1.0)
    x["A"] = x["A"] * 10  # |A| up to 40, δ up to ~3 → 120 per step
    ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    out = selective_scan_chunked(**x, delta_softplus=True, chunk_size=64)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fp16_inputs_compute_in_fp32():
    x = make_inputs(length=50, dtype=torch.float32)
    x16 = {k: v.half() for k, v in x.items()}
    out = selective_scan(**x16, delta_softplus=True, impl="chunked")
    assert out.dtype == torch.float16
    ref = selective_scan_ref(**{k: v.double() for k, v in x16.items()}, delta_softplus=True)
    assert (out.double() - ref).abs().max() <= 3e-3 * ref.abs().max()


def test_dispatch_is_explicit():
    x = make_inputs(length=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown scan implementation"):
        selective_scan(**x, impl="fast")
    with pytest.raises(ScanImplUnavailable, match="mamba_ssm"):
        selective_scan(**x, impl="mamba_ssm")
    # auto on a CPU: the compiled kernel where this machine can build it, else chunked (with a warning).
    try:
        from kernels.cpu_scan import CpuKernelUnavailable, load

        load()
        expected = "cpu_kernel"
    except (ImportError, CpuKernelUnavailable):
        expected = "chunked"
    assert resolve_scan_impl("auto", "cpu") == expected
    assert resolve_scan_impl("auto", "meta") == "chunked"


def test_auto_falls_back_to_chunked_with_a_warning_when_the_cpu_kernel_cannot_build(
        monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    import pdd.ssm as ssm

    monkeypatch.setattr(ssm, "_registry", {k: v for k, v in ssm._registry.items() if k != "cpu_kernel"})
    monkeypatch.setattr(ssm, "_ss2d_registry", {k: v for k, v in ssm._ss2d_registry.items() if k != "cpu_kernel"})
    monkeypatch.setitem(ssm._providers, "cpu_kernel", "pdd._cpu_kernel_missing_for_this_test")
    with caplog.at_level("WARNING", logger="pdd.ssm"):
        assert resolve_scan_impl("auto", "cpu") == "chunked"
    assert "cpu_kernel unavailable" in caplog.text
    with pytest.raises(ScanImplUnavailable, match="cpu_kernel"):
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
        selective_scan(**x, impl="chunked")


def test_nan_delta_is_refused():
    x = make_inputs(dtype=torch.float32)
    x["delta"][0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        selective_scan(**x, delta_softplus=True, impl="chunked")


def test_cross_scan_routes_and_merge():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    routes = cross_scan(x)[0, :, 0]
    assert routes[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert routes[1].tolist() == [0, 3, 1, 4, 2, 5]
    assert routes[2].tolist() == [5, 4, 3, 2, 1, 0]
    assert routes[3].tolist() == [5, 2, 4, 1, 3, 0]
    torch.testing.assert_close(cross_merge(cross_scan(x), 2, 3), 4 * x)


def test_route_positions_gather_the_cross_scan_routes():
    x = torch.randn(2, 5, 3, 4)  # (B, C, H, W), a grid that is not square
    assert route_order(2, 3).tolist() == [0, 1, 2, 3, 4, 5, 0, 3, 1, 4, 2, 5, 5, 4, 3, 2, 1, 0, 5, 2, 4, 1, 3, 0]
    positions = route_positions(x.permute(0, 2, 3, 1))                    # (B, 4, L, C)
    torch.testing.assert_close(positions, cross_scan(x).transpose(2, 3), rtol=0, atol=0)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 5)])
def test_ss2d_scan_chunked_equals_reference(h, w):
    b, d, n = 2, 6, 16
    g = torch.Generator().manual_seed(7)
    args = (torch.randn(b, d, h, w, generator=g), torch.randn(b, 4, d, h, w, generator=g),
            torch.randn(b, 4, n, h, w, generator=g), torch.randn(b, 4, n, h, w, generator=g),
            -torch.rand(4 * d, n, generator=g), torch.randn(4 * d, generator=g), torch.randn(4 * d, generator=g))
    ref = ss2d_scan(*(a.double() for a in args), impl="reference")
    out = ss2d_scan(*args, impl="chunked")
    assert out.shape == (b, d, h, w)
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
