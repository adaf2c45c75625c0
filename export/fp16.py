"""fp16 conversion of an exported ONNX graph for strongly typed TensorRT (:func:`to_fp16`).

Activations and weights become fp16 except the nodes a predicate keeps fp32 (by default those
:data:`pdd.precision.POLICY` ["fp16"] keeps: the anomaly head and the portable form's scan arithmetic, tagged
by the exporter with :data:`STAGE_KEY`) and inputs whose schema
fixes them to fp32 (the scan's A, D, δ bias). Follows each node's ONNX schema: a type variable bound to float
becomes float16; Cast nodes go where fp16 and fp32 meet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from export.custom_ops import DOMAIN, SS2D_OP
from pdd.precision import POLICY, STAGES

__all__ = ["STAGE_KEY", "keep_fp32_by_policy", "to_fp16"]

# Node metadata key naming the model stage a node computes ("scan", "head"); written by the exporter.
STAGE_KEY = "pdd.stage"
# Opset assumed for the default domain when a model names none.
_DEFAULT_OPSET = 18
_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _policy_keeps_fp32(tag: str) -> bool:
    """Whether pdd.precision's fp16 policy keeps the nodes the exporter tagged ``tag`` in fp32: the head when
    its dtype is fp32, the portable form's scan arithmetic when the scan accumulates in fp32."""
    rules = POLICY["fp16"]
    if tag == "head":
        return all(rules[s].dtype == "fp32" for s in STAGES if s.startswith("head."))
    if tag == "scan":
        return rules["vmamba.scan"].accumulate == "fp32"
    raise ValueError(f"unknown stage tag {tag!r} on an exported node")


def keep_fp32_by_policy(node: onnx.NodeProto) -> bool:
    """Nodes that stay fp32 in an fp16 graph, as :data:`pdd.precision.POLICY` ["fp16"] says: the anomaly head
    (its custom nodes in the plugin form, its tagged nodes in the portable form) and the portable form's scan
    arithmetic (cumulative sums of δ and exp(A·Δ) need fp32's range); the SS2DScan plugin reads the scan's
    dtype (fp16) and computes in fp32 inside its kernel."""
    if node.domain == DOMAIN:
        if node.op_type == SS2D_OP:
            return POLICY["fp16"]["vmamba.scan"].dtype == "fp32"
        return _policy_keeps_fp32("head")
    return any(p.key == STAGE_KEY and _policy_keeps_fp32(p.value) for p in node.metadata_props)


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


@dataclass
class _Plan:
    """Per node: whether it computes in fp16, the dtype each float input slot needs, its fp16 outputs."""

    graph: onnx.GraphProto
    opsets: dict[str, int]
    types: dict[str, int]
    half: list[bool] = field(default_factory=list)
    in_req: list[dict[int, int]] = field(default_factory=list)
    out_type: list[dict[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = len(self.graph.node)
        self.half, self.in_req, self.out_type = [False] * count, [{} for _ in range(count)], [{} for _ in range(count)]
        self.schemas = [_schema(n, self.opsets) for n in self.graph.node]

    def node(self, ni: int, as_half: bool) -> None:
        n, schema, types = self.graph.node[ni], self.schemas[ni], self.types
        ins = _slot_params(schema.inputs, len(n.input))
        outs = _slot_params(schema.outputs, len(n.output))
        params = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        float_bound = {p for p, name in (*zip(ins, n.input), *zip(outs, n.output)) if p in params and name
                       and types.get(name) == _F32}
        converted = {p for p in float_bound if as_half and "tensor(float16)" in params[p]}
        self.in_req[ni] = {si: (_F16 if p in converted else _F32) for si, (p, name) in enumerate(zip(ins, n.input))
                           if name and types.get(name) in (_F32, _F16)}
        self.out_type[ni] = {si: _F16 for si, p in enumerate(outs) if p in converted}
        self.half[ni] = bool(converted)

    def wants_half(self, name: str, consumers: dict[str, list[tuple[int, int]]]) -> bool:
        return all(self.in_req[ci].get(si) == _F16 for ci, si in consumers.get(name, []))


def _typed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Shape-inferred copy of ``model`` and the element type of every tensor (refusing untyped ones)."""
    m = shape_inference.infer_shapes(model, data_prop=False)
    g = m.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    missing = [o for n in g.node for o in n.output if o and o not in types]
    if missing:
        raise ValueError(f"fp16 conversion: no type known for {len(missing)} tensors (e.g. {missing[:3]}); "
                         f"run shape inference on the model first")
    return m, types


def _plan(g: onnx.GraphProto, opsets: dict[str, int], types: dict[str, int],
          keep_fp32: Callable[[onnx.NodeProto], bool], consumers: dict[str, list[tuple[int, int]]]) -> _Plan:
    """Decide each node's precision, last node first (a weight-only node follows its consumers)."""
    const = {t.name for t in g.initializer}  # tensors computed from weights only (no graph input upstream)
    for n in g.node:
        if all(i == "" or i in const for i in n.input):
            const.update(o for o in n.output if o)
    graph_outputs = {o.name for o in g.output}
    plan = _Plan(g, opsets, types)
    for ni in reversed(range(len(g.node))):
        n = g.node[ni]
        if keep_fp32(n):
            plan.node(ni, False)
        elif all(o in const for o in n.output if o):
            # A weight-only node turns fp16 only when everything downstream wants fp16.
            plan.node(ni, all(o not in graph_outputs and plan.wants_half(o, consumers)
                              for o in n.output if o and types.get(o) == _F32))
        else:
            plan.node(ni, True)
    return plan


def _rewrite(g: onnx.GraphProto, plan: _Plan, new_types: dict[str, int]) -> list[onnx.ValueInfoProto]:
    """Insert the Casts the plan needs and retype fp16 nodes' attributes; returns the Casts' value infos."""
    shapes = {v.name: v.type.tensor_type.shape for v in (*g.input, *g.value_info)}
    for t in g.initializer:
        shapes.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)).tensor_type.shape)
    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    infos: list[onnx.ValueInfoProto] = []
    for ni, n in enumerate(g.node):
        for si, name in enumerate(n.input):
            want = plan.in_req[ni].get(si)
            if want is None or new_types.get(name) == want:
                continue
            key = (name, want)
            if key not in casts:
                casts[key] = f"{name}__{'fp16' if want == _F16 else 'fp32'}"
                nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want, name=f"{casts[key]}_cast"))
                info = helper.make_tensor_value_info(casts[key], want, None)
                if name in shapes:
                    info.type.tensor_type.shape.CopyFrom(shapes[name])
                infos.append(info)
            n.input[si] = casts[key]
        if plan.half[ni]:
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
            infos.append(info)
    del g.node[:]
    g.node.extend(nodes)
    return infos


def to_fp16(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] = keep_fp32_by_policy
            ) -> onnx.ModelProto:
    """A typed fp16 copy of ``model`` for strongly typed TensorRT: activations and weights in fp16, except
    the nodes ``keep_fp32`` selects and inputs whose schema fixes them to fp32 (the scan's A, D, δ bias).

    Graph inputs and outputs keep their types; Cast nodes are inserted where fp16 and fp32 meet; constant
    subgraphs (weights reshaped or transposed in the graph) become fp16 when every consumer wants fp16.
    """
    m, types = _typed(model)
    g = m.graph
    opsets = {o.domain: o.version for o in m.opset_import}
    opsets.setdefault("", opsets.get("ai.onnx", _DEFAULT_OPSET))
    consumers: dict[str, list[tuple[int, int]]] = {}
    for ni, n in enumerate(g.node):
        for si, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((ni, si))
    plan = _plan(g, opsets, types, keep_fp32, consumers)
    new_types = dict(types)
    for ni, n in enumerate(g.node):
        for si, t in plan.out_type[ni].items():
            new_types[n.output[si]] = t
    for tensor in g.initializer:  # initializers read only as fp16 are stored as fp16
        if tensor.data_type == _F32 and consumers.get(tensor.name) and plan.wants_half(tensor.name, consumers):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
            new_types[tensor.name] = _F16
    infos = _rewrite(g, plan, new_types)
    for v in g.value_info:
        if v.name in new_types:
            v.type.tensor_type.elem_type = new_types[v.name]
    g.value_info.extend(infos)
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
                         f"teach export.fp16._retype_attributes about it")
