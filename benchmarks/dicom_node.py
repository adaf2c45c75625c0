"""Benchmark of the DICOM node: a CT series (default 100 slices of 512²) from the first C-STORE to the last result
stored in Orthanc, how much of that is inference, and the node's memory from series to series.

What runs: a local Orthanc (``dicom_node.orthanc``), ``pdd dicom listen`` as its own process (a fresh brain-synth
model at ``--image-size``, fixed thresholds so that all three outputs are written, results to Orthanc by
C-STORE), and this script as the modality: it sends each series in one association and polls Orthanc's REST
API until the three results of that series are stored. Series are sent one after another; between them, with
the node idle, the same model (same weights: fresh models are seeded alike) scores the same slices in this
process, for the inference time side by side:

* ``inference_s``: what ``pdd predict`` spends on the series: decode with the project's readers, preprocess,
  forward, in batches of ``--batch-size``; ``forward_s``: the forward passes alone;
* ``end_to_end_s``: first C-STORE sent to the last result found in Orthanc; ``node_s``: the same less the quiet
  period the node waits by design (``--quiet-s``); ``overhead``: ``node_s / inference_s - 1`` (target ≤ 0.10);
* from the node's job record: its scoring time (decode, forward, map resize), writing and sending;
* the node's resident memory after each series (and its peak), for flatness.

Example::

    python -m benchmarks.dicom_node --out benchmarks/results/dicom-node --series 3 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import CTImageStorage, generate_uid

from benchmarks.common import environment, exit_on_termination, free_ports
from dicom_node.orthanc import Orthanc
from dicom_node.spool import read_jobs
from dicom_node.synthetic import write_ct_series
from pdd.precision import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def _restamped(files: list[Path], folder: Path, k: int) -> list[Path]:
    """The same slices as a new study and series (new UIDs): series k of the run, without rendering again."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(entropy_srcs=["bench study", str(k)]), generate_uid(entropy_srcs=["bench", str(k)])
    out = []
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series, str(n)])
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
    return out


def _send(files: list[Path], port: int) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PDD")
    if not assoc.is_established:
        raise SystemExit("the node did not accept the association")
    try:
        for msg_id, path in enumerate(files, start=1):
            status = assoc.send_c_store(pydicom.dcmread(path), msg_id=msg_id)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"C-STORE of {path.name} answered {status}")
    finally:
        assoc.release()


def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _node(args: argparse.Namespace, work: Path, port: int, dest: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdd.cli", "dicom", "listen", "--aet", "PDD", "--host", "127.0.0.1", "--port",
           str(port), "--dest", dest, "--spool", str(work / "spool"), "--config", "brain-synth",
           "--set", f"image_size={args.image_size}", "--threshold", "4.0", "--pixel-threshold", "4.0",
           "--quiet-s", str(args.quiet_s), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    log = work / "node.log"
    with open(log, "wb") as fh:
        node = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while b"listening on" not in log.read_bytes():
        if node.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the node did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return node


def _wait_for_results(pacs: Orthanc, study_uid: str, timeout_s: float) -> float:
    """Poll Orthanc until the study holds the three results (the source series went to the node only); the
    time it did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = pacs.lookup(study_uid)
        if found and len(pacs.get(f"/studies/{found[0]['ID']}")["Series"]) == 3:
            return time.perf_counter()
        time.sleep(0.05)
    raise SystemExit(f"no results for study {study_uid} within {timeout_s:.0f} s")


def _sent_job(spool: Path, study_uid: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The study's job record once the node has recorded it as sent (it does so after the destination
    acknowledged the last result, so a moment after Orthanc shows them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = next((j for j in read_jobs(spool) if j["study_uid"] == study_uid), None)
        if job is not None and job["state"] == "sent":
            return job
        time.sleep(0.05)
    raise SystemExit(f"the node did not record the job of study {study_uid} as sent within {timeout_s:.0f} s")


def _inference(model: Any, files: list[Path], batch_size: int) -> dict[str, float]:
    """``pdd predict``'s work on the slices (decode, preprocess, forward) and the forward passes alone."""
    import torch

    from pdd.data.readers import read_image, to_model_input

    t0 = time.perf_counter()
    forward = 0.0
    for start in range(0, len(files), batch_size):
        x = torch.stack([to_model_input(read_image(p), model.cfg.image_size) for p in files[start:start + batch_size]])
        t1 = time.perf_counter()
        with torch.inference_mode():
            model(x)
        forward += time.perf_counter() - t1
    return {"inference_s": time.perf_counter() - t0, "forward_s": forward}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from pdd.checkpoint import load_model

    torch.set_num_threads(args.threads)
    print(f"writing a {args.slices}-slice {args.size}² CT series", flush=True)
    first = write_ct_series(work / "ct", slices=args.slices, image_size=args.size, seed=0, defects=[args.slices // 2])
    dicom_port, http_port, node_port = free_ports(3)
    model = load_model(config="brain-synth", image_size=args.image_size)
    with Orthanc(work / "orthanc", dicom_port=dicom_port, http_port=http_port) as pacs:
        node = _node(args, work, node_port, pacs.address)
        try:
            rows = []
            for k in range(args.series):
                files = _restamped(first, work / f"series{k}", k)
                study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
                t0 = time.perf_counter()
                _send(files, node_port)
                t_sent = time.perf_counter()
                t_end = _wait_for_results(pacs, study, timeout_s=60 + 30 * args.slices)
                job = _sent_job(work / "spool", study)
                memory = _memory_kb(node.pid)
                side = _inference(model, files, args.batch_size)
                row = {"series": k, "end_to_end_s": t_end - t0, "sending_s": t_sent - t0,
                       "node_s": t_end - t0 - args.quiet_s, **side,
                       "node_scoring_s": job["result"]["infer_s"], "node_writing_s": job["result"]["write_s"],
                       "node_sending_s": job["timings"]["sent_at"] - job["timings"]["inferred_at"],
                       "node_rss_mb": memory["VmRSS"] / 1024, "node_peak_rss_mb": memory["VmHWM"] / 1024}
                row["overhead"] = row["node_s"] / row["inference_s"] - 1.0
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        except SystemExit:
            print(f"node log (tail):\n{(work / 'node.log').read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
    medians = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "series"}
    return {"command": " ".join(["python -m benchmarks.dicom_node", *sys.argv[1:]]), "cpu_model": cpu_model(),
            "environment": environment(), "settings": vars(args) | {"out": str(args.out)}, "series": rows,
            "medians": medians}


def _markdown(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["medians"]
    env = result["environment"]
    lines = [
        f"# DICOM node: a {s['slices']}-slice {s['size']}² CT series through `pdd dicom listen` to Orthanc",
        "",
        f"Command: `{result['command']}`  ",
        f"CPU: {result['cpu_model']} ({env['cpu_count']} cores; torch {env['versions']['torch']}, {s['threads']} "
        f"threads in the node and for the side-by-side inference); load average at the end "
        f"{', '.join(f'{x:.2f}' for x in env['load_average'])}.  ",
        f"Model: fresh brain-synth PDD at {s['image_size']}² (random teachers), batch {s['batch_size']}; quiet "
        f"period {s['quiet_s']:g} s; series sent one after another, the same slices under new UIDs each time.",
        "",
        "| series | end to end (s) | less quiet period (s) | inference (s) | forward only (s) | node overhead | "
        "node scoring (s) | writing (s) | sending (s) | node RSS after (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["series"]:
        lines.append(f"| {r['series']} | {r['end_to_end_s']:.2f} | {r['node_s']:.2f} | {r['inference_s']:.2f} | "
                     f"{r['forward_s']:.2f} | {100 * r['overhead']:+.1f} % | {r['node_scoring_s']:.2f} | "
                     f"{r['node_writing_s']:.2f} | {r['node_sending_s']:.2f} | {r['node_rss_mb']:.0f} |")
    rss = [r["node_rss_mb"] for r in result["series"]]
    lines += [
        "",
        f"Medians: end to end {m['end_to_end_s']:.2f} s, of which the quiet period {s['quiet_s']:g} s; the node adds "
        f"{100 * m['overhead']:+.1f} % to the inference time of the same slices (target ≤ +10 %). Node memory after "
        f"each series: {', '.join(f'{x:.0f}' for x in rss)} MB (peak "
        f"{max(r['node_peak_rss_mb'] for r in result['series']):.0f} MB).",
        "",
        # The side-by-side inference runs in another process at another moment; the node's own split is not
        # subject to that noise.
        f"The node's own split (median): outside its scoring (receiving, writing, sending, waiting on the "
        f"spool) {m['node_s'] - m['node_scoring_s']:.2f} s, "
        f"{100 * (m['node_s'] - m['node_scoring_s']) / m['node_scoring_s']:+.1f} % of its scoring time.",
        "",
        "*inference*: decode with the project's readers, preprocess, forward, as `pdd predict` does, measured in the "
        "benchmark process between series while the node is idle. *less quiet period*: end to end minus the time the "
        "node waits after the last instance by design. *node scoring / writing / sending*: from the node's job record "
        "(scoring includes decoding and resizing the maps to 512²).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="results folder (results.json, results.md)")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512, help="rows and columns of the CT slices")
    ap.add_argument("--series", type=int, default=3, help="series sent one after another")
    ap.add_argument("--image-size", type=int, default=256, help="the model's input size")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quiet-s", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    exit_on_termination()
    work = Path(tempfile.mkdtemp(prefix="pdd-dicom-bench-"))
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
