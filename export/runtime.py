"""One interface for every way of running PDD: PyTorch, ONNX Runtime, TensorRT.

Benchmarks, parity checks and serving hold a :class:`Runtime` and call ``predict``; they do not care what
is behind it. :func:`make_runtime` builds one from a short spec and raises :class:`RuntimeUnavailable`
(with the reason) when it cannot run here, so a benchmark can list it as skipped instead of failing.

Specs (:data:`RUNTIMES` lists every full name; the benchmarks use these names)::

    torch[:<scan impl>][:compile][:bf16|:int8]      PyTorch (torch.compile with ':compile'); scan impl one of
                                                     pdd.impl_names.SCAN_IMPLS (default eager; 'chunked' is
                                                     the deprecated name of eager); ':bf16' computes in bf16
                                                     by pdd.precision's policy (CPUs with AMX or AVX512-BF16);
                                                     ':int8' with the WRN teacher quantized (pdd.int8; the
                                                     model must carry its int8 quantization)
    onnxruntime[:cpu|cuda|tensorrt][:portable|plugin] ONNX Runtime with that execution provider and ONNX form
    tensorrt[:plugin|portable][:fp32|fp16]          a TensorRT engine built by export/build_trt.py from that
                                                     ONNX form (default plugin, fp16)

Example::

    >>> import numpy as np
    >>> from pdd import PDDConfig, build_pdd
    >>> from export.runtime import make_runtime
    >>> rt = make_runtime("torch:eager", model=build_pdd(PDDConfig(image_size=64, scan_impl="eager")))
    >>> out = rt.predict(np.zeros((1, 3, 64, 64), np.float32))
    >>> out["pred_score"].shape, out["anomaly_map"].shape
    ((1,), (1, 64, 64))
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config

from export.custom_ops import DOMAIN, register_ort_ops, to_ort_domain
from export.metadata import (
    ENGINE_METADATA,
    EngineMetadata,
    EngineMismatch,
    OnnxMetadata,
    check_engine_compatible,
    metadata_path,
    read_engine_metadata,
    read_onnx_metadata,
    sha256_file,
)
from export.onnx_export import (
    FORMS,
    INPUT_NAME,
    OUTPUT_NAMES,
    build_for_export,
    export_onnx,
    load_onnx,
    save_onnx,
    to_fp16,
    weight_sharing_copy,
)
from kernels.ort_ops import configure_session
from kernels.target import driver_ptx_isa
from pdd.calibration import Calibration, apply_calibration
from pdd.impl_names import SCAN_IMPLS
from pdd.model import PDDModel
from pdd.precision import FP32, MODEL_PRECISIONS, ModelPrecision, PrecisionUnavailable
from pdd.ssm import ScanImplUnavailable, resolve_scan_impl

__all__ = [
    "ORT_PROVIDERS",
    "RUNTIMES",
    "OnnxRuntime",
    "Runtime",
    "RuntimeModel",
    "RuntimeUnavailable",
    "TensorRTRuntime",
    "TorchRuntime",
    "make_runtime",
    "typed_fp16_runtime",
]

log = logging.getLogger(__name__)

# ONNX Runtime's execution providers by runtime-name word, in the order a session tries them.
ORT_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
# Every runtime's full name. torch.compile is offered for the scans that compile to one graph (the
# eager scan reads its chunk size on the host, a graph break; the CPU kernel is one opaque custom op).
# bf16: the CPU runtimes whose scan reads bf16 itself (the C kernel).
RUNTIMES = (
    *(f"torch:{impl}" for impl in SCAN_IMPLS),
    "torch:graph-parallel:compile", "torch:triton:compile", "torch:cpu_kernel:compile",
    "torch:cpu_kernel:bf16", "torch:cpu_kernel:compile:bf16",
    *(f"onnxruntime:{provider}:{form}" for provider in ORT_PROVIDERS for form in FORMS),
    *(f"tensorrt:{form}" for form in FORMS),
)


class RuntimeUnavailable(RuntimeError):
    """This runtime cannot run here (package missing, no GPU, no artifact); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Runtime(abc.ABC):
    """Runs PDD: ``predict(images)`` -> ``{"pred_score": (B,) fp32, "anomaly_map": (B, H, W) fp32}``.

    images: (B, 3, H, W) float32 ImageNet-normalised numpy array (for an ONNX/TensorRT artifact exported
    with ``preprocess=True``: (B, H, W, 3) uint8, as its metadata says). ``decide(images)`` adds the
    calibrated decisions, as the served postprocess model does; ``calibration`` comes from the model
    (PyTorch) or the artifact's metadata.
    """

    name: str
    device: str
    calibration: Calibration | None = None

    @abc.abstractmethod
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Scores (B,) and maps (B, H, W), float32 numpy arrays on the host."""

    def decide(self, images: np.ndarray, *, image_threshold: float | None = None,
               pixel_threshold: float | None = None) -> dict[str, np.ndarray]:
        """``predict`` plus ``normalised_score`` (B,) fp32 in [0, 1], ``pred_label`` (B,) bool and ``pred_mask``
        (B, H, W) bool from the calibration; ``image_threshold`` / ``pixel_threshold`` (raw) replace its."""
        calibration = self.calibration
        if calibration is None:
            if image_threshold is None:
                raise ValueError(f"{self.name}: the model has no calibration; run `pdd calibrate` (and re-read the "
                                 f"export) or pass image_threshold=")
            calibration = Calibration.manual(image_threshold, "image_threshold=")
        out = self.predict(images)
        return {**out, **apply_calibration(calibration, out["pred_score"], out["anomaly_map"],
                                           image_threshold=image_threshold, pixel_threshold=pixel_threshold)}

    @abc.abstractmethod
    def close(self) -> None:
        """Release sessions, engines and device memory (idempotent)."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r})"


def _check_images(images: np.ndarray, where: str, uint8_nhwc: bool = False) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[0] == 0:
        shape = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"{where}: images must be a non-empty 4-D numpy array, got {shape}")
    if uint8_nhwc:
        if images.dtype != np.uint8 or images.shape[-1] != 3:
            raise ValueError(f"{where}: this artifact takes (B, H, W, 3) uint8 images, got {images.shape} "
                             f"{images.dtype}")
    elif images.dtype != np.float32 or images.shape[1] != 3:
        raise ValueError(f"{where}: images must be (B, 3, H, W) float32 ImageNet-normalised, got "
                         f"{images.shape} {images.dtype}")


class TorchRuntime(Runtime):
    """PyTorch eager (optionally ``torch.compile``) with the chosen scan implementation.

    The model is used through a copy sharing its weights (on its own device), so choosing a scan
    implementation here does not change the caller's model. ``compile``: PDD is rebuilt in its graph layer
    forms (Conv and ConvTranspose, as for export: :func:`export.onnx_export.build_for_export`) and compiled
    by inductor; on the CPU with inductor's weight freezing (weights become constants, convolution weights
    prepacked for oneDNN and batch norms folded into them), so the compiled model does not follow later
    changes to the weights. The first call compiles (about a minute on 2 cores; inductor's cache in
    ``$TORCHINDUCTOR_CACHE_DIR`` shortens later processes' first calls), as does every new batch size.
    ``precision``: what the copy computes in (:meth:`pdd.model.PDDModel.to_precision`, weights cast once); a
    native reduced precision the CPU lacks is :class:`RuntimeUnavailable` naming the feature, an emulated one
    runs eagerly only.
    """

    def __init__(self, model: torch.nn.Module, scan_impl: str = "eager", device: str | torch.device = "cpu",
                 compile: bool = False, precision: ModelPrecision = FP32) -> None:
        dev = torch.device(device)
        name = (f"torch:{scan_impl}" + (":compile" if compile else "")  # as the caller spelled it
                + (f":{precision.name}" if precision.name != "fp32" else "") + (" (emulated)" * precision.emulate))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable(f"torch on {dev}: no CUDA device here")
        if scan_impl == "triton" and dev.type != "cuda":
            raise RuntimeUnavailable("torch:triton runs the Triton kernels, which need a CUDA device")
        try:
            scan_impl = resolve_scan_impl(scan_impl, dev)
        except ScanImplUnavailable as exc:
            raise RuntimeUnavailable(str(exc)) from exc
        if precision.name != "fp32":
            if not isinstance(model, PDDModel):
                raise RuntimeUnavailable(f"{name}: reduced precision is defined for PDD (pdd.precision), not "
                                         f"{type(model).__name__}")
            if compile and precision.emulate:
                raise RuntimeUnavailable(f"{name}: emulated precision runs eagerly (it is for numerics)")
            if precision.name == "int8" and (model.precision != FP32 or model.quantization is None):
                raise RuntimeUnavailable(f"{name}: give the fp32 model with its int8 quantization (a checkpoint "
                                         f"calibrated with `pdd calibrate --precision int8`, or pdd.int8.observe)")
            if dev.type == "cpu" and not precision.emulate:
                try:
                    ModelPrecision.native(precision.name, where=name)
                except PrecisionUnavailable as exc:
                    raise RuntimeUnavailable(str(exc)) from exc
        current = next(model.parameters()).device
        # Moving a weight-sharing copy would move the caller's weights too: copy them when the device differs.
        self.model = (weight_sharing_copy(model) if current == dev else copy.deepcopy(model).to(dev)).eval()
        if hasattr(self.model, "set_scan_impl"):  # PDD; the RD4AD baseline has no scan
            self.model.set_scan_impl(scan_impl)
        if (compile or precision != FP32) and isinstance(self.model, PDDModel):
            # The graph layer forms: what inductor compiles, and oneDNN's bf16 convolutions (pdd.checkpoint).
            self.model = build_for_export(self.model, scan_impl)
        if precision != getattr(self.model, "precision", FP32):
            # The copy's weights are replaced; the caller's are not touched. A compiled int8 model compiles its
            # quantized teacher with the rest (not alone).
            self.model.to_precision(precision, compile_int8=not compile)
        self._forward = torch.compile(self.model) if compile else self.model
        self._freezing = compile and dev.type == "cpu"
        self.calibration = getattr(model, "calibration", None)
        self.name = name
        self.device = str(dev)
        self._dev = dev

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        _check_images(images, self.name)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self._dev)
        # Read when a call compiles (the first, or a new batch size); no effect on the calls after.
        freezing = inductor_config.patch(freezing=True) if self._freezing else contextlib.nullcontext()
        with torch.inference_mode(), freezing:
            out = self._forward(x)
        return {"pred_score": out.pred_score.float().cpu().numpy(),
                "anomaly_map": out.anomaly_map.float().cpu().numpy()}

    def close(self) -> None:
        self._forward = self.model = None


class OnnxRuntime(Runtime):
    """ONNX Runtime on an exported ``model.onnx`` (either form).

    Plugin-form graphs are served by the Python ops of :mod:`export.custom_ops` (the SS2D scan with
    ``scan_impl``: by default the compiled CPU kernel where it can be built; the head's numpy twin of the
    PyTorch reference), on a copy of the graph moved to onnxruntime-extensions' domain, as the served
    python flavour runs them; ``session`` is the ORT session.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, name: str | None = None, scan_impl: str = "auto") -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable(f"onnxruntime is not installed ({exc}); pip install -e '.[export]'") from exc
        path = Path(path)
        if not path.is_file():
            raise RuntimeUnavailable(f"no ONNX file at {path}; export one with export.onnx_export.export_onnx")
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeUnavailable(f"ONNX Runtime here lacks {missing} (available: {ort.get_available_providers()})")
        self.metadata: OnnxMetadata | None = read_onnx_metadata(path) if metadata_path(path).is_file() else None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Only a graph with custom nodes needs parsing here (its copy is moved to the Python ops' domain).
        proto = None if self.metadata and not self.metadata.custom_ops else load_onnx(path)
        if proto is not None and any(n.domain == DOMAIN for n in proto.graph.node):
            configure_session(options, register_ort_ops())
            source: Any = to_ort_domain(proto, scan_impl).SerializeToString()
        else:
            source = str(path)
        del proto
        self.session = ort.InferenceSession(source, options, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if set(OUTPUT_NAMES) - set(self.output_names):
            raise ValueError(f"{path}: outputs {self.output_names}, expected {list(OUTPUT_NAMES)}")
        self._uint8 = bool(self.metadata and self.metadata.preprocess)
        self.calibration = self.metadata.calibration if self.metadata else None
        self.name = name or f"onnxruntime:{providers[0].removesuffix('ExecutionProvider').lower()}"
        self.device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        _check_images(images, self.name, self._uint8)
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(images)})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None


class TensorRTRuntime(Runtime):
    """A TensorRT engine folder (``engine.plan`` + ``engine.json``) run through TensorRT's Python API.

    Refuses (:class:`export.metadata.EngineMismatch`) an engine built for another TensorRT version or GPU
    compute capability, or whose file no longer matches its recorded hash. I/O are torch CUDA tensors.
    """

    def __init__(self, engine_dir: str | os.PathLike, device: int = 0) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise RuntimeUnavailable(f"TensorRT is not installed here ({exc})") from exc
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("TensorRT needs a CUDA GPU; none is visible here")
        engine_dir = Path(engine_dir)
        if not (engine_dir / ENGINE_METADATA).is_file():
            raise RuntimeUnavailable(f"no engine metadata at {engine_dir / ENGINE_METADATA}; build the engine "
                                     f"with python export/build_trt.py")
        self.metadata: EngineMetadata = read_engine_metadata(engine_dir)
        engine_path = engine_dir / self.metadata.engine_file
        if not engine_path.is_file():
            raise RuntimeUnavailable(f"no engine file at {engine_path}; build it with python export/build_trt.py")
        cc = torch.cuda.get_device_capability(device)
        for warning in check_engine_compatible(self.metadata, tensorrt_version=trt.__version__,
                                               compute_capability=f"{cc[0]}.{cc[1]}",
                                               device_name=torch.cuda.get_device_name(device),
                                               driver_ptx_isa=driver_ptx_isa(), where=str(engine_path)):
            log.warning("%s", warning)
        if sha256_file(engine_path) != self.metadata.engine_sha256:
            raise EngineMismatch(f"{engine_path} does not match the sha256 in its metadata (changed or truncated "
                                 f"after the build); rebuild it with python export/build_trt.py")
        self._torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.uint8: torch.uint8,
                             trt.int32: torch.int32}
        self._trt = trt
        self._dev = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not deserialize {engine_path}; rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._uint8 = self.metadata.preprocess
        self.calibration = self.metadata.calibration
        self.name = f"tensorrt:{self.metadata.precision}"
        self.device = str(self._dev)

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        _check_images(images, self.name, self._uint8)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self._dev)
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self._torch_dtype[self.engine.get_tensor_dtype(name)]
            outs[name] = torch.empty(shape, dtype=dtype, device=self._dev)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(self._dev)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed for input {tuple(x.shape)}")
        stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}

    def close(self) -> None:
        self.context = self.engine = None


def typed_fp16_runtime(model: PDDModel, out_dir: str | os.PathLike, batch: int = 8,
                       threads: int | None = None) -> OnnxRuntime:
    """The typed fp16 graph TensorRT builds (``export/build_trt.py --onnx-form portable --precision fp16``:
    the portable form with the graph-parallel scan, :func:`export.fp16.to_fp16` by pdd.precision's policy), run
    by ONNX Runtime's CPU provider: fp16 TensorRT's numbers measured without a GPU.

    Why it is faithful: the graph is the one TensorRT parses, with its fp16 tensors where TensorRT has them;
    ONNX Runtime's CPU provider runs the few ops it has fp16 kernels for (LayerNormalization, casts, shape ops)
    in fp16 and wraps every other fp16 node in casts (its InsertCastTransformer), computing it in fp32 and
    rounding the result to fp16 — fp32 accumulation and fp16 rounding at each layer's output, as TensorRT's
    fp16 tactics with fp32 accumulators. What it cannot show: tactics that accumulate in fp16, and TensorRT's
    layer fusions, which round less often. Writes ``out_dir/onnx/`` (the fp32 export) and ``out_dir/fp16.onnx``.
    """
    out = Path(out_dir)
    report = export_onnx(model, out / "onnx", form="portable", batch=(1, max(batch, 1)), scan_impl="graph-parallel")
    path = out / "fp16.onnx"
    save_onnx(to_fp16(load_onnx(report.path)), path)
    return OnnxRuntime(path, threads=threads, name="onnxruntime:cpu:portable:fp16")


class RuntimeModel(torch.nn.Module):
    """A :class:`Runtime` behind the PyTorch model interface ``pdd.evaluate`` and ``pdd.predict`` use:
    ``forward(images)`` -> :class:`pdd.model.PDDOutput`; ``cfg`` and ``calibration`` as given."""

    def __init__(self, runtime: Runtime, cfg: Any, calibration: Calibration | None, precision_label: str) -> None:
        super().__init__()
        self.runtime, self.cfg, self.calibration = runtime, cfg, calibration
        self.precision_label = precision_label

    def forward(self, images: torch.Tensor) -> Any:
        from pdd.model import PDDOutput

        out = self.runtime.predict(images.detach().float().cpu().numpy())
        return PDDOutput(torch.from_numpy(out["pred_score"]), torch.from_numpy(out["anomaly_map"]))


def make_runtime(spec: str, *, model: torch.nn.Module | None = None, onnx_path: str | os.PathLike | None = None,
                 engine_dir: str | os.PathLike | None = None, artifacts: str | os.PathLike | None = None,
                 device: str | None = None, threads: int | None = None, emulate: bool = False) -> Runtime:
    """Build the runtime a spec names (see the module docstring); :class:`RuntimeUnavailable` if it cannot run.

    ``emulate``: a PyTorch runtime's reduced precision emulated in fp32 (any CPU, eager; numerics only).

    ``artifacts``: a folder laid out as ``onnx-<form>/model.onnx`` and ``tensorrt-<form>-<precision>/`` (what
    ``benchmarks/run.py --prepare-only`` and ``benchmarks/gpu_check.py`` write), used when ``onnx_path`` /
    ``engine_dir`` are not given.
    """
    kind, *rest = spec.split(":")
    if kind == "torch":
        if model is None:
            raise ValueError(f"runtime {spec!r} needs model=")
        impl = rest[0] if rest else "eager"
        words = rest[1:]
        precision = words.pop() if words and words[-1] in MODEL_PRECISIONS else "fp32"
        if words not in ([], ["compile"]):
            words = "|".join(MODEL_PRECISIONS)
            raise ValueError(f"runtime spec {spec!r}: expected torch[:<scan impl>][:compile][:{words}]")
        return TorchRuntime(model, impl, device or ("cuda" if impl == "triton" else "cpu"), compile=bool(words),
                            precision=ModelPrecision(precision, emulate=emulate and precision != "fp32"))
    if kind == "onnxruntime":
        provider = rest[0] if rest else "cpu"
        form = rest[1] if len(rest) > 1 else "portable"
        if provider not in ORT_PROVIDERS or len(rest) > 2:
            raise ValueError(f"runtime spec {spec!r}: expected onnxruntime[:{'|'.join(ORT_PROVIDERS)}][:<form>]")
        path = onnx_path or (Path(artifacts) / f"onnx-{form}" / "model.onnx" if artifacts else None)
        if path is None:
            raise RuntimeUnavailable(f"{spec}: no ONNX file given (onnx_path= or artifacts=)")
        return OnnxRuntime(path, ORT_PROVIDERS[provider], threads=threads, name=f"onnxruntime:{provider}:{form}")
    if kind == "tensorrt":
        form = rest.pop(0) if rest and rest[0] in FORMS else "plugin"
        precision = rest[0] if rest else "fp16"
        if precision not in ("fp32", "fp16") or len(rest) > 1:
            raise ValueError(f"runtime spec {spec!r}: expected tensorrt[:{'|'.join(FORMS)}][:fp32|fp16]")
        folder = engine_dir or (Path(artifacts) / f"tensorrt-{form}-{precision}" if artifacts else None)
        if folder is None:
            raise RuntimeUnavailable(f"{spec}: no engine folder given (engine_dir= or artifacts=)")
        return TensorRTRuntime(folder)
    raise ValueError(f"unknown runtime {kind!r} in spec {spec!r}; expected torch, onnxruntime or tensorrt")
