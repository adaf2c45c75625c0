"""TensorRT ahead-of-time plugins for the plugin-form graph, built from the Triton kernels' AOT records.

A TensorRT AOT plugin ("quickly deployable plugin", ``tensorrt.plugin``) launches exactly one kernel, whose
PTX the engine stores, so the engine runs in plain C++ TensorRT (trtexec, Triton server's TensorRT
backend). The kernels of :mod:`kernels.aot` map onto plugins as follows:

=================  ==========================================================  ===================
plugin (pdd::)     inputs -> outputs                                           kernel (tactics)
=================  ==========================================================  ===================
SS2DScan           x, delta, B, C, A, D, delta_bias -> y (B, D, H, W)           fused SS2D scan
                                                                               (sequential, chunked)
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from export.custom_ops import DOMAIN, HEAD_MAP_STRIDE, HEAD_OP, HEAD_PAIRS, SS2D_OP, register_onnx_schemas
from export.onnx_export import STAGE_KEY

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


# --- shapes: generic over ints and TensorRT shape expressions -------------------------------------------

def ss2d_output_shape(x_shape: Sequence[Any]) -> tuple[Any, ...]:
    """SS2DScan: y has x's shape (B, D, H, W)."""
    if len(x_shape) != 4:
        raise ValueError(f"SS2DScan: x must be (B, D, H, W), got rank {len(x_shape)}")
    return tuple(x_shape)


def head_cosine_output_shapes(teacher_shapes: Sequence[Sequence[Any]]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """HeadCosine: cos (B, Σ_l H_l·W_l) and seed (B,), from each level's teacher shape (B, C_l, H_l, W_l)."""
    if not teacher_shapes or any(len(s) != 4 for s in teacher_shapes):
        raise ValueError(f"HeadCosine: features must be (B, C, H, W) each, got {[len(s) for s in teacher_shapes]} dims")
    batch = teacher_shapes[0][0]
    total = teacher_shapes[0][2] * teacher_shapes[0][3]
    for s in teacher_shapes[1:]:
        total = total + s[2] * s[3]
    return (batch, total), (batch,)


def head_blur_output_shapes(cos_shape: Sequence[Any], height: int, width: int) -> tuple[tuple[Any, ...], ...]:
    """HeadBlurMax: map (B, height, width) and tile_max (B,), from cos (B, Σ H_l·W_l)."""
    if len(cos_shape) != 2:
        raise ValueError(f"HeadBlurMax: cos must be (B, Σ H_l·W_l), got rank {len(cos_shape)}")
    return (cos_shape[0], height, width), (cos_shape[0],)


# --- kernel sizes and launch parameters -----------------------------------------------------------------

def ss2d_sizes(x_shape: Sequence[Any]) -> dict[str, Any]:
    """Names the SS2D kernel's scalars and grid use, from x (B, D, H, W)."""
    batch, dim, height, width = x_shape
    return {"batch": batch, "dim": dim, "height": height, "width": width}


def head_cosine_sizes(teacher_shapes: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Names the cosine kernel uses: per-level channels, heights, widths and the batch."""
    return {"batch": teacher_shapes[0][0], "channels": tuple(s[1] for s in teacher_shapes),
            "heights": tuple(s[2] for s in teacher_shapes), "widths": tuple(s[3] for s in teacher_shapes)}


def head_blur_sizes(batch: Any, level_sizes: Sequence[int], height: int, width: int) -> dict[str, Any]:
    """Names the blur-max kernel uses; level_sizes = (H_1, W_1, H_2, W_2, …)."""
    sizes = [int(v) for v in level_sizes]
    return {"batch": batch, "heights": tuple(sizes[0::2]), "widths": tuple(sizes[1::2]),
            "height": int(height), "width": int(width)}


def _int_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _evaluate(expr: str, scope: Mapping[str, Any]) -> Any:
    # The expressions are the kernels' own launch contracts (kernels.aot), not user input.
    return eval(expr, {"__builtins__": {}}, dict(scope))


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: grid and int32 scalars (ints, or TensorRT expressions), block, shared memory."""

    tactic: str
    kernel_name: str
    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_mem: int
    scalar_names: tuple[str, ...]
    scalars: tuple[Any, ...]


def launch_plan(kernel: Any, sizes: Mapping[str, Any], cdiv: Callable[[Any, Any], Any] = _int_cdiv) -> LaunchPlan:
    """Evaluate an :class:`kernels.aot.AotKernel`'s grid and scalar parameters for ``sizes``.

    ``sizes`` maps the contract's names ('batch', 'dim', 'heights', …) to ints, or to TensorRT shape
    expressions together with ``cdiv=tensorrt.plugin.cdiv``.
    """
    scope = {"cdiv": cdiv, **sizes}
    names = tuple(p.name for p in kernel.params if p.role == "scalar")
    try:
        grid = tuple(_evaluate(e, scope) for e in kernel.grid)
        scalars = tuple(_evaluate(n, scope) for n in names)
    except (NameError, IndexError, TypeError) as exc:
        raise ValueError(f"{kernel.tactic}: cannot evaluate its launch contract (grid {kernel.grid}, scalars "
                         f"{names}) with sizes {sorted(sizes)}: {exc}") from exc
    return LaunchPlan(kernel.tactic, kernel.name, grid, kernel.block, kernel.shared, names, scalars)


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


@functools.cache
def ss2d_kernels(dtype: str, d_state: int) -> tuple[Any, ...]:
    """The SS2DScan tactics (one per scan strategy) for activations in ``dtype`` ('fp32'|'fp16'); tactic i+1."""
    aot = _aot()
    return _checked([aot.compile_tactic(t) for t in aot.ss2d_tactics(dtypes=(dtype,), d_states=(d_state,))])


@functools.cache
def head_cosine_kernel(dtype: str, num_levels: int) -> Any:
    """Head launch 1 for features in ``dtype`` and ``num_levels`` (teacher, student) pairs."""
    aot = _aot()
    tactics = [t for t in aot.anomaly_head_tactics(dtypes=(dtype,), num_levels=num_levels)
               if t.name.startswith("head_cosine")]
    return _checked([aot.compile_tactic(t) for t in tactics])[0]


@functools.cache
def head_blur_kernel(num_levels: int, sigma: float) -> Any:
    """Head launch 2 with σ baked into the PTX."""
    aot = _aot()
    tactics = [t for t in aot.anomaly_head_tactics(dtypes=(), num_levels=num_levels, sigma=sigma)
               if t.name.startswith("head_blur_max")]
    return _checked([aot.compile_tactic(t) for t in tactics])[0]


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
                  batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
        return ss2d_kernels(dtype(node.input[0]), d_state), ss2d_sizes(concrete(node.input[0]))
    if node.op_type == HEAD_COSINE_OP:
        teachers = [concrete(n) for n in node.input[0::2]]
        return (head_cosine_kernel(dtype(node.input[0]), len(teachers)),), head_cosine_sizes(teachers)
    if node.op_type == HEAD_BLUR_OP:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        levels = list(attrs["level_sizes"])
        return ((head_blur_kernel(len(levels) // 2, float(attrs["sigma"])),),
                head_blur_sizes(batch, levels, attrs["height"], attrs["width"]))
    if node.op_type == HEAD_OP:
        raise ValueError(f"{where}: lower the graph first (lower_for_tensorrt)")
    raise ValueError(f"{where}: no TensorRT plugin for this op; known: {PLUGIN_OPS}")


def kernels_for_model(model: onnx.ModelProto) -> dict[str, Any]:
    """Every kernel tactic a lowered plugin-form graph uses, by tactic name (empty for the portable form)."""
    infos = _value_infos(model)
    out = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            for k in _node_kernels(node, infos, batch=1)[0]:
                out[k.tactic] = k
    return out


def plugin_launch_records(model: onnx.ModelProto, batch: int) -> list[dict[str, Any]]:
    """For each plugin node and tactic of a lowered graph: kernel, grid, block, shared memory and scalars
    at ``batch`` (what TensorRT will launch), as JSON-ready dicts."""
    infos = _value_infos(model)
    records = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        kernels, sizes = _node_kernels(node, infos, batch)
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

_registered = False


def register_plugins() -> None:
    """Define the three AOT plugins with ``tensorrt.plugin`` (once per process), before parsing the ONNX.

    Needs TensorRT ≥ 10.9 (AOT quickly deployable plugins) and Triton (PTX generation at build time).
    """
    global _registered
    if _registered:
        return
    from typing import Tuple  # noqa: UP035 - tensorrt.plugin compares annotations with typing.Tuple

    import numpy.typing as npt
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = {trt.float32: "fp32", trt.float16: "fp16"}

    def dtype_of(desc: Any, op: str) -> str:
        if desc.dtype not in dtype_names:
            raise ValueError(f"{DOMAIN}::{op}: inputs must be fp32 or fp16, got {desc.dtype}")
        return dtype_names[desc.dtype]

    def folded(expr: Any) -> Any:
        """A build-time constant as an int (spatial sizes), anything else unchanged (the batch)."""
        try:
            return expr.constant_value() if expr.is_constant else expr
        except RuntimeError:  # a "fake" expression outside a shape context has no value to read
            return expr

    def cdiv(a: Any, b: Any) -> Any:
        return _int_cdiv(a, b) if isinstance(a, int) and isinstance(b, int) else trtp.cdiv(a, b)

    def shape(desc: Any) -> tuple[Any, ...]:
        return tuple(folded(d) for d in desc.shape_expr)

    def aot_result(kernel: Any, sizes: Mapping[str, Any]) -> tuple[str, str, Any, Any]:
        plan = launch_plan(kernel, sizes, cdiv)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = (g if isinstance(g, int) else trtp.SymInt32(g)
                                                       for g in plan.grid)
        params.block_x = plan.block[0]
        params.shared_mem = plan.shared_mem
        extra = trtp.SymIntExprs(len(plan.scalars))
        for i, value in enumerate(plan.scalars):
            extra[i] = trtp.SymInt32(trtp.ShapeExpr(value) if isinstance(value, int) else value)
        return kernel.name, kernel.ptx, params, extra

    ss2d_id = f"{DOMAIN}::{SS2D_OP}"

    @trtp.register(ss2d_id)
    def ss2d_desc(x: trtp.TensorDesc, delta: trtp.TensorDesc, B: trtp.TensorDesc, C: trtp.TensorDesc,
                  A: trtp.TensorDesc, D: trtp.TensorDesc, delta_bias: trtp.TensorDesc) -> trtp.TensorDesc:
        ss2d_output_shape(tuple(x.shape_expr))
        return x.like()

    @trtp.autotune(ss2d_id)
    def ss2d_autotune(x, delta, B, C, A, D, delta_bias, outputs):
        # Tactic i+1 is scan strategy i (sequential: many programs; chunked: fewer dependent steps).
        tactics = list(range(1, len(_aot().selective_scan.STRATEGIES) + 1))
        return [trtp.AutoTuneCombination(", ".join([t] * 4 + ["FP32"] * 3 + [t]), "LINEAR", tactics)
                for t in ("FP32", "FP16")]

    @trtp.aot_impl(ss2d_id)
    def ss2d_aot(x, delta, B, C, A, D, delta_bias, outputs, tactic):
        kernels = ss2d_kernels(dtype_of(x, SS2D_OP), int(folded(A.shape_expr[1])))
        return aot_result(kernels[tactic - 1], ss2d_sizes(shape(x)))

    cosine_id = f"{DOMAIN}::{HEAD_COSINE_OP}"

    @trtp.register(cosine_id)
    def cosine_desc(t1: trtp.TensorDesc, s1: trtp.TensorDesc, t2: trtp.TensorDesc, s2: trtp.TensorDesc,
                    t3: trtp.TensorDesc, s3: trtp.TensorDesc, t4: trtp.TensorDesc, s4: trtp.TensorDesc,
                    t5: trtp.TensorDesc, s5: trtp.TensorDesc, t6: trtp.TensorDesc, s6: trtp.TensorDesc,
                    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
        cos, seed = head_cosine_output_shapes([shape(t) for t in (t1, t2, t3, t4, t5, t6)])
        return trtp.from_shape_expr(cos, dtype=trt.float32), trtp.from_shape_expr(seed, dtype=trt.float32)

    @trtp.autotune(cosine_id)
    def cosine_autotune(t1, s1, t2, s2, t3, s3, t4, s4, t5, s5, t6, s6, outputs):
        return [trtp.AutoTuneCombination(", ".join([t] * 12 + ["FP32"] * 2), "LINEAR") for t in ("FP32", "FP16")]

    @trtp.aot_impl(cosine_id)
    def cosine_aot(t1, s1, t2, s2, t3, s3, t4, s4, t5, s5, t6, s6, outputs):
        teachers = [shape(t) for t in (t1, t2, t3, t4, t5, t6)]
        return aot_result(head_cosine_kernel(dtype_of(t1, HEAD_COSINE_OP), len(teachers)),
                          head_cosine_sizes(teachers))

    blur_id = f"{DOMAIN}::{HEAD_BLUR_OP}"

    @trtp.register(blur_id)
    def blur_desc(cos: trtp.TensorDesc, sigma: float, level_sizes: npt.NDArray[np.int32], height: int,
                  width: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
        amap, tile_max = head_blur_output_shapes(shape(cos), height, width)
        return trtp.from_shape_expr(amap, dtype=trt.float32), trtp.from_shape_expr(tile_max, dtype=trt.float32)

    @trtp.aot_impl(blur_id)
    def blur_aot(cos, sigma, level_sizes, height, width, outputs):
        levels = [int(v) for v in level_sizes]
        return aot_result(head_blur_kernel(len(levels) // 2, float(sigma)),
                          head_blur_sizes(folded(cos.shape_expr[0]), levels, height, width))

    _registered = True
