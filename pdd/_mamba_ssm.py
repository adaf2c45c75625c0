"""``impl="mamba_ssm"``: the CUDA selective-scan kernel of the mamba-ssm package, as a peer to compare against.

Optional: mamba-ssm is never required. Importing this module without it raises ImportError naming the
install command; :func:`pdd.ssm.selective_scan` turns that into ScanImplUnavailable. Importing it with
mamba-ssm present registers the implementation.
"""

from __future__ import annotations

from torch import Tensor

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError as exc:
    raise ImportError(
        "impl='mamba_ssm' needs the mamba-ssm package and a CUDA toolchain: "
        "pip install mamba-ssm --no-build-isolation"
    ) from exc

from pdd.ssm import _check_inputs, register_scan_impl

__all__ = ["selective_scan_mamba"]


def selective_scan_mamba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_scan_fn`` behind the :func:`pdd.ssm.selective_scan` signature.

    u, delta, z: (batch, dim, L) CUDA fp16|bf16|fp32; A: (dim, N) fp32; B, C: (batch, N, L) or
    (batch, G, N, L); D, delta_bias: (dim,) fp32. Returns out (batch, dim, L), plus the last state.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cuda":
        raise ValueError(f"impl='mamba_ssm' runs on CUDA tensors only; u is on {u.device}")
    # The CUDA kernel wants a unit stride along L and fp32 parameters.
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    z = None if z is None else z.contiguous()
    D = None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    return selective_scan_fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus, return_last_state)


register_scan_impl("mamba_ssm", selective_scan_mamba)
