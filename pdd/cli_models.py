"""What the ``pdd`` commands share: the device, the model named by --checkpoint or --config in --precision, the
fidelity gate of ``pdd eval --against`` and the precision a Triton repository serves.

Part of the command line (:mod:`pdd.cli`), split off for size: like it, it may import ``export``, and only the
command line imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pdd.config import SCAN_CHOICES, atomic_write_text

__all__ = ["BUDGET_OPTIONS", "add_budget_args", "add_model_args", "add_precision_args", "decode_budget",
           "device_of", "int8_for_calibration", "model_from_args", "model_precision", "precision_label",
           "require_model_source", "run_gate", "served_precision", "typed_fp16_model", "warm_seconds"]

log = logging.getLogger("pdd")


def device_of(name: str | None) -> str:
    import torch  # lazily, as every heavy import here: `pdd --help` starts in a fraction of a second

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_precision(args: argparse.Namespace, device: str, name: str | None = None) -> Any:
    """--precision (and --emulate) as a :class:`pdd.precision.ModelPrecision`, or "auto" (the checkpoint chooses).

    A native reduced precision this CPU lacks is refused (PrecisionUnavailable names the missing feature);
    emulation is never chosen silently: it is asked for with --emulate, and says so."""
    from pdd.precision import FP32, ModelPrecision

    emulate = name is None and getattr(args, "emulate", False)  # a named precision (the gate's reference) is native
    name = name or getattr(args, "precision", None) or "fp32"
    if emulate and name in ("fp32", "auto"):
        raise SystemExit(f"--emulate emulates a reduced precision: give --precision bf16 or int8, not {name}")
    if name == "auto":
        return name
    if name == "fp32":
        return FP32
    if emulate:
        log.warning("emulating %s in fp32 (--emulate): its numbers up to summation order, several times slower "
                    "than fp32; for measuring them, not for speed", name)
        return ModelPrecision(name, emulate=True)
    if str(device).startswith("cuda"):
        return ModelPrecision(name)
    return ModelPrecision.native(name, where=f"pdd {args.command} --precision {name}")


def precision_label(model: Any) -> str:
    from pdd.precision import FP32

    return getattr(model, "precision_label", None) or getattr(model, "precision", FP32).describe()


def typed_fp16_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """--precision fp16 (eval, calibrate): TensorRT's typed fp16 graph run by ONNX Runtime's CPU provider
    (:func:`export.runtime.typed_fp16_runtime`), as a model, with the checkpoint's fp16 calibration; and the
    fp32 model it was exported from."""
    import atexit
    import shutil
    import tempfile

    from export.runtime import RuntimeModel, typed_fp16_runtime
    from pdd.checkpoint import read_calibration, read_checkpoint

    if getattr(args, "emulate", False):
        raise SystemExit("--precision fp16 is always TensorRT's typed fp16 graph run by ONNX Runtime (it rounds "
                         "where the graph does): drop --emulate")
    base = model_from_args(args, "cpu", precision="fp32")
    work = Path(tempfile.mkdtemp(prefix="pdd-fp16-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    runtime = typed_fp16_runtime(base, work, batch=getattr(args, "batch_size", 8))
    calibration = (read_calibration(read_checkpoint(args.checkpoint), args.checkpoint, "fp16")
                   if getattr(args, "checkpoint", None) else None)
    label = "fp16 (TensorRT's typed graph on ONNX Runtime's CPU provider)"
    return RuntimeModel(runtime, base.cfg, calibration, label), base


def int8_for_calibration(args: argparse.Namespace, model: Any, dataset: Any) -> Any:
    """``pdd calibrate --precision int8``: ``model`` (fp32, the checkpoint's) quantized. Its quantization is the
    checkpoint's, or, when it has none or with --requantize, observed now on the first --int8-images normal
    images of ``dataset`` and stored in the checkpoint (which drops int8's old threshold and gates)."""
    import torch

    from pdd.checkpoint import store_quantization
    from pdd.int8 import observe
    from pdd.precision import ModelPrecision

    if model.quantization is None or args.requantize:
        normal = [i for i in range(len(dataset)) if int(dataset[i]["label"]) == 0][:args.int8_images]
        if not normal:
            raise SystemExit(f"pdd calibrate --precision int8: the {args.split} split of {args.data} has no normal "
                             f"image to quantize on")
        batches = (torch.stack([dataset[i]["image"] for i in normal[k:k + args.batch_size]])
                   for k in range(0, len(normal), args.batch_size))
        model.quantization = observe(model, batches, source=f"{args.data} ({args.split} split, normal images)")
        store_quantization(args.checkpoint, model.quantization)
        print(f"int8 quantization observed on {model.quantization.images} normal images, stored in "
              f"{args.checkpoint}")
    return model.to_precision(ModelPrecision("int8", emulate=bool(args.emulate)))


def require_model_source(args: argparse.Namespace) -> None:
    if not (getattr(args, "checkpoint", None) or getattr(args, "config", None)):
        raise SystemExit("give --checkpoint CKPT, or --config NAME for a freshly initialised model")


def model_from_args(args: argparse.Namespace, device: str, precision: str | None = None, resolved: Any = None):
    """The model named by --checkpoint, or a fresh one from --config (--set, --scan-impl, --image-size), in
    --precision (or ``precision``; ``resolved``: what :func:`model_precision` already made of it)."""
    from pdd.checkpoint import load_model

    require_model_source(args)
    return load_model(getattr(args, "checkpoint", None), getattr(args, "config", None),
                      overrides=getattr(args, "set", None) or (), device=device,
                      scan_impl=getattr(args, "scan_impl", None), image_size=getattr(args, "image_size", None),
                      precision=resolved if resolved is not None else model_precision(args, device, precision))


def run_gate(args: argparse.Namespace, model: Any, result: Any, dataset: Any, device: str,
          reference_model: Any = None) -> int:
    """``pdd eval --precision P --against fp32``: score the same images in fp32, print the fidelity gate, write
    it to OUT/gate.json and record it in the checkpoint; non-zero exit status when it fails."""
    from pdd.checkpoint import store_gate
    from pdd.evaluate import predict_dataset
    from pdd.fidelity import fidelity_gate
    from pdd.precision import cpu_model, instruction_set

    name, emulated = args.precision, bool(getattr(args, "emulate", False))
    if name in (args.against, "auto"):
        raise SystemExit(f"--against {args.against}: name the precision to gate with --precision (not {name})")
    reference_model = reference_model or model_from_args(args, device, precision=args.against)
    reference = predict_dataset(reference_model, dataset, args.batch_size, device)
    gate = fidelity_gate(name, reference, result.predictions, reference_model.calibration,
                         model.calibration, reference_name=args.against)
    print(gate.table())
    seconds = warm_seconds({args.against: reference_model, name: model}, dataset, args.batch_size, device)
    # fp16 is measured through ONNX Runtime's stand-in: its numbers are TensorRT's, its speed is not.
    record = {**gate.to_dict(), "emulated": emulated or name == "fp16", "cpu": cpu_model(),
              "instruction_set": instruction_set(), "measured_as": precision_label(model)}
    atomic_write_text(Path(args.out) / "gate.json", json.dumps({**record, "seconds_per_image": seconds}, indent=2))
    if args.checkpoint:
        store_gate(args.checkpoint, record, instruction_set(), seconds)
        print(f"gate recorded in {args.checkpoint} for {instruction_set()} CPUs"
              + (" (emulated: --precision auto will not choose by it)" if record["emulated"] else ""))
    return 0 if gate.passed else 1


def warm_seconds(models: dict[str, Any], dataset: Any, batch_size: int, device: str,
                 rounds: int = 3) -> dict[str, float]:
    """Seconds per image of each model on the first batch of ``dataset``, warm (after the evaluation passes,
    which include compiling: int8's teacher compiles on its first call), median of ``rounds`` in alternation."""
    import statistics
    import time

    import torch

    images = torch.stack([dataset[i]["image"] for i in range(min(batch_size, len(dataset)))]).to(device)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for key, m in models.items():
                start = time.perf_counter()
                m(images)
                times[key].append((time.perf_counter() - start) / len(images))
    return {k: statistics.median(v) for k, v in times.items()}


def served_precision(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None, Any]:
    """The precision a repository serves (a TensorRT engine's own, else --precision), and for a reduced one
    the checkpoint's passed fidelity gate and that precision's calibration; refused without a passed gate
    unless --force."""
    from export.metadata import read_engine_metadata
    from pdd.checkpoint import read_calibration, read_checkpoint, read_gates

    engine = read_engine_metadata(args.engine).precision if args.engine and args.flavour == "tensorrt" else None
    if engine and args.precision not in ("fp32", engine):
        raise SystemExit(f"--precision {args.precision}: the engine {args.engine} was built in {engine}")
    served = engine or args.precision
    if served == "auto" or args.emulate:
        raise SystemExit("pdd export triton-repo: name the precision served (an emulated or automatic one is not "
                         "a served precision)")
    if served == "int8":
        raise SystemExit("pdd export triton-repo: no served int8 flavour: the CPU flavours run ONNX Runtime graphs; "
                         "run int8 in process (pdd predict / eval --precision int8)")
    if served == "bf16":
        raise SystemExit("pdd export triton-repo: no served bf16 flavour: the CPU flavours run ONNX Runtime, whose CPU "
                         "provider has no bf16 path (onnxruntime issue 19937); serve fp32, or run bf16 in process "
                         "(pdd predict / eval --precision bf16)")
    if served == "fp32":
        return served, None, None
    if not args.checkpoint:
        if args.force:
            return served, None, None
        raise SystemExit(f"pdd export triton-repo: a {served} engine is served only with its fidelity gate: give the "
                         f"--checkpoint it was built from (or --force)")
    obj = read_checkpoint(args.checkpoint)
    gates = [g for g in read_gates(obj).get(served, {}).values() if g.get("passed")]
    if not gates and not args.force:
        raise SystemExit(f"pdd export triton-repo: {served} has no passed fidelity gate for {args.checkpoint}; run "
                         f"`pdd eval --checkpoint {args.checkpoint} --precision {served} --against fp32` (or --force)")
    return served, (gates[0] if gates else None), read_calibration(obj, args.checkpoint, served)


# --- options the commands share ----------------------------------------------------------------


def add_precision_args(p: argparse.ArgumentParser, auto: bool = True, fp16: bool = False, int8: bool = False) -> None:
    choices = ["fp32", "bf16", *(["int8"] if int8 else []), *(["fp16"] if fp16 else []), *(["auto"] if auto else [])]
    p.add_argument("--precision", choices=choices, default="fp32",
                   help="what the model computes in (pdd/precision.py): bf16 needs a CPU with AMX or AVX512-BF16"
                        + ("; int8: the WRN teacher quantized (pdd/int8.py), from the checkpoint's int8 calibration "
                           "(`pdd calibrate --precision int8`)" if int8 else "")
                        + ("; fp16: TensorRT's typed fp16 graph, run by ONNX Runtime's CPU provider" if fp16 else "")
                        + ("; auto: the fastest precision whose fidelity gate passed for the checkpoint on this CPU"
                           if auto else ""))
    p.add_argument("--emulate", action="store_true",
                   help="emulate --precision in fp32 on any CPU (its numbers, slowly; for the fidelity gate)")


def add_model_args(p: argparse.ArgumentParser, fp16: bool = False, int8: bool = False) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="a PDD checkpoint (best.pt / last.pt)")
    g.add_argument("--config", help="config name or YAML file: a freshly initialised model")
    add_precision_args(p, fp16=fp16, int8=int8)
    p.add_argument("--scan-impl", choices=SCAN_CHOICES, help="scan implementation (default: the config's); for "
                   "`export onnx` graph-sequential or graph-parallel also choose the portable form's scan")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (with --config)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")


# The decode budget's limits (pdd.data.readers.DecodeBudget fields) and what each option's help says.
BUDGET_OPTIONS = {
    "max_pixels": (int, "pixels (rows x columns) of one image, frame or slice"),
    "max_voxels": (int, "voxels of one volume (the first of a NIfTI series)"),
    "max_frames": (int, "frames of one multi-frame DICOM file"),
    "max_bytes": (int, "bytes a file's pixel data claims once decompressed"),
    "max_seconds": (float, "seconds to decode one file"),
}


def add_budget_args(p: argparse.ArgumentParser, whose: str) -> None:
    g = p.add_argument_group("decode budget", f"what one file may claim before {whose} refuses it (checked from "
                                              "its header; default: pdd.data.readers.DecodeBudget's limits)")
    for name, (kind, text) in BUDGET_OPTIONS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)


def decode_budget(args: argparse.Namespace):
    """The readers' DecodeBudget with the limits given by --max-pixels … --max-seconds."""
    from pdd.data.readers import DecodeBudget

    return DecodeBudget().replace(**{name: getattr(args, name) for name in BUDGET_OPTIONS})
