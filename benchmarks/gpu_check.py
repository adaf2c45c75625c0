"""One-call GPU check: machine facts, Triton kernels against their references, kernel timings, TensorRT
engines, and the end-to-end benchmark over every GPU runtime the machine has.

    python3 benchmarks/gpu_check.py [--out DIR] [--budget-s 450] [--images DIR] [--steps a,b,...]
    python3 benchmarks/gpu_check.py --dry-run --image-size 64 --out /tmp/dry   # on a CPU: every step up to
                                                                               # the first GPU call

``--out`` defaults to ``$OUT``, else ``./gpu-results``. Steps, in order (each under its own time limit,
cut to what is left of ``--budget-s``; a failed, timed-out or skipped step is recorded and the next runs):

1. ``machine``: GPU, driver, torch/CUDA, triton, and whether tensorrt, tensorrt.plugin, ONNX Runtime's
   CUDA and TensorRT providers, polygraphy, tritonclient, the bundled Triton Inference Server, perf_analyzer and
   nilearn (brain-synth) are there;
2. ``kernel-tests``: ``pytest tests/test_kernels.py`` natively on CUDA (fp32 and fp16, fresh random inputs,
   odd sizes, against the float64 oracles);
3. ``kernel-bench``: ``benchmarks/kernel_bench.py --quick``;
4. ``onnx-export``: the ONNX forms the GPU runtimes need (plugin for TensorRT, portable for TensorRT and
   ONNX Runtime CUDA), exported once by ``benchmarks/run.py --prepare-only`` (skipped when neither
   TensorRT nor ONNX Runtime's CUDA provider is there);
5. ``trt-<form>-<precision>``: engines built by ``pdd export trt`` (plugin fp16, portable fp16, then
   plugin fp32 and portable fp32, each while the budget leaves the benchmark its share), sharing a timing
   cache; the plugin kernels' PTX is compiled for this GPU, capped to its driver's PTX ISA;
6. ``serve``: where ``tritonserver`` with the TensorRT backend is installed (NVIDIA's container), the
   plugin fp16 engine served as the ``tensorrt`` flavour repository, its scores and maps compared with the
   engine run directly, and its latency (``benchmarks/gpu_serve.py``);
7. ``benchmark``: ``benchmarks/run.py`` at 256², batch 1,8,32, fp32 and fp16, over PyTorch eager (reference,
   eager, Triton scan), ONNX Runtime CUDA / TensorRT providers and the TensorRT engines; its accuracy
   columns are the engines' parity check against PyTorch fp32;
8. ``benchmark-compile``: torch.compile (graph-parallel scan) on its own, last, as its compile time is the least
   predictable.

Outputs in ``--out`` (at most eight files): ``summary.md`` (steps, machine, parity verdicts, the short
tables; also printed last), ``results.json`` / ``results.md`` (step 6), ``kernels.json`` / ``kernels.md``
(step 3) and ``logs.tar.gz`` (every step's log, plots, compile results, engine build plans). ONNX files and
engines stay in a temporary folder. brain-synth images need nilearn; without it, pass ``--images`` (an
MVTec-style folder, e.g. made elsewhere by ``pdd data synth --out DIR --count 40``) or the benchmark falls
back to synthetic textures and says so.

``--dry-run`` (no GPU needed) runs the machine facts, the ONNX export and the four engine preparations with
``pdd export trt --dry-run`` (typed network, plugin PTX for ``--arch``/``--ptx-isa``, default sm_90 and 9.0,
launch records, build plan) and reports every later step as skipped; ``--image-size 64`` keeps it short.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("machine", "kernel-tests", "kernel-bench", "onnx-export", "tensorrt", "serve", "benchmark",
         "benchmark-compile")
GPU_RUNTIMES = ("torch:eager", "torch:triton", "torch:reference", "onnxruntime:cuda:portable",
                "onnxruntime:tensorrt:portable", "tensorrt:plugin", "tensorrt:portable")
# Largest anomaly-map error over the reference maps' range for an engine to pass parity, by precision.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}
# (form, precision) of the engines, most important first; each build's time limit in seconds.
ENGINES = (("plugin", "fp16", 200), ("portable", "fp16", 160), ("plugin", "fp32", 160), ("portable", "fp32", 160))
BENCH_ARGS = ("--full", "--batch", "1,8,32", "--precision", "fp32,fp16", "--repeats", "10", "--warmup", "3")
# Seconds kept for the benchmark when deciding whether one more engine build fits, and for torch.compile.
BENCH_RESERVE_S = 150
COMPILE_RESERVE_S = 90
# A TensorRT build given less than this is not started.
MIN_BUILD_S = 90


@dataclass
class Step:
    """One step's outcome: ``status`` is ok, failed (exit N), timed out after N s, or skipped (why)."""

    name: str
    status: str
    seconds: float
    log: str


class Checker:
    """Runs the steps within a time budget and records each one."""

    def __init__(self, out: Path, budget_s: float, work: Path) -> None:
        self.out, self.budget_s, self.work = out, budget_s, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.steps: list[Step] = []

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def skip(self, name: str, why: str) -> Step:
        step = Step(name, f"skipped ({why})", 0.0, "")
        self.steps.append(step)
        print(f"== {name}: skipped ({why})", flush=True)
        return step

    def run(self, name: str, cmd: list[str], limit_s: float) -> Step:
        """Run ``cmd`` from the repository root, logging to ``logs/<name>.log``, killed after the limit."""
        limit = min(limit_s, self.remaining() - 5)
        if limit < 20:
            return self.skip(name, "time budget spent")
        log = self.logs / f"{name}.log"
        print(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        begin = time.monotonic()
        with open(log, "wb") as fh:
            # A session of its own, so a timeout also stops the step's children (pytest workers).
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                _end_group(proc)
                status = f"timed out after {limit:.0f} s"
            except BaseException:  # interrupted (Ctrl-C, SIGTERM): the step must not outlive this script
                _end_group(proc)
                raise
        step = Step(name, status, time.monotonic() - begin, log.name)
        self.steps.append(step)
        print(f"   {status} in {step.seconds:.0f} s", flush=True)
        if status != "ok":
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(f"   | {line}" for line in tail), flush=True)
        return step


def _end_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM a step's process group, SIGKILL it after ``grace_s``. SIGTERM first: a step's tritonserver
    runs in a group of its own, which only the step's own handler (export/serve.py) stops."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _try(fn: Any) -> str:
    try:
        return str(fn())
    except Exception as exc:  # a fact we could not get is reported as such
        return f"unavailable ({type(exc).__name__}: {str(exc)[:200]})"


def machine_facts() -> dict[str, str]:
    """What this machine has, as printable strings (never raises).

    Every package, the project's included, is imported inside ``_try`` here and lazily elsewhere in this script:
    a missing one is a fact to report, and the machine step must run even where torch is absent.
    """
    facts: dict[str, str] = {}
    smi = shutil.which("nvidia-smi")
    facts["nvidia-smi"] = _try(lambda: subprocess.run(
        [smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30).stdout.strip()) if smi else "not on PATH"
    facts["python"] = sys.version.split()[0]

    def torch_facts() -> str:
        import torch

        cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()} (sm_"
                f"{''.join(map(str, torch.cuda.get_device_capability()))})" if torch.cuda.is_available()
                else "no CUDA device")
        return f"{torch.__version__}, {cuda}"

    facts["torch"] = _try(torch_facts)
    for label, module in (("triton", "triton"), ("tensorrt", "tensorrt"), ("tensorrt.plugin", "tensorrt.plugin"),
                          ("onnx", "onnx"), ("onnxscript", "onnxscript"), ("polygraphy", "polygraphy"),
                          ("tritonclient", "tritonclient"), ("nilearn (brain-synth)", "nilearn"),
                          ("mamba_ssm", "mamba_ssm")):
        facts[label] = _try(lambda m=module: getattr(importlib.import_module(m), "__version__", "present"))

    def ort_facts() -> str:
        import onnxruntime

        return f"{onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}"

    facts["onnxruntime"] = _try(ort_facts)

    def server() -> str:
        from export.serve import find_tritonserver

        return str(find_tritonserver().binary)

    facts["tritonserver (nvidia-pytriton)"] = _try(server)
    facts["perf_analyzer"] = shutil.which("perf_analyzer") or "not on PATH"
    facts["trtexec"] = shutil.which("trtexec") or "not on PATH"
    facts["tritonserver with TensorRT backend"] = _try(lambda: tensorrt_server() or "not found")

    def kernel_target() -> str:
        from kernels.target import resolve_target

        return resolve_target().describe()

    facts["plugin kernel target"] = _try(kernel_target)
    return facts


def tensorrt_server() -> str | None:
    """A ``tritonserver`` binary on PATH whose backends include TensorRT (NVIDIA's container), else None."""
    binary = shutil.which("tritonserver")
    if binary is None:
        return None
    for backends in (Path(binary).resolve().parent.parent / "backends", Path("/opt/tritonserver/backends")):
        if (backends / "tensorrt").is_dir():
            return binary
    return None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _has(facts: dict[str, str], key: str) -> bool:
    return not facts.get(key, "unavailable").startswith(("unavailable", "not on PATH"))


def _parity(results: dict[str, Any]) -> list[str]:
    """One verdict line per engine-backed runtime: map error within tolerance and AUROC unchanged."""
    lines = []
    for e in results.get("runtimes", []):
        if e["status"] != "ok" or not e["runtime"].startswith(("tensorrt", "onnxruntime", "torch:triton")):
            continue
        acc = e.get("accuracy")
        if not acc:
            lines.append(f"- {e['runtime']} {e['precision']}: no accuracy reference")
            continue
        tol = PARITY_TOLERANCE[e["precision"]]
        ok = acc["map_max_rel_error"] <= tol and round(acc["auroc"], 3) == round(acc["auroc_reference"], 3)
        lines.append(f"- {e['runtime']} {e['precision']}: **{'pass' if ok else 'FAIL'}**: map error "
                     f"{acc['map_max_rel_error']:.2e} of range (tolerance {tol:g}), AUROC {acc['auroc']:.4f} vs "
                     f"{acc['auroc_reference']:.4f} on {acc['images']} images")
    return lines


def summary(checker: Checker, facts: dict[str, str], results_dir: Path) -> str:
    """summary.md: steps, machine facts, parity verdicts, the benchmark's and kernels' short tables."""
    used = checker.budget_s - checker.remaining()
    lines = ["# GPU check", "", f"Budget {checker.budget_s:.0f} s, used {used:.0f} s.", "",
             "| step | status | seconds | log |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.log} |" for s in checker.steps]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in facts.items()]
    for label, folder in (("Benchmark", results_dir / "run"), ("torch.compile", results_dir / "compile")):
        path = folder / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        from benchmarks.report import short_table  # lazily, as every project import here: see machine_facts

        if results.get("complete"):
            table = short_table(results)
        else:
            # A run stopped by its time limit: no targets yet, but every runtime it finished.
            table = short_table({**results, "targets": []}) + "\n(incomplete: stopped by the time limit)"
        lines += ["", f"## {label}", "", "```", table, "```"]
        parity = _parity(results)
        if parity:
            lines += ["", "Parity against PyTorch fp32 (eager scan) on the labelled images:", "", *parity]
    kernels = results_dir / "kernels.json"
    if kernels.is_file():
        from benchmarks.kernel_bench import short_table as kernel_table  # lazily: see machine_facts

        lines += ["", "## Kernels (median ms)", "", "```", kernel_table(json.loads(kernels.read_text())["rows"]), "```"]
    return "\n".join(lines) + "\n"


@dataclass
class _Run:
    """What the steps share: the arguments, the checker, the machine facts and the folders."""

    args: argparse.Namespace
    wanted: list[str]
    checker: Checker
    facts: dict[str, str]
    results: Path
    artifacts: Path
    cuda: bool
    trt: bool

    def want(self, name: str) -> bool:
        return name in self.wanted

    @property
    def images(self) -> list[str]:
        return ["--images", str(self.args.images)] if self.args.images else []

    @property
    def bench_args(self) -> list[str]:
        return ["--image-size", str(self.args.image_size), *BENCH_ARGS]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"))
    ap.add_argument("--budget-s", type=float, default=450.0, help="total time for all steps")
    ap.add_argument("--images", type=Path, help="MVTec-style folder of test images for the benchmark")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    ap.add_argument("--image-size", type=int, default=256, help="square input size of every export and benchmark")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: run every step up to the first call that needs one (engines prepared, not built)")
    ap.add_argument("--arch", help="plugin kernel target for the engines (default: the GPU; sm_90 in a dry run)")
    ap.add_argument("--ptx-isa", help="driver PTX ISA cap (default: this driver's; 9.0 in a dry run)")
    args = ap.parse_args(argv)
    args.wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.wanted) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}; expected a subset of {', '.join(STEPS)}")
    return args


def _kernel_steps(run: _Run, py: str) -> None:
    checker = run.checker
    if run.want("kernel-tests"):
        if run.cuda:
            checker.run("kernel-tests", [py, "-m", "pytest", "tests/test_kernels.py", "-q", "-p",
                                         "no:cacheprovider"], 150)
        else:
            checker.skip("kernel-tests", "no CUDA device: on a CPU they run in the Triton interpreter, "
                                         "through the normal test suite")
    if run.want("kernel-bench"):
        if run.cuda:
            checker.run("kernel-bench", [py, "benchmarks/kernel_bench.py", "--quick", "--out", str(run.results)], 90)
        else:
            checker.skip("kernel-bench", "no CUDA device")


def _engine_steps(run: _Run, py: str) -> list[Path]:
    """The ONNX exports, then the engines the budget allows; returns the folders of the engines built."""
    checker, args, artifacts = run.checker, run.args, run.artifacts
    ort_gpu = any(p in run.facts["onnxruntime"] for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    target = [*(["--arch", args.arch] if args.arch else []), *(["--ptx-isa", args.ptx_isa] if args.ptx_isa else [])]
    built: list[Path] = []
    exported = False
    if run.want("onnx-export"):
        if not (run.trt or ort_gpu):
            checker.skip("onnx-export", "neither TensorRT nor ONNX Runtime's CUDA provider is here")
        else:
            forms = ["tensorrt:plugin", "tensorrt:portable"] if run.trt else ["onnxruntime:cuda:portable"]
            step = checker.run("onnx-export", [py, "benchmarks/run.py", "--prepare-only", "--artifacts",
                                               str(artifacts), "--runtimes", ",".join(forms), *run.bench_args], 200)
            exported = step.status == "ok"
    if not run.want("tensorrt"):
        return built
    if not run.trt:
        checker.skip("tensorrt", "TensorRT is not installed here" if run.cuda else "no CUDA device")
        return built
    if not exported:
        checker.skip("tensorrt", "no ONNX export to build from")
        return built
    for form, precision, limit in ENGINES:
        name = f"trt-{form}-{precision}"
        room = checker.remaining() - BENCH_RESERVE_S
        if room < min(limit, MIN_BUILD_S):
            checker.skip(name, "time budget: the benchmark goes first")
            continue
        onnx = artifacts / f"onnx-{form}" / "model.onnx"
        engine = artifacts / f"tensorrt-{form}-{precision}"
        step = checker.run(name, [py, "-m", "pdd.cli", "export", "trt", "--onnx", str(onnx),
                                  "--precision", precision, "--batch", "1:8:32", "--out", str(engine),
                                  "--timing-cache", str(artifacts / "timing.cache"), *target,
                                  *(["--dry-run"] if args.dry_run else [])], min(limit, room))
        if step.status == "ok" and (engine / "engine.plan").is_file():
            built.append(engine)
    return built


def _serve_and_benchmark_steps(run: _Run, py: str, built: list[Path]) -> None:
    checker, args, results = run.checker, run.args, run.results
    if run.want("serve"):
        server = tensorrt_server()
        engine = next((e for e in built if e.name == "tensorrt-plugin-fp16"), built[0] if built else None)
        if args.dry_run:
            checker.skip("serve", "dry run: no engine to serve")
        elif server is None:
            checker.skip("serve", "no tritonserver with the TensorRT backend here (NVIDIA's container has it)")
        elif engine is None:
            checker.skip("serve", "no engine was built")
        else:
            checker.run("serve", [py, "-m", "benchmarks.gpu_serve", "--server", server, "--engine", str(engine),
                                  "--out", str(results / "serve.json"), *run.images], 120)
    if run.want("benchmark"):
        if run.cuda:
            keep = COMPILE_RESERVE_S if run.want("benchmark-compile") else 0
            checker.run("benchmark", [py, "benchmarks/run.py", "--runtimes", ",".join(GPU_RUNTIMES), *run.bench_args,
                                      "--reference-repeats", "1", "--artifacts", str(run.artifacts), "--out",
                                      str(results / "run"), *run.images], max(checker.remaining() - keep, 20))
        else:
            checker.skip("benchmark", "no CUDA device (benchmarks/run.py runs the CPU runtimes on its own)")
    if run.want("benchmark-compile"):
        if run.cuda:
            # Batch 1 only: every new batch size would be one more inductor compilation.
            checker.run("benchmark-compile", [py, "benchmarks/run.py", "--runtimes", "torch:graph-parallel:compile",
                                              "--image-size", str(args.image_size), "--batch", "1",
                                              "--precision", "fp32", "--repeats", "10", "--warmup", "2",
                                              "--out", str(results / "compile"), *run.images], checker.remaining())
        else:
            checker.skip("benchmark-compile", "no CUDA device")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pdd-gpu-check-"))
    py = sys.executable
    checker = Checker(args.out, args.budget_s, work)
    results = work / "results"
    try:
        facts = machine_facts()
        print("== machine\n" + "\n".join(f"   {k}: {v}" for k, v in facts.items()), flush=True)
        checker.steps.append(Step("machine", "ok", time.monotonic() - checker.start, ""))
        cuda = _cuda_available() and not args.dry_run
        # A dry run prepares the engines as far as a machine without TensorRT and a GPU can.
        trt = (_has(facts, "tensorrt") and cuda) or args.dry_run
        run = _Run(args, args.wanted, checker, facts, results, work / "artifacts", cuda, trt)
        _kernel_steps(run, py)
        built = _engine_steps(run, py)
        _serve_and_benchmark_steps(run, py, built)
        text = summary(checker, facts, results)
        _collect(args.out, work, results, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + text, flush=True)
    return 0


def _collect(out: Path, work: Path, results: Path, text: str) -> None:
    """Write the few files that come back (see the module docstring) and pack everything else."""
    (out / "summary.md").write_text(text, encoding="utf-8")
    for src in (results / "run" / "results.json", results / "run" / "results.md", results / "kernels.json",
                results / "kernels.md", results / "serve.json"):
        if src.is_file():
            shutil.copy2(src, out / src.name)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
        if results.is_dir():
            tar.add(results, arcname="results")
        for plan in sorted([*(work / "artifacts").glob("tensorrt-*/*.json"),
                            *(work / "artifacts").glob("tensorrt-*/ptx/*.ptx")]):
            tar.add(plan, arcname=f"engines/{plan.relative_to(work / 'artifacts')}")
        info = tarfile.TarInfo("summary.md")
        data = text.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    from benchmarks.common import exit_on_termination  # lazily: see machine_facts

    # The running step (and its server) is stopped before this script ends.
    exit_on_termination()
    sys.exit(main())
