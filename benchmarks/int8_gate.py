"""The int8 fidelity gate: a trained checkpoint's teachers statically quantized, scored against fp32.

What it measures, on one checkpoint and its data (``--data``, MVTec layout):

* the int8 model: the WRN teacher (``--stages wrn``; ``wrn,vmamba`` adds the VMamba teacher's linears and
  patch convolutions) exported with ``torch.export`` and quantized by torchao's PT2E flow
  (``X86InductorQuantizer``, per-channel s8 weights, u8 activations calibrated on ``--calib-images`` normal
  training images); fusion, students, scan and head stay fp32, as ``pdd/precision.py``'s int8 row says;
* its own operating point, calibrated as ``pdd calibrate`` does (false-positive rate ``--target-fpr`` on the
  training split), beside the checkpoint's fp32 calibration;
* the gate of ``pdd/fidelity.py`` with the int8 limits (Spearman >= 0.99, per-image Pearson >= 0.98, the rest
  as bf16's) on the test split, both models run eagerly (the quantized graph's quantize/dequantize pairs
  computed in fp32: the numerics of int8 products summed in int32, up to summation order);
* speed: the fp32 and the int8 models compiled by inductor with frozen weights (where the quantized
  pattern becomes int8 convolutions), batch 1, median of ``--rounds`` alternating calls.

int8 is offered only if the gate passes: the result says by how much each figure passes or fails.

Example::

    python benchmarks/int8_gate.py --checkpoint runs/gate-train/best.pt --data runs/gate-data \
        --out benchmarks/results/cpu-precision/int8-gate-128
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config

from benchmarks.common import environment
from export.onnx_export import build_for_export
from pdd.checkpoint import load_model, read_calibration, read_checkpoint
from pdd.config import DataConfig, atomic_write_text
from pdd.evaluate import calibrate, predict_dataset
from pdd.fidelity import fidelity_gate
from pdd.precision import cpu_model, instruction_set
from pdd.train import open_dataset

RUNTIME = "cpu_kernel"


def _quantize(module: torch.nn.Module, example: torch.Tensor, calibration: Sequence[torch.Tensor]) -> torch.nn.Module:
    """``module`` exported and statically quantized (torchao PT2E, X86InductorQuantizer's default config),
    its activations observed on ``calibration``."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.inference_mode():
        exported = torch.export.export(module.eval(), (example,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.inference_mode():
        for x in calibration:
            prepared(x)
    # The model's eval() (the evaluation calls it) reaches the quantized graph: make that a no-op-safe switch.
    return allow_exported_model_train_eval(convert_pt2e(prepared))


def int8_model(model: torch.nn.Module, stages: Sequence[str], calibration: Sequence[torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` (graph layer forms) whose teachers named in ``stages`` are quantized; batch 1 only
    (the quantized graphs are exported at batch 1)."""
    int8 = copy.deepcopy(build_for_export(model, RUNTIME))
    for stage in stages:
        teacher = getattr(int8.teachers, stage)
        setattr(int8.teachers, stage, _quantize(teacher, calibration[0], calibration))
    int8.precision_label = f"int8 ({'+'.join(stages)} quantized, torchao PT2E)"
    return int8.eval()


def _timed(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return (time.perf_counter() - start) * 1e3


def speed(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median batch-1 ms of each model compiled with frozen weights, in rounds whose order rotates."""
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        compiled = {k: torch.compile(m) for k, m in models.items()}
        for k in names:
            compiled[k](x)  # compile
        for i in range(rounds):
            for k in names[i % len(names):] + names[:i % len(names)]:
                times[k].append(_timed(compiled[k], x))
    return {k: statistics.median(v) for k, v in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    base = load_model(args.checkpoint, scan_impl=RUNTIME)
    fp32 = build_for_export(base, RUNTIME)
    size = base.cfg.image_size
    data = DataConfig(root=str(args.data), layout=base.cfg.data.layout, class_names=base.cfg.data.class_names)
    train, test = open_dataset(data, "train", size), open_dataset(data, "test", size)
    calib = [train[i]["image"][None] for i in range(min(args.calib_images, len(train)))]
    stages = [s for s in args.stages.split(",") if s]
    t0 = time.perf_counter()
    int8 = int8_model(base, stages, calib)
    quantize_s = time.perf_counter() - t0
    cal32 = read_calibration(read_checkpoint(args.checkpoint), args.checkpoint, "fp32")
    cal8 = calibrate(int8, train, "fpr", args.target_fpr, source=f"{args.data} (train split)", batch_size=1,
                     precision="int8")
    reference = predict_dataset(fp32, test, 1)
    candidate = predict_dataset(int8, test, 1)
    gate = fidelity_gate("int8", reference, candidate, cal32, cal8)
    print(gate.table())
    ms = speed({"fp32": fp32, "int8": int8}, calib[0], args.rounds) if args.rounds else {}
    return {"command": " ".join(["python benchmarks/int8_gate.py", *sys.argv[1:]]), "cpu": cpu_model(),
            "instruction_set": instruction_set(), "environment": environment(), "stages": stages,
            "image_size": size, "calibration_images": len(calib), "quantize_s": quantize_s,
            "gate": gate.to_dict(), "gate_table": gate.table(), "median_ms": ms,
            "int8_vs_fp32": (ms["fp32"] / ms["int8"]) if ms else None,
            "method": "torch.export + torchao prepare_pt2e/convert_pt2e (X86InductorQuantizer default config); gate "
                      "eager, batch 1; speed compiled with frozen weights, batch 1, alternating"}


def render(res: dict[str, Any]) -> str:
    speed_line = (f"fp32 {res['median_ms']['fp32']:.1f} ms, int8 {res['median_ms']['int8']:.1f} ms per image "
                  f"({res['int8_vs_fp32']:.2f}x)" if res["median_ms"] else "not measured")
    verdict = "PASSED: int8 may be offered" if res["gate"]["passed"] else "FAILED: int8 stays refused"
    return "\n".join([
        f"# int8 fidelity gate ({'+'.join(res['stages'])} quantized), {res['image_size']}²", "",
        f"Command: `{res['command']}`", "",
        f"CPU: {res['cpu']} (instruction-set level {res['instruction_set']}); "
        f"{res['environment']['torch_threads']} threads; load average {res['environment']['load_average']}.", "",
        f"Quantized in {res['quantize_s']:.0f} s, activations calibrated on {res['calibration_images']} normal "
        f"training images; {res['method']}.", "",
        f"**Gate {verdict}.**", "", "```", res["gate_table"], "```", "",
        f"Speed (batch 1): {speed_line}.", ""])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/int8_gate.py", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained PDD checkpoint with its calibration")
    ap.add_argument("--data", type=Path, required=True, help="its dataset (train split calibrates, test is gated)")
    ap.add_argument("--stages", default="wrn", help="teachers to quantize: wrn, or wrn,vmamba")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--target-fpr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=8, help="alternating timed calls (0: no speed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(res, indent=2, default=str) + "\n")
    atomic_write_text(args.out / "results.md", render(res))
    print(render(res))
    return 0 if res["gate"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
