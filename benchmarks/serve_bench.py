"""Latency and throughput of the served PDD (python flavour: ONNX Runtime on CPU) over HTTP, gRPC and
system shared memory, at several client concurrencies, with real brain-synth images.

    python benchmarks/serve_bench.py [--config brain-synth | --checkpoint CKPT | --repo REPO]
        [--image-size 256] [--concurrency 1 4] [--requests 8] [--out benchmarks/results/serve-cpu]

Closed loop (:func:`run_load`, also importable from here): each of C clients sends its next request when
the previous answer arrives, one image per request (uint8 256x256x1, brain-synth test images cycled),
after one untimed warm-up request per client. Reported with ``perf_analyzer``'s field names:
throughput (infer/s) and p50/p90/p95/p99 latency (µs) at the client, plus the server's own split of the
``pdd_engine`` step (queue, compute input / infer / output, µs per request) from Triton's statistics.
``perf_analyzer`` itself runs as well when it is on PATH (it is not installable from PyPI).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import exit_on_termination, free_ports
from export.client import PDDClient, run_load
from export.serve import TritonServer, python_env
from export.triton_repo import ENGINE, ENSEMBLE, build_triton_repo
from pdd.checkpoint import load_model
from pdd.config import atomic_write_text
from pdd.data import generate_brain_synth
from pdd.data.readers import read_image

__all__ = ["TRANSPORTS", "main", "run_load", "server_step_stats"]

log = logging.getLogger("serve_bench")

# name -> (protocol, shared memory)
TRANSPORTS = {"http": ("http", False), "grpc": ("grpc", False), "grpc+shm": ("grpc", True),
              "http+shm": ("http", True)}
_STAT_FIELDS = ("queue", "compute_input", "compute_infer", "compute_output")


def _brain_synth_images(size: int, count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``count`` brain-synth test images (half normal, half with lesions) as uint8 (size, size, 1)."""

    with tempfile.TemporaryDirectory(prefix="brain-synth-") as tmp:
        half = max(1, count // 2)
        generate_brain_synth(tmp, seed=seed, image_size=size, n_train=1, n_test_good=half,
                             n_test_anomalous=max(3, count - half))
        files = sorted((Path(tmp) / "test" / "good").glob("*.png"))[:half]
        files += sorted(p for p in (Path(tmp) / "test").glob("*/*.png") if p.parent.name != "good")[:count - half]
        images = []
        for path in files:
            img = read_image(path)
            img = img if img.ndim == 2 else img[..., 0]
            images.append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)[..., None])
        return images, [f"{p.parent.name}/{p.name}" for p in files]


def server_step_stats(url: str, model: str = ENGINE) -> dict[str, int]:
    """Triton's cumulative statistics of ``model``: request count and total ns per phase."""
    with PDDClient(url, protocol="grpc") as client:
        stats = client.client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    out = {"count": int(stats["inference_stats"]["success"].get("count", 0)),
           "success_ns": int(stats["inference_stats"]["success"].get("ns", 0)),
           "executions": int(stats.get("execution_count", 0))}
    for field in _STAT_FIELDS:
        out[f"{field}_ns"] = int(stats["inference_stats"][field].get("ns", 0))
    return out


def _server_split(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, float]:
    """Per-request server times between two snapshots {model: stats} of the ensemble and the engine."""
    eng_b, eng_a = before[ENGINE], after[ENGINE]
    n = eng_a["count"] - eng_b["count"]
    split = {f"server_{f}_us": (eng_a[f"{f}_ns"] - eng_b[f"{f}_ns"]) / max(n, 1) / 1e3 for f in _STAT_FIELDS}
    split["server_requests"] = n
    split["server_batches"] = eng_a["executions"] - eng_b["executions"]
    ens_b, ens_a = before[ENSEMBLE], after[ENSEMBLE]
    # Whole request inside the server (preprocess, queue, engine, postprocess), from arrival to response.
    answered = max(ens_a["count"] - ens_b["count"], 1)
    split["server_request_us"] = (ens_a["success_ns"] - ens_b["success_ns"]) / answered / 1e3
    return split


def _measure(server: TritonServer, transport: str, concurrency: int, images: list[np.ndarray],
             args: argparse.Namespace) -> dict[str, Any]:
    """One closed-loop run, with the server's statistics over exactly its timed requests."""
    protocol, shm = TRANSPORTS[transport]
    url = server.http_url if protocol == "http" else server.grpc_url
    before: dict[str, dict[str, int]] = {}

    def snapshot() -> None:
        before.update({m: server_step_stats(server.grpc_url, m) for m in (ENSEMBLE, ENGINE)})

    log.info("%s, concurrency %d, %d requests per client", transport, concurrency, args.requests)
    stats = run_load(lambda: PDDClient(url, protocol=protocol, shm=shm, timeout_s=args.request_timeout), images,
                     concurrency, args.requests, warmup=1, timeout_s=args.timeout, on_start=snapshot)
    stats.update(_server_split(before, {m: server_step_stats(server.grpc_url, m) for m in (ENSEMBLE, ENGINE)}))
    # What the transport and the client add: serialisation, copies, the network stack.
    stats["client_overhead_us"] = stats["avg_latency_us"] - stats["server_request_us"]
    log.info("  %.3f infer/s, p50 %.0f µs, p99 %.0f µs, %d errors", stats["throughput_infer_per_sec"],
             stats["p50_latency_us"], stats["p99_latency_us"], stats["errors"])
    return {"transport": transport, **stats}


def _perf_analyzer(url: str, image: np.ndarray, concurrency: list[int], workdir: Path) -> dict[str, Any]:
    """Run perf_analyzer over gRPC on one real image when it is installed; else say it is absent."""
    exe = shutil.which("perf_analyzer")
    if exe is None:
        return {"available": False, "note": "perf_analyzer is not on PATH (not installable from PyPI; it ships in "
                                            "NVIDIA's tritonserver SDK container)"}
    data = workdir / "perf-input.json"
    data.write_text(json.dumps({"data": [{"images": {"content": image.reshape(-1).tolist(),
                                                      "shape": list(image.shape)}}]}))
    csv = workdir / "perf.csv"
    cmd = [exe, "-m", "pdd", "-u", url, "-i", "grpc", "--input-data", str(data),
           f"--concurrency-range={min(concurrency)}:{max(concurrency)}", "--measurement-interval=10000",
           "-f", str(csv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return {"available": True, "command": shlex.join(cmd), "returncode": proc.returncode,
            "stdout_tail": proc.stdout[-4000:], "csv": csv.read_text() if csv.is_file() else None}


def _markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# Served PDD on CPU: Triton Python backend + ONNX Runtime",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model: {result['model']}; repository flavour `python` (ONNX Runtime {env['onnxruntime_in_server']} inside "
        f"Triton {env['triton_server']}'s Python backend, one image per ONNX Runtime call on CPU), "
        f"`max_batch_size` {result['max_batch_size']}, dynamic batching. Input: brain-synth test images, uint8 "
        f"{result['image_size']}x{result['image_size']}x1, one image per request, {len(result['images'])} "
        "images cycled. Closed loop: each client sends its next "
        "request when the previous answer arrives, after one untimed warm-up request.",
        "",
        f"Machine: {env['cpus']} CPUs ({env['processor']}), load average {env['loadavg_start']} at the start and "
        f"{env['loadavg_end']} at the end. **Other processes shared these CPUs during the run**, so absolute "
        "numbers are pessimistic and noisy; compare rows within this table.",
        "",
        "| transport | concurrency | requests | errors | throughput (infer/s) | p50 latency (µs) | p90 (µs) "
        "| p95 (µs) | p99 (µs) | server request (µs) | client overhead (µs) | server queue (µs) "
        "| compute input (µs) | compute infer (µs) | compute output (µs) | batches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['transport']} | {r['concurrency']} | {r['completed']} | {r['errors']} "
            f"| {r['throughput_infer_per_sec']:.3f} | {r['p50_latency_us']:,.0f} | {r['p90_latency_us']:,.0f} "
            f"| {r['p95_latency_us']:,.0f} | {r['p99_latency_us']:,.0f} | {r['server_request_us']:,.0f} "
            f"| {r['client_overhead_us']:,.0f} | {r['server_queue_us']:,.0f} "
            f"| {r['server_compute_input_us']:,.0f} | {r['server_compute_infer_us']:,.0f} "
            f"| {r['server_compute_output_us']:,.0f} | {r['server_batches']} |")
    pa = result["perf_analyzer"]
    lines += ["", "Server columns, from Triton's statistics over the timed requests: `server request` is the "
              "ensemble's average time from a request's arrival to its response; `client overhead` = average "
              "client latency − server request, i.e. what the transport adds (serialisation, copies, sockets "
              "or shared memory). Queue and compute columns are the `pdd_engine` step's, per request (a dynamic "
              "batch's time counts for each request in it); `batches` is how many times the engine ran.", ""]
    if any(r["client_overhead_us"] < 0 for r in result["runs"]):
        lines += ["A negative client overhead means the transport cost is below what these two clocks can "
                  "resolve: the server's clock and the client's start and stop at different moments of a "
                  "request, so a difference of a few ms between two averages reads as no measurable cost.", ""]
    lines.append(f"perf_analyzer: {pa['command']} (exit {pa['returncode']})" if pa["available"] else
                 f"perf_analyzer: {pa['note']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--config", default="brain-synth", help="config name: a freshly initialised model")
    src.add_argument("--checkpoint", help="a trained PDD checkpoint")
    src.add_argument("--repo", type=Path, help="an existing python-flavour repository (no export)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--onnx-form", choices=["plugin", "portable"], default="plugin",
                    help="the ONNX form the exported repository serves (plugin: the compiled CPU scan kernel)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--transports", nargs="+", default=["http", "grpc", "grpc+shm"], choices=sorted(TRANSPORTS))
    ap.add_argument("--requests", type=int, default=8, help="timed requests per client")
    ap.add_argument("--images", type=int, default=8, help="brain-synth test images to cycle")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run before no new request starts")
    ap.add_argument("--request-timeout", type=float, default=600, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "serve-cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pdd.model").setLevel(logging.ERROR)
    command = shlex.join(["python", "benchmarks/serve_bench.py", *(argv if argv is not None else sys.argv[1:])])

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        if args.repo:
            repo, model_desc = args.repo, f"repository {args.repo}"
        else:
            model = load_model(args.checkpoint, None if args.checkpoint else args.config, scan_impl="eager",
                               image_size=args.image_size)
            model_desc = (f"checkpoint {args.checkpoint}" if args.checkpoint else
                          f"config {args.config}, freshly initialised (random teachers: speed only)")
            model_desc += f", {args.onnx_form} ONNX form"
            log.info("exporting %s at %d²", model_desc, args.image_size)
            repo = build_triton_repo(work / "repo", flavour="python", model=model,
                                     max_batch_size=args.max_batch_size, onnx_form=args.onnx_form)
            del model
        images, names = _brain_synth_images(args.image_size, args.images, args.seed)
        http, grpc, metrics = free_ports(3)
        loadavg_start = os.getloadavg()
        with TritonServer(repo, http, grpc, metrics, log=work / "tritonserver.log") as server:
            with PDDClient(server.http_url) as client:
                meta = client.client.get_server_metadata()
            runs = [_measure(server, name, conc, images, args) for name in args.transports
                    for conc in args.concurrency]
            perf = _perf_analyzer(server.grpc_url, images[0], args.concurrency, work)
        ort_version = subprocess.run([str(python_env() / "bin" / "python3"), "-c",
                                      "import onnxruntime; print(onnxruntime.__version__)"],
                                     capture_output=True, text=True, timeout=60).stdout.strip()
    result = {
        "command": command, "model": model_desc, "image_size": args.image_size,
        "max_batch_size": args.max_batch_size, "images": names, "runs": runs, "perf_analyzer": perf,
        "environment": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "triton_server": meta.get("version"),
                        "onnxruntime_in_server": ort_version,
                        "loadavg_start": [round(v, 2) for v in loadavg_start],
                        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
                        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(args.out.with_suffix(".md"), _markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    exit_on_termination()
    main()
