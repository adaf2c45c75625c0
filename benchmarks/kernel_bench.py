"""GPU timings of the Triton kernels against their PyTorch and mamba-ssm peers.

    python benchmarks/kernel_bench.py [--quick] [--dtype fp16|fp32] [--out benchmarks/results]

SS2D scan at the four VMamba-T v0 stage shapes of a 256² input (H = W = 64, 32, 16, 8; d_inner = 192,
384, 768, 1536; N = 16; 4 routes) and batch 1, 8, 64: the fused Triton kernel in each strategy, the
PyTorch eager path, the reference loop (batch 1 and L ≤ 256 only: one Python step per position)
and mamba-ssm's CUDA scan when installed (behind the same ss2d_scan, so with its route copies). The
anomaly head, Triton against PyTorch, on PDD's pairs at 256² (256@64², 512@32², 1024@16², twice each).

Times are medians of ``triton.testing.do_bench``. Achieved bandwidth counts every input read once and the
output written once, and is set against a device-to-device copy measured in the same run. Each
implementation is also checked against the PyTorch path at batch 1 (max |Δ| / max |ref|). Writes
``kernels.json`` and ``kernels.md`` to ``--out``; on a machine without CUDA it says why and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pdd.anomaly import anomaly_head_ref
from pdd.config import atomic_write_text
from pdd.ss2d import ss2d_scan

STAGES = ((64, 192), (32, 384), (16, 768), (8, 1536))  # (H = W, d_inner) of VMamba-T v0 at 256²
D_STATE = 16
HEAD_LEVELS = ((256, 64), (512, 32), (1024, 16)) * 2  # (channels, H = W) of PDD's pairs at 256²
IMAGE = 256
REFERENCE_MAX_L = 256
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}

Bench = Callable[[Callable[[], Any]], float]


def nbytes(*ts: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def rel_err(got: Tensor, ref: Tensor) -> float:
    ref = ref.float()
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def ss2d_inputs(batch: int, side: int, dim: int, dtype: torch.dtype, device: str) -> list[Tensor]:
    """x, delta, B, C in ``dtype``; A (< 0), D, delta_bias fp32: VMamba-like magnitudes."""
    k, n = 4, D_STATE

    def act(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype)

    A = -torch.exp(torch.rand(k * dim, n, device=device) * 2)
    return [act(batch, dim, side, side), act(batch, k, dim, side, side, scale=0.5, shift=-2.0),
            act(batch, k, n, side, side), act(batch, k, n, side, side), A, torch.randn(k * dim, device=device),
            torch.randn(k * dim, device=device) * 0.5 - 2.0]


def ss2d_impls(batch: int, length: int) -> dict[str, Callable[..., Tensor]]:
    from kernels.selective_scan import STRATEGIES, ss2d_scan_triton  # lazily: needs triton (the [gpu] extra)

    impls: dict[str, Callable[..., Tensor]] = {
        f"triton-{s}": (lambda *a, s=s: ss2d_scan_triton(*a, strategy=s)) for s in STRATEGIES
    }
    impls["torch-eager"] = lambda *a: ss2d_scan(*a, impl="eager")
    if batch == 1 and length <= REFERENCE_MAX_L:
        impls["torch-reference"] = lambda *a: ss2d_scan(*a, impl="reference")
    if importlib.util.find_spec("mamba_ssm") is not None:
        impls["mamba_ssm"] = lambda *a: ss2d_scan(*a, impl="mamba_ssm")
    return impls


def ss2d_rows(bench: Bench, batches: tuple[int, ...], stages: tuple[tuple[int, int], ...], dtype: torch.dtype,
              device: str) -> list[dict[str, Any]]:
    rows = []
    for side, dim in stages:
        check = ss2d_inputs(1, side, dim, dtype, device)
        want = ss2d_scan(*check, impl="eager")
        for batch in batches:
            inputs = ss2d_inputs(batch, side, dim, dtype, device)
            moved = nbytes(*inputs) + nbytes(inputs[0])  # inputs once, output (x's shape and dtype) once
            for impl, fn in ss2d_impls(batch, side * side).items():
                ms = bench(lambda fn=fn, a=inputs: fn(*a))
                rows.append({"op": "ss2d", "impl": impl, "batch": batch, "H": side, "W": side, "D": dim,
                             "N": D_STATE, "ms": ms, "bytes": moved, "err": rel_err(fn(*check), want)})
                print(f"ss2d {side}x{side} D={dim} batch={batch} {impl}: {ms:.4f} ms", flush=True)
            del inputs
            torch.cuda.empty_cache()
    return rows


def head_pairs(batch: int, dtype: torch.dtype, device: str) -> list[tuple[Tensor, Tensor]]:
    pairs = []
    for c, side in HEAD_LEVELS:
        t = torch.randn(batch, c, side, side, device=device)
        pairs.append((t.to(dtype), (t + 0.5 * torch.randn_like(t)).to(dtype)))
    return pairs


def head_rows(bench: Bench, batches: tuple[int, ...], dtype: torch.dtype, device: str) -> list[dict[str, Any]]:
    from kernels.anomaly_head import anomaly_head_triton  # lazily: needs triton (the [gpu] extra)

    impls = {"triton": lambda p: anomaly_head_triton(p, (IMAGE, IMAGE)),
             "torch-reference": lambda p: anomaly_head_ref(p, (IMAGE, IMAGE))}
    check = head_pairs(1, dtype, device)
    want = anomaly_head_ref(check, (IMAGE, IMAGE))[0]
    rows = []
    for batch in batches:
        pairs = head_pairs(batch, dtype, device)
        moved = nbytes(*(t for pair in pairs for t in pair)) + batch * (IMAGE * IMAGE + 1) * 4
        for impl, fn in impls.items():
            ms = bench(lambda fn=fn, p=pairs: fn(p))
            rows.append({"op": "anomaly_head", "impl": impl, "batch": batch, "H": IMAGE, "W": IMAGE,
                         "D": sum(c for c, _ in HEAD_LEVELS), "N": None, "ms": ms, "bytes": moved,
                         "err": rel_err(fn(check)[0], want)})
            print(f"anomaly_head {IMAGE}x{IMAGE} batch={batch} {impl}: {ms:.4f} ms", flush=True)
        del pairs
        torch.cuda.empty_cache()
    return rows


def copy_gbps(bench: Bench, device: str, gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth: read + write of a ``gib`` GiB buffer, GB/s."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes(src) / ms / 1e6


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Kernel timings on {result['device']}",
        "",
        f"Command: `{result['command']}`  ",
        f"torch {result['torch']}, triton {result['triton']}, activations {result['dtype']}, "
        f"device-to-device copy {result['copy_gbps']:.0f} GB/s.  ",
        "Medians of triton.testing.do_bench; GB/s counts inputs read once and the output written once; "
        "err = max |Δ| / max |ref| against the PyTorch path at batch 1.",
        "",
        "| op | H×W | D | batch | impl | ms | GB/s | % of copy | err |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['H']}×{r['W']} | {r['D']} | {r['batch']} | {r['impl']} | {r['ms']:.4f} "
                     f"| {r['gbps']:.0f} | {r['pct_copy']:.1f} | {r['err']:.1e} |")
    return "\n".join(lines) + "\n"


def short_table(rows: list[dict[str, Any]]) -> str:
    """One line per (op, shape, batch), one column of milliseconds per implementation."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases: dict[tuple[Any, ...], dict[str, float]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["H"], r["D"], r["batch"]), {})[r["impl"]] = r["ms"]
    head = f"{'op':<13}{'H':>4}{'D':>6}{'batch':>6}" + "".join(f"{i:>18}" for i in impls)
    out = [head, "-" * len(head)]
    for (op, h, d, b), ms in cases.items():
        cells = "".join(f"{ms[i]:>18.4f}" if i in ms else f"{'-':>18}" for i in impls)
        out.append(f"{op:<13}{h:>4}{d:>6}{b:>6}{cells}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="activation dtype (params stay fp32)")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, shorter timing windows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py: no CUDA device here, so there is nothing to time: the Triton kernels "
              "run on GPUs only (CPU runs use the slow interpreter, meaningless for timing). Nothing written.")
        return 0
    import triton
    import triton.testing

    warmup, rep = (10, 30) if args.quick else (25, 100)

    def bench(fn: Callable[[], Any]) -> float:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    device, dtype = "cuda", DTYPES[args.dtype]
    batches = (1, 8) if args.quick else (1, 8, 64)
    torch.manual_seed(0)
    with torch.inference_mode():
        copy = copy_gbps(bench, device)
        print(f"device-to-device copy: {copy:.0f} GB/s", flush=True)
        rows = ss2d_rows(bench, batches, STAGES, dtype, device) + head_rows(bench, batches, dtype, device)
    for r in rows:
        r["gbps"] = r["bytes"] / r["ms"] / 1e6
        r["pct_copy"] = 100 * r["gbps"] / copy
    result = {
        "command": "python benchmarks/kernel_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mamba_ssm": importlib.util.find_spec("mamba_ssm") is not None,
        "dtype": args.dtype,
        "copy_gbps": copy,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "kernels.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "kernels.md", markdown(result))
    print(f"\nwrote {args.out / 'kernels.json'} and kernels.md; median ms:\n")
    print(short_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
