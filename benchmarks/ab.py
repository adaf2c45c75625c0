"""Before/after comparison of two checkouts of this project, in interleaved rounds of ``benchmarks/run.py``.

    python benchmarks/ab.py --before DIR_A --after DIR_B [--rounds 4] [--out DIR] -- [run.py options]

Each round runs the ``benchmarks/run.py`` of both checkouts once, each in its own process with its own
code first on the import path, in the order A B, then B A, A B, … so that slow and fast phases of a shared
machine fall on both sides alike. Each checkout keeps its ONNX exports in its own artifacts folder across
rounds (the first round exports, the later ones reuse). From every round it reads, per runtime, the fp32
median latency at the smallest batch and the per-stage times, and reports for each the median over the
rounds of both sides and of the per-round ratio after / before (below 1: the after checkout is faster).

Writes ``ab.json`` and ``ab.md`` (with the command and both commits) and the rounds' own result folders to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdd.config import atomic_write_text

SIDES = ("before", "after")


def _commit(tree: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """'<runtime> ms' (fp32 median latency at the smallest batch) and '<runtime> <stage> ms' from one run."""
    out: dict[str, float] = {}
    for entry in result.get("runtimes", []):
        if entry.get("status") != "ok" or entry.get("precision") != "fp32" or not entry.get("latency"):
            continue
        row = min(entry["latency"], key=lambda r: r["batch"])
        out[f"{entry['runtime']} ms"] = row["median_ms"]
        for stage, ms in ((entry.get("stages") or {}).get("ms") or {}).items():
            out[f"{entry['runtime']} {stage} ms"] = ms
    return out


def _run_side(tree: Path, run_args: Sequence[str], out: Path, artifacts: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "benchmarks" / "run.py"), *run_args, "--out", str(out),
           "--artifacts", str(artifacts)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with {proc.returncode}; see {out.parent / out.name}.log")
    return _metrics(json.loads((out / "results.json").read_text()))


def compare(rounds: list[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per metric present on both sides in every round: medians of each side and of the after/before ratios."""
    keys = sorted(set.intersection(*(set(r[side]) for r in rounds for side in SIDES))) if rounds else []
    rows = []
    for key in keys:
        before = [r["before"][key] for r in rounds]
        after = [r["after"][key] for r in rounds]
        ratios = [a / b for a, b in zip(after, before)]
        rows.append({"metric": key, "before_ms": statistics.median(before), "after_ms": statistics.median(after),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "before_all": before, "after_all": after})
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Before / after: {report['rounds']} interleaved rounds", "",
             f"Command: `{report['command']}`", "",
             f"- before: `{report['commits']['before']}`", f"- after: `{report['commits']['after']}`",
             f"- run.py options: `{' '.join(report['run_args'])}`", f"- wall time: {report['seconds']:.0f} s", "",
             "| metric | before (median ms) | after (median ms) | after / before (median of rounds) | range |",
             "|---|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['metric']} | {row['before_ms']:.1f} | {row['after_ms']:.1f} | "
                     f"{row['ratio_median']:.3f} | {row['ratio_min']:.3f}–{row['ratio_max']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout measured as 'before'")
    ap.add_argument("--after", type=Path, required=True, help="checkout measured as 'after'")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench-ab"))
    args = ap.parse_args(own)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for side, tree in trees.items():
        if not (tree / "benchmarks" / "run.py").is_file():
            ap.error(f"--{side} {tree} has no benchmarks/run.py")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rounds: list[dict[str, dict[str, float]]] = []
    for i in range(args.rounds):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        measured = {}
        for side in order:
            measured[side] = _run_side(trees[side], run_args, args.out / f"round{i}-{side}",
                                       args.out / f"artifacts-{side}")
            print(f"round {i} {side}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(measured[side].items())
                                                    if k.count(" ") == 1), flush=True)
        rounds.append(measured)
    # The checkouts' folders are this machine's business; the commits say what was measured.
    shown = [{str(a): "BEFORE", str(b): "AFTER"}.get(x, x) for x in argv for a, b in [(args.before, args.after)]]
    report = {"command": " ".join(["python", "benchmarks/ab.py", *shown]), "run_args": run_args,
              "rounds": args.rounds, "commits": {side: _commit(tree) for side, tree in trees.items()},
              "seconds": time.perf_counter() - start, "rows": compare(rounds), "per_round": rounds}
    atomic_write_text(args.out / "ab.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(args.out / "ab.md", markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
