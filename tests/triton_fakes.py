"""Stand-in artifacts for the Triton repository tests: a tiny ONNX network and a fake TensorRT engine folder,
each with real metadata files (no export, no GPU)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.metadata import EngineMetadata, OnnxMetadata, TensorSpec, write_metadata
from pdd.calibration import Calibration, fit_operating_point
from pdd.data.readers import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "export" / "triton_models"
NORMALISATION = {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "in_graph": False}


def tiny_onnx(path: Path, size: int) -> None:
    """images (B, 3, S, S) -> anomaly_map = channel mean (B, S, S), pred_score = its max (B,)."""
    axes_c = helper.make_tensor("axes_c", TensorProto.INT64, [1], [1])
    axes_hw = helper.make_tensor("axes_hw", TensorProto.INT64, [2], [1, 2])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images", "axes_c"], ["anomaly_map"], keepdims=0),
         helper.make_node("ReduceMax", ["anomaly_map", "axes_hw"], ["pred_score"], keepdims=0)],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", size, size])],
        initializer=[axes_c, axes_hw])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def specs(size: int, dtype: str = "float32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    return ([TensorSpec("images", dtype, ("batch", 3, size, size))],
            [TensorSpec("pred_score", "float32", ("batch",)),
             TensorSpec("anomaly_map", "float32", ("batch", size, size))])


def make_onnx_dir(folder: Path, size: int = 64, batch: tuple[int, int] = (1, 8),
                  calibration: Calibration | None = None, preprocess: bool = False,
                  custom_ops: tuple[str, ...] = (), config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_onnx(folder / "model.onnx", size)
    inputs, outputs = specs(size)
    write_metadata(folder / "model.json", OnnxMetadata(
        form="portable", opset=18, file="model.onnx", sha256="0" * 64, size_bytes=1, nodes=2, inputs=inputs,
        outputs=outputs, image_size=(size, size), batch=batch, preprocess=preprocess, input_layout="NCHW",
        normalisation=NORMALISATION, config=config or {}, custom_ops=list(custom_ops), calibration=calibration))
    return folder


def make_engine_dir(folder: Path, size: int = 64, max_batch: int = 8, dtype: str = "float32",
                    min_batch: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "engine.plan").write_bytes(b"stand-in: not a TensorRT engine")
    inputs, outputs = specs(size, dtype)
    write_metadata(folder / "engine.json", EngineMetadata(
        engine_file="engine.plan", engine_sha256="0" * 64, precision="fp16" if dtype == "float16" else "fp32",
        onnx_form="plugin", onnx_sha256="0" * 64, kernels_sha256="0" * 64, plugins=["pdd::SS2DScan"],
        tensorrt_version="10.13.0", device_name="NVIDIA H200", compute_capability="9.0",
        profile={"images": {"min": [min_batch, 3, size, size], "opt": [max(4, min_batch), 3, size, size],
                            "max": [max_batch, 3, size, size]}},
        inputs=inputs, outputs=outputs, image_size=(size, size), preprocess=False, normalisation=NORMALISATION,
        config={}, calibration=Calibration.manual(0.25)))
    return folder


def calibration() -> Calibration:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 10)
    image = fit_operating_point(rng.normal(0.3, 0.05, 30) + 0.2 * labels, labels, source="stand-in")
    pixel = fit_operating_point(rng.normal(0.2, 0.05, 1000), target=0.01, source="stand-in pixels")
    return Calibration(image, pixel)


# --- triton_python_backend_utils: what the Python-backend models import from the server --------------------


class BackendTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self) -> np.ndarray:
        return self.array


class BackendError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


class BackendResponse:
    def __init__(self, output_tensors: list[BackendTensor] | None = None, error: BackendError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


def backend_utils() -> types.ModuleType:
    """A stand-in ``triton_python_backend_utils`` (only the server provides the real one): tensors, responses
    and errors as plain records, requests as dicts of arrays. Install it in ``sys.modules`` before loading a
    model.py."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.TritonError, pb.InferenceResponse = BackendTensor, BackendError, BackendResponse
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.TritonModelException = RuntimeError
    return pb
