"""CPU latency of one image through the VMamba teacher and the whole PDD, reference vs eager scan.

    python benchmarks/cpu_latency.py [--image-size 256] [--repeats 5] [--ref-repeats 3] [--threads N] [--out DIR]

Writes ``cpu-latency.json`` and ``cpu-latency.md`` (medians over repeats, after one warm-up run, both
scan paths measured in the same process, one after the other).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pdd import PDDConfig, build_pdd
from pdd.config import atomic_write_text


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the fast paths")
    ap.add_argument("--ref-repeats", type=int, default=3, help="timed runs of the (slow) reference scan")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (1 is steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pdd.model").setLevel(logging.ERROR)

    torch.manual_seed(0)
    model = build_pdd(PDDConfig(image_size=args.image_size, scan_impl="eager")).eval()
    x = torch.randn(1, 3, args.image_size, args.image_size)
    rows = []
    with torch.inference_mode():
        for impl, repeats in (("eager", args.repeats), ("reference", args.ref_repeats)):
            model.set_scan_impl(impl)
            for part, fn in (("vmamba_teacher", lambda: model.teachers.vmamba(x)), ("pdd_full", lambda: model(x))):
                times = _time(fn, repeats)
                rows.append({"scan": impl, "part": part, "median_s": statistics.median(times), "times_s": times})
                print(f"{part:15s} scan={impl:9s} median {statistics.median(times):.3f} s", flush=True)
    med = {(r["scan"], r["part"]): r["median_s"] for r in rows}
    speedup = {p: med[("reference", p)] / med[("eager", p)] for p in ("vmamba_teacher", "pdd_full")}
    result = {
        "command": "python benchmarks/cpu_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "image_size": args.image_size,
        "batch": 1,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
        "speedup_eager_over_reference": speedup,
        "note": "random-initialised teachers (latency does not depend on the weights' values)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "cpu-latency.json", json.dumps(result, indent=2))
    lines = [
        f"# CPU latency, one {args.image_size}² image (batch 1)",
        "",
        f"Command: `{result['command']}`  ",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores, "
        f"load average at end {tuple(round(v, 2) for v in result['load_average_at_end'])}.  ",
        "Medians over repeats after one warm-up; teachers randomly initialised.",
        "",
        "| part | scan | median (s) | repeats |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['part']} | {r['scan']} | {r['median_s']:.3f} | {len(r['times_s'])} |" for r in rows]
    lines += ["", "Speed-up of the eager scan over the reference loop, same run:", ""]
    lines += [f"- {p}: {s:.1f}x" for p, s in speedup.items()]
    atomic_write_text(args.out / "cpu-latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-3:]))
    return result


if __name__ == "__main__":
    main()
