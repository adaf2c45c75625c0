"""Runtime interface: specs, unavailability reasons, ONNX Runtime on small hand-built graphs (standard and
custom-op nodes), PyTorch eager, and the parity helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export.custom_ops import DOMAIN, HEAD_MAP_STRIDE, HEAD_OP, SS2D_OP, register_ort_ops, to_ort_domain
from export.metadata import OnnxMetadata, TensorSpec, metadata_path, write_metadata
from export.parity import compare_predictions, labelled_images
from export.runtime import OnnxRuntime, RuntimeUnavailable, TorchRuntime, make_runtime
from kernels.contract import ss2d_shapes
from pdd.anomaly import anomaly_head_ref
from pdd.backbones.vmamba import SS2D
from pdd.calibration import Calibration, apply_calibration, fit_operating_point
from pdd.model import UpConv2x2
from pdd.ss2d import ss2d_scan

# One intra-op thread for the forward passes of this module (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _save(graph: onnx.GraphProto, path: Path, domains: dict[str, int] | None = None) -> Path:
    opsets = [helper.make_opsetid("", 18), *(helper.make_opsetid(d, v) for d, v in (domains or {}).items())]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _toy_pipeline(path: Path) -> Path:
    """images (B, 3, 8, 8) -> anomaly_map = mean over channels, pred_score = max of the map."""
    axes_c = helper.make_tensor("axes_c", TensorProto.INT64, [1], [1])
    axes_hw = helper.make_tensor("axes_hw", TensorProto.INT64, [2], [1, 2])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images", "axes_c"], ["anomaly_map"], keepdims=0),
         helper.make_node("ReduceMax", ["anomaly_map", "axes_hw"], ["pred_score"], keepdims=0)],
        "toy", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 8, 8])],
        initializer=[axes_c, axes_hw])
    return _save(graph, path)


def test_onnxruntime_runs_a_pipeline_graph(tmp_path: Path) -> None:
    rt = make_runtime("onnxruntime:cpu", onnx_path=_toy_pipeline(tmp_path / "toy.onnx"))
    images = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    out = rt.predict(images)
    np.testing.assert_allclose(out["anomaly_map"], images.mean(1), rtol=1e-6)
    np.testing.assert_allclose(out["pred_score"], images.mean(1).max((1, 2)), rtol=1e-6)
    assert rt.name == "onnxruntime:cpu:portable" and rt.device == "cpu"
    with pytest.raises(ValueError, match="float32"):
        rt.predict(images.astype(np.float64))
    with pytest.raises(ValueError, match="non-empty"):
        rt.predict(images[:0])
    rt.close()


def test_decide_applies_the_artifact_calibration(tmp_path: Path) -> None:
    path = _toy_pipeline(tmp_path / "toy.onnx")
    images = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    with make_runtime("onnxruntime:cpu", onnx_path=path) as rt:
        with pytest.raises(ValueError, match="no calibration"):
            rt.decide(images)
        manual = rt.decide(images, image_threshold=0.5)
    np.testing.assert_array_equal(manual["pred_label"], manual["pred_score"] > 0.5)
    np.testing.assert_array_equal(manual["pred_mask"], manual["anomaly_map"] > 0.5)
    maps = images.mean(1)
    cal = Calibration(fit_operating_point(maps.max((1, 2))[:2], target=0.5),
                      fit_operating_point(maps[:2], target=0.05))
    spec = [TensorSpec("images", "float32", ("batch", 3, 8, 8))]
    outs = [TensorSpec("pred_score", "float32", ("batch",)), TensorSpec("anomaly_map", "float32", ("batch", 8, 8))]
    write_metadata(metadata_path(path), OnnxMetadata(
        form="portable", opset=18, file=path.name, sha256="0" * 64, size_bytes=1, nodes=2, inputs=spec,
        outputs=outs, image_size=(8, 8), batch=(1, 8), preprocess=False, input_layout="NCHW", normalisation={},
        config={}, custom_ops=[], calibration=cal))
    with make_runtime("onnxruntime:cpu", onnx_path=path) as rt:
        assert rt.calibration == cal
        out = rt.decide(images)
        ref = apply_calibration(cal, out["pred_score"], out["anomaly_map"])
        for key in ("normalised_score", "pred_label", "pred_mask"):
            np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
        assert out["pred_mask"].any() and not out["pred_mask"].all()


def test_onnxruntime_serves_the_ss2d_node_with_the_python_op(tmp_path: Path) -> None:
    shapes = ss2d_shapes(batch=2, dim=4, height=3, width=5, d_state=2)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    node = helper.make_node(SS2D_OP, list(shapes), ["y"], domain=DOMAIN, plugin_namespace=DOMAIN, aot=1)
    graph = helper.make_graph([node], "ss2d", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes["x"])])
    path = _save(graph, tmp_path / "ss2d.onnx", {DOMAIN: 1})
    gen = torch.Generator().manual_seed(0)
    feeds = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    feeds["A"] = -torch.rand(shapes["A"], generator=gen) - 0.5
    feeds["delta"] = feeds["delta"] * 0.5
    options = ort.SessionOptions()  # a bare session: this graph is not a PDD pipeline

    options.register_custom_ops_library(register_ort_ops())
    session = ort.InferenceSession(to_ort_domain(onnx.load(str(path))).SerializeToString(), options)
    (y,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    expected = ss2d_scan(*(feeds[k] for k in shapes), impl="reference")
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_onnxruntime_serves_the_head_node_with_the_python_op(tmp_path: Path) -> None:
    levels = [(2, 8, 4, 4), (2, 16, 2, 2), (2, 32, 1, 1)] * 2
    names = [f"{kind}{i}" for i in range(len(levels)) for kind in ("t", "s")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, levels[i // 2]) for i, n in enumerate(names)]
    size = HEAD_MAP_STRIDE * 4
    node = helper.make_node(HEAD_OP, names, ["anomaly_map", "pred_score"], domain=DOMAIN, sigma=1.0,
                            image_size=[size, size], plugin_namespace=DOMAIN, aot=1)
    graph = helper.make_graph([node], "head", inputs, [
        helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [2, size, size]),
        helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, [2])])
    path = _save(graph, tmp_path / "head.onnx", {DOMAIN: 1})
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(levels[i // 2], generator=gen) for i in range(len(names))]
    rt = OnnxRuntime(path)
    amap, score = rt.session.run(None, dict(zip(names, (f.numpy() for f in feats))))
    ref_map, ref_score = anomaly_head_ref(list(zip(feats[0::2], feats[1::2])), (size, size), sigma=1.0)
    np.testing.assert_allclose(amap, ref_map.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(score, ref_score.numpy(), rtol=1e-5, atol=1e-6)


def test_torch_runtime_predicts_and_keeps_the_model_untouched(small_pdd: torch.nn.Module) -> None:
    impls = {m.scan_impl for m in small_pdd.modules() if isinstance(m, SS2D)}
    rt = make_runtime("torch:reference", model=small_pdd)
    assert isinstance(rt, TorchRuntime) and rt.name == "torch:reference" and rt.device == "cpu"
    assert {m.scan_impl for m in rt.model.modules() if isinstance(m, SS2D)} == {"reference"}
    assert {m.scan_impl for m in small_pdd.modules() if isinstance(m, SS2D)} == impls
    out = make_runtime("torch:eager", model=small_pdd).predict(np.zeros((1, 3, 64, 64), np.float32))
    assert out["pred_score"].shape == (1,) and out["anomaly_map"].shape == (1, 64, 64)
    assert out["anomaly_map"].dtype == np.float32


def test_compiled_cpu_kernel_runtime_matches_eager(small_pdd: torch.nn.Module) -> None:
    """torch:cpu_kernel:compile (inductor, frozen weights, graph layer forms) gives the eager maps and scores;
    the caller's model keeps its scan and layer forms. Compiles once at 64² (~1 min on 2 cores)."""
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    want = make_runtime("torch:cpu_kernel", model=small_pdd).predict(images)
    rt = make_runtime("torch:cpu_kernel:compile", model=small_pdd)
    assert rt.name == "torch:cpu_kernel:compile" and rt.device == "cpu"
    got = rt.predict(images)
    span = float(want["anomaly_map"].max() - want["anomaly_map"].min())
    assert np.abs(got["anomaly_map"] - want["anomaly_map"]).max() <= 1e-5 * span
    np.testing.assert_allclose(got["pred_score"], want["pred_score"], rtol=1e-5)
    assert {m.scan_impl for m in small_pdd.modules() if isinstance(m, SS2D)} == {"eager"}
    assert any(isinstance(m, UpConv2x2) and m.eager_gemm for m in small_pdd.modules())
    assert not any(isinstance(m, UpConv2x2) and m.eager_gemm for m in rt.model.modules())


def test_unavailable_runtimes_say_why(small_pdd: torch.nn.Module, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeUnavailable, match="CUDA"):
            make_runtime("torch:triton", model=small_pdd)
    with pytest.raises(RuntimeUnavailable, match="no ONNX file"):
        make_runtime("onnxruntime:cpu:plugin", artifacts=tmp_path)
    with pytest.raises(RuntimeUnavailable, match="no ONNX file given"):
        make_runtime("onnxruntime:cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider"):
            make_runtime("onnxruntime:cuda", onnx_path=_toy_pipeline(tmp_path / "toy.onnx"))
    with pytest.raises(RuntimeUnavailable) as info:
        make_runtime("tensorrt:fp16", engine_dir=tmp_path)
    assert info.value.reason


def test_bad_specs_are_programming_errors(small_pdd: torch.nn.Module) -> None:
    for spec in ("openvino", "onnxruntime:gpu", "tensorrt:int8", "torch:eager:fast"):
        with pytest.raises(ValueError, match=r"spec|runtime"):
            make_runtime(spec, model=small_pdd)
    with pytest.raises(ValueError, match="model="):
        make_runtime("torch:eager")


def test_labelled_images_are_deterministic_and_balanced() -> None:
    images, labels = labelled_images(6, 32, seed=3)
    again, _ = labelled_images(6, 32, seed=3)
    assert images.shape == (6, 3, 32, 32) and images.dtype == np.float32
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    np.testing.assert_array_equal(images, again)
    mean = np.asarray([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    pixels = images * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels[1].max() > pixels[0].max()  # the blob is bright


def test_compare_predictions_measures_maps_ranks_and_auroc() -> None:
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 2, (4, 8, 8)).astype(np.float32)
    ref = {"anomaly_map": maps, "pred_score": np.array([0.1, 0.9, 0.2, 0.8], np.float32)}
    labels = np.array([0, 1, 0, 1])
    same = compare_predictions(ref, {k: v.copy() for k, v in ref.items()}, labels)
    assert same.ok() and same.map_max_abs_error == 0 and same.auroc_reference == 1.0
    close = {"anomaly_map": maps + 1e-5, "pred_score": ref["pred_score"] + 1e-6}
    assert compare_predictions(ref, close, labels).ok()
    swapped = {"anomaly_map": maps, "pred_score": np.array([0.1, 0.9, 0.95, 0.8], np.float32)}
    report = compare_predictions(ref, swapped, labels)
    assert not report.rank_identical and not report.ok() and report.auroc_candidate == 0.5
    far = {"anomaly_map": maps + 1e-2, "pred_score": ref["pred_score"]}
    assert compare_predictions(ref, far, labels).map_relative_error > 1e-4
