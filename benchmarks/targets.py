"""The performance targets of the benchmark, each with its measured value and whether it is met."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.runners import REFERENCE, SERVER, SLOW, TENSORRT, median_ms

__all__ = ["best_cpu_runtime", "target_pairs", "target_value", "targets"]


def _ok(entries: list[dict[str, Any]], name: str, precision: str = "fp32", device: str | None = None
        ) -> dict[str, Any] | None:
    return next((e for e in entries if e["runtime"] == name and e["precision"] == precision and e["status"] == "ok"
                 and (device is None or e["device"].startswith(device))), None)


def _best_cpu(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    cpu = [e for e in entries if e["status"] == "ok" and e["device"] == "cpu" and e["runtime"] != SLOW
           and e["precision"] == "fp32" and median_ms(e["latency"], 1) is not None]
    return min(cpu, key=lambda e: median_ms(e["latency"], 1)) if cpu else None


def best_cpu_runtime(entries: list[dict[str, Any]]) -> str | None:
    """The name of the fastest CPU runtime at batch 1 (the one the CPU targets are about), if any ran."""
    best = _best_cpu(entries)
    return best["runtime"] if best else None


def target_pairs(entries: list[dict[str, Any]], rounds: int) -> list[tuple[str, str, int]]:
    """(slower, faster candidate, rounds) pairs of the CPU targets, from the runtimes measured."""
    pairs = []
    best = _best_cpu(entries)
    slow = _ok(entries, SLOW, device="cpu")
    if best and slow:
        reference_rounds = max(1, min(rounds, slow["latency"][0].get("n", 1) if slow["latency"] else 1))
        pairs.append((SLOW, best["runtime"], reference_rounds))
    if _ok(entries, "onnxruntime:cpu:portable") and _ok(entries, REFERENCE, device="cpu"):
        pairs.append((REFERENCE, "onnxruntime:cpu:portable", rounds))
    if best and best["runtime"] != "onnxruntime:cpu:portable" and _ok(entries, "onnxruntime:cpu:portable"):
        pairs.append(("onnxruntime:cpu:portable", best["runtime"], rounds))
    return pairs


def _paired(paired: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    return next((p for p in paired if p["a"] == a and p["b"] == b and p["status"] == "ok"), None)


def _cpu_kernel_targets(entries: list[dict[str, Any]], paired: list[dict[str, Any]],
                        yardstick: dict[str, Any] | None, add: Callable[..., None], note: str) -> None:
    """The compiled CPU scan's targets: teacher balance, speed-up over ONNX Runtime portable, GEMM share."""
    kernel = _ok(entries, "torch:cpu_kernel", device="cpu")
    stages = (kernel or {}).get("stages") or {}
    ms = stages.get("ms", {})
    if ms.get("vmamba_teacher") and ms.get("wrn_teacher"):
        ratio = ms["vmamba_teacher"] / ms["wrn_teacher"]
        add("CPU batch 1: VMamba teacher vs WRN teacher (torch:cpu_kernel)", "<= 1.5x", ratio, ratio <= 1.5,
            f"{ms['vmamba_teacher']:.0f} ms vs {ms['wrn_teacher']:.0f} ms, each stage timed alone{note}")
    else:
        add("CPU batch 1: VMamba teacher vs WRN teacher (torch:cpu_kernel)", "<= 1.5x", None, None,
            "needs torch:cpu_kernel's per-stage times on the CPU")
    best, ort = _best_cpu(entries), _ok(entries, "onnxruntime:cpu:portable")
    if best and ort and median_ms(ort["latency"], 1):
        ratio = median_ms(ort["latency"], 1) / median_ms(best["latency"], 1)
        detail = (f"{best['runtime']} {median_ms(best['latency'], 1):.0f} ms vs onnxruntime:cpu:portable "
                  f"{median_ms(ort['latency'], 1):.0f} ms (medians, one after the other)")
        if pair := _paired(paired, "onnxruntime:cpu:portable", best["runtime"]):
            detail = f"alternating calls: {pair['b_ms']:.0f} ms vs {pair['a_ms']:.0f} ms; {detail}"
            ratio = pair["ratio"]
        add("CPU batch 1: best runtime vs ONNX Runtime portable", ">= 2x", ratio, ratio >= 2, detail + note)
    else:
        add("CPU batch 1: best runtime vs ONNX Runtime portable", ">= 2x", None, None,
            "needs onnxruntime:cpu:portable and another CPU runtime at batch 1")
    if best and yardstick and median_ms(best["latency"], 1):
        rate = yardstick["model_gflop"] / (median_ms(best["latency"], 1) / 1e3)
        share = rate / yardstick["gemm_gflops"]
        detail = (f"{best['runtime']}: {yardstick['model_gflop']:.1f} GFLOP in {median_ms(best['latency'], 1):.0f} ms "
                  f"= {rate:.0f} GFLOP/s; {yardstick['gemm_size']}² fp32 GEMM {yardstick['gemm_gflops']:.0f} GFLOP/s "
                  f"measured after the runtimes: {100 * share:.0f}%")
        alt = yardstick.get("alternating") or {}
        if alt.get("status") == "ok" and alt["runtime"] == best["runtime"]:
            alt_rate = yardstick["model_gflop"] / (alt["model_ms"] / 1e3)
            share = alt_rate / alt["gemm_gflops"]
            detail = (f"alternating calls: {alt['model_ms']:.0f} ms = {alt_rate:.0f} GFLOP/s vs the GEMM's "
                      f"{alt['gemm_gflops']:.0f} GFLOP/s (medians of {alt['rounds']} each); {detail}")
        add("CPU batch 1: best runtime's share of this machine's GEMM rate", ">= 50%", 100 * share, share >= 0.5,
            detail + note)
    else:
        add("CPU batch 1: best runtime's share of this machine's GEMM rate", ">= 50%", None, None,
            "needs the GEMM yardstick and a CPU runtime at batch 1")


def targets(entries: list[dict[str, Any]], image_size: int, paired: list[dict[str, Any]] = (),
            yardstick: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's performance targets, each with the measured ratio and whether it is met (None: not measured).

    The CPU ratios come from the alternating (paired) measurement when there is one, since the machine's
    speed may drift between runtimes measured one after the other; those separate medians are quoted too.
    """
    out = []
    note = "" if image_size == 256 else f" (measured at {image_size}², the target is stated for 256²)"

    def add(name: str, goal: str, value: float | None, met: bool | None, detail: str) -> None:
        out.append({"target": name, "goal": goal, "value": value, "met": met, "detail": detail})

    ref = _ok(entries, SLOW, device="cpu")
    best = _best_cpu(entries)
    if ref and best and median_ms(ref["latency"], 1):
        ratio = median_ms(ref["latency"], 1) / median_ms(best["latency"], 1)
        detail = (f"{best['runtime']} {median_ms(best['latency'], 1):.0f} ms vs {SLOW} "
                  f"{median_ms(ref['latency'], 1):.0f} ms (medians, measured one after the other)")
        if pair := _paired(paired, SLOW, best["runtime"]):
            detail = (f"alternating calls: {best['runtime']} {pair['b_ms']:.0f} ms vs {SLOW} {pair['a_ms']:.0f} ms "
                      f"(medians of {pair['rounds']} each); {detail}: {ratio:.2f}x")
            ratio = pair["ratio"]
        add("CPU batch 1: best runtime vs PyTorch eager, reference scan", ">= 10x", ratio, ratio >= 10,
            detail + note)
    else:
        add("CPU batch 1: best runtime vs PyTorch eager, reference scan", ">= 10x", None, None,
            "needs torch:reference and another runtime at batch 1 on the CPU")
    ort, eager = _ok(entries, "onnxruntime:cpu:portable"), _ok(entries, REFERENCE, device="cpu")
    if ort and eager and median_ms(ort["latency"], 1) and median_ms(eager["latency"], 1):
        ratio = median_ms(eager["latency"], 1) / median_ms(ort["latency"], 1)
        detail = (f"{median_ms(ort['latency'], 1):.0f} ms vs {median_ms(eager['latency'], 1):.0f} ms "
                  f"(medians, measured one after the other)")
        if pair := _paired(paired, REFERENCE, "onnxruntime:cpu:portable"):
            detail = (f"alternating calls: {pair['b_ms']:.0f} ms vs {pair['a_ms']:.0f} ms (medians of "
                      f"{pair['rounds']} each); {detail}: {ratio:.2f}x")
            ratio = pair["ratio"]
        add("CPU batch 1: ONNX Runtime portable vs PyTorch eager scan", ">= 1x", ratio, ratio >= 1, detail + note)
    else:
        add("CPU batch 1: ONNX Runtime portable vs PyTorch eager scan", ">= 1x", None, None,
            "needs onnxruntime:cpu:portable and torch:eager at batch 1 on the CPU")
    eager = _ok(entries, REFERENCE, device="cuda")
    trts = [e for e in (_ok(entries, n, "fp16") for n in TENSORRT) if e]
    throughput = {id(e): next((r["throughput_img_s"] for r in e["latency"] if r["batch"] == 32), None)
                  for e in [*trts, *([eager] if eager else [])]}
    trts = [e for e in trts if throughput[id(e)]]
    if eager and throughput[id(eager)] and trts:
        best = max(trts, key=lambda e: throughput[id(e)])
        ratio = throughput[id(best)] / throughput[id(eager)]
        add("GPU batch 32: TensorRT fp16 vs PyTorch eager fp32 throughput", ">= 3x", ratio, ratio >= 3,
            f"{best['runtime']} {throughput[id(best)]:.0f} img/s vs {REFERENCE} {throughput[id(eager)]:.0f} img/s"
            f"{note}")
    else:
        add("GPU batch 32: TensorRT fp16 vs PyTorch eager fp32 throughput", ">= 3x", None, None,
            "needs a GPU with TensorRT fp16 engines and torch:eager on CUDA at batch 32")
    served = [r for n in SERVER if (e := _ok(entries, n)) for r in e["latency"]
              if r["batch"] == 1 and r["concurrency"] == 1 and r["completed"]]
    if served and ort and median_ms(ort["latency"], 1):
        best = min(served, key=lambda r: r["p99_latency_us"])
        ratio = best["p99_latency_us"] / 1e3 / median_ms(ort["latency"], 1)
        add("Served p99 at batch 1 vs engine-only latency", "<= 1.5x", ratio, ratio <= 1.5,
            f"server p99 {best['p99_latency_us'] / 1e3:.0f} ms (concurrency 1, best protocol) vs the engine it "
            f"serves (onnxruntime:cpu:portable) in process, median {median_ms(ort['latency'], 1):.0f} ms; the "
            f"target is stated for a GPU server with TensorRT, which the bundled server cannot host{note}")
    else:
        add("Served p99 at batch 1 vs engine-only latency", "<= 1.5x", None, None,
            "needs Triton Inference Server and the engine it serves (onnxruntime:cpu:portable) "
            "measured at batch 1")
    _cpu_kernel_targets(entries, paired, yardstick, add, note)
    return out


def target_value(t: dict[str, Any]) -> str:
    """A target's measured value in its goal's unit (a ratio, or a percentage)."""
    return f"{t['value']:.0f}%" if t["goal"].endswith("%") else f"{t['value']:.2f}x"
