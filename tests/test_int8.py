"""int8 (pdd/int8.py): the WRN teacher quantized as the policy says, checked on the running model; native
(compiled, oneDNN's int8 kernels) against the emulated quantized graph; the quantization stored in the checkpoint
and rebuilt from it; `pdd calibrate --precision int8` and its gate; the refusals."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from test_fidelity import MAP_FIGURES  # tests/ is on the path (rootdir)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pdd.checkpoint import load_model, read_checkpoint, read_gates, read_quantization, store_quantization
from pdd.cli import main as pdd_main
from pdd.config import apply_overrides, resolve_config
from pdd.int8 import QUANTIZED, Int8Calibration, Int8Error, Int8Teacher, observe
from pdd.precision import POLICY, ModelPrecision, instruction_set

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, best.pt) of one epoch on 12 normal brain-synth images at 64² (random teachers)."""
    from pdd.data import generate_brain_synth
    from pdd.train import train

    root = tmp_path_factory.mktemp("int8")
    data = root / "data"
    generate_brain_synth(data, seed=7, image_size=64, n_train=12, n_test_good=6, n_test_anomalous=6)
    cfg = apply_overrides(resolve_config("brain-synth"), [
        "image_size=64", "train.epochs=1", "train.batch_size=4", "train.eval_every=1", "train.amp=false",
        "train.val_fraction=0.25", f"data.root={data}", "scan_impl=cpu_kernel"])
    return data, train(cfg, root / "run").best_checkpoint


@pytest.fixture(scope="module")
def quantized(trained):
    """(fp32 model, its Int8Calibration observed on 8 random images, images to score)."""
    _, best = trained
    model = load_model(best)
    torch.manual_seed(1)
    calibration = observe(model, [torch.randn(4, 3, 64, 64) for _ in range(2)], source="random images")
    return model, calibration, torch.randn(3, 3, 64, 64)


def _int8(model: nn.Module, calibration: Int8Calibration, emulate: bool) -> nn.Module:
    q = copy.deepcopy(model)
    q.quantization = calibration
    return q.to_precision(ModelPrecision("int8", emulate=emulate))


class _Ops(TorchDispatchMode):
    """The ops each stage ran (stage set by module hooks), with the dtypes of their float inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = ["head"]
        self.seen: dict[str, list[tuple[str, tuple[torch.dtype, ...]]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        floats = tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        self.seen.setdefault(self.stage[-1], []).append((func.__name__.split(".")[0], floats))
        return func(*args, **(kwargs or {}))


@contextmanager
def _hooked(model: nn.Module, ops: _Ops) -> Iterator[None]:
    students = [d for s in (model.prior_student, model.plain_student) for d in (s.d1, s.d2, s.d3)]
    named = [(model.teachers.wrn, "wrn"), (model.teachers.vmamba, "vmamba"), (model.ina, "fusion"),
             (model.mmu, "fusion"), (model.mpa, "fusion"), *((d, "students") for d in students)]
    hooks = []
    for m, stage in named:
        hooks += [m.register_forward_pre_hook(lambda *_, s=stage: ops.stage.append(s)),
                  m.register_forward_hook(lambda *_: ops.stage.pop() and None)]  # None: keep the output
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def test_the_wrn_teacher_runs_int8_convolutions_and_the_rest_stays_fp32(quantized) -> None:
    model, calibration, x = quantized
    assert QUANTIZED == ("wrn",) and POLICY["int8"]["wrn"].dtype == "int8"
    assert all(POLICY["int8"][s].dtype == "fp32" for s in POLICY["int8"] if s != "wrn")
    q = _int8(model, calibration, emulate=True)
    assert isinstance(q.teachers.wrn, Int8Teacher) and not isinstance(q.teachers.vmamba, Int8Teacher)
    ops = _Ops()
    with torch.inference_mode(), _hooked(q, ops), ops:
        q(x)
    wrn = [name for name, _ in ops.seen["wrn"]]
    convs = sum(isinstance(m, nn.Conv2d) for m in model.teachers.wrn.modules())
    # Each convolution (its batch norm folded in) reads u8-quantized activations and s8 per-channel weights:
    # quantized, then dequantized for the fp32 arithmetic of the emulated graph.
    assert wrn.count("conv2d") == convs and "batch_norm" not in " ".join(wrn)
    assert wrn.count("dequantize_per_channel") == convs
    assert wrn.count("quantize_per_tensor") >= convs and wrn.count("dequantize_per_tensor") >= convs
    for stage in ("vmamba", "fusion", "students", "head"):
        names = {name for name, _ in ops.seen[stage]}
        assert not any("quantize" in n for n in names), (stage, names)
        floats = {d for _, dtypes in ops.seen[stage] for d in dtypes}
        # fp32 (the head builds its Gaussian taps in float64 before casting them to the map's fp32).
        assert floats == ({torch.float32, torch.float64} if stage == "head" else {torch.float32}), (stage, floats)


def test_native_int8_matches_the_emulated_quantized_graph_and_stays_near_fp32(quantized) -> None:
    model, calibration, x = quantized
    with torch.inference_mode():
        ref = model(x)
        emulated = _int8(model, calibration, emulate=True)(x)
        native_model = _int8(model, calibration, emulate=False)
        native = native_model(x)
    assert native_model.teachers.wrn.native and not native_model.teachers.wrn.training
    span = float(ref.anomaly_map.max() - ref.anomaly_map.min())
    # oneDNN's int8 convolutions against the same quantized values in fp32: summation order and requantization.
    assert float((native.anomaly_map - emulated.anomaly_map).abs().max()) <= 1e-3 * span
    assert float((emulated.anomaly_map - ref.anomaly_map).abs().max()) <= 2e-2 * span
    torch.testing.assert_close(native.pred_score, emulated.pred_score, rtol=1e-3, atol=1e-3 * span)


def test_quantizing_keeps_what_this_process_compiled(quantized) -> None:
    # A strict torch.export resets dynamo: a compiled runtime built before an int8 one would recompile.
    model, calibration, x = quantized
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: torch.relu(t) * 2, backend=backend)
    compiled(x)
    _int8(model, calibration, emulate=True)
    compiled(x)
    assert len(graphs) == 1


def test_the_quantization_round_trips_through_the_checkpoint(trained, quantized, tmp_path) -> None:
    _, best = trained
    model, calibration, x = quantized
    path = tmp_path / "q.pt"
    path.write_bytes(best.read_bytes())
    store_quantization(path, calibration)
    stored = read_quantization(read_checkpoint(path), path)
    assert stored.images == 8 and stored.source == "random images" and set(stored.versions) == {"torch", "torchao"}
    loaded = load_model(path, precision=ModelPrecision("int8", emulate=True))
    with torch.inference_mode():  # the same quantized teacher, bit for bit, rebuilt without any image
        for a, b in zip(loaded.teachers.wrn(x), _int8(model, calibration, emulate=True).teachers.wrn(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # An observer state for another graph (a torch or torchao whose export differs) is refused, not guessed.
    broken = Int8Calibration({"wrn": dict(list(calibration.observers["wrn"].items())[:-3])}, 8, "x")
    with pytest.raises(Int8Error, match="observed on another graph"):
        _int8(model, broken, emulate=True)
    with pytest.raises(Int8Error, match="damaged"):
        Int8Calibration.from_dict({"observers": {"wrn": {"a": 1.0}}, "images": 1, "source": "s"}, "ckpt.pt")


def test_int8_without_its_quantization_is_refused_with_the_command_to_run(trained, capsys) -> None:
    data, best = trained
    with pytest.raises(Int8Error, match="pdd calibrate --checkpoint CKPT --data DIR --precision int8"):
        load_model(best, precision=ModelPrecision("int8"))
    assert pdd_main(["eval", "--checkpoint", str(best), "--data", str(data), "--out", "unused", "--precision",
                     "int8"]) == 2
    assert "int8 needs the model's int8 calibration" in capsys.readouterr().err


def test_calibrate_quantizes_once_and_eval_gates_int8(trained, tmp_path, capsys) -> None:
    data, src = trained
    best = tmp_path / "best.pt"
    best.write_bytes(src.read_bytes())
    calibrate = ["calibrate", "--checkpoint", str(best), "--data", str(data), "--split", "train", "--target-fpr",
                 "0.1", "--precision", "int8", "--batch-size", "4"]
    assert pdd_main(calibrate) == 0
    assert "int8 quantization observed on 12 normal images" in capsys.readouterr().out
    obj = read_checkpoint(best)
    first = read_quantization(obj, best)
    assert obj["precisions"]["int8"]["calibration"]["precision"] == "int8" and first.images == 12
    assert pdd_main(calibrate) == 0  # the stored quantization is kept: the threshold is refitted on it
    assert "observed" not in capsys.readouterr().out
    again = read_quantization(read_checkpoint(best), best)
    assert all(torch.equal(again.observers["wrn"][k], v) for k, v in first.observers["wrn"].items())

    rc = pdd_main(["eval", "--checkpoint", str(best), "--data", str(data), "--out", str(tmp_path / "eval"),
                   "--batch-size", "6", "--precision", "int8", "--against", "fp32"])
    out = capsys.readouterr().out
    gate = json.loads((tmp_path / "eval" / "gate.json").read_text())
    assert rc == (0 if gate["passed"] else 1), out
    assert "fidelity gate: int8 against fp32, 12 images" in out
    assert gate["measured_as"] == "int8" and not gate["emulated"]
    rows = {r["name"]: r for r in gate["rows"]}
    assert rows["spearman_scores"]["limit"] == 0.99 and rows["pearson_maps_min"]["limit"] == 0.98
    # The map-level figures (the image scores of this random-teacher model are near-ties: tests/test_fidelity.py).
    assert all(rows[n]["passed"] for n in MAP_FIGURES), rows
    recorded = read_gates(read_checkpoint(best))["int8"][instruction_set()]
    assert recorded["passed"] == gate["passed"] and set(recorded["seconds_per_image"]) == {"fp32", "int8"}

    # A new quantization drops the threshold and the gates measured with the old one.
    assert pdd_main([*calibrate, "--requantize", "--int8-images", "4"]) == 0
    obj = read_checkpoint(best)
    assert read_quantization(obj, best).images == 4 and read_gates(obj)["int8"] == {}
