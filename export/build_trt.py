"""Build a TensorRT engine for PDD: export ONNX, type it (fp32 or fp16), compile the plugin kernels, build.

Run from the repository root (or import :func:`main` / :func:`prepare` / :func:`build_engine`)::

    python export/build_trt.py --checkpoint runs/x/best.pt --onnx-form plugin --precision fp16 \\
        --batch 1:8:32 --out engines/pdd-fp16 --timing-cache engines/timing.cache --check
    python export/build_trt.py --config headct --dry-run --arch sm_90 --out /tmp/plan  # no GPU, no TensorRT
    pdd export trt ...                                                        # the same command

``--arch`` / ``--ptx-isa`` name the GPU the plugin kernels are compiled for; by default they come from the
visible GPU and its driver (on a machine without one: sm_90 and PTX ISA 9.0, the H200 machines' driver
580). A real build refuses an ``--arch`` other than the GPU's (TensorRT times the kernels on it).

Steps (all but the last run on CPU, which is what ``--dry-run`` does):

1. export the eval pipeline to ``<out>/onnx/model.onnx`` (+ ``model.json``), or take ``--onnx``;
2. plugin form: lower the head for TensorRT (:func:`export.trt_plugins.lower_for_tensorrt`);
   fp16: convert to a typed fp16 graph with the head kept fp32 (:func:`export.onnx_export.to_fp16`);
   the result is ``<out>/network.onnx``, what TensorRT parses;
3. compile every plugin kernel tactic to PTX for the target (``<out>/ptx/``, ``.version`` capped to the
   driver's PTX ISA) and write the launch records TensorRT will use at the optimal batch
   (``<out>/plugins.json``), then ``<out>/build-plan.json`` (with the target, PTX ISA and Triton version);
4. build a strongly typed network (the only kind TensorRT 11 has; also used on 10.x) with one
   optimisation profile over the batch range, load/save the timing cache, and write ``engine.plan`` and
   ``engine.json`` atomically. ``--check`` then compares the engine with ONNX Runtime and PyTorch
   through Polygraphy and prints max/mean error per output.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.metadata import (
    ENGINE_FILE,
    ENGINE_METADATA,
    EngineMetadata,
    OnnxMetadata,
    atomic_write_bytes,
    read_onnx_metadata,
    sha256_file,
    sha256_texts,
    versions,
    write_metadata,
)
from export.onnx_export import FORMS, INPUT_NAME, OUTPUT_NAMES, export_onnx, load_onnx, save_onnx, to_fp16
from export.parity import compare_predictions, labelled_images, to_pixels
from export.runtime import OnnxRuntime, TensorRTRuntime, TorchRuntime
from export.trt_plugins import kernels_for_model, lower_for_tensorrt, plugin_launch_records, register_plugins
from kernels.target import KernelTarget, TargetError, resolve_target, version_text
from pdd.backbones.weights import WeightsError
from pdd.checkpoint import load_model
from pdd.config import ConfigError
from pdd.model import PDDModel

__all__ = ["BuildError", "BuildPlan", "build_engine", "check_engine", "main", "parse_batch", "prepare"]

log = logging.getLogger("export.build_trt")

PRECISIONS = ("fp32", "fp16")
# The scan each ONNX form is exported with for a GPU engine (see export.onnx_export.SCAN_IMPLS_BY_FORM).
GPU_SCAN_IMPLS = {"portable": "graph-parallel", "plugin": "plugin"}


class BuildError(RuntimeError):
    """The engine could not be built (parse or build failure, TensorRT missing)."""


@dataclass
class BuildPlan:
    """Everything decided before the TensorRT builder runs."""

    out: Path
    onnx_path: Path
    network_path: Path
    form: str
    precision: str
    profile: tuple[int, int, int]
    onnx_meta: OnnxMetadata
    kernels_sha256: str
    plugins: list[str]
    ptx_files: list[str]
    target: KernelTarget
    ptx_isa: str | None  # highest PTX .version among the plugin kernels; None without plugins
    triton_version: str | None

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.onnx_meta.image_size)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.image_size
        return (batch, h, w, 3) if self.onnx_meta.preprocess else (batch, 3, h, w)


def parse_batch(text: str) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or 'N' for a static batch) -> (min, opt, max), checked 1 <= min <= opt <= max."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise argparse.ArgumentTypeError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return parts[0], parts[1], parts[2]


def prepare(out: Path, *, model: Any = None, onnx: Path | None = None, form: str = "plugin",
            precision: str = "fp16", batch: tuple[int, int, int] = (1, 8, 32), image_size: int | None = None,
            preprocess: bool = False, opset: int | None = None, target: KernelTarget | None = None) -> BuildPlan:
    """Steps 1–3 (CPU only): ONNX, typed network graph, plugin PTX and launch records, build plan.

    ``target``: the GPU the plugin kernels are compiled for (default: :func:`kernels.target.resolve_target`).
    """
    target = target or resolve_target()

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out.mkdir(parents=True, exist_ok=True)
    lo, opt, hi = batch
    if onnx is None:
        if model is None:
            raise ValueError("prepare() needs a model to export or an existing onnx file")
        kwargs = {"opset": opset} if opset else {}
        # On the GPU the portable scans join their chunks by a parallel log-depth scan; the plugin form has
        # one scan of its own (its SS2DScan node).
        export_onnx(model, out / "onnx", form=form, batch=(lo, hi), image_size=image_size, preprocess=preprocess,
                    scan_impl=GPU_SCAN_IMPLS[form], **kwargs)
        onnx = out / "onnx" / "model.onnx"
    meta = read_onnx_metadata(onnx)
    if not (meta.batch[0] <= lo and hi <= meta.batch[1]):
        raise ValueError(f"{onnx} was exported for batch {meta.batch[0]}..{meta.batch[1]}; the profile {batch} "
                         f"does not fit: re-export or choose --batch inside it")
    graph = load_onnx(onnx)
    if meta.form == "plugin":
        graph = lower_for_tensorrt(graph)
    if precision == "fp16":
        graph = to_fp16(graph)
    network_path = out / "network.onnx"
    save_onnx(graph, network_path)
    kernels = kernels_for_model(graph, target)
    ptx_dir = out / "ptx"
    for name, k in kernels.items():
        atomic_write_bytes(ptx_dir / f"{name}.ptx", k.ptx.encode())
    records = plugin_launch_records(graph, opt, target)
    plugins = sorted({r["plugin"] for r in records})
    atomic_write_bytes(out / "plugins.json", (json.dumps({"batch": opt, "launches": records}, indent=1) + "\n")
                       .encode())
    isa = max((k.ptx_isa for k in kernels.values()), default=None)
    triton_version = versions("triton").get("triton") if kernels else None
    plan = BuildPlan(out=out, onnx_path=onnx, network_path=network_path, form=meta.form, precision=precision,
                     profile=batch, onnx_meta=meta, kernels_sha256=sha256_texts({n: k.ptx for n, k in kernels.items()}),
                     plugins=plugins, ptx_files=sorted(f"ptx/{n}.ptx" for n in kernels), target=target,
                     ptx_isa=None if isa is None else version_text(isa), triton_version=triton_version)
    summary = {
        "form": plan.form, "precision": precision, "profile": {"min": lo, "opt": opt, "max": hi},
        "input_shapes": {k: list(plan.input_shape(b)) for k, b in (("min", lo), ("opt", opt), ("max", hi))},
        "onnx": onnx.name, "onnx_sha256": meta.sha256, "network": network_path.name,
        "network_sha256": sha256_file(network_path), "network_nodes": len(graph.graph.node),
        "kernels_sha256": plan.kernels_sha256, "plugins": plugins, "ptx": plan.ptx_files,
        "kernel_target": {"arch": target.sm, "driver_ptx_isa": target.ptx_isa_text, "ptx_isa": plan.ptx_isa,
                          "triton": triton_version},
        "versions": versions("torch", "onnx", "triton"),
    }
    atomic_write_bytes(out / "build-plan.json", (json.dumps(summary, indent=1) + "\n").encode())
    log.info("build plan written to %s: %s, %s, %d network nodes, %d kernel tactics", out, plan.form, precision,
             len(graph.graph.node), len(kernels))
    return plan


def _network_flags(trt: Any) -> int:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # gone in TensorRT 11
    if explicit is not None:
        flags |= 1 << int(explicit)
    return flags


def build_engine(plan: BuildPlan, timing_cache: Path | None = None, workspace_gib: float = 8.0,
                 verbose: bool = False) -> Path:
    """Step 4: parse ``network.onnx``, build the engine, write ``engine.plan`` + ``engine.json``."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(f"TensorRT is not installed here ({exc}); --dry-run prepares everything else") from exc
    import torch

    try:
        here = resolve_target(plan.target.arch, plan.target.ptx_isa, require_gpu=True)
    except TargetError as exc:
        raise BuildError(f"the plan in {plan.out} is for {plan.target.describe()}: {exc}") from exc
    if plan.form == "plugin":
        register_plugins(here)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.network_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT {trt.__version__} could not parse {plan.network_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *(plan.input_shape(b) for b in plan.profile))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT {trt.__version__} failed to build {plan.network_path}; rerun with --verbose")
    engine_path = plan.out / ENGINE_FILE
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    cc = torch.cuda.get_device_capability()
    m = plan.onnx_meta
    lo, opt, hi = plan.profile
    meta = EngineMetadata(
        engine_file=ENGINE_FILE, engine_sha256=sha256_file(engine_path), precision=plan.precision,
        onnx_form=plan.form, onnx_sha256=m.sha256, kernels_sha256=plan.kernels_sha256, plugins=plan.plugins,
        tensorrt_version=trt.__version__, device_name=torch.cuda.get_device_name(),
        compute_capability=f"{cc[0]}.{cc[1]}",
        profile={INPUT_NAME: {"min": list(plan.input_shape(lo)), "opt": list(plan.input_shape(opt)),
                              "max": list(plan.input_shape(hi))}},
        inputs=m.inputs, outputs=m.outputs,
        image_size=m.image_size, preprocess=m.preprocess, normalisation=m.normalisation, config=m.config,
        cuda_arch=here.sm if plan.plugins else None, ptx_isa=plan.ptx_isa, triton_version=plan.triton_version,
        versions={**versions("torch", "onnx", "triton"), "tensorrt": trt.__version__},
        calibration=m.calibration,
    )
    write_metadata(plan.out / ENGINE_METADATA, meta)
    log.info("engine written to %s (%.0f s, %.1f MiB)", engine_path, time.perf_counter() - start,
             engine_path.stat().st_size / 2**20)
    return engine_path


def _torch_runner(runtime: Any, name: str) -> Any:
    """A Polygraphy runner around a :class:`export.runtime.TorchRuntime` (Polygraphy has none for PyTorch)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        def activate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> TensorMetadata:
            return TensorMetadata().add(INPUT_NAME, np.float32, (None, 3, None, None))

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            out = runtime.predict(feed_dict[INPUT_NAME])
            self.inference_time = time.perf_counter() - start
            return out

        def deactivate_impl(self) -> None:
            pass

    return TorchRunner(name=name)


def check_engine(plan: BuildPlan, model: Any = None, images: int = 8, batch: int = 2) -> bool:
    """Compare the engine with ONNX Runtime (source ONNX) and PyTorch eager through Polygraphy.

    Prints max/mean absolute error per output and runtime pair, and the parity verdict (maps, score
    ranks, AUROC) of TensorRT against the first reference. Returns whether Polygraphy's comparison passed.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    engine_rt = TensorRTRuntime(plan.out)  # refuses an engine that does not match this TensorRT or GPU
    ort_rt = OnnxRuntime(plan.onnx_path)
    h, _ = plan.image_size
    x, labels = labelled_images(images, h)
    if plan.onnx_meta.preprocess:
        x = to_pixels(x)
    feeds = [{INPUT_NAME: x[i:i + batch]} for i in range(0, len(x), batch)]
    runners = [TrtRunner(engine_rt.engine, name="tensorrt"), OnnxrtRunner(ort_rt.session, name="onnxruntime")]
    if model is not None and not plan.onnx_meta.preprocess:
        runners.append(_torch_runner(TorchRuntime(model, "eager"), "pytorch"))
    results = Comparator.run(runners, data_loader=feeds)
    tol = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2)}[plan.precision]
    passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=tol[0], rtol=tol[1])))
    joined = {name: {k: np.concatenate([np.asarray(it[k]) for it in iters]) for k in OUTPUT_NAMES}
              for name, iters in results.items()}
    print(f"{'pair':<28} {'output':<12} {'max |err|':>11} {'mean |err|':>11}")
    for other in [n for n in joined if n != "tensorrt"]:
        for k in OUTPUT_NAMES:
            err = np.abs(joined["tensorrt"][k].astype(np.float64) - joined[other][k])
            print(f"{'tensorrt vs ' + other:<28} {k:<12} {err.max():>11.3g} {err.mean():>11.3g}")
    reference = "pytorch" if "pytorch" in joined else "onnxruntime"
    print(compare_predictions(joined[reference], joined["tensorrt"], labels, reference, "tensorrt"))
    engine_rt.close()
    return passed


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export PDD to ONNX and build a TensorRT engine (AOT Triton plugins or portable graph).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a PDD checkpoint (pdd train output)")
    src.add_argument("--config", help="a config file or built-in config name (random teachers unless it names weights)")
    src.add_argument("--onnx", type=Path,
                     help="an ONNX file exported by export_onnx, with its model.json (its form wins over --onnx-form)")
    p.add_argument("--onnx-form", choices=FORMS, default="plugin", help="custom-kernel plugins or standard ops only")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="typed network precision (head stays fp32)")
    p.add_argument("--batch", type=parse_batch, default=(1, 8, 32), metavar="MIN:OPT:MAX",
                   help="optimisation profile of the dynamic batch")
    p.add_argument("--image-size", type=int, help="square input size (default: the model's config)")
    p.add_argument("--preprocess", action="store_true", help="uint8 (B, H, W, 3) input, normalisation in the graph")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--arch", help="GPU the plugin kernels are for, e.g. sm_90 (default: the visible GPU; sm_90 on "
                                  "a machine without one)")
    p.add_argument("--ptx-isa", help="highest PTX ISA the deployment driver loads, e.g. 9.0 for driver 580 "
                                     "(default: this driver's; 9.0 without one)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache to load and update")
    p.add_argument("--workspace-gib", type=float, default=8.0, help="builder workspace limit")
    p.add_argument("--check", action="store_true", help="compare the engine with ONNX Runtime and PyTorch")
    p.add_argument("--check-images", type=int, default=8, help="labelled images used by --check")
    p.add_argument("--dry-run", action="store_true", help="everything up to the TensorRT builder (CPU only)")
    p.add_argument("-v", "--verbose", action="store_true", help="verbose TensorRT and export logging")
    return p


def main(argv: list[str] | None = None, prog: str = "python export/build_trt.py") -> int:
    """The command line of ``python export/build_trt.py`` and ``pdd export trt`` (same arguments)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        target = resolve_target(args.arch, args.ptx_isa, require_gpu=not args.dry_run)
    except TargetError as exc:
        print(f"error: {exc} (--dry-run prepares everything up to the TensorRT builder)", file=sys.stderr)
        return 2
    model = None
    if not args.onnx:
        if args.checkpoint is None:
            log.warning("building from config %r without a checkpoint: trainable parts are freshly initialised",
                        args.config)
        model = load_model(args.checkpoint, args.config, scan_impl="eager")
        if not isinstance(model, PDDModel):
            raise ValueError(f"{args.checkpoint or args.config} is a {model.cfg.model!r} model, which has no export "
                             f"path (only PDD is exported); give a PDD checkpoint or config")
    plan = prepare(args.out, model=model, onnx=args.onnx, form=args.onnx_form, precision=args.precision,
                   batch=args.batch, image_size=args.image_size, preprocess=args.preprocess, opset=args.opset,
                   target=target)
    kernels = (f"{len(plan.ptx_files)} kernel tactics for {target.sm}, PTX ISA {plan.ptx_isa} "
               f"(Triton {plan.triton_version})" if plan.ptx_files else "no plugin kernels")
    print(f"prepared {plan.form} {plan.precision} network {plan.network_path} (batch {plan.profile}); {kernels}; "
          f"plan in {plan.out / 'build-plan.json'}")
    if args.dry_run:
        return 0
    try:
        engine = build_engine(plan, args.timing_cache, args.workspace_gib, args.verbose)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"engine: {engine} (+ {engine.with_suffix('.json').name})")
    if args.check:
        return 0 if check_engine(plan, model, args.check_images) else 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, WeightsError, FileNotFoundError, ValueError) as exc:  # as `pdd export trt` reports them
        print(f"build_trt.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
