"""``pdd dicom listen | infer | watch | status``: the command line of the DICOM node.

:func:`add_parser` registers the subcommands on the ``pdd`` parser; it imports nothing heavy, so ``pdd --help``
stays fast. Each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]

log = logging.getLogger("pdd.dicom")


def _scorer(args: argparse.Namespace):
    """The scorer named by --server, or --checkpoint / --config (a local model)."""
    from dicom_node.scoring import check_local_precision, local_scorer, server_scorer

    common = {"precision": args.precision, "threshold": args.threshold, "pixel_threshold": args.pixel_threshold,
              "batch_size": args.batch_size, "dicom_window": args.dicom_window}
    if args.server:
        from export.client import PDDClient

        client = PDDClient(args.server, protocol=args.protocol, model_name=args.model_name)
        return server_scorer(client, **common)
    if not (args.checkpoint or args.config):
        raise SystemExit("give --checkpoint CKPT, --config NAME (a freshly initialised model) or --server URL")
    check_local_precision(args.precision)  # before the model is built: a wrong option fails at once
    import torch

    from pdd.checkpoint import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, args.config, overrides=args.set or (), device=device,
                       scan_impl=args.scan_impl)
    return local_scorer(model, device=device, checkpoint=args.checkpoint, config=args.config, **common)


def _destinations(args: argparse.Namespace) -> list:
    from dicom_node.send import DicomDestination, FolderDestination, StowDestination

    out = [DicomDestination(d, calling_aet=args.aet) for d in args.dest or []]
    out += [StowDestination(url) for url in args.stow or []]
    out += [FolderDestination(p) for p in args.out or []]
    if not out:
        raise SystemExit("give at least one destination: --dest AET@HOST:PORT, --stow URL or --out DIR")
    return out


def _quiet_libraries(verbose: bool) -> None:
    """highdicom logs every module it copies and pynetdicom every message: warnings only, unless -v."""
    for name in ("highdicom", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _node(args: argparse.Namespace):
    from dicom_node.node import Node
    from dicom_node.spool import Spool, SpoolError

    max_bytes = None if args.spool_max_gb is None else int(args.spool_max_gb * 1e9)
    try:
        spool = Spool(args.spool, max_bytes=max_bytes)
    except SpoolError as exc:
        raise SystemExit(f"pdd dicom: error: {exc}") from None
    destinations = _destinations(args)
    return Node(spool, _scorer(args), destinations, quiet_s=args.quiet_s, retry_s=args.retry_s,
                retry_max_s=args.retry_max_s, dicom_window=args.dicom_window)


def _run_until_signalled(stop: threading.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)


def cmd_listen(args: argparse.Namespace) -> int:
    from dicom_node.scp import serve

    _quiet_libraries(args.verbose)
    node = _node(args).start()
    server = serve(node, args.aet, args.host, args.port, args.allow_aet or ())
    print(f"pdd dicom: {args.aet} listening on {args.host}:{args.port}, spool {args.spool}", flush=True)
    try:
        _run_until_signalled(threading.Event())
    finally:
        server.shutdown()
        node.stop()
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from dicom_node.watch import watch

    _quiet_libraries(args.verbose)
    node = _node(args).start()
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(node, args.folder, stop), kwargs={"poll_s": args.poll_s},
                              daemon=True)
    thread.start()
    print(f"pdd dicom: watching {args.folder}, spool {args.spool}", flush=True)
    try:
        _run_until_signalled(stop)
    finally:
        stop.set()
        thread.join(30)
        node.stop()
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from dicom_node.infer import infer_files

    _quiet_libraries(args.verbose)
    summary = infer_files(_scorer(args), args.inputs, args.out, skip_bad=args.skip_bad)
    brief = [{k: s[k] for k in ("series_uid", "frames", "series_score", "finding")} for s in summary["series"]]
    print(json.dumps({"series": brief, "refused": summary["refused"], "skipped": summary["skipped"]}, indent=2))
    print(f"results in {args.out} ({args.out / 'results.json'})")
    return 0


def _status_rows(jobs: list[dict[str, Any]]) -> list[str]:
    rows = [f"{'job':<30} {'state':<10} {'frames':>6} {'tries':>5}  {'finding':<9} series / last error"]
    for job in jobs:
        result = job.get("result") or {}
        frames = result.get("frames", job.get("instances", ""))
        note = job["errors"][-1] if job["state"] in ("refused", "failed") or job.get("attempts") else job["series_uid"]
        finding = str(result.get("finding", "")).split(" ")[0]
        rows.append(f"{job['id']:<30} {job['state']:<10} {frames!s:>6} {job.get('attempts', 0):>5}  {finding:<9} "
                    f"{note}")
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.spool import read_jobs

    jobs = read_jobs(args.spool)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    print("\n".join(_status_rows(jobs)))
    counts = {s: sum(j["state"] == s for j in jobs) for s in sorted({j["state"] for j in jobs})}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) or "no jobs")
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", type=Path, help="a PDD checkpoint (its calibration sets the thresholds)")
    g.add_argument("--config", help="config name or YAML file: a freshly initialised model (for trials)")
    g.add_argument("--server", help="the Triton Inference Server (host:port) instead of a local model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (with --config)")
    p.add_argument("--scan-impl", help="scan implementation of the local model (default: the config's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--precision", default="fp32", help="precision the model runs in, recorded in every output "
                   "(local model: fp32; --server: what the served engine runs)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http", help="with --server")
    p.add_argument("--model-name", default="pdd", help="the served ensemble, with --server")
    p.add_argument("--threshold", type=float, help="raw image score above which a frame is abnormal "
                   "(default: the calibration's)")
    p.add_argument("--pixel-threshold", type=float, help="raw map value above which a pixel is in the mask "
                   "(default: the calibration's)")
    p.add_argument("--dicom-window", type=float, nargs=2, metavar=("CENTRE", "WIDTH"),
                   help="VOI window for every frame instead of the files' own")
    p.add_argument("--batch-size", type=int, default=8, help="frames per inference batch")


def _node_options(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--spool", required=True, type=Path, help="the durable job folder")
    p.add_argument("--spool-max-gb", type=float, help="refuse new instances beyond this spool size")
    p.add_argument("--dest", action="append", metavar="AET@HOST:PORT", help="send results by C-STORE (repeatable)")
    p.add_argument("--stow", action="append", metavar="URL", help="send results by STOW-RS to this DICOMweb root")
    p.add_argument("--out", action="append", type=Path, metavar="DIR", help="also copy results into DIR/<series>/")
    p.add_argument("--aet", default="PDD", help="the node's AE title (also the calling AE title when sending)")
    p.add_argument("--quiet-s", type=float, default=10.0,
                   help="a series is complete after this many seconds without a new instance")
    p.add_argument("--retry-s", type=float, default=5.0, help="first wait before re-sending (doubles each time)")
    p.add_argument("--retry-max-s", type=float, default=300.0, help="longest wait between re-sends")


def add_parser(sub: Any) -> None:
    """Register ``pdd dicom ...`` on the ``pdd`` command's subparsers."""
    dicom = sub.add_parser("dicom", help="a DICOM node: DICOM in, Parametric Map + Segmentation + SR out")
    cmds = dicom.add_subparsers(dest="dicom_command", required=True)

    p = cmds.add_parser("listen", help="a DICOM Storage SCP: series in by C-STORE, results to --dest / --stow")
    _node_options(p)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--allow-aet", action="append", metavar="AET", help="accept only these calling AE titles")
    p.set_defaults(fn=cmd_listen)

    p = cmds.add_parser("watch", help="infer series dropped as DICOM files into a folder")
    p.add_argument("folder", type=Path)
    _node_options(p)
    p.add_argument("--poll-s", type=float, default=1.0, help="how often the folder is scanned")
    p.set_defaults(fn=cmd_watch)

    p = cmds.add_parser("infer", help="DICOM files or folders -> results per series (no network)")
    _model_options(p)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path, help="OUT/<series>/{pm,seg,sr}.dcm and OUT/results.json")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files (listed in results.json)")
    p.set_defaults(fn=cmd_infer)

    p = cmds.add_parser("status", help="the jobs of a spool and their states")
    p.add_argument("--spool", required=True, type=Path)
    p.add_argument("--json", action="store_true", help="the full job records")
    p.set_defaults(fn=cmd_status)
