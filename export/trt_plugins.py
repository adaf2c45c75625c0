"""TensorRT ahead-of-time plugins for the plugin-form graph, built from the Triton kernels' AOT records.

A TensorRT AOT plugin ("quickly deployable plugin", ``tensorrt.plugin``) launches exactly one kernel, whose
PTX the engine stores, so the engine runs in plain C++ TensorRT (trtexec, Triton Inference Server's TensorRT
backend). The kernels of :mod:`kernels.aot` map onto plugins as follows:

=================  ==========================================================  ===================
plugin (pdd::)     inputs -> outputs                                           kernel (tactics)
=================  ==========================================================  ===================
SS2DScan           x, delta, B, C, A, D, delta_bias -> y (B, D, H, W)           fused SS2D scan
                                                                               (stepwise, blockwise)
HeadCosine         t_1, s_1, …, t_6, s_6 -> cos (B, Σ H_l·W_l) fp32,            head launch 1
                   seed (B,) fp32
HeadBlurMax        cos -> map (B, H, W) fp32, tile_max (B,) fp32                 head launch 2 (σ baked in)
=================  ==========================================================  ===================

The exported graph has one ``AnomalyHead`` node; :func:`lower_for_tensorrt` replaces it with HeadCosine
→ HeadBlurMax and takes the score as ``ReduceMax`` of the map. The head needs two launches (see
:mod:`kernels.anomaly_head`) and an AOT plugin holds one; launch 2 folds tile maxima into a score buffer
that launch 1 initialises, and across two plugins that buffer cannot be shared, so ``tile_max`` is left
unused and the exact max is taken in the graph.

Kernel parameters are ordered inputs…, int32 scalars…, outputs… (the AOT contract); every scalar and
grid size is an expression over the plugin's input shapes. With the spatial size fixed per export they
fold to constants at build time; only the batch stays symbolic.

Everything above the ``register_plugins`` function is plain Python (shape functions, launch parameters,
graph lowering), tested on CPU; ``register_plugins`` imports TensorRT and must run before parsing.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from export.custom_ops import DOMAIN, HEAD_MAP_STRIDE, HEAD_OP, HEAD_PAIRS, SS2D_OP, register_onnx_schemas
from export.fp16 import STAGE_KEY
from export.trt_launch import (
    LaunchPlan,
    head_blur_output_shapes,
    head_blur_sizes,
    head_cosine_output_shapes,
    head_cosine_sizes,
    int_cdiv,
    launch_plan,
    ss2d_output_shape,
    ss2d_sizes,
)

__all__ = [
    "HEAD_BLUR_OP",
    "HEAD_COSINE_OP",
    "PLUGIN_OPS",
    "LaunchPlan",
    "head_blur_kernel",
    "head_blur_output_shapes",
    "head_blur_sizes",
    "head_cosine_kernel",
    "head_cosine_output_shapes",
    "head_cosine_sizes",
    "kernels_for_model",
    "launch_plan",
    "lower_for_tensorrt",
    "plugin_launch_records",
    "register_plugins",
    "ss2d_kernels",
    "ss2d_output_shape",
    "ss2d_sizes",
]

HEAD_COSINE_OP = "HeadCosine"
HEAD_BLUR_OP = "HeadBlurMax"
PLUGIN_OPS = (SS2D_OP, HEAD_COSINE_OP, HEAD_BLUR_OP)
_DTYPES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}


# --- kernels (compiled to PTX by kernels.aot, no GPU needed) --------------------------------------------

def _aot() -> Any:
    try:
        from kernels import aot
    except ImportError as exc:
        raise ImportError(f"the TensorRT plugins need the Triton kernels' AOT compiler (kernels.aot): {exc}") from exc
    return aot


def _checked(kernels: Sequence[Any]) -> tuple[Any, ...]:
    aot = _aot()
    for k in kernels:
        problems = aot.check_contract(k)
        if problems:
            raise RuntimeError(f"kernel {k.tactic} breaks the TensorRT AOT launch contract: {'; '.join(problems)}")
    return tuple(kernels)


def _target(target: Any) -> Any:
    return _aot().DEFAULT_TARGET if target is None else target


@functools.cache
def ss2d_kernels(dtype: str, d_state: int, target: Any = None) -> tuple[Any, ...]:
    """The SS2DScan tactics (one per scan strategy) for activations in ``dtype`` ('fp32'|'fp16'); tactic i+1.

    ``target``: a :class:`kernels.aot.KernelTarget` (default: sm_90, PTX ISA 9.0).
    """
    aot = _aot()
    return _checked([aot.compile_tactic(t, _target(target))
                     for t in aot.ss2d_tactics(dtypes=(dtype,), d_states=(d_state,))])


@functools.cache
def head_cosine_kernel(dtype: str, num_levels: int, target: Any = None) -> Any:
    """Head launch 1 for features in ``dtype`` and ``num_levels`` (teacher, student) pairs."""
    aot = _aot()
    tactics = [t for t in aot.anomaly_head_tactics(dtypes=(dtype,), num_levels=num_levels)
               if t.name.startswith("head_cosine")]
    return _checked([aot.compile_tactic(t, _target(target)) for t in tactics])[0]


@functools.cache
def head_blur_kernel(num_levels: int, sigma: float, target: Any = None) -> Any:
    """Head launch 2 with σ baked into the PTX."""
    aot = _aot()
    tactics = [t for t in aot.anomaly_head_tactics(dtypes=(), num_levels=num_levels, sigma=sigma)
               if t.name.startswith("head_blur_max")]
    return _checked([aot.compile_tactic(t, _target(target)) for t in tactics])[0]


# --- graph lowering and launch records (ONNX, no TensorRT) ----------------------------------------------

def _register_lowered_schemas() -> None:
    register_onnx_schemas()
    param = OpSchema.FormalParameter
    trt_attrs = [OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "", required=False),
                 OpSchema.Attribute("aot", OpSchema.AttrType.INT, "", required=False)]
    schemas = [
        OpSchema(HEAD_COSINE_OP, DOMAIN, 1, "Anomaly head launch 1: packed 1 − cos maps of every level.",
                 inputs=[param("features", "T", param_option=OpSchema.FormalParameterOption.Variadic, min_arity=2)],
                 outputs=[param("cos", "tensor(float)"), param("seed", "tensor(float)")],
                 type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")], attributes=trt_attrs),
        OpSchema(HEAD_BLUR_OP, DOMAIN, 1, "Anomaly head launch 2: upsample, sum, Gaussian blur, tile maxima.",
                 inputs=[param("cos", "tensor(float)")],
                 outputs=[param("anomaly_map", "tensor(float)"), param("tile_max", "tensor(float)")],
                 attributes=[OpSchema.Attribute("sigma", OpSchema.AttrType.FLOAT, ""),
                             OpSchema.Attribute("level_sizes", OpSchema.AttrType.INTS, "H_1, W_1, H_2, W_2, …"),
                             OpSchema.Attribute("height", OpSchema.AttrType.INT, ""),
                             OpSchema.Attribute("width", OpSchema.AttrType.INT, ""), *trt_attrs]),
    ]
    for s in schemas:
        if not onnx.defs.has(s.name, s.domain):
            onnx.defs.register_schema(s)


def _value_infos(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | str, ...]]]:
    out = {}
    for v in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, tuple(d.dim_param or d.dim_value for d in t.shape.dim))
    for t in model.graph.initializer:
        out[t.name] = (t.data_type, tuple(t.dims))
    return out


def _shape(infos: Mapping[str, tuple[int, tuple[int | str, ...]]], name: str, where: str) -> tuple[int | str, ...]:
    if name not in infos or not infos[name][1]:
        raise ValueError(f"{where}: no shape recorded for tensor {name!r}; export the model with export_onnx, "
                         f"which keeps intermediate shapes")
    return infos[name][1]


def lower_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin-form graph where each ``AnomalyHead`` is HeadCosine → HeadBlurMax (+ ReduceMax)."""
    _register_lowered_schemas()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    infos = _value_infos(m)
    nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        if node.domain != DOMAIN or node.op_type != HEAD_OP:
            nodes.append(node)
            continue
        where = f"ONNX node {node.name!r} ({HEAD_OP})"
        if len(node.input) != 2 * HEAD_PAIRS:
            raise ValueError(f"{where}: {len(node.input)} inputs, the plugins take {2 * HEAD_PAIRS}")
        teachers = [_shape(infos, name, where) for name in node.input[0::2]]
        if any(not all(isinstance(d, int) for d in s[1:]) for s in teachers):
            raise ValueError(f"{where}: feature sizes must be static (only the batch may be dynamic), got {teachers}")
        sigma = next((a.f for a in node.attribute if a.name == "sigma"), None)
        if sigma is None:
            raise ValueError(f"{where}: missing attribute 'sigma'")
        height, width = HEAD_MAP_STRIDE * teachers[0][2], HEAD_MAP_STRIDE * teachers[0][3]
        prefix = node.name or "anomaly_head"
        trt = {"plugin_namespace": DOMAIN, "aot": 1}
        cos, seed, tile_max = f"{prefix}/cos", f"{prefix}/seed", f"{prefix}/tile_max"
        batch = teachers[0][0]
        _, total = head_cosine_output_shapes(teachers)[0]
        m.graph.value_info.extend([
            helper.make_tensor_value_info(cos, TensorProto.FLOAT, [batch, total]),
            helper.make_tensor_value_info(seed, TensorProto.FLOAT, [batch]),
            helper.make_tensor_value_info(tile_max, TensorProto.FLOAT, [batch]),
        ])
        axes = f"{prefix}/score_axes"
        m.graph.initializer.append(numpy_helper.from_array(np.array([1, 2], np.int64), axes))
        lowered = [
            helper.make_node(HEAD_COSINE_OP, list(node.input), [cos, seed], name=f"{prefix}/cosine", domain=DOMAIN,
                             **trt),
            helper.make_node(HEAD_BLUR_OP, [cos], [node.output[0], tile_max], name=f"{prefix}/blur_max",
                             domain=DOMAIN, sigma=sigma, level_sizes=[d for s in teachers for d in s[2:]],
                             height=height, width=width, **trt),
            helper.make_node("ReduceMax", [node.output[0], axes], [node.output[1]], name=f"{prefix}/score",
                             keepdims=0),
        ]
        for n in lowered:  # the head stays fp32 when the graph is converted to fp16
            n.metadata_props.add(key=STAGE_KEY, value="head")
        nodes.extend(lowered)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _node_kernels(node: onnx.NodeProto, infos: Mapping[str, tuple[int, tuple[int | str, ...]]],
                  batch: int, target: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(tactics, kernel sizes at ``batch``) of one plugin node."""
    where = f"ONNX node {node.name!r} ({DOMAIN}::{node.op_type})"

    def concrete(name: str) -> tuple[int, ...]:
        return tuple(batch if isinstance(d, str) else d for d in _shape(infos, name, where))

    def dtype(name: str) -> str:
        elem = infos[name][0]
        if elem not in _DTYPES:
            raise ValueError(f"{where}: input {name!r} is {TensorProto.DataType.Name(elem)}; plugins take fp32|fp16")
        return _DTYPES[elem]

    if node.op_type == SS2D_OP:
        d_state = concrete(node.input[4])[1]
        return ss2d_kernels(dtype(node.input[0]), d_state, target), ss2d_sizes(concrete(node.input[0]))
    if node.op_type == HEAD_COSINE_OP:
        teachers = [concrete(n) for n in node.input[0::2]]
        return (head_cosine_kernel(dtype(node.input[0]), len(teachers), target),), head_cosine_sizes(teachers)
    if node.op_type == HEAD_BLUR_OP:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        levels = list(attrs["level_sizes"])
        return ((head_blur_kernel(len(levels) // 2, float(attrs["sigma"]), target),),
                head_blur_sizes(batch, levels, attrs["height"], attrs["width"]))
    if node.op_type == HEAD_OP:
        raise ValueError(f"{where}: lower the graph first (lower_for_tensorrt)")
    raise ValueError(f"{where}: no TensorRT plugin for this op; known: {PLUGIN_OPS}")


def kernels_for_model(model: onnx.ModelProto, target: Any = None) -> dict[str, Any]:
    """Every kernel tactic a lowered plugin-form graph uses, by tactic name (empty for the portable form)."""
    infos = _value_infos(model)
    out = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            for k in _node_kernels(node, infos, 1, target)[0]:
                out[k.tactic] = k
    return out


def plugin_launch_records(model: onnx.ModelProto, batch: int, target: Any = None) -> list[dict[str, Any]]:
    """For each plugin node and tactic of a lowered graph: kernel, grid, block, shared memory and scalars
    at ``batch`` (what TensorRT will launch), as JSON-ready dicts."""
    infos = _value_infos(model)
    records = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        kernels, sizes = _node_kernels(node, infos, batch, target)
        for tactic_id, k in enumerate(kernels, start=1):
            plan = launch_plan(k, sizes)
            records.append({
                "node": node.name, "plugin": f"{DOMAIN}::{node.op_type}", "tactic_id": tactic_id,
                "tactic": k.tactic, "kernel": k.name, "grid": list(plan.grid), "grid_expr": list(k.grid),
                "block": list(plan.block), "shared_mem": plan.shared_mem,
                "scalars": dict(zip(plan.scalar_names, plan.scalars)), "params": [p.name for p in k.params],
            })
    return records


# --- TensorRT registration --------------------------------------------------------------------------------
#
# NVIDIA's validators (tensorrt/plugin/_validate.py) read these functions' signatures, so their form is
# part of the contract: annotations are evaluated objects (no ``from __future__ import annotations`` in this
# module), an aot_impl takes (inputs…, every attribute in registration order, outputs, tactic) and is
# annotated ``-> tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]``; attributes arrive from
# the ONNX parser as 1-element arrays (INT as int32, FLOAT as float32), so scalar attributes are annotated
# ``npt.NDArray[...]``: a ``float``/``int`` annotation converts the array with ``float(array)``, which
# numpy >= 2.4 refuses (TensorRT 10.x).

_HEAD_TACTIC = 1  # the head has one kernel per launch; an explicit tactic makes TensorRT call set_tactic


def _folded(expr: Any) -> Any:
    """A build-time constant as an int (spatial sizes), anything else unchanged (the batch)."""
    try:
        return expr.constant_value() if expr.is_constant else expr
    except RuntimeError:  # a "fake" expression outside a shape context has no value to read
        return expr


def _desc_shape(desc: Any) -> tuple[Any, ...]:
    return tuple(_folded(d) for d in desc.shape_expr)


def _dtype_name(trt: Any, desc: Any, op: str) -> str:
    names = {trt.float32: "fp32", trt.float16: "fp16"}
    if desc.dtype not in names:
        raise ValueError(f"{DOMAIN}::{op}: inputs must be fp32 or fp16, got {desc.dtype}")
    return names[desc.dtype]


def _aot_result(trtp: Any, kernel: Any, sizes: Mapping[str, Any]) -> tuple[str, str, Any, Any]:
    """(kernel name, PTX, launch parameters, int32 scalars) for TensorRT, from the kernel's launch contract."""
    def cdiv(a: Any, b: Any) -> Any:
        return int_cdiv(a, b) if isinstance(a, int) and isinstance(b, int) else trtp.cdiv(a, b)

    plan = launch_plan(kernel, sizes, cdiv)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = plan.grid
    params.block_x = plan.block[0]
    params.shared_mem = plan.shared_mem
    extra = trtp.SymIntExprs(len(plan.scalars))
    for i, value in enumerate(plan.scalars):
        extra[i] = trtp.SymInt32(value)
    return kernel.name, kernel.ptx, params, extra


def _check_tactic(op: str, tactic: int, count: int) -> int:
    if not 1 <= tactic <= count:
        raise ValueError(f"{DOMAIN}::{op}: tactic {tactic} asked for, the plugin offers 1..{count}")
    return tactic - 1


def _ss2d_functions(trt: Any, trtp: Any, target: Any) -> tuple[Callable, Callable, Callable]:
    """SS2DScan: shape function, type/format/tactic list, AOT implementation (tactic i+1 = scan strategy i)."""
    Aot = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    def desc(x: trtp.TensorDesc, delta: trtp.TensorDesc, B: trtp.TensorDesc, C: trtp.TensorDesc,
             A: trtp.TensorDesc, D: trtp.TensorDesc, delta_bias: trtp.TensorDesc) -> trtp.TensorDesc:
        ss2d_output_shape(tuple(x.shape_expr))
        return x.like()

    def autotune(x, delta, B, C, A, D, delta_bias, outputs) -> list[trtp.AutoTuneCombination]:
        # x, delta, B, C and y in the network's activation type; A, D, delta_bias stay fp32.
        tactics = list(range(1, len(_aot().selective_scan.STRATEGIES) + 1))
        return [trtp.AutoTuneCombination(", ".join([t] * 4 + ["FP32"] * 3 + [t]), "LINEAR", tactics)
                for t in ("FP32", "FP16")]

    def aot_impl(x, delta, B, C, A, D, delta_bias, outputs, tactic: int) -> Aot:
        kernels = ss2d_kernels(_dtype_name(trt, x, SS2D_OP), int(_folded(A.shape_expr[1])), target)
        return _aot_result(trtp, kernels[_check_tactic(SS2D_OP, tactic, len(kernels))], ss2d_sizes(_desc_shape(x)))

    return desc, autotune, aot_impl


def _cosine_functions(trt: Any, trtp: Any, target: Any) -> tuple[Callable, Callable, Callable]:
    """HeadCosine (head launch 1) over the six (teacher, student) pairs."""
    Aot = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]
    Desc = trtp.TensorDesc

    def desc(t1: Desc, s1: Desc, t2: Desc, s2: Desc, t3: Desc, s3: Desc, t4: Desc, s4: Desc, t5: Desc, s5: Desc,
             t6: Desc, s6: Desc) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        cos, seed = head_cosine_output_shapes([_desc_shape(t) for t in (t1, t2, t3, t4, t5, t6)])
        return trtp.from_shape_expr(cos, dtype=trt.float32), trtp.from_shape_expr(seed, dtype=trt.float32)

    def autotune(t1, s1, t2, s2, t3, s3, t4, s4, t5, s5, t6, s6, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join([t] * 12 + ["FP32"] * 2), "LINEAR", [_HEAD_TACTIC])
                for t in ("FP32", "FP16")]

    def aot_impl(t1, s1, t2, s2, t3, s3, t4, s4, t5, s5, t6, s6, outputs, tactic: int) -> Aot:
        _check_tactic(HEAD_COSINE_OP, tactic, 1)
        teachers = [_desc_shape(t) for t in (t1, t2, t3, t4, t5, t6)]
        kernel = head_cosine_kernel(_dtype_name(trt, t1, HEAD_COSINE_OP), len(teachers), target)
        return _aot_result(trtp, kernel, head_cosine_sizes(teachers))

    return desc, autotune, aot_impl


def _blur_functions(trt: Any, trtp: Any, target: Any) -> tuple[Callable, Callable, Callable]:
    """HeadBlurMax (head launch 2); σ is baked into the PTX, the level sizes and map size are int32 scalars."""
    import numpy.typing as npt

    Aot = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]
    F32, I32 = npt.NDArray[np.float32], npt.NDArray[np.int32]

    def desc(cos: trtp.TensorDesc, sigma: F32, level_sizes: I32, height: I32, width: I32,
             ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        amap, tile_max = head_blur_output_shapes(_desc_shape(cos), int(height[0]), int(width[0]))
        return trtp.from_shape_expr(amap, dtype=trt.float32), trtp.from_shape_expr(tile_max, dtype=trt.float32)

    def autotune(cos, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, FP32", "LINEAR", [_HEAD_TACTIC])]

    def aot_impl(cos, sigma: F32, level_sizes: I32, height: I32, width: I32, outputs, tactic: int) -> Aot:
        _check_tactic(HEAD_BLUR_OP, tactic, 1)
        levels = [int(v) for v in level_sizes]
        kernel = head_blur_kernel(len(levels) // 2, float(sigma[0]), target)
        return _aot_result(trtp, kernel, head_blur_sizes(_folded(cos.shape_expr[0]), levels, int(height[0]),
                                                         int(width[0])))

    return desc, autotune, aot_impl


def register_plugins(target: Any = None) -> list[str]:
    """Define the three AOT plugins with ``tensorrt.plugin`` before the ONNX is parsed; returns their ids.

    ``target``: the :class:`kernels.aot.KernelTarget` whose PTX the plugins hand to TensorRT (default:
    sm_90, PTX ISA 9.0). Needs TensorRT ≥ 10.9 (AOT quickly deployable plugins) and Triton.

    Safe to call again, also after a failed call: a plugin already registered with ``tensorrt.plugin``
    keeps its registration (TensorRT has no way to remove one), and its autotune and AOT functions are
    defined again, so the retry reports the original problem instead of "already has a definition", and
    a later call with another ``target`` switches the PTX the plugins hand out.
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if not hasattr(trtp, "aot_impl"):
        raise ImportError(f"TensorRT {trt.__version__} has no AOT plugins (tensorrt.plugin.aot_impl); "
                          f"install TensorRT >= 10.9 or build the portable form (--onnx-form portable)")
    ids = []
    for op, functions in ((SS2D_OP, _ss2d_functions), (HEAD_COSINE_OP, _cosine_functions),
                          (HEAD_BLUR_OP, _blur_functions)):
        plugin_id = f"{DOMAIN}::{op}"
        desc, autotune, aot_impl = functions(trt, trtp, target)
        if getattr(getattr(trtp.op, DOMAIN, None), op, None) is None:
            trtp.register(plugin_id)(desc)
        trtp.autotune(plugin_id)(autotune)
        trtp.aot_impl(plugin_id)(aot_impl)
        ids.append(plugin_id)
    return ids
