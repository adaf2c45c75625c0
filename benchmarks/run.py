"""End-to-end inference benchmark of PDD over every runtime: latency, throughput, accuracy, per-stage time.

    python benchmarks/run.py [--full] [--runtimes all|cpu|gpu|NAME,...] [--batch 1,8,32] [--concurrency 1,4,16]
        [--image-size 256] [--precision fp32,fp16] [--repeats N] [--warmup N] [--out DIR]

Without options it is a quick run, a few minutes on a 2-core CPU: PyTorch (reference and chunked scans,
Triton where a GPU is), ONNX Runtime on CPU and the bundled Triton server, 64² images, batch 1,
concurrency 1, 3 timed calls. ``--full`` makes the exhaustive run the default instead: every runtime,
256², batch 1,8,32, concurrency 1,4,16, 20 timed calls. Explicit options override either preset.

Runtimes (``--runtimes``; ``cpu`` and ``gpu`` name the ones that compute there)::

    torch:reference  torch:chunked  torch:cpu_kernel  torch:triton
                                                        PyTorch eager, by selective-scan implementation
    torch:chunked:compile  torch:triton:compile         torch.compile (inductor)
    onnxruntime:cpu:portable  onnxruntime:cpu:plugin    ONNX Runtime (export/runtime.py), by provider
    onnxruntime:cuda:portable  onnxruntime:tensorrt:portable                                  and ONNX form
    tensorrt:plugin  tensorrt:portable                  TensorRT engines (export/build_trt.py) in --artifacts
    server:http  server:grpc  server:shm                the bundled Triton server (python flavour), shm = gRPC
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

Precision: fp32 everywhere; fp16 is PyTorch under CUDA autocast and TensorRT's typed fp16 engines (ONNX
Runtime and the server run the fp32 graph; other combinations are listed as skipped). ``--threads`` sets
the CPU threads of PyTorch and ONNX Runtime (the served one too): on a CPU shared with other processes,
1 thread avoids the collapse of oversubscribed thread pools.

TensorRT engines are read from ``--artifacts``: ``run.py --prepare-only --artifacts DIR`` exports the ONNX
forms (``DIR/onnx-<form>``), ``python export/build_trt.py --onnx DIR/onnx-<form>/model.onnx --precision P
--out DIR/tensorrt-<form>-<P>`` builds each engine, and a later ``run.py --artifacts DIR`` uses them after
checking they come from the same weights (benchmarks/gpu_check.py does all of it).

Accuracy: every runtime's maps and scores on the labelled images are compared with PyTorch fp32 eager with
the chunked scan, on the same device: max map error (absolute and over the reference maps' range) and
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
import csv
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    PERCENTILES,
    STAGES,
    BenchImages,
    accuracy_vs_reference,
    batch_of,
    brain_synth_images,
    environment,
    exit_on_termination,
    folder_images,
    free_ports,
    gemm_rate,
    group_layer_times,
    latency_stats,
    model_gflop,
    onnx_node_stages,
    package_version,
    texture_images,
    time_calls,
    time_cuda_events,
)
from export.runtime import Runtime, RuntimeUnavailable, make_runtime
from pdd.config import atomic_write_text

log = logging.getLogger("benchmarks.run")

TORCH = ("torch:reference", "torch:chunked", "torch:cpu_kernel", "torch:triton", "torch:chunked:compile",
         "torch:triton:compile")
ONNXRUNTIME = ("onnxruntime:cpu:portable", "onnxruntime:cpu:plugin", "onnxruntime:cuda:portable",
               "onnxruntime:tensorrt:portable")
TENSORRT = ("tensorrt:plugin", "tensorrt:portable")
SERVER = ("server:http", "server:grpc", "server:shm")
RUNTIMES = TORCH + ONNXRUNTIME + TENSORRT + SERVER
PRESETS = {
    "all": RUNTIMES,
    "cpu": ("torch:reference", "torch:chunked", "torch:cpu_kernel", "torch:chunked:compile",
            "onnxruntime:cpu:portable", "onnxruntime:cpu:plugin", *SERVER),
    "gpu": ("torch:reference", "torch:chunked", "torch:triton", "torch:chunked:compile", "torch:triton:compile",
            "onnxruntime:cuda:portable", "onnxruntime:tensorrt:portable", *TENSORRT),
}
PRECISIONS = ("fp32", "fp16")
REFERENCE = "torch:chunked"  # accuracy is measured against this runtime in fp32
SLOW = "torch:reference"
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}
_FINGERPRINT = "model-fingerprint.txt"
_PERF_ANALYZER_FIELDS = {"Inferences/Second": "throughput_infer_per_sec", "p50 latency": "p50_latency_us",
                         "p90 latency": "p90_latency_us", "p95 latency": "p95_latency_us",
                         "p99 latency": "p99_latency_us", "Avg latency": "avg_latency_us",
                         "Server Queue": "server_queue_us", "Server Compute Input": "server_compute_input_us",
                         "Server Compute Infer": "server_compute_infer_us",
                         "Server Compute Output": "server_compute_output_us"}
# The default run: what runs on any machine, small enough for a few minutes on a 2-core CPU (no compile,
# no plugin form, TensorRT only from prebuilt engines).
QUICK = {"runtimes": ["torch:reference", "torch:chunked", "torch:cpu_kernel", "torch:triton",
                      "onnxruntime:cpu:portable", *SERVER],
         "image_size": 64, "batch": [1], "concurrency": [1], "repeats": 3, "warmup": 1, "reference_repeats": 1,
         "accuracy_images": 4, "paired_rounds": 2}
# --full: every runtime at the size and batches the targets are stated for.
FULL = {"runtimes": list(RUNTIMES), "image_size": 256, "batch": [1, 8, 32], "concurrency": [1, 4, 16], "repeats": 20,
        "warmup": 3, "reference_repeats": 2, "accuracy_images": 8, "paired_rounds": 6}


class RuntimeFailed(RuntimeError):
    """A runtime's preparation failed (e.g. its ONNX export); recorded as failed, not skipped."""


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
    ap.add_argument("--precision", type=_precisions, default=["fp32"], help="fp32 and/or fp16 (default fp32)")
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


# --- helpers --------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: ties exported artifacts to the weights they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _entry(name: str, precision: str, device: str) -> dict[str, Any]:
    return {"runtime": name, "precision": precision, "device": device, "status": "ok", "reason": None,
            "setup_s": None, "notes": [], "latency": [], "compute": [], "skipped_batches": [], "accuracy": None,
            "stages": None}


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 1500 else text[:1500] + " …"


def _median_ms(rows: list[dict[str, Any]], batch: int) -> float | None:
    return next((r["median_ms"] for r in rows if r["batch"] == batch), None)


# --- the benchmark --------------------------------------------------------------------------------------


class Artifacts:
    """ONNX exports and TensorRT engines of one model in a folder, tied to its weights by a fingerprint.

    Layout: ``onnx-<form>/model.onnx`` (+ ``model.json``), ``tensorrt-<form>-<precision>/`` (from
    export/build_trt.py) and ``model-fingerprint.txt``. An export is reused when it matches the fingerprint,
    the image size and the batch range.
    """

    def __init__(self, folder: Path, model: torch.nn.Module, image_size: int, max_batch: int,
                 scan_graph: str = "sequential") -> None:
        self.folder, self.model, self.size, self.max_batch = folder, model, image_size, max_batch
        self.scan_graph = scan_graph  # how portable scans join their chunks: sequential on CPU, parallel on GPU
        self._fingerprint: str | None = None
        self._errors: dict[str, str] = {}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def _stamped(self) -> bool:
        stamp = self.folder / _FINGERPRINT
        return stamp.is_file() and stamp.read_text().strip() == self.fingerprint()

    def onnx(self, form: str) -> Path:
        """``onnx-<form>/model.onnx`` for this model, size and batch range (exported unless reusable)."""
        from export.metadata import read_onnx_metadata
        from export.onnx_export import export_onnx

        if form in self._errors:
            raise RuntimeFailed(self._errors[form])
        path = self.folder / f"onnx-{form}" / "model.onnx"
        if path.is_file() and path.with_suffix(".json").is_file() and self._stamped():
            meta = read_onnx_metadata(path)
            if (tuple(meta.image_size) == (self.size, self.size) and meta.batch[0] <= 1
                    and meta.batch[1] >= self.max_batch and not meta.preprocess
                    and (form != "portable" or meta.scan_graph == self.scan_graph)):
                return path
        print(f"exporting the {form} ONNX form ({self.size}², batch 1..{self.max_batch}"
              f"{f', {self.scan_graph} scans' if form == 'portable' else ''}) …", flush=True)
        start = time.perf_counter()
        try:
            export_onnx(self.model, path.parent, form=form, batch=(1, max(self.max_batch, 2)), image_size=self.size,
                        scan_graph=self.scan_graph)
        except Exception as exc:  # one failed export skips its runtimes, not the benchmark
            self._errors[form] = f"ONNX export of the {form} form failed: {_error_text(exc)}"
            raise RuntimeFailed(self._errors[form]) from exc
        atomic_write_text(self.folder / _FINGERPRINT, self.fingerprint() + "\n")
        print(f"  exported in {time.perf_counter() - start:.0f} s", flush=True)
        return path

    def engine_dir(self, form: str, precision: str) -> Path:
        """``tensorrt-<form>-<precision>``, checked to be built from this folder's export of this model."""
        from export.metadata import read_engine_metadata, read_onnx_metadata

        folder = self.folder / f"tensorrt-{form}-{precision}"
        build = (f"python export/build_trt.py --onnx {self.folder}/onnx-{form}/model.onnx --precision {precision} "
                 f"--batch 1:{self.max_batch}:{self.max_batch} --out {folder}")
        if not (folder / "engine.json").is_file():
            raise RuntimeUnavailable(f"no {precision} engine of the {form} form at {folder}; build it with "
                                     f"`python benchmarks/run.py --prepare-only --artifacts {self.folder}` then "
                                     f"`{build}`")
        source = self.folder / f"onnx-{form}" / "model.json"
        if not source.is_file() or not self._stamped():
            raise RuntimeUnavailable(f"{folder} was not built from an export of this run's model; rebuild: `{build}`")
        if read_engine_metadata(folder).onnx_sha256 != read_onnx_metadata(source).sha256:
            raise RuntimeUnavailable(f"{folder} was built from another ONNX file than {source}; rebuild: `{build}`")
        return folder


class Bench:
    """One benchmark run: the model, the images, the artifacts and the reference predictions."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, images: BenchImages, artifacts: Artifacts,
                 work: Path) -> None:
        self.args, self.model, self.images = args, model, images
        self.artifacts, self.work = artifacts, work
        self.device = args.device
        self.size = args.image_size
        self._models: dict[str, torch.nn.Module] = {"cpu": model}
        self.reference: dict[str, np.ndarray] | None = None
        self.reference_note: str | None = None

    def model_on(self, device: str) -> torch.nn.Module:
        """The model on ``device`` (one copy per device, shared by the PyTorch runtimes there)."""
        if device not in self._models:
            import copy

            self._models[device] = copy.deepcopy(self.model).to(device)
        return self._models[device]

    # runtimes

    def device_of(self, name: str) -> str:
        """Where a runtime computes: the Triton scan, ONNX Runtime's GPU providers and TensorRT on CUDA."""
        if name.startswith(("torch:triton", "onnxruntime:cuda", "onnxruntime:tensorrt", "tensorrt")):
            return "cuda"
        return "cpu" if name.startswith(("onnxruntime:cpu", "torch:cpu_kernel")) else self.device

    def make(self, name: str, precision: str) -> Runtime:
        """The runtime ``name`` at ``precision``; :class:`RuntimeUnavailable` when it cannot run here."""
        kind, *rest = name.split(":")
        if kind == "torch":
            device = self.device_of(name)
            if precision == "fp16" and device != "cuda":
                raise RuntimeUnavailable("fp16 PyTorch runs under CUDA autocast; on the CPU PyTorch has no fast "
                                         "fp16 convolutions, so it is not measured there")
            if device == "cuda" and not torch.cuda.is_available():
                raise RuntimeUnavailable(f"{name} needs a CUDA device; none is visible here")
            return make_runtime(name, model=self.model_on(device), device=device)
        if kind == "onnxruntime":
            provider, form = rest
            if precision != "fp32":
                raise RuntimeUnavailable("ONNX Runtime runs the exported fp32 graph; the typed fp16 graph is built "
                                         "for TensorRT (export/build_trt.py)")
            try:
                import onnxruntime
            except ImportError:
                raise RuntimeUnavailable("onnxruntime is not installed (pip install -e '.[export]')") from None

            if _ORT_PROVIDERS[provider] not in onnxruntime.get_available_providers():
                raise RuntimeUnavailable(f"this ONNX Runtime has no {_ORT_PROVIDERS[provider]} (available: "
                                         f"{onnxruntime.get_available_providers()})")
            if form == "plugin" and package_version("onnxruntime-extensions") is None:
                raise RuntimeUnavailable("the plugin form runs its custom ops through onnxruntime-extensions, "
                                         "which is not installed")
            return make_runtime(name, onnx_path=self.artifacts.onnx(form), threads=self.args.threads)
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise RuntimeUnavailable("TensorRT is not installed here") from None
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("TensorRT needs a CUDA GPU; none is visible here")
        return make_runtime(f"tensorrt:{precision}", engine_dir=self.artifacts.engine_dir(rest[0], precision))

    def _autocast(self, name: str, precision: str) -> contextlib.AbstractContextManager:
        if name.startswith("torch") and precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def measure(self, name: str, precision: str) -> dict[str, Any]:
        """Everything about one in-process runtime at one precision (never raises)."""
        entry = _entry(name, precision, self.device_of(name))
        start = time.perf_counter()
        try:
            rt = self.make(name, precision)
        except RuntimeUnavailable as exc:
            entry.update(status="skipped", reason=exc.reason)
            return entry
        except Exception as exc:  # recorded, and the benchmark goes on with the next runtime
            entry.update(status="failed", reason=_error_text(exc))
            return entry
        entry["setup_s"] = time.perf_counter() - start
        entry["device"] = rt.device
        try:
            self._measure(rt, name, precision, entry)
        except Exception as exc:  # e.g. out of memory at a large batch: keep what was measured
            log.debug("%s failed", name, exc_info=True)
            entry.update(status="failed", reason=_error_text(exc))
        finally:
            rt.close()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return entry

    def paired(self, a: str, b: str, rounds: int) -> dict[str, Any]:
        """fp32 batch-1 latency of runtimes ``a`` and ``b`` measured in alternation (a b, b a, a b, ...).

        On a machine whose speed drifts (shared CPUs), runtimes measured one after the other see
        different conditions; alternating calls see the same, so their ratio is the fair one.
        """
        out: dict[str, Any] = {"a": a, "b": b, "rounds": rounds, "order": "alternating, one warm-up call each"}
        runtimes: dict[str, Runtime] = {}
        try:
            for name in (a, b):
                runtimes[name] = self.make(name, "fp32")
            x = batch_of(self.images.normalised, 0, 1)
            times: dict[str, list[float]] = {a: [], b: []}
            for name in (a, b):
                runtimes[name].predict(x)
            for i in range(rounds):
                for name in ((a, b) if i % 2 == 0 else (b, a)):
                    start = time.perf_counter()
                    runtimes[name].predict(x)
                    times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            out.update(status="ok", a_ms=med[a], b_ms=med[b], ratio=med[a] / med[b],
                       times_ms={name: [v * 1e3 for v in t] for name, t in times.items()})
        except Exception as exc:  # recorded; the targets then fall back to the sequential medians
            out.update(status="failed", reason=_error_text(exc))
        finally:
            for rt in runtimes.values():
                rt.close()
        print(f"paired {a} vs {b}: " + (f"{out['a_ms']:.0f} ms vs {out['b_ms']:.0f} ms, ratio {out['ratio']:.2f}"
                                       if out["status"] == "ok" else out["reason"]), flush=True)
        return out

    def _measure(self, rt: Runtime, name: str, precision: str, entry: dict[str, Any]) -> None:
        args, images = self.args, self.images
        cuda = rt.device.startswith("cuda")
        slow = name == SLOW
        batches = [1] if slow else list(args.batch)
        if slow:
            entry["notes"].append(f"reference scan: batch 1 only, 1 warm-up and {args.reference_repeats} timed calls "
                                  "(one Python step per scan position); accuracy on the images of those calls")
            entry["skipped_batches"] = [{"batch": b, "reason": "the reference scan runs at batch 1 only"}
                                        for b in args.batch if b != 1]
        warmup, repeats = (min(args.warmup, 1), args.reference_repeats) if slow else (args.warmup, args.repeats)
        seen: dict[int, tuple[float, np.ndarray]] = {}
        n = len(images)
        for batch in batches:
            try:
                self._time_batch(rt, name, precision, batch, warmup, repeats, seen, entry, compute=cuda and not slow)
            except Exception as exc:  # e.g. out of memory at the largest batch: the other batches still count
                log.debug("%s batch %d failed", name, batch, exc_info=True)
                entry["skipped_batches"].append({"batch": batch, "reason": f"failed: {_error_text(exc)}"})
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if not entry["latency"]:
            raise RuntimeError(f"every batch size failed; {entry['skipped_batches'][-1]['reason']}")
        if cuda and not entry["compute"] and not slow:
            entry["notes"].append("compute time not separated from predict() for this runtime")
        if not slow:
            for i in range(n):
                if i not in seen:
                    with self._autocast(name, precision):
                        out = rt.predict(images.normalised[i:i + 1])
                    seen[i] = (float(out["pred_score"][0]), out["anomaly_map"][0])
        order = sorted(seen)
        pred = {"pred_score": np.asarray([seen[i][0] for i in order], np.float32),
                "anomaly_map": np.stack([seen[i][1] for i in order])}
        if name == REFERENCE and precision == "fp32" and len(order) == n:
            self.reference = pred
        entry["accuracy"] = self.accuracy(pred, order)
        stage_batch = min(args.batch)
        if name.startswith("torch") and not name.endswith(":compile") and not slow:
            entry["stages"] = self._torch_stages(rt, name, precision, stage_batch, cuda)
        elif name.startswith("tensorrt"):
            entry["stages"] = self._tensorrt_stages(rt, stage_batch)

    def _time_batch(self, rt: Runtime, name: str, precision: str, batch: int, warmup: int, repeats: int,
                    seen: dict[int, tuple[float, np.ndarray]], entry: dict[str, Any], compute: bool) -> None:
        """Latency rows (and on CUDA device-resident compute rows) of one batch size; batch-1 outputs into ``seen``."""
        images, n = self.images, len(self.images)
        sync = torch.cuda.synchronize if rt.device.startswith("cuda") else None
        calls = itertools.count()

        def call() -> None:
            # Consecutive calls take consecutive images, so timed batch-1 calls also cover the accuracy set.
            i = next(calls)
            with self._autocast(name, precision):
                out = rt.predict(batch_of(images.normalised, i * batch, batch))
            if batch == 1:
                seen[i % n] = (float(out["pred_score"][0]), out["anomaly_map"][0])

        print(f"  {name} {precision} batch {batch}: {warmup} warm-up + {repeats} timed", flush=True)
        first = None
        if warmup:
            start = time.perf_counter()
            call()
            first = (time.perf_counter() - start) * 1e3
        stats = latency_stats(time_calls(call, max(warmup - 1, 0), repeats, sync))
        entry["latency"].append({"batch": batch, "warmup": warmup, "first_call_ms": first, "timing": "wall, predict()",
                                 **stats, "throughput_img_s": batch / stats["median_ms"] * 1e3})
        fn = self._compute_fn(rt, name, precision, batch) if compute else None
        if fn is not None:
            stats = latency_stats(time_cuda_events(fn, warmup, repeats))
            entry["compute"].append({"batch": batch, "warmup": warmup, "timing": "CUDA events, device-resident",
                                     **stats, "throughput_img_s": batch / stats["median_ms"] * 1e3})

    def accuracy(self, pred: dict[str, np.ndarray], order: list[int]) -> dict[str, Any] | None:
        """Accuracy of ``pred`` (the images ``order``) against the reference, None when there is none."""
        if self.reference is None:
            return None
        ref = {k: v[order] for k, v in self.reference.items()}
        return accuracy_vs_reference(ref, pred, self.images.labels[order])

    def ensure_reference(self) -> None:
        """Reference predictions from a PyTorch fp32 chunked runtime when the run does not measure one."""
        try:
            with make_runtime(REFERENCE, model=self.model_on(self.device), device=self.device) as rt:
                parts = [rt.predict(self.images.normalised[i:i + 1]) for i in range(len(self.images))]
        except Exception as exc:  # without a reference the accuracy columns stay empty, with the reason
            self.reference_note = f"no accuracy reference: {REFERENCE} fp32 failed ({_error_text(exc)})"
            return
        self.reference = {k: np.concatenate([p[k] for p in parts]) for k in ("pred_score", "anomaly_map")}
        self.reference_note = f"{REFERENCE} fp32 was not measured; it was run once for the accuracy reference"

    def _compute_fn(self, rt: Runtime, name: str, precision: str, batch: int) -> Callable[[], Any] | None:
        """The network alone on device-resident buffers (PyTorch eager, TensorRT); None for the others."""
        x = batch_of(self.images.normalised, 0, batch)
        if name.startswith("torch") and not name.endswith(":compile"):
            model, xd = rt.model, torch.from_numpy(x).to(rt.device)

            def forward() -> Any:
                with torch.inference_mode(), self._autocast(name, precision):
                    return model(xd)

            return forward
        if name.startswith("tensorrt"):
            return _TrtBuffers(rt, x).run
        return None

    def _torch_stages(self, rt: Runtime, name: str, precision: str, batch: int, cuda: bool) -> dict[str, Any]:
        """Median ms of each stage run alone through the model's submodules, on device-resident input."""
        model = rt.model
        x = torch.from_numpy(batch_of(self.images.normalised, 0, batch)).to(rt.device)
        size = (self.size, self.size)
        with torch.inference_mode(), self._autocast(name, precision):
            y, z = tuple(model.teachers.wrn(x)), tuple(model.teachers.vmamba(x))
            feats = model.students(y, z)
            parts = {"wrn_teacher": lambda: model.teachers.wrn(x), "vmamba_teacher": lambda: model.teachers.vmamba(x),
                     "adapters_students": lambda: model.students(y, z),
                     "anomaly_head": lambda: model.head(feats, size)}
            ms = {}
            for stage, fn in parts.items():
                if cuda:
                    times = time_cuda_events(fn, self.args.warmup, self.args.repeats)
                else:
                    times = time_calls(fn, min(self.args.warmup, 1), self.args.repeats)
                ms[stage] = latency_stats(times)["median_ms"]
        return {"batch": batch, "method": "PyTorch submodules, each timed alone (median)" +
                (", CUDA events" if cuda else ", wall clock"), "ms": ms, "sum_ms": sum(ms.values())}

    def _tensorrt_stages(self, rt: Runtime, batch: int) -> dict[str, Any]:
        """Per-layer times from TensorRT's profiler, grouped by the stage of the ONNX nodes behind each layer."""
        import tensorrt as trt

        class LayerTimes(trt.IProfiler):
            def __init__(self) -> None:
                super().__init__()
                self.ms: dict[str, list[float]] = {}

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                self.ms.setdefault(layer_name, []).append(ms)

        # The runtime's own context: it is closed after this, so the profiler left on it does no harm.
        buffers = _TrtBuffers(rt, batch_of(self.images.normalised, 0, batch))
        profiler = LayerTimes()
        buffers.context.profiler = profiler
        # By default each enqueue reports its layers itself; otherwise the report has to be asked for.
        deferred = not getattr(buffers.context, "enqueue_emits_profile", True)
        for _ in range(self.args.repeats):
            buffers.run()
            torch.cuda.synchronize()
            if deferred:
                buffers.context.report_to_profiler()
        per_layer = {k: float(np.mean(v)) for k, v in profiler.ms.items()}
        network = self.artifacts.folder / f"tensorrt-{rt.metadata.onnx_form}-{rt.metadata.precision}" / "network.onnx"
        stages = group_layer_times(per_layer, onnx_node_stages(network)) if network.is_file() else {}
        top = sorted(per_layer.items(), key=lambda kv: -kv[1])[:10]
        return {"batch": batch, "method": "TensorRT IProfiler, mean per layer, grouped by ONNX node stage",
                "ms": stages, "sum_ms": sum(per_layer.values()), "layers": len(per_layer),
                "top_layers": [{"layer": k, "ms": v} for k, v in top]}

    # server

    def serve(self, names: list[str]) -> list[dict[str, Any]]:
        """Entries of the Triton-server runtimes ``names`` (fp32; one server started for all of them)."""
        entries = [_entry(n, "fp32", "server") for n in names]
        skipped = [_entry(n, p, "server") for n in names for p in self.args.precision if p != "fp32"]
        for e in skipped:
            e.update(status="skipped", reason="the bundled server serves the portable fp32 ONNX with ONNX Runtime")
        if "fp32" not in self.args.precision:
            return skipped
        try:
            server = self._start_server()
        except RuntimeUnavailable as exc:
            for e in entries:
                e.update(status="skipped", reason=exc.reason)
            return entries + skipped
        except Exception as exc:  # the in-process results still get written
            for e in entries:
                e.update(status="failed", reason=_error_text(exc))
            return entries + skipped
        try:
            for entry in entries:
                try:
                    self._load(server, entry)
                except Exception as exc:  # one protocol failing leaves the others
                    entry.update(status="failed", reason=_error_text(exc))
        finally:
            server.stop()
        return entries + skipped

    def _start_server(self) -> Any:
        if package_version("tritonclient") is None:
            raise RuntimeUnavailable("tritonclient is not installed (pip install -e '.[serve]')")
        from export.serve import ServerError, TritonServer, find_tritonserver
        from export.triton_repo import build_triton_repo

        try:
            find_tritonserver()
        except ServerError as exc:
            raise RuntimeUnavailable(str(exc)) from None
        onnx = self.artifacts.onnx("portable")
        print("starting the Triton server (python flavour) …", flush=True)
        repo = build_triton_repo(self.work / "triton-repo", flavour="python", engine_dir=onnx.parent,
                                 max_batch_size=self.artifacts.max_batch, image_size=self.size)
        if self.args.threads:
            _set_engine_threads(repo, self.args.threads)
        http, grpc, metrics = free_ports(3)
        server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                              log=self.work / "tritonserver.log")
        try:
            server.start(timeout_s=600)
        except ServerError as exc:
            raise RuntimeUnavailable(f"the bundled Triton server did not start: {exc}") from None
        return server

    def _load(self, server: Any, entry: dict[str, Any]) -> None:
        from benchmarks.serve_bench import server_step_stats
        from export.client import PDDClient, run_load

        protocol = "http" if entry["runtime"] == "server:http" else "grpc"
        shm = entry["runtime"] == "server:shm"
        url = server.http_url if protocol == "http" else server.grpc_url
        factory = functools.partial(PDDClient, url, protocol=protocol, shm=shm, timeout_s=600.0)
        entry["notes"].append(f"bundled tritonserver, python flavour (ONNX Runtime CPU in the Python backend), "
                              f"{protocol.upper()}{' + system shared memory' if shm else ''}; "
                              f"{self.args.requests} requests per client after 1 warm-up")
        pixels, n = self.images.pixels, len(self.images)
        seen: dict[int, tuple[float, np.ndarray]] = {}
        perf = shutil.which("perf_analyzer")
        entry["perf_analyzer"] = [] if perf else "not on PATH"
        for batch in self.args.server_batch:
            payloads = [batch_of(pixels, k * batch, batch) for k in range(n)]
            for conc in self.args.concurrency:
                print(f"  {entry['runtime']} batch {batch} concurrency {conc}", flush=True)
                before = server_step_stats(server.grpc_url)
                stats = run_load(factory, payloads, conc, self.args.requests, warmup=1, timeout_s=1800.0,
                                 keep_outputs=batch == 1)
                after = server_step_stats(server.grpc_url)
                for index, pred in stats.pop("outputs", []):
                    seen[index] = (float(pred["pred_score"][0]), pred["anomaly_map"][0])
                entry["latency"].append({"batch": batch, "concurrency": conc, "tool": "run_load", **stats,
                                         **_server_split(before, after)})
                if perf:
                    entry["perf_analyzer"].append(_perf_analyzer(perf, url, protocol, shm, batch, conc, pixels,
                                                                 self.args.requests, self.work))
        if not any(r["completed"] for r in entry["latency"]):
            raise RuntimeError(f"no request succeeded: {entry['latency'][0]['error_messages']}")
        missing = [i for i in range(n) if i not in seen]
        if missing:
            with factory() as client:
                for i in missing:
                    out = client.predict(pixels[i:i + 1])
                    seen[i] = (float(out["pred_score"][0]), out["anomaly_map"][0])
        order = sorted(seen)
        entry["accuracy"] = self.accuracy({"pred_score": np.asarray([seen[i][0] for i in order], np.float32),
                                           "anomaly_map": np.stack([seen[i][1] for i in order])}, order)


class _TrtBuffers:
    """A TensorRT execution on device-resident input and output buffers (no host copies)."""

    def __init__(self, rt: Any, images: np.ndarray) -> None:
        import tensorrt as trt

        from export.onnx_export import INPUT_NAME

        engine = rt.engine
        self.context = rt.context

        def dtype(name: str) -> torch.dtype:
            return getattr(torch, np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)

        self.input = torch.from_numpy(images).to("cuda").to(dtype(INPUT_NAME))
        self.context.set_input_shape(INPUT_NAME, tuple(self.input.shape))
        self.context.set_tensor_address(INPUT_NAME, self.input.data_ptr())
        self.outputs = {}
        for name in rt.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            self.outputs[name] = torch.empty(shape, dtype=dtype(name), device="cuda")
            self.context.set_tensor_address(name, self.outputs[name].data_ptr())

    def run(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for input {tuple(self.input.shape)}")


def _set_engine_threads(repo: Path, threads: int) -> None:
    """Give the served engine's ONNX Runtime session ``threads`` intra-op threads (its config parameter)."""
    from google.protobuf import text_format

    from export.triton_repo import ENGINE, parse_config

    path = repo / ENGINE / "config.pbtxt"
    cfg = parse_config(path)
    cfg.parameters["intra_op_threads"].string_value = str(threads)
    path.write_text(f"# Generated by export/triton_repo.py; intra_op_threads = {threads} set by benchmarks/run.py "
                    f"--threads.\n\n{text_format.MessageToString(cfg, use_short_repeated_primitives=True)}",
                    encoding="utf-8")


def _server_split(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Mean per-request server-side times of the engine between two statistics snapshots, in µs."""
    count = after["count"] - before["count"]
    if count <= 0:
        return {}
    return {f"server_{phase}_us": (after[f"{phase}_ns"] - before[f"{phase}_ns"]) / count / 1e3
            for phase in ("queue", "compute_input", "compute_infer", "compute_output")}


def _perf_analyzer(exe: str, url: str, protocol: str, shm: bool, batch: int, concurrency: int, pixels: np.ndarray,
                   requests: int, work: Path) -> dict[str, Any]:
    """One perf_analyzer measurement on the real images; its CSV row under our field names."""
    data = work / "perf-analyzer-input.json"
    data.write_text(json.dumps({"data": [{"images": {"content": p.reshape(-1).tolist(), "shape": list(p.shape)}}
                                         for p in pixels]}))
    report = work / f"perf-analyzer-{protocol}-{int(shm)}-{batch}-{concurrency}.csv"
    cmd = [exe, "-m", "pdd", "-u", url, "-i", protocol, "-b", str(batch), "--concurrency-range",
           f"{concurrency}:{concurrency}", "--input-data", str(data), "-f", str(report),
           "--measurement-mode", "count_windows", "--measurement-request-count", str(max(requests * concurrency, 4))]
    if shm:
        cmd += ["--shared-memory", "system"]
    row: dict[str, Any] = {"batch": batch, "concurrency": concurrency, "tool": "perf_analyzer", "command": cmd}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {**row, "error": "perf_analyzer timed out after 900 s"}
    if proc.returncode != 0 or not report.is_file():
        return {**row, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    with open(report, newline="") as fh:
        first = next(csv.DictReader(fh), {})
    fields = {ours: float(first[theirs]) for theirs, ours in _PERF_ANALYZER_FIELDS.items() if first.get(theirs)}
    return {**row, **fields}


# --- targets --------------------------------------------------------------------------------------------


def _ok(entries: list[dict[str, Any]], name: str, precision: str = "fp32", device: str | None = None
        ) -> dict[str, Any] | None:
    return next((e for e in entries if e["runtime"] == name and e["precision"] == precision and e["status"] == "ok"
                 and (device is None or e["device"].startswith(device))), None)


def _best_cpu(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    cpu = [e for e in entries if e["status"] == "ok" and e["device"] == "cpu" and e["runtime"] != SLOW
           and e["precision"] == "fp32" and _median_ms(e["latency"], 1) is not None]
    return min(cpu, key=lambda e: _median_ms(e["latency"], 1)) if cpu else None


def _target_pairs(entries: list[dict[str, Any]], rounds: int) -> list[tuple[str, str, int]]:
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
    if best and ort and _median_ms(ort["latency"], 1):
        ratio = _median_ms(ort["latency"], 1) / _median_ms(best["latency"], 1)
        detail = (f"{best['runtime']} {_median_ms(best['latency'], 1):.0f} ms vs onnxruntime:cpu:portable "
                  f"{_median_ms(ort['latency'], 1):.0f} ms (medians, one after the other)")
        if pair := _paired(paired, "onnxruntime:cpu:portable", best["runtime"]):
            detail = f"alternating calls: {pair['b_ms']:.0f} ms vs {pair['a_ms']:.0f} ms; {detail}"
            ratio = pair["ratio"]
        add("CPU batch 1: best runtime vs ONNX Runtime portable", ">= 2x", ratio, ratio >= 2, detail + note)
    else:
        add("CPU batch 1: best runtime vs ONNX Runtime portable", ">= 2x", None, None,
            "needs onnxruntime:cpu:portable and another CPU runtime at batch 1")
    if best and yardstick and _median_ms(best["latency"], 1):
        rate = yardstick["model_gflop"] / (_median_ms(best["latency"], 1) / 1e3)
        share = rate / yardstick["gemm_gflops"]
        add("CPU batch 1: best runtime's share of this machine's GEMM rate", ">= 50%", 100 * share, share >= 0.5,
            f"{best['runtime']}: {yardstick['model_gflop']:.1f} GFLOP in {_median_ms(best['latency'], 1):.0f} ms = "
            f"{rate:.0f} GFLOP/s; {yardstick['gemm_size']}² fp32 GEMM {yardstick['gemm_gflops']:.0f} GFLOP/s "
            f"in the same run{note}")
    else:
        add("CPU batch 1: best runtime's share of this machine's GEMM rate", ">= 50%", None, None,
            "needs the GEMM yardstick and a CPU runtime at batch 1")


def targets(entries: list[dict[str, Any]], image_size: int, paired: list[dict[str, Any]] = (),
            yardstick: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's performance targets, each with the measured ratio and whether it is met (None: not measured).

    The CPU ratios come from the alternating (paired) measurement when there is one, since the machine's
    speed may drift between runtimes measured one after the other; the sequential medians are quoted too.
    """
    out = []
    note = "" if image_size == 256 else f" (measured at {image_size}², the target is stated for 256²)"

    def add(name: str, goal: str, value: float | None, met: bool | None, detail: str) -> None:
        out.append({"target": name, "goal": goal, "value": value, "met": met, "detail": detail})

    ref = _ok(entries, SLOW, device="cpu")
    best = _best_cpu(entries)
    if ref and best and _median_ms(ref["latency"], 1):
        ratio = _median_ms(ref["latency"], 1) / _median_ms(best["latency"], 1)
        detail = (f"{best['runtime']} {_median_ms(best['latency'], 1):.0f} ms vs {SLOW} "
                  f"{_median_ms(ref['latency'], 1):.0f} ms (medians, measured one after the other)")
        if pair := _paired(paired, SLOW, best["runtime"]):
            detail = (f"alternating calls: {best['runtime']} {pair['b_ms']:.0f} ms vs {SLOW} {pair['a_ms']:.0f} ms "
                      f"(medians of {pair['rounds']} each); {detail}: {ratio:.2f}x")
            ratio = pair["ratio"]
        add("CPU batch 1: best runtime vs PyTorch eager, reference scan", ">= 10x", ratio, ratio >= 10,
            detail + note)
    else:
        add("CPU batch 1: best runtime vs PyTorch eager, reference scan", ">= 10x", None, None,
            "needs torch:reference and another runtime at batch 1 on the CPU")
    ort, chunked = _ok(entries, "onnxruntime:cpu:portable"), _ok(entries, REFERENCE, device="cpu")
    if ort and chunked and _median_ms(ort["latency"], 1) and _median_ms(chunked["latency"], 1):
        ratio = _median_ms(chunked["latency"], 1) / _median_ms(ort["latency"], 1)
        detail = (f"{_median_ms(ort['latency'], 1):.0f} ms vs {_median_ms(chunked['latency'], 1):.0f} ms "
                  f"(medians, measured one after the other)")
        if pair := _paired(paired, REFERENCE, "onnxruntime:cpu:portable"):
            detail = (f"alternating calls: {pair['b_ms']:.0f} ms vs {pair['a_ms']:.0f} ms (medians of "
                      f"{pair['rounds']} each); {detail}: {ratio:.2f}x")
            ratio = pair["ratio"]
        add("CPU batch 1: ONNX Runtime portable vs PyTorch eager chunked", ">= 1x", ratio, ratio >= 1, detail + note)
    else:
        add("CPU batch 1: ONNX Runtime portable vs PyTorch eager chunked", ">= 1x", None, None,
            "needs onnxruntime:cpu:portable and torch:chunked at batch 1 on the CPU")
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
            "needs a GPU with TensorRT fp16 engines and torch:chunked on CUDA at batch 32")
    served = [r for n in SERVER if (e := _ok(entries, n)) for r in e["latency"]
              if r["batch"] == 1 and r["concurrency"] == 1 and r["completed"]]
    if served and ort and _median_ms(ort["latency"], 1):
        best = min(served, key=lambda r: r["p99_latency_us"])
        ratio = best["p99_latency_us"] / 1e3 / _median_ms(ort["latency"], 1)
        add("Served p99 at batch 1 vs engine-only latency", "<= 1.5x", ratio, ratio <= 1.5,
            f"server p99 {best['p99_latency_us'] / 1e3:.0f} ms (concurrency 1, best protocol) vs the engine it "
            f"serves (onnxruntime:cpu:portable) in process, median {_median_ms(ort['latency'], 1):.0f} ms; the "
            f"target is stated for a GPU server with TensorRT, which the bundled server cannot host{note}")
    else:
        add("Served p99 at batch 1 vs engine-only latency", "<= 1.5x", None, None,
            "needs the Triton server and the engine it serves (onnxruntime:cpu:portable) "
            "measured at batch 1")
    _cpu_kernel_targets(entries, paired, yardstick, add, note)
    return out


# --- report ---------------------------------------------------------------------------------------------


def _target_value(t: dict[str, Any]) -> str:
    """A target's measured value in its goal's unit (a ratio, or a percentage)."""
    return f"{t['value']:.0f}%" if t["goal"].endswith("%") else f"{t['value']:.2f}x"


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    """results.md: set-up, latency/throughput/accuracy table, server table, stages, targets, skipped runtimes."""
    env, cfg, load = result["environment"], result["config"], result["load_average"]
    entries = result["runtimes"]
    cuda = env["cuda"]
    lines = [
        f"# PDD inference benchmark ({cuda['device'] if cuda else 'CPU only'})",
        "",
        f"Command: `{result['command']}`  ",
        f"{preset_line(cfg)}  ",
        f"{cfg['image_size']}² images: {cfg['images']}.  ",
        f"{cfg['weights']}.  ",
        f"torch {env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime'] or '–'}, triton "
        f"{env['versions']['triton'] or '–'}, tensorrt {env['versions']['tensorrt'] or '–'}; {env['cpu_count']} "
        f"CPU cores, torch threads: {env['torch_threads']}"
        + (f" (--threads {cfg['threads']}: PyTorch, ONNX Runtime and the served ONNX Runtime).  " if cfg["threads"]
           else ".  "),
        f"Load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load['before'])}, after "
        f"{tuple(round(v, 2) for v in load['after'])}"
        + (" (the run's own threads count in the second): other work loaded the CPUs at or just before its start, "
           "so absolute CPU times are pessimistic; ratios measured in this run compare like with like."
           if load["before"][0] > 0.5 * (env["cpu_count"] or 1) else " (the run's own threads count in the second)."),
        *([f"Yardstick, same run: {y['gemm_size']}² fp32 GEMM {y['gemm_gflops']:.0f} GFLOP/s on {y['threads']} "
           f"threads; PDD is {y['model_gflop']:.1f} GFLOP per {cfg['image_size']}² image (convolutions and "
           f"matrix products, torch's FLOP counter)."] if (y := result.get("yardstick")) else []),
        "",
        f"Latency: wall time of `predict()` (host arrays in and out), {cfg['warmup']} warm-up and {cfg['repeats']} "
        "timed calls per case (the reference scan: see notes; with few calls, p90–p99 interpolate between the "
        "slowest ones); the first warm-up call is shown apart (it includes torch.compile's compilation); "
        "throughput = batch / median. Accuracy against "
        f"{REFERENCE} fp32 on {cfg['accuracy_images']} labelled images: max |Δ map| (absolute and over the "
        "reference maps' range) and image-AUROC difference.",
        "",
        "| runtime | precision | device | batch | 1st call ms | median ms | p50 | p90 | p95 | p99 | img/s | "
        "max abs err | rel err | ΔAUROC |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        if e["status"] != "ok" or e["device"] == "server":
            continue
        acc = e["accuracy"] or {}
        for r in e["latency"]:
            cells = [e["runtime"], e["precision"], e["device"], r["batch"], _fmt(r.get("first_call_ms")),
                     _fmt(r["median_ms"]), *(_fmt(r[f"p{q}_ms"]) for q in PERCENTILES),
                     _fmt(r["throughput_img_s"], ".2f"), _fmt(acc.get("map_max_abs_error"), ".2e"),
                     _fmt(acc.get("map_max_rel_error"), ".2e"), _fmt(acc.get("auroc_diff"), "+.4f")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    compute = [(e, r) for e in entries if e["status"] == "ok" for r in e["compute"]]
    if compute:
        lines += ["", "Device-resident compute (CUDA events, the network alone):", "",
                  "| runtime | precision | batch | median ms | p99 ms | img/s |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {e['runtime']} | {e['precision']} | {r['batch']} | {_fmt(r['median_ms'], '.3f')} | "
                  f"{_fmt(r['p99_ms'], '.3f')} | {_fmt(r['throughput_img_s'], '.1f')} |" for e, r in compute]
    served = [e for e in entries if e["device"] == "server" and e["status"] == "ok"]
    if served:
        lines += ["", "Triton server (closed-loop load from export.client.run_load, perf_analyzer's fields; shm = gRPC "
                      "with system shared memory; server times: the engine step's per-request means from Triton's "
                      "statistics, warm-up requests included):", "",
                  "| runtime | batch | concurrency | requests | errors | infer/s | p50 µs | p90 µs | p95 µs | p99 µs | "
                  "queue µs | compute infer µs | max abs err | ΔAUROC |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in served:
            acc = e["accuracy"] or {}
            for r in e["latency"]:
                cells = [e["runtime"], r["batch"], r["concurrency"], r["requests"], r["errors"],
                         _fmt(r["throughput_infer_per_sec"], ".2f"),
                         *(_fmt(r[f"p{q}_latency_us"], ".0f") for q in PERCENTILES),
                         _fmt(r.get("server_queue_us"), ".0f"), _fmt(r.get("server_compute_infer_us"), ".0f"),
                         _fmt(acc.get("map_max_abs_error"), ".2e"), _fmt(acc.get("auroc_diff"), "+.4f")]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        measured = [(e, r) for e in served if isinstance(e.get("perf_analyzer"), list) for r in e["perf_analyzer"]]
        if measured:
            lines += ["", "perf_analyzer on the same server and images:", "",
                      "| runtime | batch | concurrency | infer/s | p50 µs | p90 µs | p95 µs | p99 µs | queue µs | "
                      "compute infer µs | error |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for e, r in measured:
                cells = [e["runtime"], r["batch"], r["concurrency"], _fmt(r.get("throughput_infer_per_sec"), ".2f"),
                         *(_fmt(r.get(f"p{q}_latency_us"), ".0f") for q in PERCENTILES),
                         _fmt(r.get("server_queue_us"), ".0f"), _fmt(r.get("server_compute_infer_us"), ".0f"),
                         (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:200]]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        else:
            lines += ["", "perf_analyzer is not on PATH here (not installable from PyPI; it ships in NVIDIA's "
                          "tritonserver SDK container): the server was measured with run_load only."]
    staged = [e for e in entries if e["status"] == "ok" and e["stages"]]
    if staged:
        lines += ["", "Per-stage time (ms; each stage alone, so the sum differs a little from the whole):", "",
                  "| runtime | precision | batch | " + " | ".join(STAGES) + " | other | sum | method |",
                  "|---|---|---:|" + "---:|" * (len(STAGES) + 2) + "---|"]
        for e in staged:
            s = e["stages"]
            cells = " | ".join(_fmt(s["ms"].get(k), ".2f") for k in (*STAGES, "other"))
            lines.append(f"| {e['runtime']} | {e['precision']} | {s['batch']} | {cells} | {_fmt(s['sum_ms'], '.2f')} | "
                         f"{s['method']} |")
    lines += ["", "Targets (ratios from this run):", ""]
    for t in result["targets"]:
        verdict = "not measured here" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "" if t["value"] is None else f"{_target_value(t)}, "
        lines.append(f"- {t['target']} (goal {t['goal']}): **{verdict}** — {value}{t['detail']}")
    notes = [(e, n) for e in entries for n in e["notes"] if e["device"] != "server"]
    if notes or result.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in result.get("notes", [])]
        lines += [f"- {e['runtime']} {e['precision']}: {n}" for e, n in notes]
    not_run = [e for e in entries if e["status"] != "ok"]
    partial = [(e, s) for e in entries for s in e["skipped_batches"]]
    if not_run or partial:
        lines += ["", "Skipped or failed:", "", "| runtime | precision | status | reason |", "|---|---|---|---|"]
        for e in not_run:
            reason = (e["reason"] or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {e['runtime']} | {e['precision']} | {e['status']} | {reason} |")
        lines += [f"| {e['runtime']} | {e['precision']} | batch {s['batch']} skipped | {s['reason']} |"
                  for e, s in partial]
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out: Path) -> list[str]:
    """latency.png (percentiles at batch 1), throughput.png (against batch; server against concurrency),
    stages.png (stacked per-stage time). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in result["runtimes"] if e["status"] == "ok"]
    inproc = [e for e in entries if e["device"] != "server"]
    written = []
    batch = min(result["config"]["batch"])
    rows = [(f"{e['runtime']} {e['precision']}", r) for e in inproc for r in e["latency"] if r["batch"] == batch]
    rows += [(f"{e['runtime']} c={r['concurrency']}", {f"p{q}_ms": r[f"p{q}_latency_us"] / 1e3 for q in PERCENTILES})
             for e in entries if e["device"] == "server" for r in e["latency"]
             if r["batch"] == batch and r["completed"]]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
        width = 0.8 / len(PERCENTILES)
        for k, q in enumerate(PERCENTILES):
            ax.bar([i + k * width for i in range(len(rows))], [r[f"p{q}_ms"] for _, r in rows], width, label=f"p{q}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [n for n, _ in rows], rotation=30, ha="right",
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_title(f"Latency percentiles at batch {batch}, {result['config']['image_size']}²")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=120)
        plt.close(fig)
        written.append("latency.png")
    servers = [e for e in entries if e["device"] == "server"]
    panels = [p for p, present in (("in-process", inproc), ("server", servers)) if present]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            if panel == "in-process":
                for e in inproc:
                    rs = sorted(e["latency"], key=lambda r: r["batch"])
                    ax.plot([r["batch"] for r in rs], [r["throughput_img_s"] for r in rs], marker="o",
                            label=f"{e['runtime']} {e['precision']}")
                ax.set_xlabel("batch size")
                ax.set_ylabel("images / s")
                ax.set_yscale("log")
                ax.set_title("In-process throughput against batch size")
            else:
                for e in servers:
                    for b in sorted({r["batch"] for r in e["latency"]}):
                        rs = sorted((r for r in e["latency"] if r["batch"] == b), key=lambda r: r["concurrency"])
                        ax.plot([r["concurrency"] for r in rs], [r["throughput_infer_per_sec"] for r in rs],
                                marker="o", label=f"{e['runtime']} batch {b}")
                ax.set_xlabel("client concurrency")
                ax.set_ylabel("infer / s")
                ax.set_title("Triton server throughput")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
        plt.close(fig)
        written.append("throughput.png")
    staged = [e for e in entries if e["stages"]]
    if staged:
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(staged)))
        names = [f"{e['runtime']} {e['precision']} b={e['stages']['batch']}" for e in staged]
        left = np.zeros(len(staged))
        for stage in (*STAGES, "other"):
            values = np.asarray([e["stages"]["ms"].get(stage, 0.0) or 0.0 for e in staged])
            if values.any():
                ax.barh(names, values, left=left, label=stage)
                left += values
        ax.set_xlabel("ms")
        ax.set_title("Per-stage time")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=120)
        plt.close(fig)
        written.append("stages.png")
    return written


def preset_line(cfg: dict[str, Any]) -> str:
    """What the run measured, in one sentence, and how to get the other preset."""
    line = (f"{cfg['preset']} run: {cfg['image_size']}² images, batch {','.join(map(str, cfg['batch']))}, server "
            f"concurrency {','.join(map(str, cfg['concurrency']))}, {cfg['warmup']} warm-up + {cfg['repeats']} timed "
            f"calls per case, runtimes {','.join(cfg['runtimes'])}")
    if cfg["preset"] == "quick":
        line += (f"; `python benchmarks/run.py --full` measures every runtime at {FULL['image_size']}², batch "
                 f"{','.join(map(str, FULL['batch']))}, {FULL['repeats']} timed calls")
    return line + "."


def short_table(result: dict[str, Any]) -> str:
    """A terminal summary: one line per runtime and precision (batch-1 median, best throughput, accuracy)."""
    lines = [preset_line(result["config"]), "",
             f"{'runtime':<30}{'prec':<6}{'status':<9}{'b1 median ms':>13}{'best img/s':>12}{'rel err':>10}"
             f"{'ΔAUROC':>9}"]
    for e in result["runtimes"]:
        if e["status"] != "ok":
            lines.append(f"{e['runtime']:<30}{e['precision']:<6}{e['status']:<9}  {(e['reason'] or '')[:90]}")
            continue
        acc = e["accuracy"] or {}
        if e["device"] == "server":
            b1 = next((r["p50_latency_us"] / 1e3 for r in e["latency"] if r["batch"] == 1 and r["concurrency"] == 1),
                      None)
            best = max((r["throughput_infer_per_sec"] for r in e["latency"]), default=None)
        else:
            b1 = _median_ms(e["latency"], 1)
            best = max((r["throughput_img_s"] for r in e["latency"]), default=None)
        lines.append(f"{e['runtime']:<30}{e['precision']:<6}{'ok':<9}{_fmt(b1):>13}{_fmt(best, '.2f'):>12}"
                     f"{_fmt(acc.get('map_max_rel_error'), '.1e'):>10}{_fmt(acc.get('auroc_diff'), '+.3f'):>9}")
    for t in result["targets"]:
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target {t['target']} ({t['goal']}): {verdict}"
                     + ("" if t["value"] is None else f" ({_target_value(t)})"))
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------


def _build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    from pdd import PDDConfig, build_pdd

    logging.getLogger("pdd.model").setLevel(logging.ERROR)
    if args.checkpoint is not None:
        from pdd.checkpoint import load_pdd

        model = load_pdd(args.checkpoint, scan_impl="chunked").eval()
        if model.cfg.image_size != args.image_size:
            model.cfg = model.cfg.replace(image_size=args.image_size)
        return model, f"weights from checkpoint {args.checkpoint.name}"
    torch.manual_seed(0)
    model = build_pdd(PDDConfig(image_size=args.image_size, scan_impl="chunked")).eval()
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
                              scan_graph="parallel" if args.device == "cuda" else "sequential")
        artifacts.folder.mkdir(parents=True, exist_ok=True)
        if args.prepare_only:
            forms = sorted({n.split(":")[-1] for n in args.runtimes if n.startswith(("onnxruntime", "tensorrt"))}
                           | ({"portable"} if any(n in SERVER for n in args.runtimes) else set()))
            for form in forms:
                print(f"{form}: {artifacts.onnx(form)}", flush=True)
            return {"artifacts": str(artifacts.folder), "forms": forms}
        bench_images = _load_images(args, work)
        bench = Bench(args, model, bench_images, artifacts, work)
        result: dict[str, Any] = {
            "schema": 1, "complete": False, "command": command, "environment": env,
            "load_average": {"before": env.pop("load_average"), "after": None},
            "config": {"image_size": args.image_size, "batch": args.batch, "server_batch": args.server_batch,
                       "concurrency": args.concurrency,
                       "precision": args.precision, "repeats": args.repeats, "warmup": args.warmup,
                       "reference_repeats": args.reference_repeats, "requests": args.requests,
                       "accuracy_images": args.accuracy_images, "device": args.device, "preset": args.preset,
                       "threads": args.threads, "runtimes": args.runtimes, "images": bench_images.source,
                       "weights": weights},
            "runtimes": [], "targets": [], "notes": [], "plots": [],
        }
        print(preset_line(result["config"]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)

        def record(entry: dict[str, Any]) -> None:
            if entry["status"] != "ok":
                print(f"  {entry['status']}: {entry['reason']}", flush=True)
            result["runtimes"].append(entry)
            atomic_write_text(args.out / "results.json", json.dumps(result, indent=2, default=str) + "\n")

        inprocess = [n for n in args.runtimes if n not in SERVER]
        # The reference first, so every other runtime gets its accuracy columns.
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
        if any(bench.device_of(n) == "cpu" for n in args.runtimes):
            gemm = gemm_rate()
            result["yardstick"] = {"gemm_gflops": gemm["gflops"], "gemm_size": gemm["size"],
                                   "threads": gemm["threads"], "model_gflop": model_gflop(model, args.image_size)}
            print(f"yardstick: {gemm['size']}² fp32 GEMM {gemm['gflops']:.0f} GFLOP/s on {gemm['threads']} threads; "
                  f"PDD {result['yardstick']['model_gflop']:.1f} GFLOP per image", flush=True)
        result["paired"] = []
        if args.paired_rounds:
            for a, b, rounds in _target_pairs(result["runtimes"], args.paired_rounds):
                result["paired"].append(bench.paired(a, b, rounds))
        servers = [n for n in args.runtimes if n in SERVER]
        if servers:
            for entry in bench.serve(servers):
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
