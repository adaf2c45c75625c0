"""The fidelity gate of a reduced precision (pdd/fidelity.py) and the commands around it, on a tiny trained
brain-synth model (64², random teachers): per-precision calibration, `pdd eval --precision P --against fp32`
(a pass, and a deliberately broken precision that fails), the gate recorded for `--precision auto`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pdd.calibration import Calibration, fit_operating_point
from pdd.checkpoint import choose_precision, load_model, read_checkpoint, read_gates, store_gate
from pdd.cli import main as pdd_main
from pdd.config import apply_overrides, resolve_config
from pdd.evaluate import Predictions
from pdd.fidelity import LIMITS, fidelity_gate
from pdd.precision import POLICY, ModelPrecision, Rule, instruction_set, missing_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, best.pt) of one epoch on 12 normal images; both precisions calibrated on the same split."""
    from pdd.data import generate_brain_synth
    from pdd.train import train

    root = tmp_path_factory.mktemp("fidelity")
    data = root / "data"
    generate_brain_synth(data, seed=5, image_size=64, n_train=12, n_test_good=6, n_test_anomalous=6)
    cfg = apply_overrides(resolve_config("brain-synth"), [
        "image_size=64", "train.epochs=1", "train.batch_size=4", "train.eval_every=1", "train.amp=false",
        "train.val_fraction=0.25", f"data.root={data}"])
    best = train(cfg, root / "run").best_checkpoint
    for precision in (["--precision", "fp32"], ["--precision", "bf16", "--emulate"]):
        assert pdd_main(["calibrate", "--checkpoint", str(best), "--data", str(data), "--split", "train",
                         "--target-fpr", "0.1", *precision]) == 0
    return data, best


def _predictions(scores, maps, labels) -> Predictions:
    n = len(scores)
    return Predictions(np.asarray(scores, np.float32), np.asarray(maps, np.float32), np.asarray(labels),
                       np.zeros(np.shape(maps), bool), np.zeros(n, bool), [f"{i}.png" for i in range(n)],
                       ["all"] * n, 1.0)


def test_the_gate_passes_on_identical_predictions_and_names_what_fails() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 50 + [1] * 50)
    maps = rng.random((100, 8, 8)) + labels[:, None, None]
    scores = maps.reshape(100, -1).max(1)
    ref = _predictions(scores, maps, labels)
    cal = Calibration(fit_operating_point(scores[labels == 0], target=0.1))
    same = fidelity_gate("bf16", ref, ref, cal, cal)
    assert same.passed and {r.name: r.value for r in same.rows}["normalised_map_max_abs"] == 0.0
    # A candidate whose maps are off by 5 % of the range and whose scores are re-ordered fails those rows.
    noisy = _predictions(scores[::-1], maps + 0.05 * (maps.max() - maps.min()) * rng.standard_normal(maps.shape),
                         labels)
    bad = fidelity_gate("bf16", ref, noisy, cal, cal)
    assert not bad.passed
    assert {"spearman_scores", "pearson_maps_min", "normalised_map_max_abs", "image_auroc_pp"} <= set(bad.failed())
    assert "FAIL" in bad.table() and "bf16: FAILED" in bad.table()
    assert LIMITS["int8"]["spearman_scores"] == 0.99 and LIMITS["bf16"]["spearman_scores"] == 0.999
    with pytest.raises(ValueError, match="same images in the same order"):
        fidelity_gate("bf16", ref, dataclasses.replace(ref, paths=ref.paths[::-1]), cal, cal)


def test_each_precision_has_its_own_calibration(trained) -> None:
    _, best = trained
    obj = read_checkpoint(best)
    assert obj["calibration"]["precision"] == "fp32"
    assert obj["precisions"]["bf16"]["calibration"]["precision"] == "bf16"
    fp32 = load_model(best)
    bf16 = load_model(best, precision=ModelPrecision("bf16", emulate=True))
    assert fp32.calibration.precision == "fp32" and bf16.calibration.precision == "bf16"
    assert bf16.calibration.image.threshold != fp32.calibration.image.threshold  # fitted on each one's scores
    assert bf16.calibration.image.source == fp32.calibration.image.source


# The map-level figures of a faithful precision; the image-level ones (AUROC, Spearman of the scores) are not
# asserted on this model: its random teachers leave the 12 image scores within 1e-4 of each other, an order that
# bf16's rounding may or may not swap depending on the CPU's summation order (a full-size gate: benchmarks/results).
MAP_FIGURES = ("pixel_auroc_pp", "aupro_pp", "pearson_maps_min", "normalised_map_max_abs")


def test_eval_against_fp32_writes_the_gate_and_records_it(trained, tmp_path, capsys) -> None:
    data, best = trained
    rc = pdd_main(["eval", "--checkpoint", str(best), "--data", str(data), "--out", str(tmp_path), "--batch-size",
                   "6", "--precision", "bf16", "--emulate", "--against", "fp32"])
    out = capsys.readouterr().out
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert rc == (0 if gate["passed"] else 1), out  # the exit status is the gate's verdict
    assert "fidelity gate: bf16 against fp32, 12 images" in out
    assert f"bf16: {'PASSED' if gate['passed'] else 'FAILED'}" in out
    assert (tmp_path / "metrics.json").is_file() and len((tmp_path / "scores.csv").read_text().splitlines()) == 13
    assert gate["emulated"] and gate["instruction_set"] == instruction_set()
    rows = {r["name"]: r for r in gate["rows"]}
    assert all(rows[name]["passed"] for name in MAP_FIGURES), rows
    assert rows["pearson_maps_min"]["value"] > 0.99
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["precision"] == "bf16 (emulated in fp32)"
    recorded = read_gates(read_checkpoint(best))["bf16"][instruction_set()]
    assert recorded["passed"] == gate["passed"] and recorded["emulated"]
    assert set(recorded["seconds_per_image"]) == {"fp32", "bf16"}
    # An emulated gate proves the numbers, not the speed: auto does not choose by it.
    assert choose_precision(read_checkpoint(best), instruction_set(), ["fp32", "bf16"])[0] == "fp32"


def test_a_broken_precision_fails_its_gate(trained, tmp_path, capsys, monkeypatch) -> None:
    """bf16 with the anomaly head computed in bf16 too (against the policy): 1 − cos of nearly equal features
    cancels in bf16, which scrambles the scores' order, and the gate says so with a non-zero exit status."""
    data, best = trained
    for stage in ("head.cosine", "head.upsample", "head.blur", "head.max"):
        monkeypatch.setitem(POLICY["bf16"], stage, Rule("bf16", "bf16", "deliberately broken"))
    rc = pdd_main(["eval", "--checkpoint", str(best), "--data", str(data), "--out", str(tmp_path), "--batch-size",
                   "6", "--precision", "bf16", "--emulate", "--against", "fp32"])
    out = capsys.readouterr().out
    assert rc == 1 and "bf16: FAILED" in out
    failed = {r["name"] for r in json.loads((tmp_path / "gate.json").read_text())["rows"] if not r["passed"]}
    assert failed & {"spearman_scores", "image_auroc_pp", "pearson_maps_min", "normalised_map_max_abs"}, failed


def test_auto_chooses_the_fastest_precision_that_passed_here(trained) -> None:
    _, best = trained
    level = instruction_set()
    passed = {"precision": "bf16", "passed": True, "emulated": False}
    store_gate(best, passed, level, {"fp32": 0.30, "bf16": 0.10})
    obj = read_checkpoint(best)
    assert choose_precision(obj, level, ["fp32", "bf16"]) == (
        "bf16", f"bf16 passed its fidelity gate on {level} and took 0.33x fp32's time per image")
    assert choose_precision(obj, "some-other-level", ["fp32", "bf16"])[0] == "fp32"
    assert choose_precision(obj, level, ["fp32"])[0] == "fp32"  # bf16 cannot run natively on this CPU
    store_gate(best, {**passed, "passed": False}, level, {"fp32": 0.30, "bf16": 0.10})
    assert choose_precision(read_checkpoint(best), level, ["fp32", "bf16"])[0] == "fp32"
    store_gate(best, passed, level, {"fp32": 0.30, "bf16": 0.10})
    model = load_model(best, precision="auto")
    assert model.precision.name == ("fp32" if missing_features("bf16") else "bf16")
    assert model.calibration.precision == model.precision.name


def test_precision_refusals_on_the_command_line(trained, capsys, monkeypatch) -> None:
    data, best = trained
    monkeypatch.setattr("pdd.precision.cpu_features", lambda: frozenset({"avx2"}))
    assert pdd_main(["eval", "--checkpoint", str(best), "--data", str(data), "--out", "unused",
                     "--precision", "bf16"]) == 2
    assert "bf16 needs a CPU with AMX_BF16 or AVX512_BF16" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--emulate emulates a reduced precision"):
        pdd_main(["predict", "--checkpoint", str(best), str(data), "--emulate"])


def test_fp16_is_gated_as_tensorrts_typed_graph_on_onnx_runtime(trained, tmp_path, capsys) -> None:
    """(`pdd calibrate --precision fp16` builds the same model; without its calibration the fp16 decisions are
    taken at fp32's threshold.)"""
    data, best = trained
    rc = pdd_main(["eval", "--checkpoint", str(best), "--data", str(data), "--out", str(tmp_path), "--batch-size",
                   "6", "--precision", "fp16", "--against", "fp32"])
    out = capsys.readouterr().out
    assert "fidelity gate: fp16 against fp32, 12 images" in out
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert rc == (0 if gate["passed"] else 1) and gate["emulated"]
    assert gate["measured_as"] == "fp16 (TensorRT's typed graph on ONNX Runtime's CPU provider)"
    rows = {r["name"]: r["value"] for r in gate["rows"]}
    assert 0 < rows["normalised_map_max_abs"] < 2e-2 and rows["pearson_maps_min"] > 0.99


def test_a_served_reduced_precision_carries_its_gate_and_calibration(trained, tmp_path, capsys) -> None:
    """An fp16 TensorRT engine is served only with a passed fp16 gate of its checkpoint (or --force), and the
    repository gets that precision's thresholds and the gate's figures; bf16 has no served flavour."""
    from triton_fakes import make_engine_dir

    _, best = trained
    engine = make_engine_dir(tmp_path / "engine", dtype="float16")
    common = ["export", "triton-repo", "--engine", str(engine), "--flavour", "tensorrt"]
    with pytest.raises(SystemExit, match="give the --checkpoint it was built from"):
        pdd_main([*common, "--out", str(tmp_path / "r0")])
    fp16 = Calibration(fit_operating_point(np.linspace(1.0, 2.0, 20), target=0.1), precision="fp16")
    from pdd.checkpoint import store_calibration

    store_calibration(best, fp16)
    # On this CPU's level: it replaces the fp16 gate an earlier test recorded there (a passed one, on any CPU).
    store_gate(best, {"precision": "fp16", "passed": False, "emulated": True}, instruction_set(),
               {"fp32": 1.0, "fp16": 1.0})
    with pytest.raises(SystemExit, match="fp16 has no passed fidelity gate"):
        pdd_main([*common, "--checkpoint", str(best), "--out", str(tmp_path / "r1")])
    assert pdd_main([*common, "--checkpoint", str(best), "--force", "--out", str(tmp_path / "r1")]) == 0
    assert json.loads((tmp_path / "r1" / "precision.json").read_text())["forced"] is True
    gate = {"precision": "fp16", "passed": True, "emulated": True, "rows": []}
    store_gate(best, gate, instruction_set(), {"fp32": 1.0, "fp16": 1.0})
    assert pdd_main([*common, "--checkpoint", str(best), "--out", str(tmp_path / "r2")]) == 0
    record = json.loads((tmp_path / "r2" / "precision.json").read_text())
    assert record["precision"] == "fp16" and record["fidelity_gate"]["passed"] and not record["forced"]
    assert record["calibration_precision"] == "fp16"
    served = json.loads((tmp_path / "r2" / "pdd_engine" / "1" / "engine.json").read_text())["calibration"]
    assert Calibration.from_dict(served) == fp16
    with pytest.raises(SystemExit, match="no served bf16 flavour"):
        pdd_main(["export", "triton-repo", "--checkpoint", str(best), "--precision", "bf16", "--out",
                  str(tmp_path / "r3")])
    capsys.readouterr()
