"""Hostile inputs and faults, measured: the decode bombs of issue 27 at full size, locally and through the
server (time to the refusal, peak memory), a real 10^9-element request, and SIGKILL of each Python-backend
stub and of the server itself, with and without the watchdog of ``pdd serve``.

Local: ``pdd predict --config brain-synth --set image_size=128 FILE`` in a child process per file (its wall
time and peak RSS, the model included), and the reader alone in this process. Server: a python-flavour
repository of the same model; ``pdd predict --server`` per file, the server's process group sampled for its
peak RSS, then one request whose answer must equal the one given before. Run::

    python benchmarks/hostile.py --out benchmarks/results/hostile

Writes ``OUT/results.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import hostile_files as bombs
from benchmarks.common import RssSampler, cpu_model, free_ports, group_rss_mb
from export.client import InferenceError, PDDClient
from export.watchdog import Watchdog, backend_stubs

CONFIG = ["--config", "brain-synth", "--set", "image_size=128"]
# The files of the table, at full size: (label, builder).
FILES = [
    ("PNG 8-bit grey, 12000 x 12000", lambda d: bombs.png(d / "big.png", 12000, 12000, full=True)),
    ("TIFF 16-bit deflate, 12000 x 12000", lambda d: bombs.tiff(d / "big.tif", 12000, 12000, full=True)),
    ("NIfTI-1 gz, 20000 x 20000 x 4 int16", lambda d: bombs.nifti_gz(d / "big.nii.gz", (20000, 20000, 4), full=True)),
    ("DICOM deflated, 30000 x 30000 16-bit",
     lambda d: bombs.dicom_deflated(d / "big.dcm", 30000, 30000, full=True)),
    ("DICOM, 100,000 frames of 64 x 64", lambda d: bombs.dicom_frames(d / "frames.dcm", 100_000)),
]


# Runs `pdd` in the child and reports the child's own peak RSS (VmHWM) last on stderr: ru_maxrss would
# count the pages of this process that the child had between fork and exec.
_LAUNCH = ("import atexit, runpy, sys; atexit.register(lambda: print('VmHWM ' + next(l for l in open("
           "'/proc/self/status') if l.startswith('VmHWM')).split()[1], file=sys.stderr)); "
           "sys.argv = ['pdd', *sys.argv[1:]]; runpy.run_module('pdd.cli', run_name='__main__')")


def _child(args: list[str]) -> dict[str, Any]:
    """Run ``pdd ARGS``; its exit status, wall time, peak RSS and the last line of stderr before the peak."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    peak = int(lines.pop().split()[1]) / 1024
    return {"status": proc.returncode, "wall_s": wall, "peak_rss_mb": peak, "message": lines[-1] if lines else ""}


def _reader(path: Path) -> dict[str, Any]:
    from pdd.data.readers import ImageReadError, read_image

    start = time.perf_counter()
    try:
        read_image(path)
        outcome = "decoded"
    except ImageReadError as exc:
        outcome = type(exc).__name__
    return {"reader_s": time.perf_counter() - start, "reader_outcome": outcome}


def _answer(url: str, image: np.ndarray) -> dict[str, np.ndarray]:
    with PDDClient(url, timeout_s=600) as client:
        return client.predict(image)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    tol = 1e-5 * float(np.ptp(a["anomaly_map"]))
    return bool(np.allclose(a["anomaly_map"], b["anomaly_map"], atol=tol, rtol=0))


def _kill(server: Any, target: str, image: np.ndarray, reference: dict, watch: bool, observe_s: float) -> dict:
    """SIGKILL ``target`` (a model's stub, or "tritonserver") under a 2-client load; what followed."""
    watchdog = Watchdog(server, interval_s=0.5) if watch else None
    stop = threading.Event()
    results: list[tuple[float, float, str]] = []

    def load() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                outcome = "right" if _same(_answer(server.http_url, image), reference) else "WRONG"
            except InferenceError as exc:
                outcome = f"error: {exc}"
                time.sleep(0.2)
            results.append((t0, time.monotonic(), outcome))

    threads = [threading.Thread(target=load) for _ in range(2)]
    if watchdog is not None:
        threads.append(threading.Thread(target=watchdog.run, args=(stop,)))
    for t in threads:
        t.start()
    time.sleep(3)
    pid = server.pid if target == "tritonserver" else next(
        p for p, m in backend_stubs(server.pid).items() if m == target)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while time.monotonic() - killed < observe_s and not (
            watch and any(t0 > killed and r == "right" for t0, _, r in results)):
        time.sleep(0.25)
    observed = time.monotonic() - killed
    stop.set()
    for t in threads:
        t.join(timeout=300)
    after = [(t0 - killed, t1 - killed, r) for t0, t1, r in results if t1 > killed]
    first_right = min((t1 for t0, t1, r in after if t0 > 0 and r == "right"), default=None)
    errors = [r for _, _, r in after if r.startswith("error")]
    return {"target": target, "watchdog": watch, "observed_s": observed, "requests_after_kill": len(after),
            "in_flight_errors": sum(1 for t0, _, r in after if t0 < 0 and r != "right"),
            "errors": len(errors), "wrong": sum(r == "WRONG" for _, _, r in after),
            "first_error": errors[0][:160] if errors else "", "first_right_after_s": first_right,
            "restarts": [{"reason": r.reason, "detected_after_s": r.detected_at - killed, "restart_s": r.seconds}
                         for r in (watchdog.restarts if watchdog else [])]}


def _big_request(server: Any, image: np.ndarray, reference: dict) -> dict:
    """A real 10^9-element uint8 request (one 31623 x 31623 image, 1.0 GB) over HTTP."""
    big = np.zeros((1, 31623, 31623, 1), np.uint8)
    before = group_rss_mb(server.pid)
    start = time.perf_counter()
    with RssSampler(server.pid) as rss:
        try:
            _answer(server.http_url, big)
            message = "ANSWERED"
        except InferenceError as exc:
            message = str(exc)
    elapsed = time.perf_counter() - start
    del big
    time.sleep(10)
    return {"elements": 31623 * 31623, "seconds": elapsed, "message": message, "server_rss_before_mb": before,
            "server_peak_rss_mb": rss.peak_mb,
            "server_rss_after_mb": group_rss_mb(server.pid), "next_answer_right": _same(
                _answer(server.http_url, image), reference)}


def _repo(work: Path) -> Path:
    from export.triton_repo import build_triton_repo
    from pdd.checkpoint import load_model

    repo = work / "repo"
    if not (repo / "pdd" / "config.pbtxt").is_file():
        build_triton_repo(repo, flavour="python", model=load_model(config="brain-synth", image_size=128),
                          max_batch_size=4)
    return repo


def _table(rows: list[dict], where: str) -> list[str]:
    out = [f"| file ({where}) | on disk | exit | wall (s) | peak RSS (MB) | reader alone (s) | message |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        server = (f" (server {r['server_rss_before_mb']:,.0f} before, peak {r['server_peak_rss_mb']:,.0f})"
                  if "server_peak_rss_mb" in r else "")
        reader = f"{r['reader_s']:.3f}" if "reader_s" in r else ""
        out.append(f"| {r['label']} | {r['size_kb']:,.0f} KB | {r['status']} | {r['wall_s']:.2f} | "
                   f"{r['peak_rss_mb']:,.0f}{server} | {reader} | {r['message'][:220].replace('|', '/')} |")
    return out


def _report(data: dict, command: str) -> str:
    lines = ["# Hostile inputs and faults", "", f"Command: `{command}`", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, load average at the end "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}. Model: config brain-synth at 128², random "
             "teachers; server: the bundled "
             "Triton 2.51, python flavour, plugin ONNX form.", "",
             "## The decode bombs of the issue, at full size", "",
             "Local: `pdd predict " + " ".join(CONFIG) + " FILE --out DIR`, one process per file (wall time and peak "
             "RSS include starting Python and building the model); *reader alone*: `read_image(FILE)` in the "
             "benchmark's process.", "", *_table(data["local"], "local"), "",
             "Through the server: `pdd predict --server URL FILE` (the client's wall time and peak RSS; the server "
             "group's peak RSS in brackets); after each, one request whose answer must equal the one given before "
             f"the bombs: {'all equal' if all(r['next_answer_right'] for r in data['server']) else 'NOT ALL EQUAL'}.",
             "", *_table(data["server"], "server"), ""]
    big = data["big_request"]
    lines += ["## A 10^9-element request", "",
              f"One uint8 image of 31623 x 31623 (1.0 GB) over HTTP: answered in {big['seconds']:.1f} s with "
              f"`{big['message'][:200]}`; the server group's RSS went from {big['server_rss_before_mb']:,.0f} MB to a "
              f"peak of {big['server_peak_rss_mb']:,.0f} MB "
              f"({big['server_rss_after_mb']:,.0f} MB after); next answer right: {big['next_answer_right']}. Triton "
              "2.51 has no request-size limit: it receives the whole tensor before the preprocess model refuses it, "
              "so a proxy in front of the server should cap request bodies (deploy/README.md).", "",
              "## SIGKILL under a two-client load", "",
              "| killed | watchdog | requests after the kill | in flight, failed | errors | wrong answers | "
              "first error | detected after (s) | restart (s) | first right answer after (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for k in data["kills"]:
        restart = k["restarts"][0] if k["restarts"] else None
        first = "none" if k["first_right_after_s"] is None else f"{k['first_right_after_s']:.1f}"
        lines.append(f"| {k['target']} | {'yes' if k['watchdog'] else 'no'} | {k['requests_after_kill']} | "
                     f"{k['in_flight_errors']} | {k['errors']} | {k['wrong']} | {k['first_error'].replace('|', '/')} | "
                     f"{'' if restart is None else format(restart['detected_after_s'], '.1f')} | "
                     f"{'' if restart is None else format(restart['restart_s'], '.1f')} | "
                     f"{first} (watched {k['observed_s']:.0f} s) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from export.serve import TritonServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hostile"))
    ap.add_argument("--work", type=Path, help="where the files and the repository go (default: a temporary folder)")
    ap.add_argument("--observe-s", type=float, default=60.0, help="how long a kill without the watchdog is watched")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="pdd-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    files = [(label, build(work)) for label, build in FILES]
    data: dict[str, Any] = {"local": [], "server": [], "kills": []}
    for label, path in files:
        row = {"label": label, "size_kb": path.stat().st_size / 1024, **_reader(path),
               **_child(["predict", *CONFIG, str(path), "--out", str(work / "out")])}
        data["local"].append(row)
        print(row, flush=True)
    server = TritonServer(_repo(work), *free_ports(3), log=work / "tritonserver.log").start(timeout_s=600)
    try:
        image = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
        reference = _answer(server.http_url, image)
        for label, path in files:
            before = group_rss_mb(server.pid)
            with RssSampler(server.pid) as rss:
                row = {"label": label, "size_kb": path.stat().st_size / 1024,
                       **_child(["predict", "--server", server.http_url, str(path)])}
            right = _same(_answer(server.http_url, image), reference)
            row.update(server_rss_before_mb=before, server_peak_rss_mb=rss.peak_mb, next_answer_right=right)
            data["server"].append(row)
            print(row, flush=True)
        data["kills"].append(_kill(server, "pdd_engine", image, reference, watch=False, observe_s=args.observe_s))
        Watchdog(server).restart("after the unwatched kill")
        for target in ("preprocess", "pdd_engine", "postprocess", "tritonserver"):
            data["kills"].append(_kill(server, target, image, reference, watch=True, observe_s=300))
            print(data["kills"][-1], flush=True)
        # Last: Triton keeps much of the memory such a request took.
        data["big_request"] = _big_request(server, image, reference)
        print(data["big_request"], flush=True)
    finally:
        server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(data, indent=1))
    (args.out / "results.md").write_text(_report(data, "python benchmarks/hostile.py --out " + str(args.out)))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
