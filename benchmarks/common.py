"""Helpers of the end-to-end benchmark (``benchmarks/run.py``): inputs, timing, statistics, accuracy, stages.

Everything here is plain Python/numpy (torch only for CUDA timing), so the statistics and the accuracy
numbers can be checked on known inputs without running a model.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import signal
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pdd.data import generate_brain_synth
from pdd.data.readers import to_model_input
from pdd.metrics import auroc
from pdd.precision import cpu_features, cpu_model, instruction_set

__all__ = [
    "PERCENTILES",
    "STAGES",
    "BenchImages",
    "accuracy_vs_reference",
    "alternate_with_gemm",
    "batch_of",
    "brain_synth_images",
    "environment",
    "exit_on_termination",
    "folder_images",
    "group_layer_times",
    "latency_stats",
    "onnx_node_stages",
    "package_version",
    "stage_of_node",
    "texture_images",
    "time_calls",
    "time_cuda_events",
]

PERCENTILES = (50, 90, 95, 99)
# PDD's eval pipeline in four parts, in the order the data flows (pdd/model.py).
STAGES = ("wrn_teacher", "vmamba_teacher", "adapters_students", "anomaly_head")
# Module paths (as the ONNX exporter records them in each node's "namespace") that mark a stage.
_STAGE_MODULES = (
    ("anomaly_head", ("/head:",)),
    ("wrn_teacher", ("model.teachers.wrn",)),
    ("vmamba_teacher", ("model.teachers.vmamba",)),
    ("adapters_students", ("model.ina", "model.mmu", "model.mpa", "model.prior_student", "model.plain_student")),
)
# Custom ops of the plugin form, when the exporter left no namespace on them.
_STAGE_OPS = {"SS2DScan": "vmamba_teacher", "AnomalyHead": "anomaly_head", "HeadCosine": "anomaly_head",
              "HeadBlurMax": "anomaly_head"}
OTHER_STAGE = "other"


# --- statistics -----------------------------------------------------------------------------------------


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Summary of per-call times: ``n``, ``mean_ms``, ``median_ms``, ``min_ms``, ``max_ms``, ``p50_ms`` … ``p99_ms``.

    Percentiles use numpy's linear interpolation between order statistics (so p99 of few samples lies
    between the two largest); an empty sequence gives ``n = 0`` and NaNs.
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0, **{k: math.nan for k in ("mean_ms", "median_ms", "min_ms", "max_ms")},
                **{f"p{q}_ms": math.nan for q in PERCENTILES}}
    return {"n": int(ms.size), "mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in PERCENTILES}}


def _auroc_or_nan(scores: np.ndarray, labels: np.ndarray) -> float:
    return auroc(scores, labels) if 0 < labels.sum() < labels.size else math.nan


def accuracy_vs_reference(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                          labels: np.ndarray) -> dict[str, float | int]:
    """How far a runtime's predictions are from the reference's on the same images.

    reference, candidate: ``pred_score`` (N,) and ``anomaly_map`` (N, H, W); labels (N,) 0/1.
    Returns ``images``, ``map_max_abs_error``, ``map_range`` (max − min of the reference maps),
    ``map_max_rel_error`` (the max error over that range), ``score_max_abs_error``, ``auroc_reference``,
    ``auroc`` and ``auroc_diff`` (candidate − reference; NaN when the labels are all one class).
    """
    ref_map = np.asarray(reference["anomaly_map"], np.float64)
    cand_map = np.asarray(candidate["anomaly_map"], np.float64)
    if ref_map.shape != cand_map.shape:
        raise ValueError(f"anomaly maps differ in shape: reference {ref_map.shape}, candidate {cand_map.shape}")
    labels = np.asarray(labels)
    if labels.shape != (ref_map.shape[0],):
        raise ValueError(f"labels {labels.shape} do not match {ref_map.shape[0]} maps")
    ref_score = np.asarray(reference["pred_score"], np.float64).reshape(-1)
    cand_score = np.asarray(candidate["pred_score"], np.float64).reshape(-1)
    err = float(np.abs(ref_map - cand_map).max())
    span = float(ref_map.max() - ref_map.min())
    auc_ref, auc = _auroc_or_nan(ref_score, labels), _auroc_or_nan(cand_score, labels)
    return {"images": int(labels.size), "map_max_abs_error": err, "map_range": span,
            "map_max_rel_error": err / span if span > 0 else math.inf if err > 0 else 0.0,
            "score_max_abs_error": float(np.abs(ref_score - cand_score).max()),
            "auroc_reference": auc_ref, "auroc": auc, "auroc_diff": auc - auc_ref}


# --- timing ---------------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None] | None = None
               ) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call, so queued device
    work is neither charged to the next call nor left out of this one.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


def time_cuda_events(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Device-side seconds of ``repeats`` calls of ``fn`` (CUDA events on the current stream), after warm-up.

    Calls are queued back to back, as in steady-state inference, so each interval is what the GPU spends
    per call, launch gaps included; host-side waiting is not.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


# --- inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchImages:
    """Labelled benchmark images, normal and anomalous alternating (index 0 normal).

    normalised: (N, 3, S, S) float32 ImageNet-normalised (the runtimes' input); pixels: (N, S, S, 1)
    uint8, the same images as sent to a server; labels: (N,) int64, 1 = anomalous; source: where they
    come from, for the report.
    """

    normalised: np.ndarray
    pixels: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.labels.size)


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports free on 127.0.0.1 right now (for a server started next)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def batch_of(array: np.ndarray, start: int, size: int) -> np.ndarray:
    """``size`` consecutive items of ``array`` from ``start``, wrapping around (batches larger than the set)."""
    return np.ascontiguousarray(array[np.arange(start, start + size) % len(array)])


def _alternate(normal: Sequence[Path], anomalous: Sequence[Path], n: int, where: Path) -> list[tuple[Path, int]]:
    half = n // 2
    if n < 2 or len(normal) < n - half or len(anomalous) < half:
        raise ValueError(f"{where}: need {n - half} normal and {half} anomalous test images (n >= 2), found "
                         f"{len(normal)} in test/good and {len(anomalous)} in test/<defect>/")
    picked = []
    for i in range(n):
        picked.append((normal[i // 2], 0) if i % 2 == 0 else (anomalous[i // 2], 1))
    return picked


def folder_images(root: str | os.PathLike, size: int, n: int) -> BenchImages:
    """n test images of an MVTec-style folder (``test/good``, ``test/<defect>``), grey, resized to size².

    Pixels are resized once here (bilinear) so a server and the in-process runtimes see the same pixels.
    """
    from PIL import Image

    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{test} does not exist; expected an MVTec-style folder with test/good and "
                                "test/<defect> (e.g. made by pdd.data.generate_brain_synth)")
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    normal = sorted(p for p in (test / "good").glob("*") if p.suffix.lower() in suffixes)
    anomalous = sorted(p for d in sorted(test.iterdir()) if d.is_dir() and d.name != "good"
                       for p in d.glob("*") if p.suffix.lower() in suffixes)
    pixels, labels = [], []
    for path, label in _alternate(normal, anomalous, n, root):
        with Image.open(path) as img:
            grey = img.convert("L")
            if grey.size != (size, size):
                grey = grey.resize((size, size), Image.BILINEAR)
            pixels.append(np.asarray(grey, dtype=np.uint8))
        labels.append(label)
    pix = np.stack(pixels)[..., None]
    normalised = np.stack([to_model_input(p.astype(np.float32) / np.float32(255.0), size).numpy() for p in pix])
    return BenchImages(normalised, pix, np.asarray(labels, np.int64), f"{n} test images of {root.name}")


def brain_synth_images(size: int, n: int, workdir: str | os.PathLike, seed: int = 0) -> BenchImages:
    """n brain-synth test images (half anomalous) generated at size² into ``workdir``."""
    half = n // 2
    generate_brain_synth(workdir, seed=seed, image_size=size, n_train=0, n_test_good=n - half, n_test_anomalous=half,
                         overwrite=True)
    images = folder_images(workdir, size, n)
    return BenchImages(images.normalised, images.pixels, images.labels,
                       f"brain-synth (seed {seed}): {n - half} normal, {half} anomalous test slices at {size}²")


def texture_images(size: int, n: int, why: str) -> BenchImages:
    """Fallback when brain-synth cannot be generated: smooth textures, every second with a bright blob."""
    from export.parity import labelled_images, to_pixels  # lazily: ONNX and ONNX Runtime (the [export] extra) behind it

    normalised, labels = labelled_images(n, size)
    # Grey pixels, so a server and the in-process runtimes see the same input.
    pixels = np.rint(to_pixels(normalised).mean(axis=3, keepdims=True)).astype(np.uint8)
    normalised = np.stack([to_model_input(p.astype(np.float32) / np.float32(255.0), size).numpy() for p in pixels])
    return BenchImages(normalised, pixels, labels, f"synthetic textures with blobs ({n} images; brain-synth "
                                                   f"unavailable: {why})")


# --- per-stage breakdown --------------------------------------------------------------------------------


def stage_of_node(namespace: str, op_type: str = "") -> str:
    """The stage (one of :data:`STAGES`, else ``"other"``) of an ONNX node, from its exporter namespace."""
    for stage, markers in _STAGE_MODULES:
        if any(m in namespace for m in markers):
            return stage
    return _STAGE_OPS.get(op_type, OTHER_STAGE)


def onnx_node_stages(path: str | os.PathLike) -> dict[str, str]:
    """Node name -> stage for an exported graph (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        stage = stage_of_node(props.get("namespace", ""), node.op_type)
        if stage == OTHER_STAGE and props.get("pdd.stage") == "head":
            stage = "anomaly_head"
        out[node.name] = stage
    return out


_TOKEN = re.compile(r"[A-Za-z_][\w./:-]*")


def group_layer_times(layer_ms: Mapping[str, float], node_stages: Mapping[str, str]) -> dict[str, float]:
    """Sum per-layer times (ms) by stage. A TensorRT layer is named after the ONNX node(s) it runs (fused
    ones as ``a + b`` or ``{ForeignNode[a...b]}``): the stage most of its known node names belong to wins;
    layers with no known name (reformatting, casts TensorRT inserted) count as ``"other"``.
    """
    totals = dict.fromkeys((*STAGES, OTHER_STAGE), 0.0)
    for layer, ms in layer_ms.items():
        votes: dict[str, int] = {}
        for token in _TOKEN.findall(layer):
            for name in {token, token.rstrip("."), token.split("...")[0]}:
                if name in node_stages:
                    votes[node_stages[name]] = votes.get(node_stages[name], 0) + 1
                    break
        stage = max(votes, key=lambda s: (votes[s], s != OTHER_STAGE)) if votes else OTHER_STAGE
        totals[stage] += ms
    return totals


# --- environment ----------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (None when absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions, device, CPU count, threads and load average of this machine, for the results file."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        # The CPU model and the flags that decide which precision pays: numbers from different CPUs never mix.
        "cpu": cpu_model(),
        "cpu_features": sorted(cpu_features()),
        "instruction_set": instruction_set(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "versions": {"torch": torch.__version__,
                     **{name: package_version(dist) for name, dist in (
                         ("onnxruntime", "onnxruntime"), ("onnxruntime_gpu", "onnxruntime-gpu"),
                         ("onnx", "onnx"), ("triton", "triton"), ("tritonclient", "tritonclient"),
                         ("nvidia_pytriton", "nvidia-pytriton"), ("tensorrt", "tensorrt"), ("numpy", "numpy"))}},
        "cuda": None,
    }
    if env["versions"]["tensorrt"] is None:  # NVIDIA's containers install it without pip metadata
        try:
            import tensorrt

            env["versions"]["tensorrt"] = tensorrt.__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        # PyTorch's fp32 convolutions use TF32 on Ampere and later unless disabled: it bounds fp32 accuracy.
        env["cuda"] = {"device": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}",
                       "cuda_runtime": torch.version.cuda, "device_count": torch.cuda.device_count(),
                       "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                       "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return env


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def exit_on_termination() -> None:
    """For a benchmark run as a script: SIGTERM and SIGHUP exit like ``sys.exit(128 + signal)``, so ``finally``
    blocks and context managers run first: servers are stopped, temporary folders (ONNX exports) removed.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit)


def gemm_rate(size: int = 2048, warmup: int = 2, repeats: int = 7, dtype: str = "fp32") -> dict[str, float]:
    """This machine's matrix-multiply rate in ``dtype`` (fp32 or bf16) with torch's current threads: the
    yardstick CPU runtimes of that precision are compared with. Median GFLOP/s of ``size``² x ``size``² products."""
    import torch

    from pdd.precision import DTYPES

    a, b = torch.randn(size, size, dtype=DTYPES[dtype]), torch.randn(size, size, dtype=DTYPES[dtype])
    with torch.inference_mode():
        times = time_calls(lambda: torch.mm(a, b), warmup, repeats)
    median = latency_stats(times)["median_ms"] / 1e3
    return {"gflops": 2 * size**3 / median / 1e9, "size": size, "threads": torch.get_num_threads(),
            "median_ms": median * 1e3}


def alternate_with_gemm(call: Callable[[], Any], rounds: int, dtype: str = "fp32") -> dict[str, Any]:
    """Median ms of ``call`` and median GFLOP/s of the GEMM yardstick in ``dtype`` (:func:`gemm_rate`, 3
    products a round) timed in alternation (call, GEMM, GEMM, call, ...), after one warm-up call: the share of
    the GEMM rate then compares the two under one condition of the machine."""
    call()
    model_ms, gemm_gflops, size = [], [], 0
    for i in range(rounds):
        for step in (("model", "gemm") if i % 2 == 0 else ("gemm", "model")):
            if step == "gemm":
                gemm = gemm_rate(warmup=1, repeats=3, dtype=dtype)
                gemm_gflops.append(gemm["gflops"])
                size = gemm["size"]
            else:
                start = time.perf_counter()
                call()
                model_ms.append((time.perf_counter() - start) * 1e3)
    return {"order": "alternating, one warm-up call", "dtype": dtype, "model_ms": statistics.median(model_ms),
            "gemm_gflops": statistics.median(gemm_gflops), "gemm_size": size, "times_ms": model_ms,
            "gemm_gflops_each": gemm_gflops}


def model_gflop(model: Any, image_size: int) -> float:
    """Floating-point operations of one forward at batch 1, in GFLOP (multiply-adds count 2), as counted by
    torch's FLOP counter: convolutions and matrix products, which the elementwise work (scan, norms) does not
    add to."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def group_rss_mb(group: int) -> float:
    """Resident memory of the processes of process group ``group`` (a server and its stubs), in MB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != group:
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError):  # exited meanwhile
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


class RssSampler:
    """Samples :func:`group_rss_mb` of ``group`` every ``interval_s`` in a thread; ``peak_mb`` is the largest."""

    def __init__(self, group: int, interval_s: float = 0.05) -> None:
        import threading

        self.group, self.interval_s, self.peak_mb = group, interval_s, group_rss_mb(group)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, group_rss_mb(self.group))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
