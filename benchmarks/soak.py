"""Soak the served model: several clients, HTTP and gRPC, mixed good and bad requests, for a bounded run.

Every good request's answer is compared with the single-request answer for the same payload, taken before the
run (a wrong answer is any difference over 1e-5 of the map's range); every bad request must get the error
its kind expects (a decode bomb refused by the budget, a file that is no image, pixels with a side over
4096);
anything else is an unexpected error. The server's process group is sampled for its RSS once a second.
Reported: requests, outcomes by kind, p50/p99 latency per tenth of the run, and the RSS slope. Targets
(issue 27): 0 wrong answers, 0 unexpected errors, RSS growth <= 2 % from the first to the last tenth,
p99 of the last tenth <= 1.2x the first. Run::

    python benchmarks/soak.py --requests 2000 --out benchmarks/results/soak

Writes ``OUT/results.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import hostile_files as bombs
from benchmarks.common import cpu_model, free_ports, group_rss_mb
from export.client import InferenceError, PDDClient

SIZE = 128
TARGETS = {"rss_growth": 0.02, "p99_ratio": 1.2}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def payloads(work: Path) -> list[tuple[str, Any, str | None]]:
    """(kind, payload, the error a bad one must get, or None for a good one), cycled through by the clients."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    grey = (np.exp(-((yy - 0.5) ** 2 + (xx - 0.4) ** 2) / 0.05) * 200 + 20).astype(np.uint8)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    dicom = bombs.dicom_deflated(work / "ct.dcm", 96, 80, full=True).read_bytes()
    return [
        ("pixels rgb", rgb[None], None),
        ("pixels grey", grey[None, :, :, None], None),
        ("png bytes", [_png(grey)], None),
        ("dicom bytes", [dicom], None),
        ("png bomb", [bombs.png(work / "bomb.png", 12000, 12000).read_bytes()], "max_pixels"),
        ("pixels rgb", rgb[None], None),
        ("not an image", [b"%PDF-1.4 not an image" * 10], "unrecognised image format"),
        ("png bytes", [_png(rgb)], None),
        ("side over 4096", np.zeros((1, 4100, 4, 3), np.uint8), "largest side accepted is 4096"),
        ("deflated dicom bomb", [bombs.dicom_deflated(work / "bomb.dcm", 30000, 30000).read_bytes()], "max_pixels"),
    ]


class _Run:
    def __init__(self, server: Any, mix: list, references: dict[int, dict], requests: int, clients: int) -> None:
        self.server, self.mix, self.references, self.requests = server, mix, references, requests
        self.clients = clients
        self.lock = threading.Lock()
        self.next = 0
        self.records: list[dict[str, Any]] = []

    def _take(self) -> int | None:
        with self.lock:
            if self.next >= self.requests:
                return None
            self.next += 1
            return self.next - 1

    def worker(self, w: int) -> None:
        url, protocol = (self.server.http_url, "http") if w % 2 == 0 else (self.server.grpc_url, "grpc")
        with PDDClient(url, protocol=protocol, timeout_s=600) as client:
            while (i := self._take()) is not None:
                slot = i % len(self.mix)
                kind, payload, expected = self.mix[slot]
                start = time.monotonic()
                try:
                    out = client.predict(payload)
                    error = None
                except (InferenceError, ValueError) as exc:
                    out, error = None, str(exc)
                latency = time.monotonic() - start
                if expected is None:
                    outcome = "unexpected error" if error else "right" if _same(out, self.references[slot]) else "WRONG"
                else:
                    outcome = "refused as expected" if error and expected in error else "unexpected error" \
                        if error else "WRONG (answered a bad request)"
                with self.lock:
                    self.records.append({"i": i, "t": start, "latency_s": latency, "kind": kind, "protocol": protocol,
                                         "outcome": outcome, "error": (error or "")[:200] if outcome != "right" and
                                         outcome != "refused as expected" else ""})


def _same(out: dict, ref: dict) -> bool:
    tol = 1e-5 * float(np.ptp(ref["anomaly_map"]))
    return bool(np.allclose(out["anomaly_map"], ref["anomaly_map"], atol=tol, rtol=0)
                and np.allclose(out["pred_score"], ref["pred_score"], atol=tol, rtol=0))


def summarise(records: list[dict], rss: list[tuple[float, float]]) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["t"])
    t0, t1 = records[0]["t"], max(r["t"] + r["latency_s"] for r in records)
    tenth = (t1 - t0) / 10
    tenths = []
    for k in range(10):
        lo, hi = t0 + k * tenth, t0 + (k + 1) * tenth
        lat = [r["latency_s"] for r in records if lo <= r["t"] < hi or (k == 9 and r["t"] >= hi)]
        mem = [m for t, m in rss if lo <= t < hi or (k == 9 and t >= hi)]
        tenths.append({"requests": len(lat), "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat else None,
                       "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat else None,
                       "rss_mb": float(np.mean(mem)) if mem else None})
    outcomes = Counter((r["kind"], r["outcome"]) for r in records)
    first, last = tenths[0], tenths[-1]
    return {"requests": len(records), "wall_s": t1 - t0, "tenths": tenths,
            "outcomes": {f"{k} / {o}": n for (k, o), n in sorted(outcomes.items())},
            "wrong": sum(r["outcome"].startswith("WRONG") for r in records),
            "unexpected_errors": sum(r["outcome"] == "unexpected error" for r in records),
            "unexpected_examples": [r["error"] for r in records if r["outcome"] == "unexpected error"][:5],
            "rss_growth": last["rss_mb"] / first["rss_mb"] - 1, "p99_ratio": last["p99_ms"] / first["p99_ms"]}


def _report(s: dict[str, Any], args: argparse.Namespace) -> str:
    met = {"wrong answers": s["wrong"] == 0, "unexpected errors": s["unexpected_errors"] == 0,
           "RSS growth": s["rss_growth"] <= TARGETS["rss_growth"], "p99 ratio": s["p99_ratio"] <= TARGETS["p99_ratio"]}
    lines = ["# Soak: the served model under mixed good and bad requests", "",
             f"Command: `python benchmarks/soak.py --requests {args.requests} --clients {args.clients} "
             f"--out {args.out}`",
             "", f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, load average at the end "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}. Server: the "
             f"bundled Triton 2.51, python flavour, brain-synth at {SIZE}² (random teachers), max_batch_size 4. "
             f"{args.clients} clients, half HTTP, half gRPC, closed loop; 10 payloads cycled: 6 good (uint8 RGB "
             "and grey pixels, PNG and deflated DICOM bytes), 4 bad (two decode bombs, a file that is no image, "
             "pixels with a side over 4096).", "",
             f"**{s['requests']:,} requests in {s['wall_s']:.0f} s: {s['wrong']} wrong answers, "
             f"{s['unexpected_errors']} unexpected errors, RSS growth {100 * s['rss_growth']:+.2f} % (first to last "
             f"tenth), p99 last/first tenth {s['p99_ratio']:.2f}x.** Targets: "
             + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()) + ".", "",
             "| tenth | requests | p50 (ms) | p99 (ms) | server RSS (MB) |", "|---|---|---|---|---|"]
    for k, t in enumerate(s["tenths"], 1):
        lines.append(f"| {k} | {t['requests']} | {t['p50_ms']:,.0f} | {t['p99_ms']:,.0f} | {t['rss_mb']:,.0f} |")
    lines += ["", "| payload / outcome | requests |", "|---|---|",
              *(f"| {k} | {n:,} |" for k, n in s["outcomes"].items())]
    if s["unexpected_examples"]:
        lines += ["", "Unexpected errors (first five):", *(f"- `{e}`" for e in s["unexpected_examples"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from export.serve import TritonServer
    from export.triton_repo import build_triton_repo
    from pdd.checkpoint import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--repo", type=Path, help="a python-flavour repository at 128² (default: exported here)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pdd-soak-"))
    repo = args.repo or build_triton_repo(work / "repo", flavour="python", max_batch_size=4,
                                          model=load_model(config="brain-synth", image_size=SIZE))
    mix = payloads(work)
    server = TritonServer(repo, *free_ports(3), log=work / "tritonserver.log").start(timeout_s=600)
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    try:
        with PDDClient(server.http_url, timeout_s=600) as client:
            references = {k: client.predict(p) for k, (_, p, bad) in enumerate(mix) if bad is None}

        def sample() -> None:
            while not stop.wait(1.0):
                rss.append((time.monotonic(), group_rss_mb(server.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run = _Run(server, mix, references, args.requests, args.clients)
        workers = [threading.Thread(target=run.worker, args=(w,)) for w in range(args.clients)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        sampler.join()
    finally:
        server.stop()
    summary = summarise(run.records, rss)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**summary, "rss_samples": rss}, indent=1))
    (args.out / "results.md").write_text(_report(summary, args))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
