"""ONNX Runtime Python ops for the plugin ONNX form's custom nodes, without torch.

The plugin form has one ``pdd::SS2DScan`` node per VMamba block and one ``pdd::AnomalyHead`` node (contracts
in :mod:`export.custom_ops`). ONNX Runtime runs them as onnxruntime-extensions Python ops, which live in
domain ``ai.onnx.contrib``:

- :func:`to_ort_domain_inplace` moves the nodes there and writes on each SS2DScan node the scan
  implementation its op runs (attribute ``scan_impl``);
- :func:`register_ort_ops` registers both ops once per process: SS2DScan runs :data:`CPU_KERNEL`, the compiled
  C kernel (:func:`kernels.cpu_lib.ss2d_scan_numpy`), or an implementation the caller adds by name;
  AnomalyHead runs :func:`kernels.cpu_head.anomaly_head_numpy`;
- :func:`configure_session` puts the ops' library into a session's options.

The in-process runtime (:class:`export.runtime.OnnxRuntime`, through :mod:`export.custom_ops`) and the
served python flavour (``export/triton_models/ort_engine.py``) both go through these functions, so a plugin
graph runs the same code in both. A model repository carries a copy of the files in :data:`BUNDLE` beside
its engine model, whose server has numpy, onnx and onnxruntime-extensions but no torch and not this
project; the modules of the bundle import each other relatively, so the copy imports under any package name.

Example::

    >>> options = onnxruntime.SessionOptions()                                        # doctest: +SKIP
    >>> configure_session(options, register_ort_ops())                               # doctest: +SKIP
    >>> graph = to_ort_domain_inplace(onnx.load("model.onnx"), CPU_KERNEL)            # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession(graph.SerializeToString(), options)    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from . import cpu_lib
from .contract import DOMAIN, HEAD_MAP_STRIDE, HEAD_OP, HEAD_PAIRS, SS2D_OP
from .cpu_head import anomaly_head_numpy

__all__ = ["BUNDLE", "CPU_KERNEL", "ORT_DOMAIN", "ORT_SCAN_IMPL_ATTR", "ScanOp", "configure_session",
           "register_ort_ops", "to_ort_domain_inplace"]

ORT_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions serves Python ops from
# The attribute to_ort_domain_inplace writes on every SS2DScan node: the scan implementation its op runs.
ORT_SCAN_IMPL_ATTR = "scan_impl"
# The compiled CPU kernel's name among the scan implementations (pdd.impl_names.SCAN_IMPLS).
CPU_KERNEL = "cpu_kernel"
# What a server needs to run both ops without this project, relative to this package: these modules, the
# package marker and the kernel's C source.
BUNDLE = ("__init__.py", "contract.py", "cpu_head.py", "cpu_lib.py", "ort_ops.py", "cpu/scan.c")

# An SS2D scan on numpy arrays: (x, delta, B, C, A, D, delta_bias) -> y (B, D, H, W) fp32.
ScanOp = Callable[..., np.ndarray]

# The scan implementations added by register_ort_ops' callers; the compiled kernel is always there.
_scans: dict[str, ScanOp] = {}
_library: str | None = None


def _scan(impl: str) -> ScanOp:
    if impl == CPU_KERNEL:
        return cpu_lib.ss2d_scan_numpy
    try:
        return _scans[impl]
    except KeyError:
        raise ValueError(f"{SS2D_OP} node: scan_impl {impl!r} has no ONNX Runtime op in this process (has "
                         f"{sorted([CPU_KERNEL, *_scans])}); rewrite the graph with one of those") from None


def register_ort_ops(scans: Mapping[str, ScanOp] | None = None) -> str:
    """Register SS2DScan and AnomalyHead as onnxruntime-extensions Python ops; returns the ops' library path.

    The ops are registered once per process (ONNX Runtime refuses a second kernel for an op). ``scans``
    adds scan implementations by name, which SS2DScan nodes may then name in their ``scan_impl``; the
    compiled CPU kernel (:data:`CPU_KERNEL`) is always there. The head takes the node's ``sigma`` and
    derives its map size from the first feature map, as the TensorRT plugin does.
    """
    global _library
    _scans.update(scans or {})
    if _library is None:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

        f32 = PyCustomOpDef.dt_float

        @onnx_op(op_type=SS2D_OP, inputs=[f32] * 7, outputs=[f32],
                 attrs={ORT_SCAN_IMPL_ATTR: PyCustomOpDef.dt_string})
        def _ss2d(x, delta, B, C, A, D, delta_bias, scan_impl):  # numpy arrays in, out
            return _scan(scan_impl)(x, delta, B, C, A, D, delta_bias)

        @onnx_op(op_type=HEAD_OP, inputs=[f32] * (2 * HEAD_PAIRS), outputs=[f32, f32],
                 attrs={"sigma": PyCustomOpDef.dt_float})
        def _head(*features, sigma):
            pairs = list(zip(features[0::2], features[1::2]))
            size = (HEAD_MAP_STRIDE * features[0].shape[-2], HEAD_MAP_STRIDE * features[0].shape[-1])
            return anomaly_head_numpy(pairs, size, float(sigma))

        _install_array_returns(PyCustomOpDef, (_ss2d, _head))
        _library = get_library_path()
    return _library


def _install_array_returns(native: Any, ops: tuple[Any, ...]) -> None:
    """Have ``ops`` hand their fp32 outputs to ONNX Runtime as arrays.

    onnxruntime-extensions calls every Python op through one Python hook, which returns each output as
    ``(shape, flat values)``. Its own hook makes the values a Python list (``tolist``). The native side takes
    any array-like there and copies its buffer, but a list costs about 50 ms per 0.8 M floats: a stage-1
    SS2DScan took 65 ms in the graph against 7 ms for the kernel. This hook returns contiguous fp32 arrays
    for ``ops`` and leaves every other Python op of the process to the library's own hook.
    """
    from onnxruntime_extensions import _ocos

    library_hook = _ocos._on_pyop_invocation
    ours = {id(op): op for op in ops}  # the op ids the native side passes (onnx_op registers id(opdef))

    def invoke(op_id: int, feed: Any, attributes: Any) -> tuple[Any, ...]:
        op = ours.get(op_id)
        if op is None:
            return library_hook(op_id, feed, attributes)
        out = op.body(*feed, **op.cast_attributes(attributes))
        fetched: list[Any] = [op_id]
        for value in out if isinstance(out, tuple) else (out,):
            value = np.ascontiguousarray(value, dtype=np.float32)
            fetched += [value.shape, value]
        return tuple(fetched)

    native.install_hooker(invoke)


def configure_session(options: object, library: str) -> None:
    """Give an ``onnxruntime.SessionOptions`` the Python ops' ``library`` (from :func:`register_ort_ops`).

    The ops run on the session's calling thread, with threads of their own; spinning intra-op pool threads
    would only take CPU from them, so spinning is turned off.
    """
    options.register_custom_ops_library(library)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")


def to_ort_domain_inplace(model: onnx.ModelProto, scan_impl: str) -> onnx.ModelProto:
    """Move ``model``'s ``pdd`` nodes to ``ai.onnx.contrib`` in place and return it; raises ValueError when
    it has none.

    Keeps only the attributes the Python ops read (onnxruntime-extensions accepts scalar int, float and
    string attributes only) and writes ``scan_impl`` on each SS2DScan node: the implementation its op runs,
    a registered name (:func:`register_ort_ops`), chosen by the caller.
    """
    kept = {SS2D_OP: set(), HEAD_OP: {"sigma"}}
    moved = 0
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type not in kept:
            raise ValueError(f"ONNX node {node.name!r}: unknown op {DOMAIN}::{node.op_type}; expected {sorted(kept)}")
        if node.op_type == HEAD_OP and len(node.input) != 2 * HEAD_PAIRS:
            raise ValueError(f"ONNX node {node.name!r}: {HEAD_OP} has {len(node.input)} inputs; the ONNX Runtime "
                             f"Python op takes {2 * HEAD_PAIRS} (PDD's {HEAD_PAIRS} pairs)")
        node.domain = ORT_DOMAIN
        attrs = [a for a in node.attribute if a.name in kept[node.op_type]]
        if node.op_type == SS2D_OP:
            attrs.append(onnx.helper.make_attribute(ORT_SCAN_IMPL_ATTR, scan_impl))
        del node.attribute[:]
        node.attribute.extend(attrs)
        moved += 1
    if not moved:
        raise ValueError(f"the ONNX graph {model.graph.name!r} has no {DOMAIN}:: nodes: it is not the plugin form")
    opsets = [o for o in model.opset_import if o.domain not in (DOMAIN, ORT_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([*opsets, onnx.helper.make_opsetid(ORT_DOMAIN, 1)])
    return model
