"""The in-process runtimes of the benchmark: their names and how each is timed (their artifacts: benchmarks.artifacts).

:class:`Bench` measures one runtime at one precision (latency, device compute time, per-stage time and
accuracy against the reference runtime); every runtime is built by :func:`export.runtime.make_runtime`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config

from benchmarks.artifacts import Artifacts, RuntimeFailed, error_text, model_fingerprint
from benchmarks.common import (
    BenchImages,
    accuracy_vs_reference,
    alternate_with_gemm,
    batch_of,
    brain_synth_images,
    group_layer_times,
    latency_stats,
    onnx_node_stages,
    package_version,
    time_calls,
    time_cuda_events,
)
from export.onnx_export import INPUT_NAME
from export.runtime import ORT_PROVIDERS, Runtime, RuntimeUnavailable, make_runtime
from export.runtime import RUNTIMES as RUNTIME_NAMES

__all__ = ["FULL", "PRECISIONS", "PRESETS", "QUICK", "REFERENCE", "RUNTIMES", "SERVER", "SLOW", "TENSORRT",
           "Artifacts", "Bench", "RuntimeFailed", "error_text", "median_ms", "model_fingerprint", "new_entry"]

log = logging.getLogger("benchmarks.run")

# The runtimes measured, by export.runtime's names (checked below), plus the server's protocols.
TORCH = ("torch:reference", "torch:eager", "torch:cpu_kernel", "torch:cpu_kernel:compile", "torch:triton",
         "torch:graph-parallel:compile", "torch:triton:compile")
ONNXRUNTIME = ("onnxruntime:cpu:portable", "onnxruntime:cpu:plugin", "onnxruntime:cuda:portable",
               "onnxruntime:tensorrt:portable")
TENSORRT = ("tensorrt:plugin", "tensorrt:portable")
SERVER = ("server:http", "server:grpc", "server:shm")
RUNTIMES = TORCH + ONNXRUNTIME + TENSORRT + SERVER
_UNKNOWN = set(TORCH + ONNXRUNTIME + TENSORRT) - set(RUNTIME_NAMES)
if _UNKNOWN:
    raise ImportError(f"benchmark runtimes unknown to export.runtime: {sorted(_UNKNOWN)}")
PRESETS = {
    "all": RUNTIMES,
    "cpu": ("torch:reference", "torch:eager", "torch:cpu_kernel", "torch:cpu_kernel:compile",
            "torch:graph-parallel:compile", "onnxruntime:cpu:portable", "onnxruntime:cpu:plugin", *SERVER),
    "gpu": ("torch:reference", "torch:eager", "torch:triton", "torch:graph-parallel:compile", "torch:triton:compile",
            "onnxruntime:cuda:portable", "onnxruntime:tensorrt:portable", *TENSORRT),
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# The runtimes that compute in bf16 or int8 on the CPU (pdd.precision's policy; their scan reads bf16 itself).
REDUCED_CPU = ("torch:cpu_kernel", "torch:cpu_kernel:compile")
CPU_COMPILED = "torch:cpu_kernel:compile"  # its per-stage times are measured compiled
REFERENCE = "torch:eager"  # accuracy is measured against this runtime in fp32
SLOW = "torch:reference"

# The default run: what runs on any machine, small enough for a few minutes on a 2-core CPU (no compile,
# no plugin form, TensorRT only from prebuilt engines).
QUICK = {"runtimes": ["torch:reference", "torch:eager", "torch:cpu_kernel", "torch:triton",
                      "onnxruntime:cpu:portable", *SERVER],
         "image_size": 64, "batch": [1], "concurrency": [1], "repeats": 3, "warmup": 1, "reference_repeats": 1,
         "accuracy_images": 4, "paired_rounds": 2}
# --full: every runtime at the size and batches the targets are stated for.
FULL = {"runtimes": list(RUNTIMES), "image_size": 256, "batch": [1, 8, 32], "concurrency": [1, 4, 16], "repeats": 20,
        "warmup": 3, "reference_repeats": 2, "accuracy_images": 8, "paired_rounds": 6}


def new_entry(name: str, precision: str, device: str) -> dict[str, Any]:
    return {"runtime": name, "precision": precision, "device": device, "status": "ok", "reason": None,
            "setup_s": None, "notes": [], "latency": [], "compute": [], "skipped_batches": [], "accuracy": None,
            "stages": None}


def median_ms(rows: list[dict[str, Any]], batch: int) -> float | None:
    return next((r["median_ms"] for r in rows if r["batch"] == batch), None)



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
            self._models[device] = copy.deepcopy(self.model).to(device)
        return self._models[device]

    def quantized_model(self) -> torch.nn.Module:
        """The model with an int8 quantization (pdd.int8): the checkpoint's, else observed now on 8 normal
        brain-synth slices of another seed than the measured images."""
        if self.model.quantization is None:
            from pdd.int8 import observe

            calib = brain_synth_images(self.size, 16, self.work / "int8-calibration", seed=1)
            normal = torch.from_numpy(calib.normalised[calib.labels == 0][:8])
            self.model.quantization = observe(self.model, normal.split(4), source=calib.source)
        return self.model

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
            if precision in ("bf16", "int8"):
                if name not in REDUCED_CPU:
                    raise RuntimeUnavailable(f"{precision} is measured for {', '.join(REDUCED_CPU)} (the C scan "
                                             f"reads bf16; int8 quantizes the WRN teacher on the CPU)")
                model = self.quantized_model() if precision == "int8" else self.model_on(device)
                return make_runtime(f"{name}:{precision}", model=model, device=device)
            return make_runtime(name, model=self.model_on(device), device=device)
        if kind == "onnxruntime":
            provider, form = rest
            if precision != "fp32":
                raise RuntimeUnavailable("ONNX Runtime runs the exported fp32 graph here: its CPU provider has no "
                                         "AMX bf16 path (onnxruntime issue 19937), the typed fp16 graph is "
                                         "built for TensorRT (export/build_trt.py), and int8 is the PyTorch "
                                         "teacher quantized by torchao (pdd/int8.py)")
            try:
                import onnxruntime
            except ImportError:
                raise RuntimeUnavailable("onnxruntime is not installed (pip install -e '.[export]')") from None

            if ORT_PROVIDERS[provider][0] not in onnxruntime.get_available_providers():
                raise RuntimeUnavailable(f"this ONNX Runtime has no {ORT_PROVIDERS[provider][0]} (available: "
                                         f"{onnxruntime.get_available_providers()})")
            if form == "plugin" and package_version("onnxruntime-extensions") is None:
                raise RuntimeUnavailable("the plugin form runs its custom ops through onnxruntime-extensions, "
                                         "which is not installed")
            return make_runtime(name, onnx_path=self.artifacts.onnx(form), threads=self.args.threads)
        if precision in ("bf16", "int8"):
            raise RuntimeUnavailable("TensorRT engines are built in fp32 or fp16 (export/build_trt.py)")
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
        entry = new_entry(name, precision, self.device_of(name))
        start = time.perf_counter()
        try:
            rt = self.make(name, precision)
        except RuntimeUnavailable as exc:
            entry.update(status="skipped", reason=exc.reason)
            return entry
        except Exception as exc:  # recorded, and the benchmark goes on with the next runtime
            entry.update(status="failed", reason=error_text(exc))
            return entry
        entry["setup_s"] = time.perf_counter() - start
        entry["device"] = rt.device
        if precision == "int8":
            q = self.model.quantization
            entry["notes"].append(f"int8: the WRN teacher quantized, observed on {q.images} images of {q.source}")
        try:
            self._measure(rt, name, precision, entry)
        except Exception as exc:  # e.g. out of memory at a large batch: keep what was measured
            log.debug("%s failed", name, exc_info=True)
            entry.update(status="failed", reason=error_text(exc))
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
        except Exception as exc:  # recorded; the targets then fall back to the medians measured one after the other
            out.update(status="failed", reason=error_text(exc))
        finally:
            for rt in runtimes.values():
                rt.close()
        print(f"paired {a} vs {b}: " + (f"{out['a_ms']:.0f} ms vs {out['b_ms']:.0f} ms, ratio {out['ratio']:.2f}"
                                       if out["status"] == "ok" else out["reason"]), flush=True)
        return out

    def gemm_alternating(self, name: str, rounds: int) -> dict[str, Any]:
        """fp32 batch-1 latency of ``name`` and the GEMM yardstick timed in alternation
        (:func:`benchmarks.common.alternate_with_gemm`); a failure is recorded, not raised."""
        out: dict[str, Any] = {"runtime": name, "rounds": rounds}
        rt = None
        try:
            rt = self.make(name, "fp32")
            x = batch_of(self.images.normalised, 0, 1)
            out.update(status="ok", **alternate_with_gemm(lambda: rt.predict(x), rounds))
        except Exception as exc:  # the target then uses the yardstick measured after the runtimes
            out.update(status="failed", reason=error_text(exc))
        finally:
            if rt is not None:
                rt.close()
        print(f"alternating {name} vs GEMM: " + (f"{out['model_ms']:.0f} ms, GEMM {out['gemm_gflops']:.0f} GFLOP/s"
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
                entry["skipped_batches"].append({"batch": batch, "reason": f"failed: {error_text(exc)}"})
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
        # Compiled stages only for the CPU kernel's runtime: each costs one more compilation.
        if name.startswith("torch") and not slow and (not name.endswith(":compile") or name == CPU_COMPILED):
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
        """Reference predictions from the PyTorch fp32 eager-scan runtime when the run does not measure one."""
        try:
            with make_runtime(REFERENCE, model=self.model_on(self.device), device=self.device) as rt:
                parts = [rt.predict(self.images.normalised[i:i + 1]) for i in range(len(self.images))]
        except Exception as exc:  # without a reference the accuracy columns stay empty, with the reason
            self.reference_note = f"no accuracy reference: {REFERENCE} fp32 failed ({error_text(exc)})"
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
        """Median ms of each stage run alone through the model's submodules, on device-resident input; for a
        compiled CPU runtime each stage compiled alone as the runtime compiles the whole (frozen weights)."""
        model = rt.model
        compiled = name.endswith(":compile")
        x = torch.from_numpy(batch_of(self.images.normalised, 0, batch)).to(rt.device)
        size = (self.size, self.size)
        freezing = inductor_config.patch(freezing=True) if compiled else contextlib.nullcontext()
        with torch.inference_mode(), self._autocast(name, precision), freezing:
            x = model.precision.cast(x, "wrn")  # the teachers' input in the model's precision (pdd.precision)
            y, z = tuple(model.teachers.wrn(x)), tuple(model.teachers.vmamba(x))
            feats = model.students(y, z)
            parts = {"wrn_teacher": lambda: model.teachers.wrn(x), "vmamba_teacher": lambda: model.teachers.vmamba(x),
                     "adapters_students": lambda: model.students(y, z),
                     "anomaly_head": lambda: model.head(feats, size)}
            if compiled:
                parts = {stage: torch.compile(fn) for stage, fn in parts.items()}
            ms = {}
            for stage, fn in parts.items():
                if cuda:
                    times = time_cuda_events(fn, self.args.warmup, self.args.repeats)
                else:
                    times = time_calls(fn, min(self.args.warmup, 1), self.args.repeats)
                ms[stage] = latency_stats(times)["median_ms"]
        method = ("PyTorch submodules, each compiled alone (inductor, frozen weights) and timed alone (median)"
                  if compiled else "PyTorch submodules, each timed alone (median)")
        return {"batch": batch, "method": method + (", CUDA events" if cuda else ", wall clock"), "ms": ms,
                "sum_ms": sum(ms.values())}

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


class _TrtBuffers:
    """A TensorRT execution on device-resident input and output buffers (no host copies)."""

    def __init__(self, rt: Any, images: np.ndarray) -> None:
        import tensorrt as trt  # optional: only on machines with TensorRT

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
