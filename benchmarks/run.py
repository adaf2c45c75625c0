"""End-to-end inference benchmark of PDD over every runtime: latency, throughput, accuracy, per-stage time.

    python benchmarks/run.py [--full] [--runtimes all|cpu|gpu|NAME,...] [--batch 1,8,32] [--concurrency 1,4,16]
        [--image-size 256] [--precision fp32,fp16] [--repeats N] [--warmup N] [--out DIR]

Without options it is a quick run, a few minutes on a 2-core CPU: PyTorch (reference, eager and cpu_kernel scans,
Triton where a GPU is), ONNX Runtime on CPU and the bundled Triton Inference Server, 64² images, batch 1,
concurrency 1, 3 timed calls. ``--full`` makes the exhaustive run the default instead: every runtime,
256², batch 1,8,32, concurrency 1,4,16, 20 timed calls. Explicit options override either preset.

Runtimes (``--runtimes``; ``cpu`` and ``gpu`` name the ones that compute there)::

    torch:reference  torch:eager  torch:cpu_kernel  torch:triton
                                                        PyTorch eager, by selective-scan implementation
    torch:graph-parallel:compile  torch:triton:compile  torch.compile (inductor)
    onnxruntime:cpu:portable  onnxruntime:cpu:plugin    ONNX Runtime (export/runtime.py), by provider
    onnxruntime:cuda:portable  onnxruntime:tensorrt:portable                                  and ONNX form
    tensorrt:plugin  tensorrt:portable                  TensorRT engines (export/build_trt.py) in --artifacts
    server:http  server:grpc  server:shm                the bundled Triton Inference Server (python flavour), shm = gRPC
                                                        with system shared memory

Every runtime goes through :func:`export.runtime.make_runtime`; one that cannot run here is listed as
skipped with the reason, one that breaks as failed with the error, and the run carries on.

Measurement: inputs are labelled brain-synth test slices (generated into a temporary folder, normalised
as the model expects; ``--images`` takes an MVTec-style folder instead), cycled to fill a batch. Each
(runtime, precision, batch) gets ``--warmup`` untimed calls and ``--repeats`` timed ones; ``latency`` is
the wall time of ``predict`` (host arrays in and out; CUDA synchronised before and after), reported as
median and p50/p90/p95/p99, throughput = batch / median. On a GPU, ``compute`` is the device time of the
network alone on device-resident buffers (CUDA events), for PyTorch eager and TensorRT. The reference
scan takes one Python step per position (seconds per image on a CPU): it runs at batch 1 only, with
``--reference-repeats`` repeats and one warm-up, and its accuracy is taken from those calls' outputs.

Precision: fp32 everywhere; fp16 is PyTorch under CUDA autocast and TensorRT's typed fp16 engines; bf16 is
the C-kernel PyTorch runtimes cast by pdd.precision's policy, refused on a CPU without AMX or AVX512-BF16; int8 is
the same runtimes with the WRN teacher quantized (pdd.int8: the checkpoint's quantization, else observed on 8 normal
brain-synth slices of another seed) (ONNX Runtime and the server run the fp32 graph; other combinations are listed
as skipped). benchmarks/cpu_precision.py
measures the reduced precisions' targets (interleaved with fp32, the same-precision GEMM rate, peak RSS).
``--threads`` sets the CPU threads of PyTorch and ONNX Runtime (the served one too): on a CPU shared with other
processes, 1 thread avoids the collapse of oversubscribed thread pools.

TensorRT engines are read from ``--artifacts``: ``run.py --prepare-only --artifacts DIR`` exports the ONNX
forms (``DIR/onnx-<form>``), ``python export/build_trt.py --onnx DIR/onnx-<form>/model.onnx --precision P
--out DIR/tensorrt-<form>-<P>`` builds each engine, and a later ``run.py --artifacts DIR`` uses them after
checking they come from the same weights (benchmarks/gpu_check.py does all of it).

Accuracy: every runtime's maps and scores on the labelled images are compared with PyTorch fp32 with the
eager scan (``torch:eager``), on the same device: max map error (absolute and over the reference maps' range) and
image-AUROC difference. Per-stage time (WRN teacher, VMamba teacher, adapters and students, anomaly head):
PyTorch eager through the model's submodules; TensorRT through its layer profiler (``IProfiler``), each
layer assigned to a stage by the ONNX node names it was built from. Yardstick (when a CPU runtime runs): the
machine's 2048² fp32 GEMM rate measured in the same run, and the model's FLOPs at the run's size, so the
targets can state each CPU runtime's share of what this machine's matrix units deliver.

The server is the ``tritonserver`` bundled with nvidia-pytriton serving the portable ONNX with ONNX
Runtime in its Python backend (export/serve.py); load comes from the closed-loop generator
:func:`export.client.run_load` (perf_analyzer's fields: throughput infer/s, p50/p90/p95/p99 latency µs,
plus the engine's server-side queue and compute times from Triton's statistics), and from
``perf_analyzer`` too when it is on PATH.

Writes ``results.json`` (with versions, device, CPU count, load average before and after, command),
``results.md`` and plots (``latency.png``, ``throughput.png``, ``stages.png``) to ``--out``.
Teachers are randomly initialised unless ``--checkpoint`` is given: timings do not depend on the weights'
values, and accuracy is measured against PyTorch on the same weights, not against labels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BenchImages,
    brain_synth_images,
    environment,
    exit_on_termination,
    folder_images,
    gemm_rate,
    model_gflop,
    texture_images,
)
from benchmarks.report import markdown, plots, preset_line, short_table
from benchmarks.runners import FULL, PRECISIONS, PRESETS, QUICK, REFERENCE, RUNTIMES, SERVER, Artifacts, Bench
from benchmarks.server_runner import serve
from benchmarks.targets import best_cpu_runtime, target_pairs, targets
from pdd.checkpoint import load_model
from pdd.config import PDDConfig, atomic_write_text

__all__ = ["FULL", "PRESETS", "QUICK", "RUNTIMES", "main", "parse_args"]



# --- command line ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def _runtimes(text: str) -> list[str]:
    names: list[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in PRESETS:
            names += PRESETS[item]
        elif item in RUNTIMES:
            names.append(item)
        else:
            raise argparse.ArgumentTypeError(f"unknown runtime {item!r}; expected {', '.join(PRESETS)} or any of "
                                             f"{', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def _precisions(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values or any(v not in PRECISIONS for v in values):
        raise argparse.ArgumentTypeError(f"--precision takes a comma-separated subset of {PRECISIONS}, got {text!r}")
    return list(dict.fromkeys(values))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--full`` picks the exhaustive preset instead of the quick one (explicit options
    win over either)."""
    ap = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the exhaustive preset: every runtime, 256², batch 1,8,32, "
                                                        "concurrency 1,4,16, 20 repeats (default: the quick one)")
    ap.add_argument("--runtimes", type=_runtimes, help="'all', 'cpu', 'gpu' or comma-separated names (see above); "
                                                       f"default: quick {','.join(QUICK['runtimes'])}, full all")
    ap.add_argument("--batch", type=_ints, help=f"batch sizes (default quick {QUICK['batch']}, full {FULL['batch']})")
    ap.add_argument("--server-batch", type=_ints, help="batch sizes of the server requests (default: --batch)")
    ap.add_argument("--concurrency", type=_ints, help="server client concurrency (default quick "
                                                      f"{QUICK['concurrency']}, full {FULL['concurrency']})")
    ap.add_argument("--image-size", type=int, help="square input size, a multiple of 32 (default quick 64, full 256)")
    ap.add_argument("--precision", type=_precisions, default=["fp32"],
                    help="fp32, fp16 (CUDA, TensorRT), bf16 (the C-kernel CPU runtimes, on CPUs with AMX or "
                         "AVX512-BF16; pdd/precision.py) and/or int8 (the same runtimes, WRN teacher quantized: "
                         "pdd/int8.py) (default fp32)")
    ap.add_argument("--repeats", type=int, help="timed calls per case (default quick 3, full 20)")
    ap.add_argument("--warmup", type=int, help="untimed calls before timing (default quick 1, full 3)")
    ap.add_argument("--reference-repeats", type=int, help="timed calls of the slow reference scan (default quick 1, "
                                                          "full 2)")
    ap.add_argument("--paired-rounds", type=int,
                    help="alternating batch-1 calls per runtime for the CPU target ratios (0: off; the reference "
                         "scan gets at most --reference-repeats; default quick 2, full 6)")
    ap.add_argument("--requests", type=int, help="server requests per client and case (default: --repeats)")
    ap.add_argument("--accuracy-images", type=int, help="labelled images for the accuracy columns (default quick 4, "
                                                        "full 8)")
    ap.add_argument("--images", type=Path, help="MVTec-style folder of test images (default: generate brain-synth)")
    ap.add_argument("--checkpoint", type=Path, help="a PDD checkpoint (default: random teachers, seed 0)")
    ap.add_argument("--threads", type=int, help="CPU threads of PyTorch, ONNX Runtime and the server's ONNX "
                                                "Runtime (default: the libraries' own; 1 avoids thread "
                                                "oversubscription on a CPU other processes share)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="device of the PyTorch runtimes (default: cuda if "
                                                              "available)")
    ap.add_argument("--artifacts", type=Path, help="folder for (and of) ONNX exports and TensorRT engines, kept "
                                                   "and reused (default: a temporary folder)")
    ap.add_argument("--prepare-only", action="store_true", help="export the ONNX forms the runtimes need into "
                                                                "--artifacts and stop")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    args = ap.parse_args(argv)
    args.preset = "full" if args.full else "quick"
    defaults = FULL if args.full else QUICK
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    if args.requests is None:
        args.requests = args.repeats
    if args.server_batch is None:
        args.server_batch = args.batch
    if args.image_size < 32 or args.image_size % 32:
        ap.error(f"--image-size must be a positive multiple of 32, got {args.image_size}")
    if min(args.repeats, args.reference_repeats, args.requests) < 1 or args.warmup < 0:
        ap.error("--repeats, --reference-repeats and --requests must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.accuracy_images < 2:
        ap.error("--accuracy-images must be >= 2 (one normal and one anomalous image at least)")
    if args.prepare_only and args.artifacts is None:
        ap.error("--prepare-only needs --artifacts (where the exports are kept)")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --- main -----------------------------------------------------------------------------------------------


def _build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    logging.getLogger("pdd.model").setLevel(logging.ERROR)
    if args.checkpoint is not None:
        model = load_model(args.checkpoint, scan_impl="eager", image_size=args.image_size)
        return model, f"weights from checkpoint {args.checkpoint.name}"
    torch.manual_seed(0)
    model = load_model(config=PDDConfig(), scan_impl="eager", image_size=args.image_size)
    return model, ("random teachers and students (seed 0): timings do not depend on weight values; accuracy "
                   "compares runtimes on the same weights, AUROC values themselves are not meaningful")


def _load_images(args: argparse.Namespace, work: Path) -> BenchImages:
    if args.images is not None:
        return folder_images(args.images, args.image_size, args.accuracy_images)
    try:
        return brain_synth_images(args.image_size, args.accuracy_images, work / "brain-synth")
    except ImportError as exc:  # nilearn (the MNI template) missing: say so, and use textures
        return texture_images(args.image_size, args.accuracy_images, f"{exc}")


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="pdd-bench-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _new_result(args: argparse.Namespace, command: str, env: dict[str, Any], images: str,
                weights: str) -> dict[str, Any]:
    """results.json before anything is measured."""
    return {
        "schema": 1, "complete": False, "command": command, "environment": env,
        "load_average": {"before": env.pop("load_average"), "after": None},
        "config": {"image_size": args.image_size, "batch": args.batch, "server_batch": args.server_batch,
                   "concurrency": args.concurrency,
                   "precision": args.precision, "repeats": args.repeats, "warmup": args.warmup,
                   "reference_repeats": args.reference_repeats, "requests": args.requests,
                   "accuracy_images": args.accuracy_images, "device": args.device, "preset": args.preset,
                   "threads": args.threads, "runtimes": args.runtimes, "images": images,
                   "weights": weights},
        "runtimes": [], "targets": [], "notes": [], "plots": [],
    }


def _measure_inprocess(bench: Bench, args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    """Every in-process runtime at every precision, the reference first (the others' accuracy columns need it)."""
    inprocess = [n for n in args.runtimes if n not in SERVER]
    ordered = ([REFERENCE] if REFERENCE in inprocess else []) + [n for n in inprocess if n != REFERENCE]
    if REFERENCE not in inprocess or "fp32" not in args.precision:
        bench.ensure_reference()
    precisions = sorted(args.precision, key=lambda p: p != "fp32")  # fp32 first: the reference is fp32
    for name in ordered:
        for precision in precisions:
            print(f"{name} {precision}", flush=True)
            record(bench.measure(name, precision))
            if name == REFERENCE and precision == "fp32" and bench.reference is None:
                bench.ensure_reference()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results dict (also written to ``--out``).

    ``results.json`` is rewritten after every runtime (with ``"complete": false``), so a run stopped by a
    time limit still leaves what it measured.
    """
    args = parse_args(argv)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _workdir() as work:
        model, weights = _build_model(args)
        artifacts = Artifacts(args.artifacts or work / "artifacts", model, args.image_size,
                              max(*args.batch, *args.server_batch),
                              portable_scan="graph-parallel" if args.device == "cuda" else "graph-sequential")
        artifacts.folder.mkdir(parents=True, exist_ok=True)
        if args.prepare_only:
            forms = sorted({n.split(":")[-1] for n in args.runtimes if n.startswith(("onnxruntime", "tensorrt"))}
                           | ({"portable"} if any(n in SERVER for n in args.runtimes) else set()))
            for form in forms:
                print(f"{form}: {artifacts.onnx(form)}", flush=True)
            return {"artifacts": str(artifacts.folder), "forms": forms}
        bench_images = _load_images(args, work)
        bench = Bench(args, model, bench_images, artifacts, work)
        result = _new_result(args, command, env, bench_images.source, weights)
        print(preset_line(result["config"]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)

        def record(entry: dict[str, Any]) -> None:
            if entry["status"] != "ok":
                print(f"  {entry['status']}: {entry['reason']}", flush=True)
            result["runtimes"].append(entry)
            atomic_write_text(args.out / "results.json", json.dumps(result, indent=2, default=str) + "\n")

        _measure_inprocess(bench, args, record)
        if any(bench.device_of(n) == "cpu" for n in args.runtimes):
            gemm = gemm_rate()
            result["yardstick"] = {"gemm_gflops": gemm["gflops"], "gemm_size": gemm["size"],
                                   "threads": gemm["threads"], "model_gflop": model_gflop(model, args.image_size)}
            print(f"yardstick: {gemm['size']}² fp32 GEMM {gemm['gflops']:.0f} GFLOP/s on {gemm['threads']} threads; "
                  f"PDD {result['yardstick']['model_gflop']:.1f} GFLOP per image", flush=True)
        result["paired"] = []
        if args.paired_rounds:
            for a, b, rounds in target_pairs(result["runtimes"], args.paired_rounds):
                result["paired"].append(bench.paired(a, b, rounds))
            if result.get("yardstick") and (best := best_cpu_runtime(result["runtimes"])):
                result["yardstick"]["alternating"] = bench.gemm_alternating(best, args.paired_rounds)
        servers = [n for n in args.runtimes if n in SERVER]
        if servers:
            for entry in serve(bench, servers):
                record(entry)
    result["notes"] = [bench.reference_note] if bench.reference_note else []
    result["load_average"]["after"] = list(os.getloadavg())
    result["targets"] = targets(result["runtimes"], args.image_size, result.get("paired", []),
                                result.get("yardstick"))
    result["plots"] = plots(result, args.out)
    result["complete"] = True
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(args.out / "results.md", markdown(result))
    print(f"\nwrote {args.out / 'results.json'}, results.md and {', '.join(result['plots']) or 'no plots'}\n")
    print(short_table(result))
    return result


if __name__ == "__main__":
    exit_on_termination()
    main()
