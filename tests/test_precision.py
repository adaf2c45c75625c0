"""Reduced precision (pdd/precision.py): the policy, checked on the running model; emulated against native bf16;
the refusal on a CPU without the features."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from export.runtime import RuntimeUnavailable, TorchRuntime
from pdd import PDDConfig, build_pdd
from pdd.precision import (
    DTYPES,
    MODEL_PRECISIONS,
    POLICY,
    PRECISIONS,
    STAGES,
    EmulatedTensor,
    ModelPrecision,
    PrecisionUnavailable,
    instruction_set,
    missing_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE_BF16 = not missing_features("bf16")


@pytest.fixture(scope="module")
def pdd64() -> nn.Module:
    torch.manual_seed(0)
    return build_pdd(PDDConfig(image_size=64, scan_impl="cpu_kernel")).eval()


def test_the_policy_covers_every_stage_and_keeps_the_scan_state_and_the_head_fp32() -> None:
    assert set(POLICY) == set(PRECISIONS)
    for precision, rules in POLICY.items():
        assert tuple(rules) == STAGES
        assert rules["vmamba.scan"].accumulate == "fp32", precision
        assert all(rules[s].dtype == "fp32" for s in STAGES if s.startswith("head.")), precision
        assert all(r.why for r in rules.values())
    assert {r.dtype for r in POLICY["fp32"].values()} == {"fp32"}


class _Recorder(TorchDispatchMode):
    """The dtypes each op of the model saw, by the stage running it (set by the hooks below)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = ["head"]  # outside every hooked module, after the students: the head
        self.seen: list[tuple[str, str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        floats = tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        self.seen.append((self.stage[-1], func.__name__, floats))
        return func(*args, **(kwargs or {}))


@contextmanager
def _stages(model: nn.Module, recorder: _Recorder) -> Iterator[None]:
    def enter(stage: str):
        return lambda *_: recorder.stage.append(stage)

    def leave(*_):
        recorder.stage.pop()

    students = [d for s in (model.prior_student, model.plain_student) for d in (s.d1, s.d2, s.d3)]
    named = [(model.teachers.wrn, "wrn"), (model.teachers.vmamba, "vmamba"), (model.ina, "fusion"),
             (model.mmu, "fusion"), (model.mpa, "fusion"), *((d, "students") for d in students)]
    for m in model.teachers.vmamba.modules():
        if isinstance(m, nn.LayerNorm):
            named.append((m, "vmamba.norm"))
        elif isinstance(m, nn.Conv2d) and m.groups > 1:
            named.append((m, "vmamba.dwconv"))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            named.append((m, "vmamba.proj"))
    hooks = []
    for m, stage in named:
        hooks += [m.register_forward_pre_hook(enter(stage)), m.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# The ops that compute (as a tensor subclass sees them, and after decomposition as a plain mode sees them).
_GEMMS = {"conv2d", "convolution", "linear", "matmul", "mm", "addmm", "bmm", "conv_transpose2d"}
_ARITHMETIC = _GEMMS | {"layer_norm", "native_layer_norm", "batch_norm", "_native_batch_norm_legit_no_training",
                        "ss2d_scan", "mul", "sum", "upsample_bilinear2d", "amax", "max"}


def _observed(model: nn.Module, x: torch.Tensor) -> dict[str, set[torch.dtype]]:
    """Per stage, the dtypes of the float inputs of its arithmetic ops (convolutions, GEMMs, norms, the scan,
    the head's products and sums), recorded while the model runs. In VMamba, outside its hooked layers, the
    scan op is the scan stage (its first input, x) and the x/δ projections' matmuls the projection stage."""
    recorder = _Recorder()
    with torch.inference_mode(), _stages(model, recorder), recorder:
        model(x)
    seen: dict[str, set[torch.dtype]] = {}
    for stage, op, dtypes in recorder.seen:
        name = op.split(".")[0]
        if name not in _ARITHMETIC or not dtypes:
            continue
        if stage == "vmamba":
            if name == "ss2d_scan":
                stage, dtypes = "vmamba.scan", dtypes[:1]
            elif name in _GEMMS:
                stage = "vmamba.proj"
            else:
                continue
        seen.setdefault(stage, set()).update(dtypes)
    return seen


@pytest.mark.parametrize("emulate", [True, pytest.param(False, marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="native bf16 needs AMX or AVX512-BF16 (emulated bf16 checks the same casts)"))])
def test_each_stage_computes_in_the_policys_dtype(pdd64: nn.Module, emulate: bool) -> None:
    model = copy.deepcopy(pdd64).to_precision(ModelPrecision("bf16", emulate=emulate))
    seen = _observed(model, torch.randn(1, 3, 64, 64))
    rules = POLICY["bf16"]
    for stage in ("wrn", "vmamba.proj", "vmamba.dwconv", "vmamba.norm", "vmamba.scan", "fusion", "students"):
        assert seen.get(stage) == {DTYPES[rules[stage].dtype]}, (stage, seen.get(stage))
    assert seen["head"] == {torch.float32}
    scan = next(m for m in model.teachers.vmamba.modules() if hasattr(m, "A_logs"))
    assert {scan.A_logs.dtype, scan.Ds.dtype, scan.dt_projs_bias.dtype} == {torch.float32}
    assert scan.x_proj_weight.dtype == torch.bfloat16 and isinstance(scan.x_proj_weight, EmulatedTensor) == emulate


def test_emulated_layers_are_native_bf16_up_to_summation_order() -> None:
    """One op at a time: fp32 arithmetic on bf16-rounded inputs, rounded at the output, against native bf16
    (PyTorch's bf16 kernels on any CPU): equal within one bf16 ulp of the output."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 9, 9, generator=g)
    layers = [nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.LayerNorm(9),
              nn.Linear(9, 24), nn.GELU(), nn.BatchNorm2d(16).eval()]
    for layer in layers:
        native = copy.deepcopy(layer).to(torch.bfloat16)
        emulated = copy.deepcopy(layer)
        ModelPrecision("bf16", emulate=True).cast_module(emulated, "wrn")
        with torch.inference_mode():
            want = native(x.bfloat16()).float()
            got = emulated(EmulatedTensor.of(x, torch.bfloat16))
        assert isinstance(got, EmulatedTensor) and got.dtype == torch.bfloat16
        ulp = want.abs().clamp_min(1e-30) * 2.0**-7
        assert bool(((got.inner - want).abs() <= ulp).all()), type(layer).__name__
        assert float((got.inner == want).float().mean()) > 0.9, type(layer).__name__


@pytest.mark.skipif(not NATIVE_BF16, reason="native bf16 needs AMX or AVX512-BF16")
def test_emulated_bf16_model_matches_native_where_both_run(pdd64: nn.Module) -> None:
    """The whole model: rounding differences of one ulp grow through 70 layers, so emulated and native differ
    by bf16's own noise; both stay as close to fp32 as each other, and close to each other."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.inference_mode():
        outs["fp32"] = pdd64(x)
        for emulate in (False, True):
            outs[emulate] = copy.deepcopy(pdd64).to_precision(ModelPrecision("bf16", emulate=emulate))(x)
    ref = outs["fp32"].anomaly_map
    span = float(ref.max() - ref.min())

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max()) / span

    native, emulated = outs[False].anomaly_map, outs[True].anomaly_map
    assert err(native, ref) < 2e-2 and err(emulated, ref) < 2e-2
    assert err(emulated, native) < 2 * max(err(native, ref), err(emulated, ref))
    assert np.corrcoef(native.flatten().numpy(), emulated.flatten().numpy())[0, 1] > 0.999
    torch.testing.assert_close(outs[True].pred_score, outs[False].pred_score, rtol=2e-2, atol=0)


def test_bf16_is_refused_on_a_cpu_without_the_features(pdd64: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    avx2 = {"avx2", "avx512f", "avx512_vnni"}
    assert missing_features("bf16", avx2) == ("amx_bf16", "avx512_bf16")
    assert missing_features("bf16", {"avx512_bf16"}) == () and missing_features("fp32", set()) == ()
    with pytest.raises(PrecisionUnavailable, match=r"bf16 needs a CPU with AMX_BF16 or AVX512_BF16.*--emulate"):
        ModelPrecision.native("bf16", avx2)
    monkeypatch.setattr("pdd.precision.cpu_features", lambda: frozenset(avx2))
    with pytest.raises(RuntimeUnavailable, match=r"torch:cpu_kernel:bf16: bf16 needs a CPU with AMX_BF16"):
        TorchRuntime(pdd64, "cpu_kernel", precision=ModelPrecision("bf16"))
    emulated = TorchRuntime(pdd64, "cpu_kernel", precision=ModelPrecision("bf16", emulate=True))  # never refused
    assert emulated.name == "torch:cpu_kernel:bf16 (emulated)"
    assert next(pdd64.parameters()).dtype == torch.float32  # the caller's model is not cast
    with pytest.raises(RuntimeUnavailable, match="emulated precision runs eagerly"):
        TorchRuntime(pdd64, "cpu_kernel", compile=True, precision=ModelPrecision("bf16", emulate=True))


def test_instruction_set_levels_and_model_precisions() -> None:
    assert instruction_set({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}) == "amx"
    assert instruction_set({"avx2", "avx512f", "avx512_vnni"}) == "avx512_vnni"
    assert instruction_set({"avx2"}) == "avx2" and instruction_set(set()) == "baseline"
    assert MODEL_PRECISIONS == ("fp32", "bf16", "int8")
    with pytest.raises(ValueError, match="TensorRT"):
        ModelPrecision("fp16")
    with pytest.raises(ValueError, match="nothing to emulate"):
        ModelPrecision("fp32", emulate=True)


def test_a_reduced_precision_model_is_not_cast_again(pdd64: nn.Module) -> None:
    model = copy.deepcopy(pdd64).to_precision(ModelPrecision("bf16", emulate=True))
    assert model.to_precision(ModelPrecision("bf16", emulate=True)) is model
    with pytest.raises(ValueError, match="load it again in fp32"):
        model.to_precision(ModelPrecision("bf16"))
