"""Reduced precision: one policy for every stage of PDD, the CPU features that make it pay, and its emulation.

:data:`POLICY` says, for each precision and each stage, the dtype the stage's tensors and arithmetic are in and
the dtype its sums accumulate in, with the reason in one line. Everything that runs PDD in reduced precision
reads it: the PyTorch model (:meth:`pdd.model.PDDModel.to_precision`, bf16 on the CPU), the fp16 ONNX graph
for TensorRT (:func:`export.fp16.keep_fp32_by_policy`) and the int8 quantizer (which stages are quantized).
The scan's state and its cumulative sums stay fp32 wherever they run; the anomaly head is fp32 everywhere.

Precisions: ``fp32`` (the reference), ``bf16`` (CPUs with AMX or AVX512-BF16: oneDNN's bf16 convolutions and
GEMMs, fp32 accumulation), ``fp16`` (TensorRT's typed fp16 graph) and ``int8`` (the WRN teacher's convolutions
statically quantized, :mod:`pdd.int8`; any x86 CPU, fastest with VNNI or AMX). A PyTorch model runs in
:data:`MODEL_PRECISIONS`. int8 stages take and give fp32 tensors: their quantize/dequantize pairs are inside the
quantized graph, so :meth:`ModelPrecision.dtype` is fp32 for them.

**Emulation** (``--emulate``): bf16 convolutions and GEMMs read bf16 inputs and accumulate in fp32, and every
bf16 op rounds its fp32 result once; so fp32 arithmetic on bf16-rounded inputs, rounded again at each op's
output, gives native bf16's numbers up to summation order, on any CPU. :class:`EmulatedTensor` is a float32
tensor that reports (and behaves as) the dtype it stands for: each op runs in fp32 on the stored values and
its result is rounded where native bf16 would give a bf16 result (the result dtypes come from running the op
on meta tensors of the emulated dtypes). It is slow (eager, one meta and one real call per op): numerics only.
Emulated int8 is the quantized graph run eagerly, its quantized values computed in fp32 (:mod:`pdd.int8`).

Example::

    >>> from pdd.precision import POLICY, ModelPrecision
    >>> POLICY["bf16"]["vmamba.scan"].accumulate, POLICY["bf16"]["head.cosine"].dtype
    ('fp32', 'fp32')
    >>> ModelPrecision("bf16", emulate=True).describe()
    'bf16 (emulated in fp32)'
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = [
    "CPU_FEATURES",
    "DTYPES",
    "FP32",
    "MODEL_PRECISIONS",
    "NATIVE_FEATURES",
    "POLICY",
    "PRECISIONS",
    "SCAN_FP32_PARAMETERS",
    "STAGES",
    "EmulatedTensor",
    "ModelPrecision",
    "PrecisionUnavailable",
    "Rule",
    "cpu_features",
    "cpu_model",
    "instruction_set",
    "missing_features",
]

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# What a PyTorch PDD model computes in (fp16 is TensorRT's typed graph).
MODEL_PRECISIONS = ("fp32", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The stages of PDD, in data-flow order (pdd/model.py's docstring draws them).
STAGES = ("wrn", "vmamba.proj", "vmamba.dwconv", "vmamba.norm", "vmamba.scan", "fusion", "students",
          "head.cosine", "head.upsample", "head.blur", "head.max")
# The SS2D parameters the scan reads in fp32 in every precision (A = −exp(A_logs), the D skips, the δ bias).
SCAN_FP32_PARAMETERS = ("A_logs", "Ds", "dt_projs_bias")


@dataclass(frozen=True)
class Rule:
    """One stage in one precision: ``dtype`` of its tensors and arithmetic, ``accumulate`` of its sums."""

    dtype: str
    accumulate: str
    why: str


def _rules(**rules: tuple[str, str, str]) -> dict[str, Rule]:
    missing = set(STAGES) ^ set(rules)
    if missing:
        raise AssertionError(f"precision policy: stages {sorted(missing)} missing or unknown")
    return {stage: Rule(*rules[stage]) for stage in STAGES}


_FP32 = "fp32"
_HEAD = {
    "head_cosine": ("fp32", "fp32", "1 − cos of nearly equal features cancels: bf16/fp16 (8/11-bit mantissas) "
                                    "leave a resolution as large as the normal maps' values, and Σc² over 2048 "
                                    "channels overflows fp16"),
    "head_upsample": ("fp32", "fp32", "bilinear weights applied to the fp32 distances; cheap"),
    "head_blur": ("fp32", "fp32", "33-tap Gaussian sums of the map; cheap, and the map's values are the output"),
    "head_max": ("fp32", "fp32", "the image score; exact in any dtype, kept in the map's"),
}


def _head(**rest: tuple[str, str, str]) -> dict[str, Rule]:
    return _rules(**rest, **{k.replace("_", ".", 1): v for k, v in _HEAD.items()})


POLICY: dict[str, dict[str, Rule]] = {
    "fp32": _rules(**{stage: (_FP32, _FP32, "the reference precision") for stage in STAGES}),
    "bf16": _head(**{
        "wrn": ("bf16", "fp32", "oneDNN's AMX/AVX512-BF16 convolutions read bf16 and accumulate in fp32; the "
                                "frozen weights are cast once"),
        "vmamba.proj": ("bf16", "fp32", "patch embedding, merging and the in/out/x/δ projections are GEMMs: "
                                        "bf16 inputs, fp32 accumulation"),
        "vmamba.dwconv": ("bf16", "fp32", "a depthwise 3x3 convolution: 9 products per output, fp32 sums"),
        "vmamba.norm": ("bf16", "fp32", "LayerNorm reads and writes bf16; its mean and variance are fp32"),
        "vmamba.scan": ("bf16", "fp32", "x, δ, B, C are read as bf16; the states, exp(δA) and sums are fp32 "
                                        "(A, D, δ bias stay fp32)"),
        "fusion": ("bf16", "fp32", "InA/MMU/MPA adapters are convolutions: bf16 inputs, fp32 accumulation"),
        "students": ("bf16", "fp32", "the decoders are convolutions and 2x2 up-convolutions: as the teachers"),
    }),
    "fp16": _head(**{
        "wrn": ("fp16", "fp32", "TensorRT's fp16 tensor-core convolutions; BatchNorm folded into them"),
        "vmamba.proj": ("fp16", "fp32", "GEMMs on fp16 tensor cores, fp32 accumulation"),
        "vmamba.dwconv": ("fp16", "fp32", "depthwise convolution in fp16"),
        "vmamba.norm": ("fp16", "fp32", "LayerNorm's statistics in fp32 (TensorRT's normalization layer)"),
        "vmamba.scan": ("fp16", "fp32", "the SS2DScan plugin reads fp16 and computes in fp32; the portable "
                                        "form's scan arithmetic (cumulative sums of δ·A) stays fp32 for range"),
        "fusion": ("fp16", "fp32", "convolutions, as the teachers"),
        "students": ("fp16", "fp32", "convolutions and deconvolutions, as the teachers"),
    }),
    "int8": _head(**{
        "wrn": ("int8", "int32", "statically quantized convolutions (per-channel s8 weights, u8 activations "
                                 "calibrated on normal images): the frozen teacher's bulk of FLOPs"),
        "vmamba.proj": ("fp32", "fp32", "not quantized yet: the gate passed with WRN alone, and VMamba's export "
                                        "fixes the batch (its linears quantized: 1.4x on that teacher, not gated)"),
        "vmamba.dwconv": ("fp32", "fp32", "9 products per output: nothing to gain, and quantizes poorly"),
        "vmamba.norm": ("fp32", "fp32", "statistics over channels; not a GEMM"),
        "vmamba.scan": ("fp32", "fp32", "a recurrence: its state must not be quantized"),
        "fusion": ("fp32", "fp32", "trained parts stay in float: their small differences are the signal"),
        "students": ("fp32", "fp32", "trained parts stay in float: their small differences are the signal"),
    }),
}

# The CPU features that make a precision native, any one of which suffices.
NATIVE_FEATURES: dict[str, tuple[str, ...]] = {"bf16": ("amx_bf16", "avx512_bf16")}
# The instruction-set flags the benchmarks record and the precision choice keys on, in /proc/cpuinfo's names.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


class PrecisionUnavailable(RuntimeError):
    """The precision cannot run natively on this CPU; the message names the missing feature."""


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_features() -> frozenset[str]:
    """This CPU's instruction-set flags (those of :data:`CPU_FEATURES` it has), from /proc/cpuinfo."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split()) & frozenset(CPU_FEATURES)
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), e.g. 'Intel(R) Xeon(R) Platinum 8480+'."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def instruction_set(features: Iterable[str] | None = None) -> str:
    """The level that decides which precision pays: 'amx', 'avx512_bf16', 'avx512_vnni', 'avx512', 'avx2' or
    'baseline'. A precision's gate is recorded per level: a checkpoint gated on one level says nothing of another."""
    have = cpu_features() if features is None else frozenset(features)
    for level, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512_vnni", "avx512_vnni"),
                        ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in have:
            return level
    return "baseline"


def missing_features(precision: str, features: Iterable[str] | None = None) -> tuple[str, ...]:
    """The features ``precision`` needs to run natively here that this CPU lacks (() when it can)."""
    needed = NATIVE_FEATURES.get(precision)
    if needed is None:
        return ()
    have = cpu_features() if features is None else frozenset(features)
    return () if any(f in have for f in needed) else needed


@dataclass(frozen=True)
class ModelPrecision:
    """The precision a PyTorch PDD model computes in: ``name`` of :data:`MODEL_PRECISIONS`, native or
    ``emulate``-d (fp32 arithmetic rounded as native would be; any CPU, eager only)."""

    name: str = "fp32"
    emulate: bool = False

    def __post_init__(self) -> None:
        if self.name not in MODEL_PRECISIONS:
            raise ValueError(f"a PyTorch model runs in {MODEL_PRECISIONS}, not {self.name!r} (fp16 is TensorRT's "
                             f"typed graph: export/build_trt.py)")
        if self.emulate and self.name == "fp32":
            raise ValueError("fp32 is the reference: there is nothing to emulate")

    @classmethod
    def native(cls, name: str, features: Iterable[str] | None = None, where: str = "") -> ModelPrecision:
        """``name`` run natively, or :class:`PrecisionUnavailable` naming the CPU feature it lacks."""
        missing = missing_features(name, features)
        if missing:
            raise PrecisionUnavailable(
                f"{where}{': ' if where else ''}{name} needs a CPU with {' or '.join(f.upper() for f in missing)} "
                f"(/proc/cpuinfo flags {', '.join(missing)}); this one ({cpu_model()}) has neither, and emulated "
                f"{name} would be ~100x slower than fp32 here. Use --precision fp32, or --emulate to compute "
                f"{name}'s numbers (slowly) on any CPU")
        return cls(name)

    def describe(self) -> str:
        return f"{self.name} (emulated in fp32)" if self.emulate else self.name

    def rule(self, stage: str) -> Rule:
        return POLICY[self.name][stage]

    def dtype(self, stage: str) -> torch.dtype:
        """The dtype of ``stage``'s tensors (what the model casts to at its entry; fp32 for an int8 stage, whose
        quantization is inside its graph)."""
        return DTYPES.get(self.rule(stage).dtype, torch.float32)

    def cast(self, t: Tensor, stage: str) -> Tensor:
        """``t`` as ``stage`` reads it: cast to its dtype, or as an :class:`EmulatedTensor` of it. The fp32
        reference casts nothing (training under autocast keeps its dtypes)."""
        if self.name == "fp32":
            return t
        dtype = self.dtype(stage)
        if self.emulate and dtype != torch.float32:
            return t if isinstance(t, EmulatedTensor) and t.dtype == dtype else EmulatedTensor.of(t, dtype)
        return t.to(dtype)

    def cast_module(self, module: nn.Module, stage: str, keep_fp32: Iterable[str] = ()) -> None:
        """Cast ``module``'s floating parameters and buffers, once and in place, to ``stage``'s dtype, except
        those named in ``keep_fp32`` (attribute names, e.g. :data:`SCAN_FP32_PARAMETERS`)."""
        keep = frozenset(keep_fp32)
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    if t is None or not t.is_floating_point():
                        continue
                    new = t.detach().to(torch.float32) if name in keep else self.cast(t.detach(), stage)
                    if new is t:
                        continue
                    table[name] = nn.Parameter(new, requires_grad=False) if table is sub._parameters else new


FP32 = ModelPrecision()  # the reference precision, the default everywhere


class EmulatedTensor(torch.Tensor):
    """A float32 tensor standing for one of ``dtype`` (bf16, fp16): its values are representable in that dtype,
    it reports that dtype, and every op on it computes in fp32 and rounds its result where the op's native
    result would have that dtype (see the module docstring)."""

    inner: Tensor

    @staticmethod
    def __new__(cls, inner: Tensor, dtype: torch.dtype) -> EmulatedTensor:
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=dtype,
                                                   device=inner.device, requires_grad=False)

    def __init__(self, inner: Tensor, dtype: torch.dtype) -> None:
        self.inner = inner

    @classmethod
    def of(cls, t: Tensor, dtype: torch.dtype) -> EmulatedTensor:
        """``t`` (any float tensor) rounded to ``dtype``, held in fp32."""
        inner = t.inner if isinstance(t, EmulatedTensor) else t
        return cls(inner.detach().to(dtype).to(torch.float32), dtype)

    def __repr__(self) -> str:  # the wrapper has no storage of its own to print
        return f"EmulatedTensor({self.dtype}, shape={tuple(self.shape)}, inner={self.inner!r})"

    def __tensor_flatten__(self) -> tuple[list[str], torch.dtype]:
        return ["inner"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: Mapping[str, Tensor], dtype: torch.dtype, *_: Any) -> EmulatedTensor:
        return EmulatedTensor(inner["inner"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out_meta = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
        out = func(*tree_map(_real, args), **tree_map(_real, kwargs))
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None:
            # A view (values already rounded) or an in-place op, whose result is an argument: round in place.
            mutated = returns[0].alias_info.is_write
            target = next((a for a in args if isinstance(a, EmulatedTensor)), None)
            if mutated and isinstance(target, EmulatedTensor):
                target.inner.copy_(target.inner.to(target.dtype).to(torch.float32))
                return target

        def wrap(o: Any, m: Any) -> Any:
            if not (isinstance(o, Tensor) and isinstance(m, Tensor) and m.dtype in _REDUCED):
                return o
            if returns and returns[0].alias_info is not None:
                return EmulatedTensor(o, m.dtype)  # a view of rounded values: keep it a view
            return EmulatedTensor(o.to(m.dtype).to(torch.float32), m.dtype)

        if isinstance(out, (tuple, list)):
            return type(out)(wrap(o, m) for o, m in zip(out, out_meta))
        return wrap(out, out_meta)


_REDUCED = (torch.bfloat16, torch.float16)


def _meta(a: Any) -> Any:
    """The op's argument as a meta tensor of the dtype it stands for (to find the native result dtypes)."""
    if isinstance(a, Tensor):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
    return a


def _real(a: Any) -> Any:
    """The op's argument for the fp32 computation: an emulated tensor's values, a plain reduced-precision tensor
    (made by a factory with the dtype an emulated tensor reports) widened, reduced dtypes as fp32."""
    if isinstance(a, EmulatedTensor):
        return a.inner
    if isinstance(a, Tensor) and a.dtype in _REDUCED:
        return a.float()
    return torch.float32 if isinstance(a, torch.dtype) and a in _REDUCED else a
