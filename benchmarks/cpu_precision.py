"""Reduced precision on this CPU: the fastest runtime of each precision side by side with fp32, in one run.

    python benchmarks/cpu_precision.py [--checkpoint CKPT] [--image-size 256] [--threads 2] [--rounds 8]
        [--batch8-calls 3] [--images 8] [--no-stages] [--no-rss] --out benchmarks/results/cpu-precision

Per precision (fp32, bf16 where the CPU has AMX or AVX512-BF16; refused with the missing flag otherwise):
the compiled C-kernel runtime (``torch:cpu_kernel:compile[:bf16]``, export/runtime.py) at batch 1, timed in
interleaved rounds (each round times every precision once and that precision's 2048² GEMM right after it, in
rotating order), so the ratios and each precision's share of its own GEMM rate over the model's FLOPs
compare like with like; batch 8 throughput; each stage compiled and timed alone; peak RSS of a fresh
process that loads the checkpoint (for random weights a temporary one, with the int8 quantization), builds the
runtime of that precision, compiles and runs it (its VmHWM); agreement with
fp32 on labelled brain-synth images (map error over the fp32 maps' range, per-image Pearson, ΔAUROC). The
fidelity gate proper (on a test set, per-precision thresholds) is ``pdd eval --precision P --against fp32``.

int8 (pdd/int8.py: the WRN teacher statically quantized by torchao's PT2E flow, per-channel s8 weights and u8
activations, the rest fp32) runs on any x86 CPU: its quantization is the checkpoint's, else observed on 8 normal
brain-synth slices of another seed than the measured ones.

Writes ``results.json`` and ``results.md`` (with the command, the CPU model and its flags) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config

from benchmarks.common import (
    accuracy_vs_reference,
    batch_of,
    brain_synth_images,
    environment,
    gemm_rate,
    model_gflop,
)
from export.runtime import RuntimeUnavailable, TorchRuntime
from pdd.checkpoint import load_model, save_pdd, store_quantization
from pdd.config import PDDConfig, atomic_write_text
from pdd.int8 import observe
from pdd.precision import (
    DTYPES,
    FP32,
    MODEL_PRECISIONS,
    ModelPrecision,
    PrecisionUnavailable,
    cpu_model,
    instruction_set,
)

__all__ = ["main"]

RUNTIME = "cpu_kernel"  # the scan of every measured runtime: the C kernel, which reads bf16 itself



def _model(args: argparse.Namespace) -> torch.nn.Module:
    """The fp32 model (the runtimes cast their own copies), with an int8 quantization."""
    if args.checkpoint is not None:
        model = load_model(args.checkpoint, scan_impl=RUNTIME, image_size=args.image_size)
    else:
        torch.manual_seed(0)
        model = load_model(config=PDDConfig(), scan_impl=RUNTIME, image_size=args.image_size)
    if model.quantization is None:
        with tempfile.TemporaryDirectory(prefix="pdd-int8-") as work:
            calib = brain_synth_images(args.image_size, 16, Path(work), seed=1)
        normal = torch.from_numpy(calib.normalised[calib.labels == 0][:8])
        model.quantization = observe(model, normal.split(4), source=calib.source)
    return model


def _precisions() -> tuple[list[ModelPrecision], dict[str, str]]:
    """The native precisions this CPU runs, and the reason for each it does not."""
    runs, refused = [FP32], {}
    for name in MODEL_PRECISIONS[1:]:
        try:
            runs.append(ModelPrecision.native(name))
        except PrecisionUnavailable as exc:
            refused[name] = str(exc)
    return runs, refused


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _interleaved(runtimes: dict[str, TorchRuntime], x: np.ndarray, rounds: int) -> dict[str, Any]:
    """Per precision: median batch-1 ms, and the median rate of its own GEMM timed right after it, in rounds
    whose order rotates (fp32 bf16, bf16 fp32, ...)."""
    names = list(runtimes)
    model_ms: dict[str, list[float]] = {n: [] for n in names}
    gemm: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            model_ms[name].append(_timed(lambda rt=runtimes[name]: rt.predict(x)))
            # int8's yardstick is fp32's: its quantized convolutions are oneDNN's, the rest of it fp32.
            gemm[name].append(gemm_rate(warmup=1, repeats=3, dtype=name if name in DTYPES else "fp32")["gflops"])
    return {n: {"median_ms": statistics.median(model_ms[n]), "times_ms": model_ms[n],
                "gemm_gflops": statistics.median(gemm[n]), "gemm_gflops_each": gemm[n]} for n in names}


def _stages(rt: TorchRuntime, x: np.ndarray, repeats: int) -> dict[str, float]:
    """Median ms of each stage compiled alone (frozen weights), in the runtime's precision."""
    model = rt.model
    size = tuple(x.shape[-2:])
    xt = torch.from_numpy(x)
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        xi = model.precision.cast(xt, "wrn")
        y, z = tuple(model.teachers.wrn(xi)), tuple(model.teachers.vmamba(xi))
        feats = model.students(y, z)
        parts = {"wrn_teacher": lambda: model.teachers.wrn(xi), "vmamba_teacher": lambda: model.teachers.vmamba(xi),
                 "adapters_students": lambda: model.students(y, z), "anomaly_head": lambda: model.head(feats, size)}
        ms = {}
        for stage, fn in parts.items():
            compiled = torch.compile(fn)
            compiled()
            ms[stage] = statistics.median(_timed(compiled) for _ in range(repeats))
    return ms


def _child_rss(args: argparse.Namespace) -> None:
    """--child-rss P: load, compile and run one precision in this fresh process; print its peak RSS."""
    precision = ModelPrecision(args.child_rss)
    imports = _status_mib("VmRSS")
    model = _model(args)
    rt = TorchRuntime(model, RUNTIME, compile=True, precision=precision)
    del model
    x = np.zeros((1, 3, args.image_size, args.image_size), np.float32)
    for _ in range(3):
        rt.predict(x)
    # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's RSS at the fork that started this process.
    print(json.dumps({"precision": precision.name, "peak_rss_mib": _status_mib("VmHWM"),
                      "after_imports_mib": imports, "after_calls_mib": _status_mib("VmRSS")}))


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: its peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss(args: argparse.Namespace, precision: str, checkpoint: Path) -> dict[str, float] | None:
    cmd = [sys.executable, "-m", "benchmarks.cpu_precision", "--child-rss", precision,
           "--image-size", str(args.image_size), "--threads", str(args.threads), "--checkpoint", str(checkpoint)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if done.returncode == 0 and lines else None


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, goal: str, value: float | None, met: bool | None, detail: str) -> None:
        out.append({"target": name, "goal": goal, "value": value, "met": met, "detail": detail})

    timing, gflop = res["interleaved"], res["model_gflop"]
    amx = instruction_set() == "amx"
    if "bf16" in timing:
        bf, fp = timing["bf16"], timing["fp32"]
        add("bf16 batch 1 end to end", "<= 100 ms", bf["median_ms"], bf["median_ms"] <= 100,
            f"torch:cpu_kernel:compile:bf16, median of {len(bf['times_ms'])} interleaved calls")
        ratio = fp["median_ms"] / bf["median_ms"]
        add("bf16 vs fp32 compiled, batch 1", ">= 3x", ratio, ratio >= 3,
            f"{bf['median_ms']:.1f} ms vs {fp['median_ms']:.1f} ms, interleaved")
        share = gflop / (bf["median_ms"] / 1e3) / bf["gemm_gflops"]
        add("bf16 share of the bf16 GEMM rate", ">= 35%", 100 * share, share >= 0.35,
            f"{gflop:.1f} GFLOP in {bf['median_ms']:.1f} ms vs 2048² bf16 GEMM {bf['gemm_gflops']:.0f} GFLOP/s")
        b8 = res["batch8"].get("bf16")
        if b8:
            add("bf16 batch 8 throughput", ">= 15 img/s", b8["img_s"], b8["img_s"] >= 15,
                f"median of {b8['calls']} calls of 8 images")
        rss = res.get("rss_mib") or {}
        if rss.get("bf16") and rss.get("fp32"):
            bf, fp = rss["bf16"], rss["fp32"]
            ratio = bf["peak_rss_mib"] / fp["peak_rss_mib"]
            add("bf16 peak RSS vs fp32", "<= 0.6x", ratio, ratio <= 0.6,
                f"{bf['peak_rss_mib']:.0f} MiB vs {fp['peak_rss_mib']:.0f} MiB (fresh process: load, compile, 3 "
                f"calls); of which {fp['after_imports_mib']:.0f} MiB after the imports, before any model")
    elif amx:
        add("bf16 batch 1 end to end", "<= 100 ms", None, None, "bf16 did not run")
    if "int8" in timing:
        q, fp = timing["int8"], timing["fp32"]
        ratio = fp["median_ms"] / q["median_ms"]
        add("int8 vs the fastest fp32 runtime, batch 1", ">= 1.2x", ratio, ratio >= 1.2,
            f"{q['median_ms']:.1f} ms vs torch:cpu_kernel:compile {fp['median_ms']:.1f} ms, interleaved (its gate: "
            f"pdd eval --precision int8 --against fp32)")
        rss = res.get("rss_mib") or {}
        if rss.get("int8") and rss.get("fp32"):
            ratio = rss["int8"]["peak_rss_mib"] / rss["fp32"]["peak_rss_mib"]
            add("int8 peak RSS vs fp32", "<= 0.6x", ratio, ratio <= 0.6,
                f"{rss['int8']['peak_rss_mib']:.0f} MiB vs {rss['fp32']['peak_rss_mib']:.0f} MiB")
    return out


def _markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [f"# Reduced precision on the CPU: {env['cpu']}", "", f"Command: `{res['command']}`", "",
             f"CPU: {env['cpu']}; flags: {', '.join(env['cpu_features']) or 'none of note'}; level "
             f"{env['instruction_set']}; {env['torch_threads']} threads; torch {env['versions']['torch']}; load "
             f"average before {res['load_average']['before']}, after {res['load_average']['after']}.", "",
             f"Model: {res['weights']}, {res['image_size']}², {res['model_gflop']:.1f} GFLOP per image.", "",
             "| precision | batch 1 median ms (interleaved) | same-precision GEMM GFLOP/s | share of it "
             "| batch 8 img/s | peak RSS MiB | map err / range vs fp32 | min Pearson | ΔAUROC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in res["interleaved"].items():
        share = res["model_gflop"] / (t["median_ms"] / 1e3) / t["gemm_gflops"]
        b8 = res["batch8"].get(name, {})
        acc = res["accuracy"].get(name) or {}
        rss = ((res.get("rss_mib") or {}).get(name) or {}).get("peak_rss_mib")
        lines.append(f"| {name} | {t['median_ms']:.1f} | {t['gemm_gflops']:.0f} | {100 * share:.0f}% | "
                     f"{b8.get('img_s', float('nan')):.1f} | {'–' if rss is None else f'{rss:.0f}'} | "
                     f"{acc.get('map_err_over_range', 0):.2e} | {acc.get('min_pearson', 1):.5f} | "
                     f"{acc.get('auroc_delta', 0):+.4f} |")
    if res["stages"]:
        names = list(next(iter(res["stages"].values())))
        lines += ["", "Each stage compiled and timed alone (median ms, batch 1):", "",
                  "| precision | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {p} | " + " | ".join(f"{ms[n]:.1f}" for n in names) + " |" for p, ms in res["stages"].items()]
    lines += ["", "| target | goal | value | met | detail |", "|---|---|---:|---|---|"]
    for t in res["targets"]:
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {t['met']} | {t['detail']} |")
    lines += ["", f"int8: the WRN teacher quantized (pdd/int8.py), observed on {res['int8_quantization']}; its GEMM "
                  "yardstick is fp32's (the quantized convolutions are oneDNN's, the rest of the model fp32)."]
    if res["refused"]:
        lines += ["", "Not run here:", ""] + [f"- {k}: {v}" for k, v in res["refused"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/cpu_precision.py", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a PDD checkpoint (default: random weights, seed 0)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the batch-1 timing")
    ap.add_argument("--batch8-calls", type=int, default=3, help="timed calls at batch 8")
    ap.add_argument("--images", type=int, default=8, help="labelled brain-synth images for the agreement columns")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--out", type=Path, default=Path("bench-precision"))
    ap.add_argument("--child-rss", choices=MODEL_PRECISIONS, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_rss:
        _child_rss(args)
        return {}
    command = "python benchmarks/cpu_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = environment()
    precisions, refused = _precisions()
    base = _model(args)
    res: dict[str, Any] = {"command": command, "environment": env, "image_size": args.image_size,
                           "load_average": {"before": env.pop("load_average"), "after": None},
                           "weights": f"checkpoint {args.checkpoint.name}" if args.checkpoint else "random (seed 0)",
                           "model_gflop": model_gflop(base, args.image_size), "refused": refused, "compile_s": {},
                           "int8_quantization": f"{base.quantization.images} images of {base.quantization.source}",
                           "batch8": {}, "accuracy": {}, "stages": {}}
    runtimes = {}
    x = np.zeros((1, 3, args.image_size, args.image_size), np.float32)
    for p in precisions:
        try:
            runtimes[p.name] = TorchRuntime(base, RUNTIME, compile=True, precision=p)
        except RuntimeUnavailable as exc:
            refused[p.name] = exc.reason
            continue
        res["compile_s"][p.name] = _timed(lambda rt=runtimes[p.name]: rt.predict(x)) / 1e3
        print(f"{p.name}: compiled in {res['compile_s'][p.name]:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="pdd-precision-") as work:
        images = brain_synth_images(args.image_size, args.images, Path(work) / "brain-synth")
    x = batch_of(images.normalised, 0, 1)
    res["interleaved"] = _interleaved(runtimes, x, args.rounds)
    outs = {n: [rt.predict(images.normalised[i:i + 1]) for i in range(len(images))] for n, rt in runtimes.items()}
    joined = {n: {k: np.concatenate([o[k] for o in v]) for k in ("pred_score", "anomaly_map")} for n, v in outs.items()}
    for name, pred in joined.items():
        acc = accuracy_vs_reference(joined["fp32"], pred, images.labels)
        ref, got = joined["fp32"]["anomaly_map"], pred["anomaly_map"]
        pearson = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ref, got)]
        res["accuracy"][name] = {"map_err_over_range": acc["map_max_rel_error"], "min_pearson": min(pearson),
                                 "auroc_delta": acc["auroc_diff"], "raw": acc}
    x8 = batch_of(images.normalised, 0, 8)
    for name, rt in runtimes.items():
        rt.predict(x8)  # compiles batch 8
        ms = statistics.median(_timed(lambda rt=rt: rt.predict(x8)) for _ in range(args.batch8_calls))
        res["batch8"][name] = {"median_ms": ms, "img_s": 8 / ms * 1e3, "calls": args.batch8_calls}
        print(f"{name}: batch 8 {8 / ms * 1e3:.1f} img/s", flush=True)
    if not args.no_stages:
        for name, rt in runtimes.items():
            res["stages"][name] = _stages(rt, x, max(3, args.rounds // 2))
            print(f"{name}: stages {res['stages'][name]}", flush=True)
    for rt in runtimes.values():
        rt.close()
    if not args.no_rss:
        with tempfile.TemporaryDirectory(prefix="pdd-rss-") as work:
            # What each child loads, as `pdd predict` would: the weights and the int8 quantization, nothing observed.
            checkpoint = Path(work) / "model.pt"
            save_pdd(base, checkpoint)
            store_quantization(checkpoint, base.quantization)
            res["rss_mib"] = {name: _peak_rss(args, name, checkpoint) for name in runtimes}
        print(f"RSS: {res['rss_mib']}", flush=True)
    res["load_average"]["after"] = list(os.getloadavg())
    res["targets"] = _targets(res)
    res["cpu"] = cpu_model()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(res, indent=2, default=str) + "\n")
    atomic_write_text(args.out / "results.md", _markdown(res))
    print(_markdown(res))
    return res


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
