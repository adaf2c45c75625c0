"""The two custom operators of the ``plugin`` ONNX form: the SS2D scan and the anomaly head.

Each exists three times, with one contract:

- as a PyTorch custom op (``torch.ops.pdd.ss2d_scan``, defined in :mod:`pdd.ss2d` because a model built
  with ``scan_impl="plugin"`` calls it; ``torch.ops.pdd.anomaly_head`` here), so that ``torch.export``
  sees one opaque node per VMamba block and one for the head;
- as an ONNX operator of domain ``pdd`` (``SS2DScan``, ``AnomalyHead``) with a registered schema and the
  attributes TensorRT's ONNX parser reads (``plugin_namespace``, ``aot``);
- as an ONNX Runtime Python op (onnxruntime-extensions), which must live in domain ``ai.onnx.contrib``:
  :func:`to_ort_domain` rewrites a copy of the graph for ONNX Runtime, so one ONNX file serves both. The
  ops themselves are torch-free (:mod:`kernels.ort_ops`: the compiled CPU scan kernel and the numpy head),
  so a server without torch runs the same graph with the same code; :func:`register_ort_ops` adds the
  PyTorch scan implementations for nodes that name them.

Contracts (shapes and dtypes)::

    SS2DScan(x (B, D, H, W) T, delta (B, 4, D, H, W) T, B (B, 4, N, H, W) T, C (B, 4, N, H, W) T,
             A (4·D, N) fp32, D (4·D,) fp32, delta_bias (4·D,) fp32) -> y (B, D, H, W) T      T = fp32|fp16
    AnomalyHead(t_1, s_1, …, t_6, s_6: (B, C_l, H_l, W_l) T) -> map (B, 4·H_1, 4·W_1) fp32, score (B,) fp32

The head's map size comes from the shape of its first input (WRN layer 1, at 1/4 of the image), so the
engine needs no float or size attribute at run time; ``sigma`` and ``image_size`` are attributes for the
build (the kernel bakes σ in) and for people reading the graph.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from torch import Tensor

from kernels import ort_ops
from kernels.contract import DOMAIN, HEAD_MAP_STRIDE, HEAD_OP, HEAD_PAIRS, SS2D_OP
from kernels.ort_ops import CPU_KERNEL, ORT_DOMAIN, ORT_SCAN_IMPL_ATTR
from pdd.anomaly import anomaly_head_ref
from pdd.impl_names import SCAN_IMPLS
from pdd.ss2d import ss2d_scan
from pdd.ssm import resolve_scan_impl

__all__ = [
    "DOMAIN",
    "HEAD_MAP_STRIDE",
    "HEAD_OP",
    "HEAD_PAIRS",
    "ORT_DOMAIN",
    "ORT_SCAN_IMPL_ATTR",
    "SS2D_OP",
    "anomaly_head_op",
    "register_onnx_schemas",
    "register_ort_ops",
    "to_ort_domain",
    "translation_table",
]

log = logging.getLogger(__name__)


@torch.library.custom_op(f"{DOMAIN}::anomaly_head", mutates_args=())
def anomaly_head_op(features: list[Tensor], sigma: float) -> tuple[Tensor, Tensor]:
    """:func:`pdd.anomaly.anomaly_head_ref` as one op; features = (t_1, s_1, …) -> (map (B, H, W), score (B,)) fp32."""
    pairs = _pairs(features)
    return anomaly_head_ref(pairs, _map_size(features[0].shape), sigma)


@anomaly_head_op.register_fake
def _anomaly_head_fake(features: list[Tensor], sigma: float) -> tuple[Tensor, Tensor]:
    first = features[0]
    h, w = _map_size(first.shape)
    return first.new_empty((first.shape[0], h, w), dtype=torch.float32), first.new_empty(
        (first.shape[0],), dtype=torch.float32)


def _pairs(features: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    if len(features) % 2:
        raise ValueError(f"anomaly head op: features must be (teacher, student) pairs, got {len(features)} tensors")
    return [(features[i], features[i + 1]) for i in range(0, len(features), 2)]


def _map_size(first_shape: Sequence[int]) -> tuple[int, int]:
    return HEAD_MAP_STRIDE * first_shape[-2], HEAD_MAP_STRIDE * first_shape[-1]


# --- ONNX schemas and translation ----------------------------------------------------------------

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]


def _trt_attributes() -> list[OpSchema.Attribute]:
    return [
        OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=False),
        OpSchema.Attribute("aot", OpSchema.AttrType.INT, "1: TensorRT uses the ahead-of-time kernel", required=False),
    ]


def _schemas() -> list[OpSchema]:
    param = OpSchema.FormalParameter
    ss2d = OpSchema(
        SS2D_OP, DOMAIN, 1,
        "Four-route VMamba selective scan (SS2D v0), routes merged back to the image grid; computes in fp32.",
        inputs=[param("x", "T"), param("delta", "T"), param("B", "T"), param("C", "T"),
                param("A", "tensor(float)"), param("D", "tensor(float)"), param("delta_bias", "tensor(float)")],
        outputs=[param("y", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "activations")],
        attributes=_trt_attributes(),
    )
    head = OpSchema(
        HEAD_OP, DOMAIN, 1,
        "PDD anomaly head: Σ bilinear-up(1 − cos over channels) of (teacher, student) pairs, Gaussian blur, max.",
        inputs=[param("features", "T", param_option=OpSchema.FormalParameterOption.Variadic, min_arity=2)],
        outputs=[param("anomaly_map", "tensor(float)"), param("pred_score", "tensor(float)")],
        type_constraints=[("T", _FLOAT_TYPES, "feature maps (summed in fp32)")],
        attributes=[
            OpSchema.Attribute("sigma", OpSchema.AttrType.FLOAT, "Gaussian σ of the map (a kernel constant)"),
            OpSchema.Attribute("image_size", OpSchema.AttrType.INTS, "(H, W) of the map, for reference",
                               required=False),
            *_trt_attributes(),
        ],
    )
    return [ss2d, head]


def register_onnx_schemas() -> None:
    """Register the ONNX schemas of both ops in domain ``pdd`` (idempotent).

    The exporter needs them to give the custom nodes their outputs; ``onnx.checker`` and shape inference
    use them too. Not in ``ai.onnx.contrib`` as well: ``onnx.reference`` (used by constant folding) needs
    op names unique across domains, and ONNX Runtime's Python ops need no ONNX schema.
    """
    for schema in _schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: each custom op -> one node of domain ``pdd``."""
    import onnxscript

    register_onnx_schemas()
    opset = onnxscript.values.Opset(DOMAIN, 1)

    def ss2d(x, delta, B, C, A, D, delta_bias):  # onnxscript values in, out
        return opset.SS2DScan(x, delta, B, C, A, D, delta_bias, plugin_namespace=DOMAIN, aot=1)

    def head(features, sigma: float):
        return opset.AnomalyHead(*features, sigma=float(sigma), plugin_namespace=DOMAIN, aot=1)

    return {torch.ops.pdd.ss2d_scan.default: ss2d, torch.ops.pdd.anomaly_head.default: head}


# --- ONNX Runtime: Python ops ----------------------------------------------------------------------


def _torch_scan(impl: str, *arrays: np.ndarray) -> np.ndarray:
    """:func:`pdd.ss2d.ss2d_scan` with ``impl`` on numpy arrays (the ONNX Runtime op's other implementations)."""
    args = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    with torch.no_grad():
        return ss2d_scan(*args, impl=impl).numpy()


def register_ort_ops() -> str:
    """Register both ops as onnxruntime-extensions Python ops (once per process); returns the library path.

    Add the path to a session with :func:`kernels.ort_ops.configure_session`. The SS2DScan body runs the
    implementation its node names (written by :func:`to_ort_domain`): the compiled CPU kernel through
    :func:`kernels.cpu_lib.ss2d_scan_numpy`, any other through :func:`pdd.ss2d.ss2d_scan`; the head runs
    :func:`kernels.cpu_head.anomaly_head_numpy`, the numpy twin of the PyTorch reference.
    """
    return ort_ops.register_ort_ops({impl: functools.partial(_torch_scan, impl) for impl in SCAN_IMPLS
                                     if impl != CPU_KERNEL})


def to_ort_domain(model: onnx.ModelProto, scan_impl: str = "auto") -> onnx.ModelProto:
    """A copy of ``model`` whose ``pdd`` nodes sit in ``ai.onnx.contrib``, keeping only the attributes the
    Python ops read (:func:`kernels.ort_ops.to_ort_domain_inplace`).

    Each SS2DScan node gets the attribute ``scan_impl``: the implementation its op runs, resolved here on the
    CPU (``auto``: the compiled CPU kernel where it can be built, else ``eager`` with a warning).
    """
    impl = resolve_scan_impl(scan_impl, "cpu")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return ort_ops.to_ort_domain_inplace(out, impl)
