"""The end-to-end benchmark (benchmarks/run.py): statistics and accuracy helpers on known inputs, stage
grouping, targets, and the quick preset run end to end on the CPU at 64²."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    """benchmarks.run and benchmarks.common, imported from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import common, run

    return run, common


def test_latency_stats_known_values(bench) -> None:
    _, common = bench
    stats = common.latency_stats([i / 1000 for i in range(10, 0, -1)])  # 10 … 1 ms, unsorted
    assert stats["n"] == 10
    assert stats["median_ms"] == pytest.approx(5.5)
    assert stats["p50_ms"] == pytest.approx(5.5)
    assert stats["mean_ms"] == pytest.approx(5.5)
    # Linear interpolation between order statistics: p90 sits 0.1 of the way from 9 to 10 ms.
    assert stats["p90_ms"] == pytest.approx(9.1)
    assert stats["p95_ms"] == pytest.approx(9.55)
    assert stats["p99_ms"] == pytest.approx(9.91)
    assert (stats["min_ms"], stats["max_ms"]) == pytest.approx((1.0, 10.0))
    one = common.latency_stats([0.25])
    assert one["p99_ms"] == one["p50_ms"] == pytest.approx(250.0)
    empty = common.latency_stats([])
    assert empty["n"] == 0 and math.isnan(empty["p99_ms"])


def test_accuracy_vs_reference_known_values(bench) -> None:
    _, common = bench
    ref_maps = np.zeros((4, 8, 8), np.float32)
    ref_maps[1, 2, 3] = 2.0  # reference range 2.0
    cand_maps = ref_maps.copy()
    cand_maps[3, 0, 0] += 0.5
    labels = np.array([0, 1, 0, 1])
    reference = {"pred_score": np.array([0.1, 0.9, 0.2, 0.8], np.float32), "anomaly_map": ref_maps}
    # One positive (0.15) now ranks below a negative (0.2): 3 of 4 pairs ordered, AUROC 0.75.
    candidate = {"pred_score": np.array([0.1, 0.15, 0.2, 0.8], np.float32), "anomaly_map": cand_maps}
    acc = common.accuracy_vs_reference(reference, candidate, labels)
    assert acc["images"] == 4
    assert acc["map_max_abs_error"] == pytest.approx(0.5)
    assert acc["map_range"] == pytest.approx(2.0)
    assert acc["map_max_rel_error"] == pytest.approx(0.25)
    assert acc["score_max_abs_error"] == pytest.approx(0.75)
    assert acc["auroc_reference"] == pytest.approx(1.0)
    assert acc["auroc"] == pytest.approx(0.75)
    assert acc["auroc_diff"] == pytest.approx(-0.25)
    same = common.accuracy_vs_reference(reference, reference, labels)
    assert same["map_max_abs_error"] == 0.0 and same["auroc_diff"] == 0.0
    one_class = common.accuracy_vs_reference(reference, candidate, np.zeros(4, int))
    assert math.isnan(one_class["auroc"]) and math.isnan(one_class["auroc_diff"])
    with pytest.raises(ValueError, match="shape"):
        common.accuracy_vs_reference(reference, {**candidate, "anomaly_map": cand_maps[:, :4]}, labels)


def test_batch_of_wraps_around(bench) -> None:
    _, common = bench
    items = np.arange(3)
    assert common.batch_of(items, 2, 4).tolist() == [2, 0, 1, 2]
    assert common.batch_of(items, 4, 1).tolist() == [1]


def test_stages_from_node_namespaces_and_layer_names(bench) -> None:
    _, common = bench
    wrn = ": export.onnx_export.ExportablePDD/model.teachers: pdd.model.Teachers/model.teachers.wrn: x/conv2d: aten"
    vmamba = ": export.onnx_export.ExportablePDD/model.teachers: pdd.model.Teachers/model.teachers.vmamba: y/add"
    head = ": export.onnx_export.ExportablePDD/head: export.onnx_export._AnomalyHeadStage/amax: aten.amax.default"
    student = ": export.onnx_export.ExportablePDD/model.prior_student: pdd.model.StudentDecoder/conv"
    assert common.stage_of_node(wrn) == "wrn_teacher"
    assert common.stage_of_node(vmamba) == "vmamba_teacher"
    assert common.stage_of_node(head) == "anomaly_head"
    assert common.stage_of_node(student) == "adapters_students"
    assert common.stage_of_node("", "SS2DScan") == "vmamba_teacher"
    assert common.stage_of_node("", "Shape") == "other"

    nodes = {"node_conv2d": "wrn_teacher", "node_relu": "wrn_teacher", "node_add_5": "vmamba_teacher",
             "n0_91": "anomaly_head", "node_conv_7": "adapters_students"}
    layers = {"node_conv2d + node_relu": 1.0,                     # a fused TensorRT layer
              "{ForeignNode[node_add_5...node_conv_7]}": 2.0,     # a Myelin region: first named node wins a tie
              "n0_91": 0.25,
              "Reformatting CopyNode for Input Tensor 0 to x": 0.5}  # inserted by TensorRT: no ONNX node
    grouped = common.group_layer_times(layers, nodes)
    assert grouped == {"wrn_teacher": 1.0, "vmamba_teacher": 2.0, "adapters_students": 0.0, "anomaly_head": 0.25,
                       "other": 0.5}


def _entry(runtime: str, device: str, medians: dict[int, float], precision: str = "fp32") -> dict:
    return {"runtime": runtime, "precision": precision, "device": device, "status": "ok",
            "latency": [{"batch": b, "median_ms": m, "throughput_img_s": b / m * 1e3} for b, m in medians.items()]}


def test_targets_from_measured_medians(bench) -> None:
    run, _ = bench
    entries = [_entry("torch:reference", "cpu", {1: 10_000.0}), _entry("torch:eager", "cpu", {1: 800.0}),
               _entry("onnxruntime:cpu:portable", "cpu", {1: 500.0}),
               {**_entry("torch:triton", "cpu", {}), "status": "skipped", "reason": "no CUDA"}]
    by_name = {t["target"]: t for t in run.targets(entries, 256)}
    best = by_name["CPU batch 1: best runtime vs PyTorch eager, reference scan"]
    assert best["value"] == pytest.approx(20.0) and best["met"] is True
    assert "onnxruntime:cpu:portable" in best["detail"]
    ort = by_name["CPU batch 1: ONNX Runtime portable vs PyTorch eager scan"]
    assert ort["value"] == pytest.approx(1.6) and ort["met"] is True
    gpu = by_name["GPU batch 32: TensorRT fp16 vs PyTorch eager fp32 throughput"]
    assert gpu["met"] is None and gpu["detail"].startswith("needs")
    served = by_name["Served p99 at batch 1 vs engine-only latency"]
    assert served["met"] is None

    # Alternating (paired) measurements, when present, decide the CPU verdicts; the sequential ratio is quoted.
    paired = [{"a": "torch:reference", "b": "onnxruntime:cpu:portable", "status": "ok", "a_ms": 9000.0,
               "b_ms": 1000.0, "ratio": 9.0, "rounds": 2},
              {"a": "torch:eager", "b": "onnxruntime:cpu:portable", "status": "ok", "a_ms": 700.0,
               "b_ms": 800.0, "ratio": 0.875, "rounds": 6}]
    by_name = {t["target"]: t for t in run.targets(entries, 256, paired)}
    best = by_name["CPU batch 1: best runtime vs PyTorch eager, reference scan"]
    assert best["value"] == pytest.approx(9.0) and best["met"] is False and "20.00x" in best["detail"]
    ort = by_name["CPU batch 1: ONNX Runtime portable vs PyTorch eager scan"]
    assert ort["value"] == pytest.approx(0.875) and ort["met"] is False and "alternating" in ort["detail"]
    assert run.target_pairs(entries, 6) == [("torch:reference", "onnxruntime:cpu:portable", 1),
                                              ("torch:eager", "onnxruntime:cpu:portable", 6)]

    gpu_entries = [_entry("torch:eager", "cuda", {32: 400.0}),
                   _entry("tensorrt:plugin", "cuda:0", {32: 100.0}, "fp16"),
                   _entry("tensorrt:portable", "cuda:0", {32: 160.0}, "fp16")]
    gpu = {t["target"]: t for t in run.targets(gpu_entries, 256)}["GPU batch 32: TensorRT fp16 vs PyTorch eager "
                                                                     "fp32 throughput"]
    assert gpu["value"] == pytest.approx(4.0) and gpu["met"] is True and "tensorrt:plugin" in gpu["detail"]


def test_parse_args_quick_defaults_and_errors(bench) -> None:
    run, _ = bench
    args = run.parse_args(["--runtimes", "cpu,torch:triton", "--batch", "4,1,4"])
    assert args.preset == "quick" and args.image_size == 64 and args.repeats == 3 and args.batch == [1, 4]
    assert args.runtimes[:2] == ["torch:reference", "torch:eager"] and "torch:triton" in args.runtimes
    assert args.requests == args.repeats and args.paired_rounds == 2
    quick = run.parse_args([])
    assert quick.batch == quick.concurrency == [1] and "torch:graph-parallel:compile" not in quick.runtimes
    assert {"onnxruntime:cpu:portable", "server:http"} <= set(quick.runtimes)
    full = run.parse_args(["--full", "--repeats", "5"])
    assert full.preset == "full" and full.image_size == 256 and full.batch == [1, 8, 32] and full.repeats == 5
    assert full.runtimes == list(run.RUNTIMES) and full.paired_rounds == 6
    for bad in (["--runtimes", "torch:magic"], ["--image-size", "100"], ["--batch", "0"], ["--prepare-only"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def test_quick_run_end_to_end(bench, tmp_path: Path) -> None:
    """The quick preset on the CPU: PyTorch eager and reference scans measured, GPU runtimes listed as skipped."""
    run, common = bench
    out = tmp_path / "results"
    result = run.main(["--batch", "1,2", "--repeats", "1", "--device", "cpu", "--threads", "1", "--out", str(out),
                       "--runtimes", "torch:eager,torch:reference,torch:triton,tensorrt:plugin"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runtimes"] == json.loads(json.dumps(result["runtimes"], default=str))
    env = on_disk["environment"]
    assert {"torch", "onnxruntime", "triton", "tensorrt"} <= set(env["versions"])
    assert env["cpu_count"] >= 1 and len(on_disk["load_average"]["before"]) == 3
    assert on_disk["command"].startswith("python benchmarks/run.py --batch 1,2")
    assert on_disk["config"]["preset"] == "quick"
    assert on_disk["config"]["image_size"] == 64 and on_disk["config"]["batch"] == [1, 2]
    assert "brain-synth" in on_disk["config"]["images"] or "textures" in on_disk["config"]["images"]

    entries = {e["runtime"]: e for e in on_disk["runtimes"]}
    chunked, reference = entries["torch:eager"], entries["torch:reference"]
    assert chunked["status"] == reference["status"] == "ok"
    assert [r["batch"] for r in chunked["latency"]] == [1, 2]
    for row in chunked["latency"] + reference["latency"]:
        assert row["n"] >= 1 and row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["throughput_img_s"] == pytest.approx(row["batch"] / row["median_ms"] * 1e3)
    assert [r["batch"] for r in reference["latency"]] == [1]
    assert reference["skipped_batches"][0]["batch"] == 2 and reference["skipped_batches"][0]["reason"]
    assert chunked["accuracy"]["map_max_abs_error"] == 0.0 and chunked["accuracy"]["images"] == 4
    # The reference scan computes the same maps up to float rounding, on the images of its timed calls.
    assert reference["accuracy"]["map_max_rel_error"] < 1e-3 and reference["accuracy"]["images"] >= 2
    assert set(chunked["stages"]["ms"]) == set(common.STAGES) and all(v > 0 for v in chunked["stages"]["ms"].values())

    for name in ("torch:triton", "tensorrt:plugin"):
        if entries[name]["status"] != "ok":  # on a CPU machine; a GPU machine may run torch:triton
            assert entries[name]["status"] == "skipped" and entries[name]["reason"]
    assert entries["tensorrt:plugin"]["status"] == "skipped"  # no engine was built for this run
    assert "build_trt.py" in entries["tensorrt:plugin"]["reason"] or "TensorRT" in entries["tensorrt:plugin"]["reason"]
    assert len(on_disk["targets"]) == 7 and all(t["met"] in (True, False, None) for t in on_disk["targets"])
    # The GEMM yardstick is measured in the same run, and the GEMM-share target computed from it.
    yard = on_disk["yardstick"]
    assert yard["gemm_gflops"] > 0 and yard["model_gflop"] > 0 and yard["threads"] == 1
    share = next(t for t in on_disk["targets"] if "GEMM rate" in t["target"])
    # ... from the best runtime (never the reference scan) and the GEMM timed in alternation with it.
    alt = yard["alternating"]
    assert (alt["status"], alt["runtime"]) == ("ok", "torch:eager")
    assert len(alt["times_ms"]) == len(alt["gemm_gflops_each"]) == alt["rounds"]
    assert share["value"] == pytest.approx(100 * yard["model_gflop"] / (alt["model_ms"] / 1e3) / alt["gemm_gflops"])
    assert "alternating calls" in share["detail"] and "measured after the runtimes" in share["detail"]
    (pair,) = on_disk["paired"]  # reference vs the best other CPU runtime, in alternation
    assert (pair["a"], pair["b"], pair["status"]) == ("torch:reference", "torch:eager", "ok")
    assert len(pair["times_ms"]["torch:reference"]) == len(pair["times_ms"]["torch:eager"]) == pair["rounds"]
    assert pair["ratio"] == pytest.approx(pair["a_ms"] / pair["b_ms"])

    md = (out / "results.md").read_text()
    assert "| torch:eager | fp32 |" in md and "Skipped or failed" in md and "Targets" in md
    for png in ("latency.png", "throughput.png", "stages.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_check_records_every_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The GPU script's bookkeeping, on any machine: the machine step alone, its summary and archive."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--steps", "machine", "--budget-s", "60"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| machine | ok |" in summary and "- torch: " in summary and "- tensorrt: " in summary
    assert (tmp_path / "logs.tar.gz").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.md"]
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--steps", "machine,warp-drive"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path of the GPU script")
def test_gpu_check_dry_run_prepares_every_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every step up to the first GPU call: the ONNX exports and four engine build plans with capped PTX."""
    import tarfile

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--image-size", "64", "--ptx-isa", "8.4"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    for step in ("onnx-export", "trt-plugin-fp16", "trt-portable-fp16", "trt-plugin-fp32", "trt-portable-fp32"):
        assert f"| {step} | ok |" in summary, summary
    assert "| serve | skipped (dry run" in summary and "| benchmark | skipped" in summary
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        plan = json.load(tar.extractfile("engines/tensorrt-plugin-fp16/build-plan.json"))
        ptx = [m for m in tar.getnames() if m.startswith("engines/tensorrt-plugin-fp16/ptx/")]
        assert plan["kernel_target"]["arch"] == "sm_90a" and plan["kernel_target"]["ptx_isa"] == "8.4"
        assert len(ptx) == len(plan["ptx"]) == 4
        assert all(".version 8.4" in tar.extractfile(m).read().decode() for m in ptx)


def test_pdd_bench_passes_leading_options_through(capsys):
    """`pdd bench --full ...` reaches benchmarks/run.py's own parser (here its --help), options first included."""
    from pdd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--full", "--help"])
    assert exit_info.value.code == 0
    assert "usage: python benchmarks/run.py" in capsys.readouterr().out
