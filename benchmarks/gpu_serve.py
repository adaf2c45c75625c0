"""Serve a TensorRT engine with NVIDIA's Triton Inference Server (TensorRT backend) and check it against the engine.

    python -m benchmarks.gpu_serve --server /opt/tritonserver/bin/tritonserver --engine ENGINE_DIR \\
        [--images MVTEC_DIR] [--requests 32] --out serve.json

Step ``serve`` of ``benchmarks/gpu_check.py``, for a GPU machine with NVIDIA's server (its container); the
bundled CPU server has no TensorRT backend. It writes the ``tensorrt`` flavour repository for the engine,
starts the server on loopback ports in a process group of its own (stopped on exit, also on failure),
sends the images one per request over HTTP, and compares the served scores and maps with the same engine
run in this process on the same pixels (largest map error over the map range, score ranks); then times
``--requests`` requests one after another (p50/p99 latency, throughput). Prints one JSON line and writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common import free_ports
from export.client import PDDClient
from export.parity import labelled_images, to_pixels
from export.runtime import TensorRTRuntime
from export.serve import stop_group
from export.triton_repo import build_triton_repo
from pdd.config import atomic_write_text
from pdd.data.readers import normalise_nhwc


def _pixels(images: Path | None, size: int, count: int) -> np.ndarray:
    """uint8 (N, S, S, 3): the first ``count`` test images of an MVTec folder, else labelled textures."""
    if images is None:
        x, _ = labelled_images(count, size)
        return to_pixels(x)
    from PIL import Image

    files = sorted(p for p in (images / "test").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    if not files:
        raise SystemExit(f"no test images under {images / 'test'}")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files])


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tritonserver exited with code {proc.returncode} while loading the repository")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"tritonserver was not ready after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_serve", description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="tritonserver binary with the TensorRT backend")
    ap.add_argument("--engine", required=True, type=Path, help="engine folder (engine.plan + engine.json)")
    ap.add_argument("--images", type=Path, help="MVTec-style folder (default: labelled textures)")
    ap.add_argument("--count", type=int, default=8, help="images compared with the engine")
    ap.add_argument("--requests", type=int, default=32, help="timed requests, one after another")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pdd-gpu-serve-"))
    repo = build_triton_repo(work / "repo", flavour="tensorrt", engine_dir=args.engine, max_batch_size=8)
    engine = TensorRTRuntime(args.engine)
    size = engine.metadata.image_size[0]
    pixels = _pixels(args.images, size, args.count)
    direct = engine.predict(normalise_nhwc(pixels))
    engine.close()
    http, grpc, metrics = free_ports(3)
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([args.server, f"--model-repository={repo}", "--http-address=127.0.0.1",
                             f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
                             "--metrics-address=127.0.0.1", f"--metrics-port={metrics}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            _wait_ready(f"127.0.0.1:{http}", proc, 180)
        except SystemExit:
            log.flush()
            print((work / "server.log").read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        with PDDClient(f"127.0.0.1:{http}") as client:
            served = [client.predict(pixels[i:i + 1]) for i in range(len(pixels))]
            maps = np.concatenate([s["anomaly_map"] for s in served])
            scores = np.concatenate([s["pred_score"] for s in served])
            latencies = []
            for i in range(args.requests):
                start = time.perf_counter()
                client.predict(pixels[i % len(pixels)][None])
                latencies.append(time.perf_counter() - start)
    finally:
        stop_group(proc, timeout_s=30)
        log.close()
    span = float(direct["anomaly_map"].max() - direct["anomaly_map"].min()) or 1.0
    result = {
        "engine": str(args.engine), "precision": engine.metadata.precision, "images": len(pixels),
        "map_max_rel_error": float(np.abs(maps - direct["anomaly_map"]).max() / span),
        "score_max_abs_error": float(np.abs(scores - direct["pred_score"]).max()),
        "score_ranks_equal": bool((np.argsort(scores) == np.argsort(direct["pred_score"])).all()),
        "latency_p50_us": float(np.percentile(latencies, 50) * 1e6),
        "latency_p99_us": float(np.percentile(latencies, 99) * 1e6),
        "throughput_infer_s": len(latencies) / float(sum(latencies)),
        "command": " ".join(["python", "-m", "benchmarks.gpu_serve", *(argv if argv is not None else sys.argv[1:])]),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["map_max_rel_error"] <= 1e-3 and result["score_ranks_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
