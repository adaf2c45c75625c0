"""The benchmark's reports: results.md, the plots and the short console table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PERCENTILES, STAGES
from benchmarks.runners import FULL, REFERENCE, median_ms
from benchmarks.targets import target_value

__all__ = ["markdown", "plots", "preset_line", "short_table"]


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _setup_lines(result: dict[str, Any]) -> list[str]:
    """The run's set-up and the head of the in-process table."""
    env, cfg, load = result["environment"], result["config"], result["load_average"]
    cuda = env["cuda"]
    return [
        f"# PDD inference benchmark ({cuda['device'] if cuda else 'CPU only'})",
        "",
        f"Command: `{result['command']}`  ",
        f"{preset_line(cfg)}  ",
        f"{cfg['image_size']}² images: {cfg['images']}.  ",
        f"{cfg['weights']}.  ",
        f"torch {env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime'] or '–'}, triton "
        f"{env['versions']['triton'] or '–'}, tensorrt {env['versions']['tensorrt'] or '–'}; {env['cpu_count']} "
        f"CPU cores, torch threads: {env['torch_threads']}"
        + (f" (--threads {cfg['threads']}: PyTorch, ONNX Runtime and the served ONNX Runtime).  " if cfg["threads"]
           else ".  "),
        f"Load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load['before'])}, after "
        f"{tuple(round(v, 2) for v in load['after'])}"
        + (" (the run's own threads count in the second): other work loaded the CPUs at or just before its start, "
           "so absolute CPU times are pessimistic; ratios measured in this run compare like with like."
           if load["before"][0] > 0.5 * (env["cpu_count"] or 1) else " (the run's own threads count in the second)."),
        *([f"Yardstick, same run: {y['gemm_size']}² fp32 GEMM {y['gemm_gflops']:.0f} GFLOP/s on {y['threads']} "
           f"threads; PDD is {y['model_gflop']:.1f} GFLOP per {cfg['image_size']}² image (convolutions and "
           f"matrix products, torch's FLOP counter)."] if (y := result.get("yardstick")) else []),
        "",
        f"Latency: wall time of `predict()` (host arrays in and out), {cfg['warmup']} warm-up and {cfg['repeats']} "
        "timed calls per case (the reference scan: see notes; with few calls, p90–p99 interpolate between the "
        "slowest ones); the first warm-up call is shown apart (it includes torch.compile's compilation); "
        "throughput = batch / median. Accuracy against "
        f"{REFERENCE} fp32 on {cfg['accuracy_images']} labelled images: max |Δ map| (absolute and over the "
        "reference maps' range) and image-AUROC difference.",
        "",
        "| runtime | precision | device | batch | 1st call ms | median ms | p50 | p90 | p95 | p99 | img/s | "
        "max abs err | rel err | ΔAUROC |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]


def _inprocess_rows(entries: list[dict[str, Any]]) -> list[str]:
    """Rows of the in-process latency, throughput and accuracy table."""
    lines: list[str] = []
    for e in entries:
        if e["status"] != "ok" or e["device"] == "server":
            continue
        acc = e["accuracy"] or {}
        for r in e["latency"]:
            cells = [e["runtime"], e["precision"], e["device"], r["batch"], _fmt(r.get("first_call_ms")),
                     _fmt(r["median_ms"]), *(_fmt(r[f"p{q}_ms"]) for q in PERCENTILES),
                     _fmt(r["throughput_img_s"], ".2f"), _fmt(acc.get("map_max_abs_error"), ".2e"),
                     _fmt(acc.get("map_max_rel_error"), ".2e"), _fmt(acc.get("auroc_diff"), "+.4f")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _compute_lines(entries: list[dict[str, Any]]) -> list[str]:
    """Device-resident compute times (CUDA events)."""
    lines: list[str] = []
    compute = [(e, r) for e in entries if e["status"] == "ok" for r in e["compute"]]
    if compute:
        lines += ["", "Device-resident compute (CUDA events, the network alone):", "",
                  "| runtime | precision | batch | median ms | p99 ms | img/s |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {e['runtime']} | {e['precision']} | {r['batch']} | {_fmt(r['median_ms'], '.3f')} | "
                  f"{_fmt(r['p99_ms'], '.3f')} | {_fmt(r['throughput_img_s'], '.1f')} |" for e, r in compute]
    return lines


def _server_lines(entries: list[dict[str, Any]]) -> list[str]:
    """The Triton-server table and perf_analyzer's."""
    lines: list[str] = []
    served = [e for e in entries if e["device"] == "server" and e["status"] == "ok"]
    if served:
        lines += ["", "Triton Inference Server (closed-loop load from export.client.run_load, perf_analyzer's fields; "
                      "shm = gRPC with system shared memory; server times: the engine step's per-request means "
                      "from the server's statistics, warm-up requests included):", "",
                  "| runtime | batch | concurrency | requests | errors | infer/s | p50 µs | p90 µs | p95 µs | p99 µs | "
                  "queue µs | compute infer µs | max abs err | ΔAUROC |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in served:
            acc = e["accuracy"] or {}
            for r in e["latency"]:
                cells = [e["runtime"], r["batch"], r["concurrency"], r["requests"], r["errors"],
                         _fmt(r["throughput_infer_per_sec"], ".2f"),
                         *(_fmt(r[f"p{q}_latency_us"], ".0f") for q in PERCENTILES),
                         _fmt(r.get("server_queue_us"), ".0f"), _fmt(r.get("server_compute_infer_us"), ".0f"),
                         _fmt(acc.get("map_max_abs_error"), ".2e"), _fmt(acc.get("auroc_diff"), "+.4f")]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        measured = [(e, r) for e in served if isinstance(e.get("perf_analyzer"), list) for r in e["perf_analyzer"]]
        if measured:
            lines += ["", "perf_analyzer on the same server and images:", "",
                      "| runtime | batch | concurrency | infer/s | p50 µs | p90 µs | p95 µs | p99 µs | queue µs | "
                      "compute infer µs | error |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for e, r in measured:
                cells = [e["runtime"], r["batch"], r["concurrency"], _fmt(r.get("throughput_infer_per_sec"), ".2f"),
                         *(_fmt(r.get(f"p{q}_latency_us"), ".0f") for q in PERCENTILES),
                         _fmt(r.get("server_queue_us"), ".0f"), _fmt(r.get("server_compute_infer_us"), ".0f"),
                         (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:200]]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        else:
            lines += ["", "perf_analyzer is not on PATH here (not installable from PyPI; it ships in NVIDIA's "
                          "tritonserver SDK container): the server was measured with run_load only."]
    return lines


def _stage_lines(entries: list[dict[str, Any]]) -> list[str]:
    """The per-stage table."""
    lines: list[str] = []
    staged = [e for e in entries if e["status"] == "ok" and e["stages"]]
    if staged:
        lines += ["", "Per-stage time (ms; each stage alone, so the sum differs a little from the whole):", "",
                  "| runtime | precision | batch | " + " | ".join(STAGES) + " | other | sum | method |",
                  "|---|---|---:|" + "---:|" * (len(STAGES) + 2) + "---|"]
        for e in staged:
            s = e["stages"]
            cells = " | ".join(_fmt(s["ms"].get(k), ".2f") for k in (*STAGES, "other"))
            lines.append(f"| {e['runtime']} | {e['precision']} | {s['batch']} | {cells} | {_fmt(s['sum_ms'], '.2f')} | "
                         f"{s['method']} |")
    return lines


def _closing_lines(result: dict[str, Any]) -> list[str]:
    """Targets, notes, and the runtimes or batch sizes skipped or failed."""
    entries = result["runtimes"]
    lines: list[str] = []
    lines += ["", "Targets (ratios from this run):", ""]
    for t in result["targets"]:
        verdict = "not measured here" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "" if t["value"] is None else f"{target_value(t)}, "
        lines.append(f"- {t['target']} (goal {t['goal']}): **{verdict}** — {value}{t['detail']}")
    notes = [(e, n) for e in entries for n in e["notes"] if e["device"] != "server"]
    if notes or result.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in result.get("notes", [])]
        lines += [f"- {e['runtime']} {e['precision']}: {n}" for e, n in notes]
    not_run = [e for e in entries if e["status"] != "ok"]
    partial = [(e, s) for e in entries for s in e["skipped_batches"]]
    if not_run or partial:
        lines += ["", "Skipped or failed:", "", "| runtime | precision | status | reason |", "|---|---|---|---|"]
        for e in not_run:
            reason = (e["reason"] or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {e['runtime']} | {e['precision']} | {e['status']} | {reason} |")
        lines += [f"| {e['runtime']} | {e['precision']} | batch {s['batch']} skipped | {s['reason']} |"
                  for e, s in partial]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """results.md: set-up, latency/throughput/accuracy table, server table, stages, targets, skipped runtimes."""
    entries = result["runtimes"]
    lines = [*_setup_lines(result), *_inprocess_rows(entries), *_compute_lines(entries), *_server_lines(entries),
             *_stage_lines(entries), *_closing_lines(result)]
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out: Path) -> list[str]:
    """latency.png (percentiles at batch 1), throughput.png (against batch; server against concurrency),
    stages.png (stacked per-stage time). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in result["runtimes"] if e["status"] == "ok"]
    inproc = [e for e in entries if e["device"] != "server"]
    written = []
    batch = min(result["config"]["batch"])
    rows = [(f"{e['runtime']} {e['precision']}", r) for e in inproc for r in e["latency"] if r["batch"] == batch]
    rows += [(f"{e['runtime']} c={r['concurrency']}", {f"p{q}_ms": r[f"p{q}_latency_us"] / 1e3 for q in PERCENTILES})
             for e in entries if e["device"] == "server" for r in e["latency"]
             if r["batch"] == batch and r["completed"]]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
        width = 0.8 / len(PERCENTILES)
        for k, q in enumerate(PERCENTILES):
            ax.bar([i + k * width for i in range(len(rows))], [r[f"p{q}_ms"] for _, r in rows], width, label=f"p{q}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [n for n, _ in rows], rotation=30, ha="right",
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_title(f"Latency percentiles at batch {batch}, {result['config']['image_size']}²")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=120)
        plt.close(fig)
        written.append("latency.png")
    servers = [e for e in entries if e["device"] == "server"]
    panels = [p for p, present in (("in-process", inproc), ("server", servers)) if present]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            if panel == "in-process":
                for e in inproc:
                    rs = sorted(e["latency"], key=lambda r: r["batch"])
                    ax.plot([r["batch"] for r in rs], [r["throughput_img_s"] for r in rs], marker="o",
                            label=f"{e['runtime']} {e['precision']}")
                ax.set_xlabel("batch size")
                ax.set_ylabel("images / s")
                ax.set_yscale("log")
                ax.set_title("In-process throughput against batch size")
            else:
                for e in servers:
                    for b in sorted({r["batch"] for r in e["latency"]}):
                        rs = sorted((r for r in e["latency"] if r["batch"] == b), key=lambda r: r["concurrency"])
                        ax.plot([r["concurrency"] for r in rs], [r["throughput_infer_per_sec"] for r in rs],
                                marker="o", label=f"{e['runtime']} batch {b}")
                ax.set_xlabel("client concurrency")
                ax.set_ylabel("infer / s")
                ax.set_title("Triton Inference Server throughput")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
        plt.close(fig)
        written.append("throughput.png")
    staged = [e for e in entries if e["stages"]]
    if staged:
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(staged)))
        names = [f"{e['runtime']} {e['precision']} b={e['stages']['batch']}" for e in staged]
        left = np.zeros(len(staged))
        for stage in (*STAGES, "other"):
            values = np.asarray([e["stages"]["ms"].get(stage, 0.0) or 0.0 for e in staged])
            if values.any():
                ax.barh(names, values, left=left, label=stage)
                left += values
        ax.set_xlabel("ms")
        ax.set_title("Per-stage time")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=120)
        plt.close(fig)
        written.append("stages.png")
    return written


def preset_line(cfg: dict[str, Any]) -> str:
    """What the run measured, in one sentence, and how to get the other preset."""
    line = (f"{cfg['preset']} run: {cfg['image_size']}² images, batch {','.join(map(str, cfg['batch']))}, server "
            f"concurrency {','.join(map(str, cfg['concurrency']))}, {cfg['warmup']} warm-up + {cfg['repeats']} timed "
            f"calls per case, runtimes {','.join(cfg['runtimes'])}")
    if cfg["preset"] == "quick":
        line += (f"; `python benchmarks/run.py --full` measures every runtime at {FULL['image_size']}², batch "
                 f"{','.join(map(str, FULL['batch']))}, {FULL['repeats']} timed calls")
    return line + "."


def short_table(result: dict[str, Any]) -> str:
    """A terminal summary: one line per runtime and precision (batch-1 median, best throughput, accuracy)."""
    lines = [preset_line(result["config"]), "",
             f"{'runtime':<30}{'prec':<6}{'status':<9}{'b1 median ms':>13}{'best img/s':>12}{'rel err':>10}"
             f"{'ΔAUROC':>9}"]
    for e in result["runtimes"]:
        if e["status"] != "ok":
            lines.append(f"{e['runtime']:<30}{e['precision']:<6}{e['status']:<9}  {(e['reason'] or '')[:90]}")
            continue
        acc = e["accuracy"] or {}
        if e["device"] == "server":
            b1 = next((r["p50_latency_us"] / 1e3 for r in e["latency"] if r["batch"] == 1 and r["concurrency"] == 1),
                      None)
            best = max((r["throughput_infer_per_sec"] for r in e["latency"]), default=None)
        else:
            b1 = median_ms(e["latency"], 1)
            best = max((r["throughput_img_s"] for r in e["latency"]), default=None)
        lines.append(f"{e['runtime']:<30}{e['precision']:<6}{'ok':<9}{_fmt(b1):>13}{_fmt(best, '.2f'):>12}"
                     f"{_fmt(acc.get('map_max_rel_error'), '.1e'):>10}{_fmt(acc.get('auroc_diff'), '+.3f'):>9}")
    for t in result["targets"]:
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target {t['target']} ({t['goal']}): {verdict}"
                     + ("" if t["value"] is None else f" ({target_value(t)})"))
    return "\n".join(lines)
