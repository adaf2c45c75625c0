"""ONNX export of PDD's eval pipeline: images in, ``pred_score`` (B,) and ``anomaly_map`` (B, H, W) out.

Two forms; the exporter builds the model for the form it writes (``build_pdd(..., graph=True)`` with the
scan implementation named below) and loads the trained weights into it, sharing their tensors:

- ``portable``: standard ONNX ops only, so ONNX Runtime, TensorRT without plugins and OpenVINO run it.
  ``scan_impl="graph-sequential"`` (default; CPU runtimes) walks the chunks of each scan in order, about
  eleven nodes per chunk of 16 positions, with chunk-sized temporaries, each SS2D block position-major
  from routes to merge; ``"graph-parallel"`` (GPUs: what build_trt.py exports) handles all chunks at once
  and joins them by a log-depth scan, so its node count grows with log2(L) but its temporaries with the
  whole sequence (see :mod:`pdd.ssm`).
- ``plugin``: ``scan_impl="plugin"``: every SS2D scan is one ``pdd::SS2DScan`` node and the head one
  ``pdd::AnomalyHead`` node (see :mod:`export.custom_ops`), the shape TensorRT's AOT plugins
  (:mod:`export.trt_plugins`) fill.

The batch dimension is dynamic within ``batch=(min, max)``; the image size is fixed per file. The file is
written as one self-contained ``.onnx`` (PDD is ~480 MB in fp32, under protobuf's 2 GB limit), which keeps
one artifact and one hash per model; ``model.json`` beside it describes it (:mod:`export.metadata`),
including the scan implementation. fp16 conversion for TensorRT: :mod:`export.fp16`.

Example::

    >>> from pdd import PDDConfig, build_pdd
    >>> from export.onnx_export import export_onnx
    >>> model = build_pdd(PDDConfig(image_size=64, scan_impl="eager"))
    >>> report = export_onnx(model, "out/portable", form="portable", batch=(1, 8))  # doctest: +SKIP
    >>> report.nodes, report.size_bytes                                               # doctest: +SKIP
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
from onnx import helper
from onnxscript.optimizer import fold_constants_ir
from torch import Tensor, nn

import pdd
from export.custom_ops import DOMAIN, HEAD_MAP_STRIDE, anomaly_head_op, translation_table
from export.fp16 import STAGE_KEY, keep_fp32_by_policy, to_fp16
from export.metadata import (
    OnnxMetadata,
    TensorSpec,
    atomic_write_bytes,
    metadata_path,
    sha256_file,
    versions,
    write_metadata,
)
from pdd.anomaly import FeaturePairs, anomaly_head_ref
from pdd.backbones.vmamba import SS2D
from pdd.data.readers import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE, normalise_nhwc
from pdd.impl_names import DEPRECATED_SCAN_GRAPHS, canonical_scan_impl
from pdd.model import PDDModel, build_pdd, head_pairs

__all__ = [
    "DEFAULT_OPSET",
    "FORMS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "SCAN_IMPLS_BY_FORM",
    "STAGE_KEY",
    "ExportReport",
    "ExportablePDD",
    "export_onnx",
    "keep_fp32_by_policy",
    "load_onnx",
    "op_counts",
    "save_onnx",
    "to_fp16",
    "weight_sharing_copy",
]

log = logging.getLogger(__name__)

FORMS = ("plugin", "portable")
# The scan implementations each form is built with; the first is the default.
SCAN_IMPLS_BY_FORM = {"portable": ("graph-sequential", "graph-parallel"), "plugin": ("plugin",)}
# Opset 18: the newest that TensorRT 10.x, ONNX Runtime and OpenVINO all import without conversion issues.
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_score", "anomaly_map")
# Protobuf refuses messages of 2 GB and more; PDD (~480 MB fp32) is far below.
_PROTOBUF_LIMIT = 2**31 - 1
# Node metadata worth keeping in a shipped file (stack traces would carry build-machine paths).
_KEPT_NODE_METADATA = ("namespace", STAGE_KEY)


class _AnomalyHeadStage(nn.Module):
    """The head as a submodule, so its exported nodes carry a name scope of their own."""

    def __init__(self, form: str, sigma: float) -> None:
        super().__init__()
        self.form, self.sigma = form, sigma

    def forward(self, pairs: FeaturePairs, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if self.form == "portable":
            return anomaly_head_ref(pairs, image_size, self.sigma)
        derived = (HEAD_MAP_STRIDE * pairs[0][0].shape[-2], HEAD_MAP_STRIDE * pairs[0][0].shape[-1])
        if derived != tuple(image_size):
            raise ValueError(f"plugin head: the first feature map {tuple(pairs[0][0].shape)} implies a "
                             f"{derived} map, the images are {tuple(image_size)}")
        return anomaly_head_op([t for pair in pairs for t in pair], self.sigma)


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` that shares its parameters and buffers (no weight is duplicated)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _form_scan_impl(form: str, scan_impl: str | None) -> str:
    if form not in FORMS:
        raise ValueError(f"unknown ONNX form {form!r}; expected one of {FORMS}")
    allowed = SCAN_IMPLS_BY_FORM[form]
    impl = allowed[0] if scan_impl is None else canonical_scan_impl(scan_impl)
    if impl not in allowed:
        raise ValueError(f"the {form} ONNX form is built with scan_impl {' or '.join(map(repr, allowed))}, "
                         f"got {scan_impl!r}")
    return impl


def build_for_export(model: PDDModel, scan_impl: str) -> PDDModel:
    """``model`` rebuilt for graph export: ``scan_impl`` and the graph layer forms (``build_pdd(graph=True)``),
    its weights loaded with ``assign=True`` so the new model shares their tensors (nothing is copied)."""
    device = next(model.parameters()).device
    built = build_pdd(dataclasses.replace(model.cfg, scan_impl=scan_impl), device, graph=True, teacher_weights=False)
    built.load_state_dict(model.state_dict(keep_vars=True), assign=True)  # the weights' dtypes come along
    built.calibration, built.precision = model.calibration, model.precision
    built.quantization = model.quantization
    return built.eval()


class ExportablePDD(nn.Module):
    """PDD's eval forward for export: images -> (pred_score (B,) fp32, anomaly_map (B, H, W) fp32).

    images: (B, 3, H, W) float32 ImageNet-normalised, or with ``preprocess`` (B, H, W, 3) uint8 RGB.
    Wraps ``model`` rebuilt for the form (:func:`build_for_export`, sharing its weights): the caller's
    model is not changed. ``scan_impl``: the scan the form is built with (default: the form's first of
    :data:`SCAN_IMPLS_BY_FORM`).
    """

    def __init__(self, model: PDDModel, form: str = "portable", preprocess: bool = False,
                 scan_impl: str | None = None) -> None:
        super().__init__()
        self.scan_impl = _form_scan_impl(form, scan_impl)
        if not isinstance(model, PDDModel):
            raise TypeError(f"ExportablePDD exports PDD models, got {type(model).__name__} "
                            f"(the RD4AD baseline has no export path)")
        self.form, self.preprocess = form, preprocess
        self.model = build_for_export(model, self.scan_impl)
        self.head = _AnomalyHeadStage(form, model.cfg.sigma)

    def normalise(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 ImageNet-normalised, as locally and on the server."""
        return normalise_nhwc(images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.preprocess:
            images = self.normalise(images)
        feats = self.model.features(images)
        amap, score = self.head(head_pairs(feats), (images.shape[-2], images.shape[-1]))
        return score, amap


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote: file, metadata, size, node count per op type."""

    path: Path
    metadata_path: Path
    form: str
    opset: int
    nodes: int
    size_bytes: int
    sha256: str
    batch: tuple[int, int]
    image_size: tuple[int, int]
    preprocess: bool
    ops: dict[str, int]
    seconds: float

    def __str__(self) -> str:
        custom = {k: v for k, v in self.ops.items() if k.startswith(f"{DOMAIN}::")}
        return (f"ONNX ({self.form}, opset {self.opset}) written to {self.path}: {self.nodes} nodes"
                f"{f' incl. {custom}' if custom else ''}, {self.size_bytes / 2**20:.1f} MiB, batch "
                f"{self.batch[0]}..{self.batch[1]}, {self.image_size[0]}x{self.image_size[1]}, "
                f"{'uint8 NHWC' if self.preprocess else 'float32 NCHW normalised'} input; "
                f"metadata {self.metadata_path} ({self.seconds:.0f} s)")


def _onnx_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out if out.suffix == ".onnx" else out / "model.onnx"


def _tag_stages(model: ir.Model, scan: bool = True) -> None:
    """Mark the nodes of the head and, with ``scan``, of SS2D's own arithmetic (δ/B/C projections and the
    chunked scan of a graph-built scan), which stay fp32 in an fp16 graph, from the module hierarchy the
    exporter records; drop other metadata. A plugin-built model (``scan=False``) runs its projections in
    fp16 like other layers: its kernel reads fp16 and computes in fp32.

    The exporter's stack traces stop at the calling module's ``forward``, so the innermost module is the
    reliable key: SS2D's Linear, Conv2d and LayerNorm sublayers are not tagged and may run in fp16.
    """
    ss2d = f"{SS2D.__module__}.{SS2D.__qualname__}"
    head = f"{_AnomalyHeadStage.__module__}.{_AnomalyHeadStage.__qualname__}"
    for node in model.graph:
        props = node.metadata_props
        raw = props.get("pkg.torch.onnx.class_hierarchy")
        modules = ast.literal_eval(raw)[:-1] if raw else []  # the last entry is the aten op
        stage = "head" if head in modules else "scan" if scan and modules and modules[-1] == ss2d else None
        kept = {k: props[k] for k in _KEPT_NODE_METADATA if k in props}
        props.clear()
        props.update(kept)
        if stage:
            props[STAGE_KEY] = stage


def _fold(model: ir.Model) -> None:
    """Constant folding and cleanup, without onnxscript's pattern rewriter.

    The exporter's ``optimize=True`` spends most of its time in pattern rewrites (~50 s on PDD here) for
    fusions TensorRT and ONNX Runtime do themselves; folding shape arithmetic is what cuts the node count.
    """
    ir_passes.InlinePass()(model)
    for _ in range(2):
        result = fold_constants_ir(model, onnx_shape_inference=True)
        ir_passes.RemoveUnusedNodesPass()(model)
        if not result.modified:
            break
    ir.passes.Sequential(
        ir_passes.RemoveUnusedFunctionsPass(),
        ir_passes.RemoveUnusedOpsetsPass(),
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_passes.DeduplicateInitializersPass(),
        ir_passes.CommonSubexpressionEliminationPass(),
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.OutputFixPass(),
        ir_passes.NameFixPass(),
    )(model)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type ('Conv', 'pdd::SS2DScan', …), most frequent first."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
    return TensorSpec(value.name, helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``proto`` as one self-contained file, atomically."""
    data = proto.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:
        raise ValueError(f"ONNX model for {path} is {len(data) / 2**30:.1f} GiB, over protobuf's 2 GiB limit; "
                         f"this exporter writes single-file models only")
    atomic_write_bytes(path, data)


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with any external data beside it); clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist; export it with export.onnx_export.export_onnx")
    return onnx.load(str(path))


def _scan_graph_argument(scan_graph: str, scan_impl: str | None, form: str) -> str | None:
    """The deprecated ``scan_graph=`` as the scan implementation it names (it only ever concerned the
    portable form, so the plugin form ignores it)."""
    warnings.warn("export_onnx(scan_graph=...) is deprecated; use scan_impl='graph-sequential' or "
                  "'graph-parallel'", DeprecationWarning, stacklevel=3)
    if scan_graph not in DEPRECATED_SCAN_GRAPHS:
        raise ValueError(f"unknown scan_graph {scan_graph!r}; expected one of {tuple(DEPRECATED_SCAN_GRAPHS)}")
    if form != "portable":
        return scan_impl
    if scan_impl is not None and canonical_scan_impl(scan_impl) != DEPRECATED_SCAN_GRAPHS[scan_graph]:
        raise ValueError(f"scan_graph={scan_graph!r} contradicts scan_impl={scan_impl!r}; give scan_impl only")
    return DEPRECATED_SCAN_GRAPHS[scan_graph]


def export_onnx(model: PDDModel, path: str | os.PathLike, form: str = "portable", batch: tuple[int, int] = (1, 32),
                image_size: int | None = None, preprocess: bool = False, opset: int = DEFAULT_OPSET,
                scan_impl: str | None = None, scan_graph: str | None = None) -> ExportReport:
    """Export PDD's eval pipeline to ``path`` (a ``.onnx`` file, or a folder that gets ``model.onnx``).

    form: ``"portable"`` (standard ops) or ``"plugin"`` (custom SS2D and head nodes); batch: (min, max) of
    the dynamic batch dimension (equal values give a static batch); image_size: square input size,
    default the model's config; preprocess: take uint8 (B, H, W, 3) images and normalise in the graph;
    scan_impl: the scan the exported model is built with: for the portable form ``"graph-sequential"``
    (default; chunk-sized temporaries, best for CPU runtimes) or ``"graph-parallel"`` (best for GPUs,
    TensorRT), for the plugin form ``"plugin"``; scan_graph: deprecated (``"sequential"`` /
    ``"parallel"`` for the portable form), use scan_impl. Writes ``<name>.onnx`` and ``<name>.json``
    atomically and returns an :class:`ExportReport`.
    """
    if scan_graph is not None:
        scan_impl = _scan_graph_argument(scan_graph, scan_impl, form)
    scan_impl = _form_scan_impl(form, scan_impl)
    lo, hi = batch
    if not 1 <= lo <= hi:
        raise ValueError(f"batch range must satisfy 1 <= min <= max, got {batch}")
    size = int(image_size or model.cfg.image_size)
    if size < 32 or size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {size}")
    path = _onnx_path(path)
    start = time.perf_counter()
    wrapper = ExportablePDD(model, form, preprocess, scan_impl).eval()
    # An example batch of 1 would let torch.export specialise the dimension; 2 keeps it symbolic.
    example_batch = min(max(2, lo), hi)
    if preprocess:
        example = torch.zeros(example_batch, size, size, 3, dtype=torch.uint8)
    else:
        example = torch.zeros(example_batch, 3, size, size)
    dynamic = {"images": {0: torch.export.Dim("batch", min=lo, max=hi)}} if hi > lo else None
    with torch.no_grad(), _quiet("onnx_ir", "onnxscript"):
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            opset_version=opset, dynamic_shapes=dynamic, optimize=False,
            custom_translation_table=translation_table() if form == "plugin" else None,
        )
        ir_model = program.model
        _tag_stages(ir_model, scan=scan_impl != "plugin")
        _fold(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    proto.producer_name = "pdd"
    proto.doc_string = f"PDD anomaly detection, {form} form: {INPUT_NAME} -> {', '.join(OUTPUT_NAMES)}"
    save_onnx(proto, path)
    digest = sha256_file(path)
    ops = op_counts(proto)
    cfg = dataclasses.replace(model.cfg, image_size=size).to_dict()
    meta = OnnxMetadata(
        form=form, opset=opset, file=path.name, sha256=digest, size_bytes=path.stat().st_size,
        nodes=len(proto.graph.node), inputs=[_spec(v) for v in proto.graph.input],
        outputs=[_spec(v) for v in proto.graph.output], image_size=(size, size), batch=(lo, hi),
        preprocess=preprocess,
        input_layout="NHWC uint8 RGB" if preprocess else "NCHW float32 RGB, ImageNet-normalised",
        normalisation={"scale": PIXEL_SCALE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "in_graph": preprocess},
        config=cfg, custom_ops=sorted(k for k in ops if k.startswith(f"{DOMAIN}::")),
        scan_impl=scan_impl,
        versions={**versions("torch", "onnx", "onnxscript"), "pdd": _pdd_version()},
        calibration=getattr(model, "calibration", None),
    )
    meta_file = write_metadata(metadata_path(path), meta)
    report = ExportReport(path, meta_file, form, opset, meta.nodes, meta.size_bytes, digest, (lo, hi), (size, size),
                          preprocess, ops, time.perf_counter() - start)
    log.info("%s", report)
    return report


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence the per-node INFO chatter of the ONNX passes (thousands of lines for PDD)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _pdd_version() -> str:
    return str(pdd.__version__)
