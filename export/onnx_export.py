"""ONNX export of PDD's eval pipeline: images in, ``pred_score`` (B,) and ``anomaly_map`` (B, H, W) out.

Two forms, one wrapper (:class:`ExportablePDD`):

- ``portable``: standard ONNX ops only. Each SS2D scan is the chunked formulation of
  :func:`pdd.ssm.selective_scan_chunked` (no Loop, no per-step unrolling), so ONNX Runtime, TensorRT
  without plugins and OpenVINO run it. ``scan_graph="sequential"`` (default; CPU runtimes) walks the
  chunks in order, about eleven nodes per chunk of 16 positions, with chunk-sized temporaries, each
  SS2D block position-major from routes to merge (:func:`pdd.ssm.ss2d_positions`);
  ``"parallel"`` (GPUs: what build_trt.py exports) handles all chunks at once and joins them by a
  log-depth scan, so its node count grows with log2(L) but its temporaries with the whole sequence.
- ``plugin``: every SS2D scan is one ``pdd::SS2DScan`` node and the head one ``pdd::AnomalyHead`` node
  (see :mod:`export.custom_ops`), the shape TensorRT's AOT plugins (:mod:`export.trt_plugins`) fill.

The batch dimension is dynamic within ``batch=(min, max)``; the image size is fixed per file. The file is
written as one self-contained ``.onnx`` (PDD is ~480 MB in fp32, under protobuf's 2 GB limit), which keeps
one artifact and one hash per model; ``model.json`` beside it describes it (:mod:`export.metadata`).

Example::

    >>> from pdd import PDDConfig, build_pdd
    >>> from export.onnx_export import export_onnx
    >>> model = build_pdd(PDDConfig(image_size=64, scan_impl="chunked"))
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnxscript.optimizer import fold_constants_ir
from torch import Tensor, nn

from export.custom_ops import DOMAIN, HEAD_MAP_STRIDE, SS2D_OP, anomaly_head_op, ss2d_scan_op, translation_table
from export.metadata import (
    OnnxMetadata,
    TensorSpec,
    atomic_write_bytes,
    metadata_path,
    sha256_file,
    versions,
    write_metadata,
)
from pdd.anomaly import anomaly_head_ref
from pdd.backbones.vmamba import SS2D
from pdd.data.readers import IMAGENET_MEAN, IMAGENET_STD, normalise_nhwc
from pdd.model import PDDFeatures, PDDModel
from pdd.ssm import TRACE_SCAN_GRAPHS, traced_scan_graph

__all__ = [
    "DEFAULT_OPSET",
    "FORMS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "STAGE_KEY",
    "ExportReport",
    "ExportablePDD",
    "export_onnx",
    "keep_fp32_for_head_and_scan",
    "load_onnx",
    "op_counts",
    "save_onnx",
    "to_fp16",
    "weight_sharing_copy",
]

log = logging.getLogger(__name__)

FORMS = ("plugin", "portable")
# Opset 18: the newest that TensorRT 10.x, ONNX Runtime and OpenVINO all import without conversion issues.
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_score", "anomaly_map")
# Node metadata key naming the model stage a node computes ("scan", "head"); precision conversion reads it.
STAGE_KEY = "pdd.stage"
# Protobuf refuses messages of 2 GB and more; PDD (~480 MB fp32) is far below.
_PROTOBUF_LIMIT = 2**31 - 1
# Node metadata worth keeping in a shipped file (stack traces would carry build-machine paths).
_KEPT_NODE_METADATA = ("namespace", STAGE_KEY)


class _PluginSS2D(SS2D):
    """SS2D whose four-route scan is the ``pdd::ss2d_scan`` custom op (one ONNX node per block).

    The steps before and after the scan repeat :meth:`pdd.backbones.vmamba.SS2D.forward` exactly; the
    export tests compare both on the same weights, so a change there cannot slip through.
    """

    def forward(self, x: Tensor) -> Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        delta, Bs, Cs = self.projections(x)
        A = -torch.exp(self.A_logs.float())
        y = ss2d_scan_op(x.contiguous(), delta, Bs, Cs, A, self.Ds.float(), self.dt_projs_bias.float().reshape(-1))
        y = self.out_norm(y.permute(0, 2, 3, 1))
        return self.out_proj(y * F.silu(z))


class _AnomalyHeadStage(nn.Module):
    """The head as a submodule, so its exported nodes carry a name scope of their own."""

    def __init__(self, form: str, sigma: float) -> None:
        super().__init__()
        self.form, self.sigma = form, sigma

    def forward(self, feats: PDDFeatures, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        pairs = [(t, s) for branch in (feats.prior, feats.plain) for t, s in zip(feats.targets, branch)]
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


class ExportablePDD(nn.Module):
    """PDD's eval forward for export: images -> (pred_score (B,) fp32, anomaly_map (B, H, W) fp32).

    images: (B, 3, H, W) float32 ImageNet-normalised, or with ``preprocess`` (B, H, W, 3) uint8 RGB.
    Wraps a structural copy of ``model`` sharing its weights: the caller's model is not changed.
    """

    def __init__(self, model: PDDModel, form: str = "portable", preprocess: bool = False) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown ONNX form {form!r}; expected one of {FORMS}")
        if not isinstance(model, PDDModel):
            raise TypeError(f"ExportablePDD exports PDD models, got {type(model).__name__} "
                            f"(the RD4AD baseline has no export path)")
        self.form, self.preprocess = form, preprocess
        self.model = weight_sharing_copy(model).eval()
        for m in self.model.modules():
            if isinstance(m, SS2D):
                if form == "plugin":
                    m.__class__ = _PluginSS2D
                else:
                    m.scan_impl = "chunked"  # the one scan that exports to standard ops
        self.head = _AnomalyHeadStage(form, model.cfg.sigma)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 ImageNet-normalised, as locally and on the server."""
        return normalise_nhwc(images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.preprocess:
            images = self.normalise(images)
        feats = self.model.features(images)
        amap, score = self.head(feats, (images.shape[-2], images.shape[-1]))
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


def _tag_stages(model: ir.Model) -> None:
    """Mark the nodes of the head and of SS2D's own arithmetic (δ/B/C projections and the chunked scan),
    which stay fp32 in an fp16 graph, from the module hierarchy the exporter records; drop other metadata.

    The exporter's stack traces stop at the calling module's ``forward``, so the innermost module is the
    reliable key: SS2D's Linear, Conv2d and LayerNorm sublayers are not tagged and may run in fp16.
    """
    ss2d = f"{SS2D.__module__}.{SS2D.__qualname__}"
    head = f"{_AnomalyHeadStage.__module__}.{_AnomalyHeadStage.__qualname__}"
    for node in model.graph:
        props = node.metadata_props
        raw = props.get("pkg.torch.onnx.class_hierarchy")
        modules = ast.literal_eval(raw)[:-1] if raw else []  # the last entry is the aten op
        stage = "head" if head in modules else "scan" if modules and modules[-1] == ss2d else None
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


def export_onnx(model: PDDModel, path: str | os.PathLike, form: str = "portable", batch: tuple[int, int] = (1, 32),
                image_size: int | None = None, preprocess: bool = False, opset: int = DEFAULT_OPSET,
                scan_graph: str = "sequential") -> ExportReport:
    """Export PDD's eval pipeline to ``path`` (a ``.onnx`` file, or a folder that gets ``model.onnx``).

    form: ``"portable"`` (standard ops) or ``"plugin"`` (custom SS2D and head nodes); batch: (min, max) of
    the dynamic batch dimension (equal values give a static batch); image_size: square input size,
    default the model's config; preprocess: take uint8 (B, H, W, 3) images and normalise in the graph;
    scan_graph (portable form): ``"sequential"`` walks the chunks of each scan in order, chunk-sized
    temporaries (best for CPU runtimes), ``"parallel"`` joins them by a log-depth scan (best for GPUs,
    TensorRT); see :func:`pdd.ssm.traced_scan_graph`.
    Writes ``<name>.onnx`` and ``<name>.json`` atomically and returns an :class:`ExportReport`.
    """
    if form not in FORMS:
        raise ValueError(f"unknown ONNX form {form!r}; expected one of {FORMS}")
    if scan_graph not in TRACE_SCAN_GRAPHS:
        raise ValueError(f"unknown scan_graph {scan_graph!r}; expected one of {TRACE_SCAN_GRAPHS}")
    lo, hi = batch
    if not 1 <= lo <= hi:
        raise ValueError(f"batch range must satisfy 1 <= min <= max, got {batch}")
    size = int(image_size or model.cfg.image_size)
    if size < 32 or size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {size}")
    path = _onnx_path(path)
    start = time.perf_counter()
    wrapper = ExportablePDD(model, form, preprocess).eval()
    # An example batch of 1 would let torch.export specialise the dimension; 2 keeps it symbolic.
    example_batch = min(max(2, lo), hi)
    if preprocess:
        example = torch.zeros(example_batch, size, size, 3, dtype=torch.uint8)
    else:
        example = torch.zeros(example_batch, 3, size, size)
    dynamic = {"images": {0: torch.export.Dim("batch", min=lo, max=hi)}} if hi > lo else None
    with torch.no_grad(), _quiet("onnx_ir", "onnxscript"), traced_scan_graph(scan_graph):
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            opset_version=opset, dynamic_shapes=dynamic, optimize=False,
            custom_translation_table=translation_table() if form == "plugin" else None,
        )
        ir_model = program.model
        _tag_stages(ir_model)
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
        normalisation={"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "in_graph": preprocess},
        config=cfg, custom_ops=sorted(k for k in ops if k.startswith(f"{DOMAIN}::")),
        scan_graph=scan_graph if form == "portable" else "plugin",
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
    import pdd

    return str(pdd.__version__)


# --- fp16 conversion ---------------------------------------------------------------------------------

_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def keep_fp32_for_head_and_scan(node: onnx.NodeProto) -> bool:
    """Nodes that stay fp32 in an fp16 graph: the anomaly head (cosines over ≤2048 channels overflow
    fp16) and, in the portable form, SS2D's scan arithmetic (cumulative sums of δ and exp(A·Δ) need fp32's
    range); the plugin scan reads fp16 and computes in fp32 inside its kernel."""
    if node.domain == DOMAIN:
        return node.op_type != SS2D_OP  # the SS2D kernels read fp16 and compute in fp32; head ops stay fp32
    return any(p.key == STAGE_KEY and p.value in ("head", "scan") for p in node.metadata_props)


def _schema(node: onnx.NodeProto, opsets: dict[str, int]) -> onnx.defs.OpSchema:
    domain = "" if node.domain == "ai.onnx" else node.domain
    try:
        return onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError as exc:
        raise ValueError(f"fp16 conversion: no ONNX schema for node {node.name!r} ({domain or 'ai.onnx'}::"
                         f"{node.op_type}); register it first (export.custom_ops.register_onnx_schemas)") from exc


def _slot_params(params: Sequence[onnx.defs.OpSchema.FormalParameter], count: int) -> list[str]:
    """Type string of each of ``count`` actual slots (a variadic last parameter repeats)."""
    out = []
    for i in range(count):
        p = params[min(i, len(params) - 1)] if params else None
        if p is None or (i >= len(params) and p.option != onnx.defs.OpSchema.FormalParameterOption.Variadic):
            raise ValueError(f"fp16 conversion: slot {i} beyond the schema's {len(params)} parameters")
        out.append(p.type_str)
    return out


def to_fp16(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] = keep_fp32_for_head_and_scan
            ) -> onnx.ModelProto:
    """A typed fp16 copy of ``model`` for strongly typed TensorRT: activations and weights in fp16, except
    the nodes ``keep_fp32`` selects and inputs whose schema fixes them to fp32 (the scan's A, D, δ bias).

    Graph inputs and outputs keep their types; Cast nodes are inserted where fp16 and fp32 meet; constant
    subgraphs (weights reshaped or transposed in the graph) become fp16 when every consumer wants fp16.
    The conversion follows each node's ONNX schema: a type variable bound to float becomes float16.
    """
    from onnx import shape_inference

    m = shape_inference.infer_shapes(model, data_prop=False)
    g = m.graph
    opsets = {o.domain: o.version for o in m.opset_import}
    opsets.setdefault("", opsets.get("ai.onnx", DEFAULT_OPSET))
    types: dict[str, int] = {}
    for v in (*g.input, *g.output, *g.value_info):
        types[v.name] = v.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        types[t.name] = t.data_type
    missing = [o for n in g.node for o in n.output if o and o not in types]
    if missing:
        raise ValueError(f"fp16 conversion: no type known for {len(missing)} tensors (e.g. {missing[:3]}); "
                         f"run shape inference on the model first")

    # Tensors computed from weights only (no graph input upstream): their nodes may stay fp32.
    const = set(inits)
    for n in g.node:
        if all(i == "" or i in const for i in n.input):
            const.update(o for o in n.output if o)

    # Per node: the type variables that turn float16, as slot -> required dtype for float inputs.
    consumers: dict[str, list[tuple[int, int]]] = {}
    for ni, n in enumerate(g.node):
        for si, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((ni, si))
    graph_outputs = {o.name for o in g.output}
    schemas = [_schema(n, opsets) for n in g.node]
    half = [False] * len(g.node)
    in_req: list[dict[int, int]] = [{} for _ in g.node]
    out_type: list[dict[int, int]] = [{} for _ in g.node]

    def plan(ni: int, as_half: bool) -> None:
        n, schema = g.node[ni], schemas[ni]
        ins = _slot_params(schema.inputs, len(n.input))
        outs = _slot_params(schema.outputs, len(n.output))
        params = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        float_bound = {p for p, name in (*zip(ins, n.input), *zip(outs, n.output)) if p in params and name
                       and types.get(name) == _F32}
        converted = {p for p in float_bound if as_half and "tensor(float16)" in params[p]}
        in_req[ni] = {si: (_F16 if p in converted else _F32) for si, (p, name) in enumerate(zip(ins, n.input))
                      if name and types.get(name) in (_F32, _F16)}
        out_type[ni] = {si: _F16 for si, p in enumerate(outs) if p in converted}
        half[ni] = bool(converted)

    for ni in reversed(range(len(g.node))):
        n = g.node[ni]
        if keep_fp32(n):
            plan(ni, False)
            continue
        if all(o in const for o in n.output if o):
            # A weight-only node turns fp16 only when everything downstream wants fp16.
            wants = all(
                o not in graph_outputs and all(in_req[ci].get(si) == _F16 for ci, si in consumers.get(o, []))
                for o in n.output if o and types.get(o) == _F32)
            plan(ni, wants)
        else:
            plan(ni, True)

    new_types = dict(types)
    for ni, n in enumerate(g.node):
        for si, t in out_type[ni].items():
            new_types[n.output[si]] = t

    # Initializers read only as fp16 are stored as fp16.
    for name, tensor in inits.items():
        uses = consumers.get(name, [])
        if tensor.data_type == _F32 and uses and all(in_req[ci].get(si) == _F16 for ci, si in uses):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), name))
            new_types[name] = _F16

    shapes = {v.name: v.type.tensor_type.shape for v in (*g.input, *g.value_info)}
    for t in g.initializer:
        shapes.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)).tensor_type.shape)
    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    cast_infos: list[onnx.ValueInfoProto] = []
    for ni, n in enumerate(g.node):
        for si, name in enumerate(n.input):
            want = in_req[ni].get(si)
            if want is None or new_types.get(name) == want:
                continue
            key = (name, want)
            if key not in casts:
                casts[key] = f"{name}__{'fp16' if want == _F16 else 'fp32'}"
                nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want, name=f"{casts[key]}_cast"))
                info = helper.make_tensor_value_info(casts[key], want, None)
                if name in shapes:
                    info.type.tensor_type.shape.CopyFrom(shapes[name])
                cast_infos.append(info)
            n.input[si] = casts[key]
        if half[ni]:
            _retype_attributes(n)
        nodes.append(n)
    for out in g.output:
        if new_types.get(out.name) == _F16 and out.type.tensor_type.elem_type == _F32:
            # Outputs keep their declared fp32 type: compute in fp16 under another name, cast back.
            half_name = f"{out.name}__fp16"
            for n in nodes:
                n.output[:] = [half_name if o == out.name else o for o in n.output]
                n.input[:] = [half_name if i == out.name else i for i in n.input]
            nodes.append(helper.make_node("Cast", [half_name], [out.name], to=_F32, name=f"{out.name}_cast"))
            info = onnx.ValueInfoProto()
            info.CopyFrom(out)
            info.name = half_name
            info.type.tensor_type.elem_type = _F16
            cast_infos.append(info)
    del g.node[:]
    g.node.extend(nodes)
    for v in g.value_info:
        if v.name in new_types:
            v.type.tensor_type.elem_type = new_types[v.name]
    g.value_info.extend(cast_infos)
    return m


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Attributes that fix a float32 output type, switched to float16 in a node computing in fp16."""
    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to" and a.i == _F32:
                a.i = _F16
    elif node.op_type in ("ConstantOfShape", "Constant"):
        for a in node.attribute:
            if a.name == "value" and a.t.data_type == _F32:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
    elif any(a.name in ("dtype", "to") for a in node.attribute):
        raise ValueError(f"fp16 conversion: node {node.name!r} ({node.op_type}) fixes its output type by attribute; "
                         f"teach export.onnx_export._retype_attributes about it")
