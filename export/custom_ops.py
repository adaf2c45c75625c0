"""The two custom operators of the ``plugin`` ONNX form: the SS2D scan and the anomaly head.

Each exists three times, with one contract:

- as a PyTorch custom op (``torch.ops.pdd.ss2d_scan``, defined in :mod:`pdd.ss2d` because a model built
  with ``scan_impl="plugin"`` calls it; ``torch.ops.pdd.anomaly_head`` here), so that ``torch.export``
  sees one opaque node per VMamba block and one for the head;
- as an ONNX operator of domain ``pdd`` (``SS2DScan``, ``AnomalyHead``) with a registered schema and the
  attributes TensorRT's ONNX parser reads (``plugin_namespace``, ``aot``);
- as an ONNX Runtime Python op (onnxruntime-extensions), which must live in domain ``ai.onnx.contrib``:
  :func:`to_ort_domain` rewrites a copy of the graph for ONNX Runtime, so one ONNX file serves both.

Contracts (shapes and dtypes)::

    SS2DScan(x (B, D, H, W) T, delta (B, 4, D, H, W) T, B (B, 4, N, H, W) T, C (B, 4, N, H, W) T,
             A (4·D, N) fp32, D (4·D,) fp32, delta_bias (4·D,) fp32) -> y (B, D, H, W) T      T = fp32|fp16
    AnomalyHead(t_1, s_1, …, t_6, s_6: (B, C_l, H_l, W_l) T) -> map (B, 4·H_1, 4·W_1) fp32, score (B,) fp32

The head's map size comes from the shape of its first input (WRN layer 1, at 1/4 of the image), so the
engine needs no float or size attribute at run time; ``sigma`` and ``image_size`` are attributes for the
build (the kernel bakes σ in) and for people reading the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from torch import Tensor

from pdd.anomaly import anomaly_head_ref
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

DOMAIN = "pdd"                  # torch library namespace, ONNX domain and TensorRT plugin namespace
ORT_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions serves Python ops from
SS2D_OP = "SS2DScan"
HEAD_OP = "AnomalyHead"
HEAD_PAIRS = 6                  # 3 levels × (prior student, plain student)
# The first (teacher, student) pair is WRN layer 1 and its fusion target, at 1/4 of the image.
HEAD_MAP_STRIDE = 4


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

_ort_registered = False
# The attribute to_ort_domain writes on every SS2DScan node: the scan implementation its Python op runs.
ORT_SCAN_IMPL_ATTR = "scan_impl"


def register_ort_ops() -> str:
    """Register both ops as onnxruntime-extensions Python ops (once per process); returns the library path.

    Add the path to a session with ``SessionOptions.register_custom_ops_library``. The SS2DScan body runs
    :func:`pdd.ss2d.ss2d_scan` with the implementation its node names (written by :func:`to_ort_domain`);
    the head runs the PyTorch reference on CPU.
    """
    global _ort_registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _ort_registered:
        f32 = PyCustomOpDef.dt_float

        @onnx_op(op_type=SS2D_OP, inputs=[f32] * 7, outputs=[f32],
                 attrs={ORT_SCAN_IMPL_ATTR: PyCustomOpDef.dt_string})
        def _ss2d(x, delta, B, C, A, D, delta_bias, scan_impl):  # numpy arrays in, out
            args = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, delta, B, C, A, D, delta_bias)]
            with torch.no_grad():
                return ss2d_scan(*args, impl=scan_impl).numpy()

        @onnx_op(op_type=HEAD_OP, inputs=[f32] * (2 * HEAD_PAIRS), outputs=[f32, f32],
                 attrs={"sigma": PyCustomOpDef.dt_float})
        def _head(*features, sigma):
            feats = [torch.from_numpy(np.ascontiguousarray(f)) for f in features]
            with torch.no_grad():
                amap, score = anomaly_head_op(feats, float(sigma))
            return amap.numpy(), score.numpy()

        _ort_registered = True
    return get_library_path()


def to_ort_domain(model: onnx.ModelProto, scan_impl: str = "auto") -> onnx.ModelProto:
    """A copy of ``model`` whose ``pdd`` nodes sit in ``ai.onnx.contrib``, keeping only the attributes the
    Python ops read (onnxruntime-extensions accepts scalar int/float/string attributes only).

    Each SS2DScan node gets the attribute ``scan_impl``: the implementation its op runs, resolved here on the
    CPU (``auto``: the compiled CPU kernel where it can be built, else ``eager`` with a warning).
    """
    impl = resolve_scan_impl(scan_impl, "cpu")
    kept = {SS2D_OP: set(), HEAD_OP: {"sigma"}}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
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
            attrs.append(onnx.helper.make_attribute(ORT_SCAN_IMPL_ATTR, impl))
        del node.attribute[:]
        node.attribute.extend(attrs)
    opsets = [o for o in out.opset_import if o.domain not in (DOMAIN, ORT_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend([*opsets, onnx.helper.make_opsetid(ORT_DOMAIN, 1)])
    return out

