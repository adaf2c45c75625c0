"""The names of the scan and anomaly-head implementations: one list, read by the config, the CLI and the APIs.

No torch here, so that configs validate without loading the model code.

Scan implementations (``PDDConfig.scan_impl``, ``--scan-impl``, ``impl=``), one meaning each:

- ``auto``: resolved when the model is built: ``triton`` on CUDA, ``cpu_kernel`` on CPU, else ``eager``.
- ``reference``: the per-position loop; float64-capable; the oracle.
- ``eager``: PyTorch ops for eager inference (chunks walked over cache-sized channel tiles in place,
  data-dependent safe chunk size); no autograd.
- ``graph-sequential``: standard ops for graph export to CPU runtimes (chunks of 16 walked in order,
  position-major SS2D).
- ``graph-parallel``: standard ops for graph export to GPU runtimes, and the differentiable formulation
  (the whole sequence at once, chunks of 16 joined by a log-depth scan).
- ``plugin``: the ``pdd::ss2d_scan`` custom op, one ONNX node per SS2D block (TensorRT plugin, ONNX
  Runtime custom op).
- ``triton``, ``cpu_kernel``, ``mamba_ssm``: the Triton kernel, the compiled CPU kernel, mamba-ssm's CUDA kernel.
"""

from __future__ import annotations

import warnings

__all__ = ["DEPRECATED_SCAN_GRAPHS", "DEPRECATED_SCAN_IMPLS", "HEAD_IMPLS", "SCAN_CHOICES", "SCAN_IMPLS",
           "canonical_scan_impl"]

SCAN_IMPLS = ("reference", "eager", "graph-sequential", "graph-parallel", "plugin", "triton", "cpu_kernel",
              "mamba_ssm")
# Old names still accepted (configs, checkpoints, CLI, impl=) with a DeprecationWarning.
DEPRECATED_SCAN_IMPLS = {"chunked": "eager"}
# The portable ONNX form's former ``scan_graph`` values (export_onnx, --scan-graph, old metadata), by the
# implementation each names.
DEPRECATED_SCAN_GRAPHS = {"sequential": "graph-sequential", "parallel": "graph-parallel"}
# What a config or the CLI may name: the implementations, "auto", and the deprecated aliases.
SCAN_CHOICES = ("auto", *SCAN_IMPLS, *DEPRECATED_SCAN_IMPLS)
HEAD_IMPLS = ("reference", "triton")


def canonical_scan_impl(name: str, allow_auto: bool = False) -> str:
    """``name`` with a deprecated alias replaced (and a DeprecationWarning); ValueError for unknown names."""
    if name in DEPRECATED_SCAN_IMPLS:
        new = DEPRECATED_SCAN_IMPLS[name]
        warnings.warn(f"scan implementation {name!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
        return new
    known = SCAN_CHOICES if allow_auto else SCAN_IMPLS
    if name not in known:
        raise ValueError(f"unknown scan implementation {name!r}; expected one of {known}")
    return name
