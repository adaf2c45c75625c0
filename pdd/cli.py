"""The ``pdd`` command: data synth, train, calibrate, eval, predict, demo, export, serve, bench, dicom.

Every command that takes ``--checkpoint`` also accepts ``--config NAME`` alone, meaning a freshly
initialised model (random teachers unless the config names weight files): for smoke tests and speed runs.

This is the only ``pdd`` module that imports ``export`` (``pdd predict --server``, ``pdd export``, ``pdd serve``),
and nothing imports it. Each command imports what it needs when it runs, so ``pdd --help`` starts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pdd.cli_models import (
    add_budget_args,
    add_model_args,
    add_precision_args,
    decode_budget,
    device_of,
    int8_for_calibration,
    model_from_args,
    model_precision,
    precision_label,
    require_model_source,
    run_gate,
    served_precision,
    typed_fp16_model,
)
from pdd.config import (
    CONFIG_DIR,
    ConfigError,
    DataConfig,
    apply_overrides,
    atomic_write_text,
    resolve_config,
)
from pdd.impl_names import DEPRECATED_SCAN_GRAPHS

__all__ = ["CONFIG_DIR", "build_parser", "main", "resolve_config"]

log = logging.getLogger("pdd")


# --- commands -----------------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    from pdd.data import generate_brain_synth

    t0 = time.perf_counter()
    info = generate_brain_synth(args.out, seed=args.seed, count=args.count, image_size=args.image_size,
                                contrast=args.contrast, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k == "counts"}, indent=2))
    print(f"brain-synth written to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from pdd.train import train

    cfg = apply_overrides(resolve_config(args.config), args.overrides)
    if args.data:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, root=str(args.data)))
    if args.skip_bad:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, skip_bad=True))
    result = train(cfg, args.out, resume=args.resume, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {result.best_checkpoint} "
              f"(epoch {result.best_epoch}, val loss {result.best_val_loss:.5f})")
        if result.calibration is not None:
            print(f"operating point: image {result.calibration.image.describe()}")
    return 0


def _calibration_choice(args: argparse.Namespace) -> tuple[str | None, float | None]:
    for method, value in (("fpr", args.target_fpr), ("sensitivity", args.target_sensitivity),
                          ("specificity", args.target_specificity)):
        if value is not None:
            return method, value
    return None, None


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pdd.checkpoint import load_model, store_calibration
    from pdd.evaluate import calibrate
    from pdd.train import open_dataset

    device = device_of(args.device)
    if args.precision == "fp16":
        model, _ = typed_fp16_model(args)
    else:  # int8 is quantized below, from the checkpoint's quantization or this split's normal images
        precision = "fp32" if args.precision == "int8" else None
        model = load_model(args.checkpoint, device=device, precision=model_precision(args, device, precision))
    data = model.cfg.data
    data = DataConfig(root=str(args.data), layout=args.layout or data.layout, class_names=data.class_names,
                      skip_bad=args.skip_bad or data.skip_bad)
    dataset = open_dataset(data, args.split, model.cfg.image_size)
    if args.precision == "int8":
        model = int8_for_calibration(args, model, dataset)
    method, target = _calibration_choice(args)
    calibration = calibrate(model, dataset, method, target, source=f"{args.data} ({args.split} split)",
                            batch_size=args.batch_size, device=device, precision=args.precision)
    store_calibration(args.checkpoint, calibration)
    text = json.dumps(calibration.to_dict(), indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    for target_path in args.export or []:
        from export.triton_repo import store_calibration

        print(f"calibration written to {store_calibration(target_path, calibration)}")
    print(f"image: {calibration.image.describe()}")
    print(f"pixel: {calibration.pixel_point.describe()}")
    print(f"stored in {args.checkpoint} as its {calibration.precision} calibration"
          + (f" and {args.out}" if args.out else ""))
    return 0


def _test_set(args: argparse.Namespace, model: Any):
    from pdd.train import open_dataset

    data = model.cfg.data
    data = DataConfig(root=str(args.data), layout=args.layout or data.layout, class_names=data.class_names,
                      skip_bad=args.skip_bad or data.skip_bad)
    return open_dataset(data, "test", model.cfg.image_size)


def cmd_eval(args: argparse.Namespace) -> int:
    from pdd.evaluate import evaluate, metrics_table

    device = device_of(args.device)
    reference = None
    if args.precision == "fp16":
        model, reference = typed_fp16_model(args)
    else:
        model = model_from_args(args, device)
    dataset = _test_set(args, model)
    source = args.checkpoint or f"config {args.config} (fresh)"
    label = precision_label(model)
    result = evaluate(model, dataset, args.out, batch_size=args.batch_size, device=device,
                      title=f"{model.cfg.model.upper()} evaluation ({label})",
                      extra={"model": source, "data": str(args.data), "precision": label})
    print(metrics_table(result.metrics))
    print(f"report: {Path(args.out) / 'report.html'}")
    if args.against:
        return run_gate(args, model, result, dataset, device, reference)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pdd.predict import ModelPredictor, predict_with

    common = {"batch_size": args.batch_size, "nifti_axis": args.nifti_axis, "dicom_window": args.dicom_window,
              "skip_bad": args.skip_bad, "budget": decode_budget(args)}
    if args.server:
        from export.client import InferenceError, PDDClient, ServerPredictor

        try:
            with PDDClient(args.server, protocol=args.protocol, model_name=args.model_name, shm=args.shm) as client:
                results = predict_with(ServerPredictor(client, args.dicom_window), args.inputs, args.out, **common)
        except InferenceError as exc:  # the server's own words, on one line
            print(f"pdd predict: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
    else:
        device = device_of(args.device)
        require_model_source(args)  # these are checked now; the model is built for the first image read
        precision = model_precision(args, device)
        predictor = ModelPredictor(lambda: model_from_args(args, device, resolved=precision), device,
                                   threshold=args.threshold,
                                   pixel_threshold=args.pixel_threshold)
        results = predict_with(predictor, args.inputs, args.out, **common)
    print(json.dumps(results, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthesise brain-synth, train a small PDD briefly, evaluate, write the report."""
    from pdd.checkpoint import load_model
    from pdd.data import generate_brain_synth
    from pdd.evaluate import evaluate, metrics_table
    from pdd.train import open_dataset, train

    t0 = time.perf_counter()
    out = Path(args.out)
    data = out / "brain-synth"
    device = device_of(args.device)
    print(f"[demo] synthesising brain-synth ({args.count} images at {args.image_size}²) into {data}", flush=True)
    generate_brain_synth(data, seed=args.seed, count=args.count, image_size=args.image_size, overwrite=True)
    cfg = apply_overrides(resolve_config("brain-synth"), [
        f"image_size={args.image_size}", f"train.epochs={args.epochs}", "train.batch_size=8", "train.eval_every=1",
        f"train.seed={args.seed}", "train.cosine_t_max=" + str(max(args.epochs, 1)), f"data.root={data}",
        f"train.amp={'true' if device.startswith('cuda') else 'false'}",
        # No weights offline: random teachers, with the conventional prior term (the released "+cos" inverts
        # the maps with them, see benchmarks/results/brain-synth.md); brain-synth already says both.
        "random_teachers=true", "loss.prior_cos_form=one_minus_cos",
    ])
    print(f"[demo] training PDD for {args.epochs} epochs on {device} (random teachers: no weights offline; "
          "prior term 1 − cos)", flush=True)
    result = train(cfg, out / "train", device=device)
    model = load_model(result.best_checkpoint, device=device)
    print("[demo] evaluating on the test split", flush=True)
    ev = evaluate(model, open_dataset(cfg.data, "test", cfg.image_size), out / "eval", batch_size=8, device=device,
                  title="PDD demo on brain-synth",
                  extra={"checkpoint": str(result.best_checkpoint), "epochs": args.epochs,
                         "teachers": "randomly initialised (offline demo)", "image_size": args.image_size})
    print(metrics_table(ev.metrics))
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s; report: {out / 'eval' / 'report.html'}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import SCAN_IMPLS_BY_FORM, export_onnx

    if args.scan_graph:
        print("pdd export onnx: --scan-graph is deprecated; use --scan-impl graph-sequential|graph-parallel",
              file=sys.stderr)
        args.scan_impl = DEPRECATED_SCAN_GRAPHS[args.scan_graph]
    model = model_from_args(args, "cpu")
    lo, _, hi = args.batch.partition(":")
    # The scan the graph is built with, when --scan-impl names one of the form's; else the form's default.
    scan = args.scan_impl if args.scan_impl in SCAN_IMPLS_BY_FORM[args.form] else None
    report = export_onnx(model, args.out, form=args.form, batch=(int(lo), int(hi or lo)),
                         image_size=args.image_size or model.cfg.image_size, preprocess=args.preprocess,
                         scan_impl=scan)
    print(report)
    return 0


def cmd_export_trt(args: argparse.Namespace) -> int:
    from export.build_trt import main as build_trt

    return build_trt(args.passthrough, prog="pdd export trt")


def cmd_export_triton_repo(args: argparse.Namespace) -> int:
    from export.triton_repo import build_triton_repo, store_calibration

    served, gate, calibration = served_precision(args)
    model = None if args.engine else model_from_args(args, "cpu", precision="fp32")
    path = build_triton_repo(args.out, flavour=args.flavour, model=model, engine_dir=args.engine,
                             max_batch_size=args.max_batch_size, onnx_form=args.onnx_form,
                             decode_budget=decode_budget(args))
    if calibration is not None:
        store_calibration(path, calibration)
    record = {"precision": served, "calibration_precision": calibration.precision if calibration else served,
              "fidelity_gate": gate, "forced": bool(args.force and served != "fp32" and gate is None)}
    atomic_write_text(Path(path) / "precision.json", json.dumps(record, indent=2) + "\n")
    print(f"Triton model repository written to {path} ({served}"
          + (", fidelity gate passed" if gate else ", no fidelity gate (forced)" if record["forced"] else "") + ")")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from export.serve import serve

    return serve(args.repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                 restart=not args.no_restart)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util
    import runpy

    # By module name, not an import: the benchmarks sit above this package and are not always installed.
    if importlib.util.find_spec("benchmarks") is None:
        raise SystemExit("pdd bench runs benchmarks/run.py from a source checkout (pip install -e .); the "
                         "benchmarks package is not in this installation")
    sys.argv = ["benchmarks/run.py", *args.passthrough]
    runpy.run_module("benchmarks.run", run_name="__main__", alter_sys=True)
    return 0


# --- parser ---------------------------------------------------------------------------------------


def _add_data(sub: Any) -> None:
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the brain-synth benchmark (MVTec layout)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, help="total images (default: the built-in split sizes)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--contrast", default="t1", help="t1 or t2 (T2-like contrast from the tissue maps)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_data_synth)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train PDD (or RD4AD) on normal images")
    p.add_argument("--config", required=True, help="config name (e.g. headct, brain-synth, rd4ad-headct) or file")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", type=Path, help="dataset root (overrides data.root)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--device")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")
    p.set_defaults(fn=cmd_train)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="score a test set, compute metrics, write the report")
    add_model_args(p, fp16=True, int8=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--layout", choices=["mvtec", "meta_json"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--against", choices=["fp32"],
                   help="also score the images in this precision and print the fidelity gate (pdd/fidelity.py) of "
                        "--precision against it; written to OUT/gate.json and recorded in the checkpoint; exit "
                        "status 1 when a figure fails")
    p.set_defaults(fn=cmd_eval, image_size=None)


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="choose the operating thresholds on a validation set, store them")
    p.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint to calibrate (updated in place)")
    p.add_argument("--data", required=True, type=Path,
                   help="a validation set in the dataset layout (not the test set)")
    p.add_argument("--split", choices=["test", "train"], default="test",
                   help="test: the labelled part (good and anomalous); train: normal images only")
    p.add_argument("--layout", choices=["mvtec", "meta_json"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-fpr", type=float, help="false-positive rate on the normals (default without "
                   "labels: 0.01)")
    g.add_argument("--target-sensitivity", type=float, help="lowest sensitivity to keep (needs labels)")
    g.add_argument("--target-specificity", type=float, help="lowest specificity to keep (needs labels)")
    p.add_argument("--export", type=Path, action="append", metavar="PATH",
                   help="also update an export without re-exporting: an ONNX file, a TensorRT engine folder or "
                        "a Triton model repository (repeatable)")
    p.add_argument("--out", type=Path, help="also write the calibration as JSON here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--device")
    add_precision_args(p, auto=False, fp16=True, int8=True)
    p.add_argument("--int8-images", type=int, default=32,
                   help="int8: normal images of the split its quantizer observes (default 32)")
    p.add_argument("--requantize", action="store_true",
                   help="int8: observe again even when the checkpoint has a quantization")
    p.set_defaults(fn=cmd_calibrate)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="score images, folders, DICOM or NIfTI files (locally or on a server)")
    add_model_args(p, int8=True)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="write heatmap PNGs and results.json here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--nifti-axis", type=int, default=2)
    p.add_argument("--dicom-window", type=float, nargs=2, metavar=("CENTRE", "WIDTH"))
    p.add_argument("--threshold", type=float,
                   help="raw score above which an image is anomalous (default: the checkpoint's calibration)")
    p.add_argument("--pixel-threshold", type=float,
                   help="raw map value above which a pixel is in the mask (default: the calibration's)")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--server", help="Triton Inference Server URL (host:port) instead of a local model")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--shm", action="store_true", help="send inputs through system shared memory")
    p.add_argument("--model-name", default="pdd")
    add_budget_args(p, "prediction (with --server: the files this side reads, NIfTI slices and heatmaps)")
    p.set_defaults(fn=cmd_predict, image_size=None)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="synthesise brain-synth, train briefly, evaluate, write the report")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--count", type=int, default=140)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.set_defaults(fn=cmd_demo)


def _add_export(sub: Any) -> None:
    exp = sub.add_parser("export", help="ONNX files, TensorRT engines, Triton model repositories").add_subparsers(
        dest="export_command", required=True)
    p = exp.add_parser("onnx", help="export the eval pipeline to ONNX")
    add_model_args(p)
    p.add_argument("--form", choices=["plugin", "portable"], default="portable")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch", default="1:32", help="MIN:MAX dynamic batch range")
    p.add_argument("--image-size", type=int)
    p.add_argument("--preprocess", action="store_true", help="uint8 HWC images in, normalisation in the graph")
    p.add_argument("--scan-graph", choices=list(DEPRECATED_SCAN_GRAPHS),
                   help="deprecated: --scan-impl graph-sequential (portable form, the default: chunks walked in "
                        "order, for CPU runtimes) or graph-parallel (chunks joined by a log-depth scan, for GPUs)")
    p.set_defaults(fn=cmd_export_onnx)
    # The builder's own command line (python export/build_trt.py), passed through whole: --help shows it.
    p = exp.add_parser("trt", add_help=False, help="build a TensorRT engine (plugin or portable form; "
                                                   "--dry-run on machines without a GPU)")
    p.set_defaults(fn=cmd_export_trt, passthrough=True)
    p = exp.add_parser("triton-repo", help="generate a Triton Inference Server model repository")
    add_model_args(p)
    p.add_argument("--engine", type=Path, help="a TensorRT engine folder from export/build_trt.py")
    p.add_argument("--flavour", choices=["tensorrt", "onnxruntime", "python"], default="python")
    p.add_argument("--onnx-form", choices=["plugin", "portable"],
                   help="the ONNX form served (default: plugin for the python flavour, whose custom nodes run the "
                        "CPU scan kernel compiled on the server, which needs a C compiler; portable for "
                        "onnxruntime); with --engine, the form of the ONNX given")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int)
    p.add_argument("--force", action="store_true", help="serve a reduced precision whose fidelity gate did not "
                                                        "pass (recorded as forced in OUT/precision.json)")
    add_budget_args(p, "the server's preprocess model")
    p.set_defaults(fn=cmd_export_triton_repo)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="start a Triton Inference Server on a model repository")
    p.add_argument("--repo", required=True, type=Path)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--no-restart", action="store_true",
                   help="do not restart the server when it or a Python-backend stub dies (Triton does not restart a "
                        "killed stub: its model fails every request until the server restarts)")
    p.set_defaults(fn=cmd_serve)


def _add_bench(sub: Any) -> None:
    # benchmarks/run.py's own command line, passed through whole: --help shows it.
    p = sub.add_parser("bench", add_help=False, help="run benchmarks/run.py (arguments passed through)")
    p.set_defaults(fn=cmd_bench, passthrough=True)


def _add_dicom(sub: Any) -> None:
    # The DICOM node is its own package above export (dicom_node/); it registers its subcommands itself.
    from dicom_node.cli import add_parser

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdd", description="PDD medical-image anomaly detection")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_train, _add_eval, _add_calibrate, _add_predict, _add_demo, _add_export, _add_serve,
                _add_bench, _add_dicom):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False) is True:
        args.passthrough = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from pdd.backbones.weights import WeightsError  # lazily: it imports torch
    from pdd.int8 import Int8Error
    from pdd.precision import PrecisionUnavailable

    try:
        return args.fn(args)
    except (ConfigError, WeightsError, PrecisionUnavailable, Int8Error, FileNotFoundError, ValueError) as exc:
        print(f"pdd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
