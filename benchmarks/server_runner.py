"""The Triton-server runtimes of the benchmark (``server:http``, ``server:grpc``, ``server:shm``).

One bundled server (python flavour: the portable ONNX under ONNX Runtime) is started for all of them; each is
measured by :func:`export.client.run_load` and, where it is on the PATH, NVIDIA's ``perf_analyzer``.
"""

from __future__ import annotations

import csv
import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import batch_of, free_ports, package_version
from benchmarks.runners import Bench, error_text, new_entry
from export.client import PDDClient, run_load
from export.runtime import RuntimeUnavailable

__all__ = ["serve"]

_PERF_ANALYZER_FIELDS = {"Inferences/Second": "throughput_infer_per_sec", "p50 latency": "p50_latency_us",
                         "p90 latency": "p90_latency_us", "p95 latency": "p95_latency_us",
                         "p99 latency": "p99_latency_us", "Avg latency": "avg_latency_us",
                         "Server Queue": "server_queue_us", "Server Compute Input": "server_compute_input_us",
                         "Server Compute Infer": "server_compute_infer_us",
                         "Server Compute Output": "server_compute_output_us"}


def serve(bench: Bench, names: list[str]) -> list[dict[str, Any]]:
    """Entries of the Triton-server runtimes ``names`` (fp32; one server started for all of them)."""
    entries = [new_entry(n, "fp32", "server") for n in names]
    skipped = [new_entry(n, p, "server") for n in names for p in bench.args.precision if p != "fp32"]
    for e in skipped:
        e.update(status="skipped", reason="the bundled server serves the portable fp32 ONNX with ONNX Runtime")
    if "fp32" not in bench.args.precision:
        return skipped
    try:
        server = _start_server(bench)
    except RuntimeUnavailable as exc:
        for e in entries:
            e.update(status="skipped", reason=exc.reason)
        return entries + skipped
    except Exception as exc:  # the in-process results still get written
        for e in entries:
            e.update(status="failed", reason=error_text(exc))
        return entries + skipped
    try:
        for entry in entries:
            try:
                _load(bench, server, entry)
            except Exception as exc:  # one protocol failing leaves the others
                entry.update(status="failed", reason=error_text(exc))
    finally:
        server.stop()
    return entries + skipped

def _start_server(bench: Bench) -> Any:
    if package_version("tritonclient") is None:
        raise RuntimeUnavailable("tritonclient is not installed (pip install -e '.[serve]')")
    # Lazily: the server modules need the optional [serve] extra (tritonclient), checked just above.
    from export.serve import ServerError, TritonServer, find_tritonserver
    from export.triton_repo import build_triton_repo

    try:
        find_tritonserver()
    except ServerError as exc:
        raise RuntimeUnavailable(str(exc)) from None
    onnx = bench.artifacts.onnx("portable")
    print("starting tritonserver (python flavour) …", flush=True)
    repo = build_triton_repo(bench.work / "triton-repo", flavour="python", engine_dir=onnx.parent,
                             max_batch_size=bench.artifacts.max_batch, image_size=bench.size)
    if bench.args.threads:
        _set_engine_threads(repo, bench.args.threads)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log=bench.work / "tritonserver.log")
    try:
        server.start(timeout_s=600)
    except ServerError as exc:
        raise RuntimeUnavailable(f"the bundled tritonserver did not start: {exc}") from None
    return server

def _load(bench: Bench, server: Any, entry: dict[str, Any]) -> None:
    """One server runtime's entry: run_load (and perf_analyzer) at every batch and concurrency, then accuracy."""
    from benchmarks.serve_bench import server_step_stats  # the optional [serve] extra, as in _start_server

    protocol = "http" if entry["runtime"] == "server:http" else "grpc"
    shm = entry["runtime"] == "server:shm"
    url = server.http_url if protocol == "http" else server.grpc_url
    factory = functools.partial(PDDClient, url, protocol=protocol, shm=shm, timeout_s=600.0)
    entry["notes"].append(f"bundled tritonserver, python flavour (ONNX Runtime CPU in the Python backend), "
                          f"{protocol.upper()}{' + system shared memory' if shm else ''}; "
                          f"{bench.args.requests} requests per client after 1 warm-up")
    pixels, n = bench.images.pixels, len(bench.images)
    seen: dict[int, tuple[float, np.ndarray]] = {}
    perf = shutil.which("perf_analyzer")
    entry["perf_analyzer"] = [] if perf else "not on PATH"
    for batch in bench.args.server_batch:
        payloads = [batch_of(pixels, k * batch, batch) for k in range(n)]
        for conc in bench.args.concurrency:
            print(f"  {entry['runtime']} batch {batch} concurrency {conc}", flush=True)
            before = server_step_stats(server.grpc_url)
            stats = run_load(factory, payloads, conc, bench.args.requests, warmup=1, timeout_s=1800.0,
                             keep_outputs=batch == 1)
            after = server_step_stats(server.grpc_url)
            for index, pred in stats.pop("outputs", []):
                seen[index] = (float(pred["pred_score"][0]), pred["anomaly_map"][0])
            entry["latency"].append({"batch": batch, "concurrency": conc, "tool": "run_load", **stats,
                                     **_server_split(before, after)})
            if perf:
                entry["perf_analyzer"].append(_perf_analyzer(perf, url, protocol, shm, batch, conc, pixels,
                                                             bench.args.requests, bench.work))
    if not any(r["completed"] for r in entry["latency"]):
        raise RuntimeError(f"no request succeeded: {entry['latency'][0]['error_messages']}")
    missing = [i for i in range(n) if i not in seen]
    if missing:
        with factory() as client:
            for i in missing:
                out = client.predict(pixels[i:i + 1])
                seen[i] = (float(out["pred_score"][0]), out["anomaly_map"][0])
    order = sorted(seen)
    entry["accuracy"] = bench.accuracy({"pred_score": np.asarray([seen[i][0] for i in order], np.float32),
                                       "anomaly_map": np.stack([seen[i][1] for i in order])}, order)


def _set_engine_threads(repo: Path, threads: int) -> None:
    """Give the served engine's ONNX Runtime session ``threads`` intra-op threads (its config parameter)."""
    from google.protobuf import text_format

    from export.triton_repo import ENGINE, parse_config  # the optional [serve] extra, as in _start_server

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
