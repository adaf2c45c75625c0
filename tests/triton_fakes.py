"""Stand-in artifacts for the Triton repository tests: tiny ONNX networks (portable, and plugin form with the
two custom nodes) and a fake TensorRT engine folder, each with real metadata files (no export, no GPU); and
the ``triton_python_backend_utils`` stand-in (tests/triton_backend_stub.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from triton_backend_stub import BackendError, BackendResponse, BackendTensor, backend_utils

from export.metadata import EngineMetadata, OnnxMetadata, TensorSpec, write_metadata
from kernels.contract import DOMAIN, HEAD_MAP_STRIDE, HEAD_OP, HEAD_PAIRS, SS2D_OP, SS2D_ROUTES
from pdd.calibration import Calibration, fit_operating_point
from pdd.data.readers import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["NORMALISATION", "ROOT", "TEMPLATES", "BackendError", "BackendResponse", "BackendTensor",
           "backend_utils", "calibration", "make_engine_dir", "make_onnx_dir", "plugin_constants", "specs",
           "tiny_onnx", "tiny_plugin_onnx"]

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


# The tiny plugin graph's SS2D state size and Gaussian σ.
_PLUGIN_STATE, _PLUGIN_SIGMA = 2, 1.0


def plugin_constants() -> dict[str, np.ndarray | float]:
    """The tiny plugin graph's scan weights (A, D, delta_bias for 3 channels) and head σ."""
    dim = 3 * SS2D_ROUTES
    return {"A": -np.linspace(0.5, 1.5, dim * _PLUGIN_STATE, dtype=np.float32).reshape(dim, _PLUGIN_STATE),
            "D": np.linspace(-0.5, 0.5, dim, dtype=np.float32),
            "delta_bias": np.linspace(-0.2, 0.2, dim, dtype=np.float32), "sigma": _PLUGIN_SIGMA}


def tiny_plugin_onnx(path: Path, size: int) -> None:
    """The plugin form in miniature: images (B, 3, S, S) -> f = 4x4 average pool (B, 3, S/4, S/4); one
    ``pdd::SS2DScan`` node, y = scan(x=f, delta=f on every route, B=C=f's first channels on every route);
    one ``pdd::AnomalyHead`` node on the pairs (y, f) x6 -> anomaly_map (B, S, S), pred_score (B,)."""
    c = plugin_constants()
    routes = helper.make_tensor("routes", TensorProto.INT64, [5], [1, SS2D_ROUTES, 1, 1, 1])
    axis1 = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    starts, ends = (helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s0", 0), ("sN", _PLUGIN_STATE)))
    weights = [onnx.numpy_helper.from_array(c[name], name) for name in ("A", "D", "delta_bias")]
    nodes = [
        helper.make_node("AveragePool", ["images"], ["f"], kernel_shape=[HEAD_MAP_STRIDE] * 2,
                         strides=[HEAD_MAP_STRIDE] * 2),
        helper.make_node("Unsqueeze", ["f", "axis1"], ["f5"]),
        helper.make_node("Tile", ["f5", "routes"], ["delta"]),
        helper.make_node("Slice", ["f", "s0", "sN", "axis1"], ["fb"]),
        helper.make_node("Unsqueeze", ["fb", "axis1"], ["fb5"]),
        helper.make_node("Tile", ["fb5", "routes"], ["bc"]),
        helper.make_node(SS2D_OP, ["f", "delta", "bc", "bc", "A", "D", "delta_bias"], ["y"], domain=DOMAIN,
                         plugin_namespace=DOMAIN, aot=1),
        helper.make_node(HEAD_OP, ["y", "f"] * HEAD_PAIRS, ["anomaly_map", "pred_score"], domain=DOMAIN,
                         sigma=c["sigma"], image_size=[size, size], plugin_namespace=DOMAIN, aot=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny-plugin", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", size, size])],
        initializer=[routes, axis1, starts, ends, *weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]),
              path)


def specs(size: int, dtype: str = "float32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    return ([TensorSpec("images", dtype, ("batch", 3, size, size))],
            [TensorSpec("pred_score", "float32", ("batch",)),
             TensorSpec("anomaly_map", "float32", ("batch", size, size))])


def make_onnx_dir(folder: Path, size: int = 64, batch: tuple[int, int] = (1, 8),
                  calibration: Calibration | None = None, preprocess: bool = False, form: str = "portable",
                  config: dict | None = None) -> Path:
    """``model.onnx`` (:func:`tiny_onnx`, or :func:`tiny_plugin_onnx` for ``form="plugin"``) and its metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    (tiny_plugin_onnx if form == "plugin" else tiny_onnx)(folder / "model.onnx", size)
    custom_ops = [f"{DOMAIN}::{HEAD_OP}", f"{DOMAIN}::{SS2D_OP}"] if form == "plugin" else []
    inputs, outputs = specs(size)
    write_metadata(folder / "model.json", OnnxMetadata(
        form=form, opset=18, file="model.onnx", sha256="0" * 64, size_bytes=1, nodes=2, inputs=inputs,
        outputs=outputs, image_size=(size, size), batch=batch, preprocess=preprocess, input_layout="NCHW",
        normalisation=NORMALISATION, config=config or {}, custom_ops=custom_ops, calibration=calibration))
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
