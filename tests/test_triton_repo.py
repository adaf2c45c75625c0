"""Triton model repository generation, the Python-backend models' logic, and the Kubernetes manifests.

No server here (see test_serving.py): repositories are built from small stand-in artifacts (a tiny ONNX and
a fake TensorRT engine with real metadata files), every config.pbtxt is parsed into Triton's ModelConfig
protobuf, and the preprocess/postprocess/engine model files run against a minimal stand-in of
``triton_python_backend_utils``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
import torch
import yaml
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from export.metadata import EngineMetadata, OnnxMetadata, TensorSpec, read_onnx_metadata, write_metadata
from export.serve import docker_command
from export.triton_repo import (
    MAX_SIDE,
    MODEL_NAMES,
    RepositoryError,
    build_triton_repo,
    check_repository,
    parse_config,
    repository_flavour,
    store_calibration,
)
from pdd.calibration import Calibration, apply_calibration, fit_operating_point
from pdd.data.readers import IMAGENET_MEAN, IMAGENET_STD, read_image, read_image_bytes, to_model_input

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "export" / "triton_models"
NORMALISATION = {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "in_graph": False}


# --- stand-in artifacts -------------------------------------------------------------------------------


def _tiny_onnx(path: Path, size: int) -> None:
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


def _specs(size: int, dtype: str = "float32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    return ([TensorSpec("images", dtype, ("batch", 3, size, size))],
            [TensorSpec("pred_score", "float32", ("batch",)),
             TensorSpec("anomaly_map", "float32", ("batch", size, size))])


def make_onnx_dir(folder: Path, size: int = 64, batch: tuple[int, int] = (1, 8),
                  calibration: Calibration | None = None, preprocess: bool = False,
                  custom_ops: tuple[str, ...] = (), config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _tiny_onnx(folder / "model.onnx", size)
    inputs, outputs = _specs(size)
    write_metadata(folder / "model.json", OnnxMetadata(
        form="portable", opset=18, file="model.onnx", sha256="0" * 64, size_bytes=1, nodes=2, inputs=inputs,
        outputs=outputs, image_size=(size, size), batch=batch, preprocess=preprocess, input_layout="NCHW",
        normalisation=NORMALISATION, config=config or {}, custom_ops=list(custom_ops), calibration=calibration))
    return folder


def make_engine_dir(folder: Path, size: int = 64, max_batch: int = 8, dtype: str = "float32",
                    min_batch: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "engine.plan").write_bytes(b"stand-in: not a TensorRT engine")
    inputs, outputs = _specs(size, dtype)
    write_metadata(folder / "engine.json", EngineMetadata(
        engine_file="engine.plan", engine_sha256="0" * 64, precision="fp16" if dtype == "float16" else "fp32",
        onnx_form="plugin", onnx_sha256="0" * 64, kernels_sha256="0" * 64, plugins=["pdd::SS2DScan"],
        tensorrt_version="10.13.0", device_name="NVIDIA H200", compute_capability="9.0",
        profile={"images": {"min": [min_batch, 3, size, size], "opt": [max(4, min_batch), 3, size, size],
                            "max": [max_batch, 3, size, size]}},
        inputs=inputs, outputs=outputs, image_size=(size, size), preprocess=False, normalisation=NORMALISATION,
        config={}, calibration=Calibration.manual(0.25)))
    return folder


@pytest.fixture()
def onnx_dir(tmp_path: Path) -> Path:
    return make_onnx_dir(tmp_path / "onnx")


@pytest.fixture()
def engine_dir(tmp_path: Path) -> Path:
    return make_engine_dir(tmp_path / "engine")


def _configs(repo: Path) -> dict[str, mc.ModelConfig]:
    return {name: text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
            for name in MODEL_NAMES}


# --- generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["python", "onnxruntime", "tensorrt"])
def test_every_flavour_parses_and_is_wired(tmp_path, onnx_dir, engine_dir, flavour):
    src = engine_dir if flavour == "tensorrt" else onnx_dir
    repo = build_triton_repo(tmp_path / "repo", flavour=flavour, engine_dir=src, max_batch_size=8)
    configs = check_repository(repo)
    assert set(configs) == set(MODEL_NAMES) and repository_flavour(repo) == flavour
    parsed = _configs(repo)
    for name, cfg in parsed.items():
        assert cfg == configs[name] and cfg.max_batch_size == 8

    ens = parsed["pdd"]
    assert ens.platform == "ensemble"
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in ens.input] == [
        ("images", "TYPE_UINT8", [-1, -1, -1], True), ("images_encoded", "TYPE_STRING", [1], True),
        ("dicom_window", "TYPE_FP32", [2], True)]
    assert {o.name: list(o.dims) for o in ens.output} == {
        "pred_score": [1], "anomaly_map": [64, 64], "normalised_score": [1], "pred_label": [1],
        "pred_mask": [64, 64]}
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocess", "pdd_engine", "postprocess"]

    eng = parsed["pdd_engine"]
    assert [(i.name, list(i.dims)) for i in eng.input] == [("images", [3, 64, 64])]
    assert list(eng.dynamic_batching.preferred_batch_size) == [4, 8]
    assert eng.dynamic_batching.max_queue_delay_microseconds == 500
    warmup = [(1, [3, 64, 64], True)] + ([] if flavour == "python" else [(8, [3, 64, 64], True)])
    assert [(w.batch_size, list(w.inputs["images"].dims), w.inputs["images"].zero_data)
            for w in eng.model_warmup] == warmup
    kind = mc.ModelInstanceGroup.Kind.Name(eng.instance_group[0].kind)
    score = next(o for o in eng.output if o.name == "pred_score")
    version = repo / "pdd_engine" / "1"
    if flavour == "tensorrt":
        assert eng.platform == "tensorrt_plan" and eng.optimization.cuda.graphs and kind == "KIND_GPU"
        assert (version / "model.plan").read_bytes() == (engine_dir / "engine.plan").read_bytes()
        assert (version / "engine.json").is_file()
        assert "TensorRT 10.13.0" in (repo / "pdd_engine" / "config.pbtxt").read_text()
    else:
        assert (version / "model.onnx").read_bytes() == (onnx_dir / "model.onnx").read_bytes()
        assert not eng.optimization.cuda.graphs
    if flavour == "onnxruntime":
        assert eng.backend == "onnxruntime" and kind == "KIND_AUTO"
    if flavour == "python":
        assert eng.backend == "python" and kind == "KIND_CPU" and not score.HasField("reshape")
        assert (version / "model.py").read_text() == (TEMPLATES / "ort_engine.py").read_text()
        assert eng.parameters["input_name"].string_value == "images"
        # CPU: one image per ONNX Runtime call, no arena (bounded memory).
        assert eng.parameters["run_batch"].string_value == "1"
        assert eng.parameters["cpu_mem_arena"].string_value == "0"
    else:
        # The network's (B,) score is exposed as (B, 1).
        assert score.HasField("reshape") and list(score.reshape.shape) == []

    pre = parsed["preprocess"]
    assert pre.backend == "python" and pre.parameters["max_side"].string_value == str(MAX_SIDE)
    assert [float(v) for v in pre.parameters["mean"].string_value.split(",")] == list(IMAGENET_MEAN)
    assert [float(v) for v in pre.parameters["std"].string_value.split(",")] == list(IMAGENET_STD)
    assert pre.parameters["image_size"].string_value == "64"
    assert (repo / "preprocess" / "1" / "model.py").read_text() == (TEMPLATES / "preprocess.py").read_text()
    assert (repo / "preprocess" / "1" / "readers.py").read_text() == (ROOT / "pdd/data/readers.py").read_text()
    assert [i.name for i in pre.input] == [i.name for i in ens.input]
    post = parsed["postprocess"]
    record = post.parameters["calibration"].string_value
    if flavour == "tensorrt":
        assert Calibration.from_dict(json.loads(record)) == Calibration.manual(0.25)
    else:
        assert record == ""
    assert post.parameters["image_threshold"].string_value == post.parameters["pixel_threshold"].string_value == ""
    assert [(o.name, mc.DataType.Name(o.data_type)) for o in post.output] == [
        ("normalised_score", "TYPE_FP32"), ("pred_label", "TYPE_BOOL"), ("pred_mask", "TYPE_BOOL")]
    assert (repo / "postprocess" / "1" / "pdd_calibration.py").read_text() == (
        ROOT / "pdd" / "calibration.py").read_text()


def _calibration() -> Calibration:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 10)
    image = fit_operating_point(rng.normal(0.3, 0.05, 30) + 0.2 * labels, labels, source="stand-in")
    pixel = fit_operating_point(rng.normal(0.2, 0.05, 1000), target=0.01, source="stand-in pixels")
    return Calibration(image, pixel)


def test_calibration_from_metadata_overrides_and_none(tmp_path):
    cal = _calibration()
    with_cal = make_onnx_dir(tmp_path / "cal", calibration=cal)
    post = _configs(build_triton_repo(tmp_path / "a", engine_dir=with_cal))["postprocess"]
    assert Calibration.from_dict(json.loads(post.parameters["calibration"].string_value)) == cal
    repo = build_triton_repo(tmp_path / "b", engine_dir=with_cal, threshold=1.5, pixel_threshold=0.75)
    post = _configs(repo)["postprocess"]
    assert (float(post.parameters["image_threshold"].string_value),
            float(post.parameters["pixel_threshold"].string_value)) == (1.5, 0.75)
    assert "image_threshold 1.5 replaces the calibrated one" in (repo / "postprocess" / "config.pbtxt").read_text()
    repo = build_triton_repo(tmp_path / "c", engine_dir=make_onnx_dir(tmp_path / "none"))
    assert _configs(repo)["postprocess"].parameters["calibration"].string_value == ""
    assert "nothing is flagged" in (repo / "postprocess" / "config.pbtxt").read_text()


def test_store_calibration_updates_a_repository_without_re_export(tmp_path):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=make_onnx_dir(tmp_path / "o"), pixel_threshold=0.5)
    onnx_before = (repo / "pdd_engine" / "1" / "model.onnx").read_bytes()
    cal = _calibration()
    assert store_calibration(repo, cal) == repo / "postprocess" / "config.pbtxt"
    check_repository(repo)
    post = _configs(repo)["postprocess"]
    assert Calibration.from_dict(json.loads(post.parameters["calibration"].string_value)) == cal
    assert post.parameters["pixel_threshold"].string_value == "0.5"  # a hand-set override is kept
    assert read_onnx_metadata(repo / "pdd_engine" / "1" / "model.json").calibration == cal
    assert (repo / "pdd_engine" / "1" / "model.onnx").read_bytes() == onnx_before
    # An ONNX export's metadata alone.
    onnx_dir = make_onnx_dir(tmp_path / "plain")
    assert store_calibration(onnx_dir / "model.onnx", cal) == onnx_dir / "model.json"
    assert read_onnx_metadata(onnx_dir / "model.onnx").calibration == cal


def test_metadata_with_a_bare_anomaly_threshold_still_loads(tmp_path):
    folder = make_onnx_dir(tmp_path / "old")
    data = json.loads((folder / "model.json").read_text())
    del data["calibration"]
    data["anomaly_threshold"] = 0.75  # how metadata recorded a threshold before calibration records
    (folder / "model.json").write_text(json.dumps(data))
    assert read_onnx_metadata(folder / "model.json").calibration == Calibration.manual(
        0.75, f"anomaly_threshold of {folder / 'model.json'}")
    post = _configs(build_triton_repo(tmp_path / "r", engine_dir=folder))["postprocess"]
    assert json.loads(post.parameters["calibration"].string_value)["image"]["threshold"] == 0.75


def test_fp16_engine_gets_fp16_preprocess_output(tmp_path):
    repo = build_triton_repo(tmp_path / "r", flavour="tensorrt",
                             engine_dir=make_engine_dir(tmp_path / "e", dtype="float16"))
    cfg = _configs(repo)
    assert cfg["preprocess"].output[0].data_type == mc.TYPE_FP16
    assert cfg["preprocess"].parameters["output_dtype"].string_value == "float16"
    assert cfg["pdd_engine"].input[0].data_type == mc.TYPE_FP16


def test_options_and_rebuild_keep_other_files(tmp_path, onnx_dir):
    out = tmp_path / "repo"
    build_triton_repo(out, flavour="onnxruntime", engine_dir=onnx_dir, max_batch_size=1, instance_kind="gpu",
                      instance_count=2, queue_delay_us=0)
    (out / "README.md").write_text("kept")
    (out / "pdd_engine" / "1" / "stale.txt").write_text("dropped")
    build_triton_repo(out, flavour="onnxruntime", engine_dir=onnx_dir, max_batch_size=1, instance_kind="gpu",
                      instance_count=2, queue_delay_us=0)
    eng = _configs(out)["pdd_engine"]
    assert (eng.instance_group[0].kind, eng.instance_group[0].count) == (mc.ModelInstanceGroup.KIND_GPU, 2)
    assert list(eng.dynamic_batching.preferred_batch_size) == []
    assert [w.batch_size for w in eng.model_warmup] == [1]
    assert (out / "README.md").read_text() == "kept" and not (out / "pdd_engine" / "1" / "stale.txt").exists()
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize("case, message", [
    ("unknown flavour", "unknown flavour"),
    ("both sources", "exactly one of model"),
    ("neither source", "exactly one of model"),
    ("tensorrt from onnx", "prebuilt engine"),
    ("batch over profile", "batches up to 4"),
    ("batch over onnx range", "batches up to 2"),
    ("profile without batch 1", "profile starts at batch 2"),
    ("preprocess in graph", "without --preprocess"),
    ("plugin form", "custom ops"),
    ("size mismatch", "exported at 64"),
    ("no engine", "no TensorRT engine"),
    ("zero batch", "max_batch_size must be"),
    ("bad instance kind", "instance_kind"),
])
def test_refusals_name_the_problem(tmp_path, onnx_dir, case, message):
    out = tmp_path / "repo"
    calls = {
        "unknown flavour": lambda: build_triton_repo(out, flavour="openvino", engine_dir=onnx_dir),
        "both sources": lambda: build_triton_repo(out, model=object(), engine_dir=onnx_dir),
        "neither source": lambda: build_triton_repo(out),
        "tensorrt from onnx": lambda: build_triton_repo(out, flavour="tensorrt", model=object()),
        "batch over profile": lambda: build_triton_repo(
            out, flavour="tensorrt", engine_dir=make_engine_dir(tmp_path / "e", max_batch=4), max_batch_size=8),
        "profile without batch 1": lambda: build_triton_repo(
            out, flavour="tensorrt", engine_dir=make_engine_dir(tmp_path / "e2", min_batch=2), max_batch_size=8),
        "batch over onnx range": lambda: build_triton_repo(
            out, engine_dir=make_onnx_dir(tmp_path / "o", batch=(1, 2)), max_batch_size=4),
        "preprocess in graph": lambda: build_triton_repo(
            out, engine_dir=make_onnx_dir(tmp_path / "p", preprocess=True)),
        "plugin form": lambda: build_triton_repo(
            out, engine_dir=make_onnx_dir(tmp_path / "q", custom_ops=("pdd::SS2DScan",))),
        "size mismatch": lambda: build_triton_repo(out, engine_dir=onnx_dir, image_size=128),
        "no engine": lambda: build_triton_repo(out, flavour="tensorrt", engine_dir=tmp_path),
        "zero batch": lambda: build_triton_repo(out, engine_dir=onnx_dir, max_batch_size=0),
        "bad instance kind": lambda: build_triton_repo(out, engine_dir=onnx_dir, instance_kind="tpu"),
    }
    with pytest.raises(RepositoryError, match=message):
        calls[case]()
    assert not list(out.glob("*/config.pbtxt"))


def test_check_repository_catches_broken_wiring(tmp_path, onnx_dir):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=onnx_dir)
    ensemble = repo / "pdd" / "config.pbtxt"
    original = ensemble.read_text()
    produced = 'key: "normalised"\n      value: "normalised"'
    assert produced in original
    ensemble.write_text(original.replace(produced, 'key: "normalised"\n      value: "normalized"'))
    with pytest.raises(RepositoryError, match="'normalised', which no ensemble input or earlier step provides"):
        check_repository(repo)
    ensemble.write_text(original.replace('key: "pred_label"', 'key: "label"'))
    with pytest.raises(RepositoryError, match="has no output 'label'"):
        check_repository(repo)
    ensemble.write_text(original.replace("max_batch_size: 8", "max_batch_size: eight"))
    with pytest.raises(RepositoryError, match="not a valid Triton model config"):
        parse_config(ensemble)
    ensemble.write_text(original)
    (repo / "pdd_engine" / "1" / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match=r"model\.onnx is missing"):
        check_repository(repo)
    assert set(check_repository(repo, require_weights=False)) == set(MODEL_NAMES)


def test_committed_example_matches_the_generator(tmp_path):
    """triton_repo/ (committed without weights) is what the generator writes for the brain-synth config."""
    committed = ROOT / "triton_repo"
    configs = check_repository(committed, require_weights=False)
    assert repository_flavour(committed) == "python"
    size = int(configs["preprocess"].parameters["image_size"].string_value)
    fresh = build_triton_repo(tmp_path / "fresh", engine_dir=make_onnx_dir(tmp_path / "onnx", size=size))
    for name in MODEL_NAMES:
        assert parse_config(fresh / name / "config.pbtxt") == configs[name], name
        for py in (fresh / name / "1").glob("*.py"):
            assert (committed / name / "1" / py.name).read_text() == py.read_text(), py
    assert not list(committed.rglob("*.onnx")) and not list(committed.rglob("*.plan"))


def test_docker_command_per_flavour(tmp_path, onnx_dir, engine_dir):
    python = docker_command(build_triton_repo(tmp_path / "py", engine_dir=onnx_dir))
    assert "nvcr.io/nvidia/tritonserver:24.10-py3" in python and "--gpus" not in python
    assert "onnxruntime" in python and "numpy<2" in python and "-p 8000:8000 -p 8001:8001 -p 8002:8002" in python
    ort = docker_command(build_triton_repo(tmp_path / "ort", flavour="onnxruntime", engine_dir=onnx_dir),
                         http_port=9000)
    assert "pip install -q" in ort and "onnxruntime" not in ort.split("pip install")[1].split("&&")[0]
    assert "-p 9000:8000" in ort
    trt = docker_command(build_triton_repo(tmp_path / "trt", flavour="tensorrt", engine_dir=engine_dir))
    assert "--gpus all" in trt and "tritonserver:<yy.mm>-py3" in trt
    assert "tritonserver:25.01-py3" in docker_command(tmp_path / "trt", tag="25.01")


# --- the Python-backend models, offline -------------------------------------------------------------------


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self) -> np.ndarray:
        return self.array


class _TritonError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: _TritonError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


@pytest.fixture()
def backend_model(monkeypatch):
    """Load a template as the Python backend would, with a minimal ``triton_python_backend_utils``."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.TritonError, pb.InferenceResponse = _Tensor, _TritonError, _Response
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.TritonModelException = RuntimeError
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)

    def load(template: str, repo: Path | None = None, name: str | None = None):
        spec = importlib.util.spec_from_file_location(f"_triton_{template}", TEMPLATES / f"{template}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        if repo is not None:
            cfg = json_format.MessageToJson(parse_config(repo / name / "config.pbtxt"),
                                            preserving_proto_field_name=True)
            model.initialize({"model_config": cfg, "model_repository": str(repo / name), "model_version": "1",
                              "model_instance_kind": "CPU", "model_instance_device_id": "0"})
        return module, model

    return load


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(64, 64, 3), (96, 80, 3), (40, 50, 1), (300, 200, 3), (1, 1, 3)])
def test_preprocess_matches_to_model_input(tmp_path, onnx_dir, backend_model, shape):
    """Same resampling (antialiased bilinear) and normalisation as pdd.data.to_model_input."""
    repo = build_triton_repo(tmp_path / "repo", engine_dir=onnx_dir)
    _, model = backend_model("preprocess", repo, "preprocess")
    img = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
    [resp] = model.execute([{"images": _Tensor("images", img)}])
    assert resp.error is None
    got = resp.outputs["normalised"]
    ref = torch.stack([to_model_input(i.astype(np.float32) / 255, 64) for i in img]).numpy()
    assert got.shape == (2, 3, 64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


def test_preprocess_encoded_equals_pixels_and_refuses_bad_requests(tmp_path, onnx_dir, backend_model):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=onnx_dir)
    _, model = backend_model("preprocess", repo, "preprocess")
    rng = np.random.default_rng(1)
    rgb, grey = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64), dtype=np.uint8)
    deep = (np.arange(48 * 40).reshape(48, 40) * 31).astype(np.uint16)
    encoded = np.array([[_png(rgb)], [_png(grey)], [_png(deep)]], dtype=np.object_)
    big_png = _png(np.zeros((8, MAX_SIDE + 1), np.uint8))
    requests = [
        {"images_encoded": _Tensor("images_encoded", encoded)},
        {"images": _Tensor("images", rgb[None])},
        {"images": _Tensor("images", np.zeros((1, 8, 8, 4), np.uint8))},
        {"images": _Tensor("images", np.zeros((0, 8, 8, 3), np.uint8))},
        {"images": _Tensor("images", np.zeros((1, MAX_SIDE + 1, 2, 3), np.uint8))},
        {"images": _Tensor("images", np.zeros((1, 0, 8, 3), np.uint8))},
        {},
        {"images": _Tensor("images", rgb[None]), "images_encoded": _Tensor("images_encoded", encoded)},
        {"images_encoded": _Tensor("images_encoded", np.array([[b"%PDF-1.4 not an image"]], np.object_))},
        {"images_encoded": _Tensor("images_encoded", np.array([[big_png]], np.object_))},
        {"images_encoded": _Tensor("images_encoded", np.array([[b""]], np.object_))},
        {"images_encoded": _Tensor("images_encoded", np.array([[_png(grey)], [_png(rgb)[:60]]], np.object_))},
        {"images": _Tensor("images", rgb[None]), "dicom_window": _Tensor("dicom_window", np.ones((1, 2), np.float32))},
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert responses[0].error is None and responses[1].error is None
    np.testing.assert_array_equal(responses[0].outputs["normalised"][0], responses[1].outputs["normalised"][0])
    grey_ref = to_model_input(grey.astype(np.float32) / 255, 64).numpy()
    np.testing.assert_allclose(responses[0].outputs["normalised"][1], grey_ref, atol=2e-6)
    # A 16-bit file is decoded by the same reader as locally (robust min/max), then resized the same way.
    deep_ref = to_model_input(read_image_bytes(_png(deep)), 64).numpy()
    np.testing.assert_allclose(responses[0].outputs["normalised"][2], deep_ref, atol=2e-6)
    expected = ["1 (grey) or 3 (RGB) channels", "empty batch", f"largest side accepted is {MAX_SIDE}",
                "empty image", "exactly one of", "exactly one of",
                "cannot read image 'images_encoded'[0]: unrecognised image format",
                f"'images_encoded'[0]: the image is 8x{MAX_SIDE + 1} pixels; the largest side accepted is {MAX_SIDE}",
                "cannot read image 'images_encoded'[0]: file is empty",
                "cannot read image 'images_encoded'[1]: corrupt or truncated image data",
                "'dicom_window' applies to DICOM files"]
    for resp, phrase in zip(responses[2:], expected, strict=True):
        assert resp.error is not None and phrase in resp.error.message, (phrase, resp.error and resp.error.message)
        assert resp.error.code == _TritonError.INVALID_ARG


def test_preprocess_decodes_dicom_as_pdd_predict_does(tmp_path, onnx_dir, backend_model, write_dicom):
    """DICOM bytes: rescale slope/intercept, the file's window or the request's, MONOCHROME1; clear refusals."""
    repo = build_triton_repo(tmp_path / "repo", engine_dir=onnx_dir)
    _, model = backend_model("preprocess", repo, "preprocess")
    stored = (np.add.outer(np.arange(80), np.arange(72)) * 20).astype(np.uint16)
    ct = write_dicom(tmp_path / "ct.dcm", stored, slope=0.5, intercept=-500.0, centre=[200.0], width=[700.0])
    mono1 = write_dicom(tmp_path / "m1.dcm", stored[:50], photometric="MONOCHROME1", slope=2.0, intercept=-100.0)
    files = np.array([[ct.read_bytes()], [mono1.read_bytes()]], dtype=np.object_)
    window = np.array([[40.0, 400.0], [40.0, 400.0]], np.float32)
    requests = [
        {"images_encoded": _Tensor("images_encoded", files)},
        {"images_encoded": _Tensor("images_encoded", files), "dicom_window": _Tensor("dicom_window", window)},
        {"images_encoded": _Tensor("images_encoded", np.array([[ct.read_bytes()[:-500]]], np.object_))},
        {"images_encoded": _Tensor("images_encoded", files), "dicom_window": _Tensor("dicom_window", window[:1])},
        {"images_encoded": _Tensor("images_encoded", files), "dicom_window": _Tensor("dicom_window", window * 0)},
    ]
    responses = model.execute(requests)
    for resp, win in zip(responses[:2], (None, (40.0, 400.0))):
        assert resp.error is None, resp.error.message
        ref = torch.stack([to_model_input(read_image(path, dicom_window=win), 64) for path in (ct, mono1)]).numpy()
        np.testing.assert_allclose(resp.outputs["normalised"], ref, atol=2e-6, rtol=0)
    # The windows change the output: the request's window overrides the file's.
    assert np.abs(responses[0].outputs["normalised"][0] - responses[1].outputs["normalised"][0]).max() > 0.1
    for resp, phrase in zip(responses[2:], ["cannot read image 'images_encoded'[0]: cannot decode DICOM pixel data",
                                            "(batch, 2)", "widths >= 1"], strict=True):
        assert resp.error is not None and phrase in resp.error.message, (phrase, resp.error and resp.error.message)


class _Request(dict):
    """A stand-in request: input tensors by name, and the request parameters as Triton gives them (JSON)."""

    def __init__(self, params: dict | None = None, **tensors: np.ndarray) -> None:
        super().__init__({name: _Tensor(name, array) for name, array in tensors.items()})
        self.params = json.dumps(params or {})

    def parameters(self) -> str:
        return self.params


class _Logger:
    warnings: ClassVar[list[str]] = []

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.warnings.append(message)


def test_postprocess_applies_the_calibration_as_pdd_does(tmp_path, backend_model, monkeypatch):
    cal = _calibration()
    config = {"model": "pdd", "vmamba_weights": None, "wrn_weights": "w.pth"}
    repo = build_triton_repo(tmp_path / "repo", engine_dir=make_onnx_dir(tmp_path / "o", calibration=cal,
                                                                          config=config))
    monkeypatch.setattr(_Logger, "warnings", [])
    monkeypatch.setattr(sys.modules["triton_python_backend_utils"], "Logger", _Logger, raising=False)
    _, model = backend_model("postprocess", repo, "postprocess")
    assert any("randomly initialised teachers (VMamba-T)" in w for w in _Logger.warnings)
    rng = np.random.default_rng(1)
    score = rng.normal(0.4, 0.1, (3, 1)).astype(np.float32)
    amap = rng.normal(0.2, 0.06, (3, 64, 64)).astype(np.float32)
    requests = [_Request(pred_score=score, anomaly_map=amap),
                _Request({"image_threshold": 0.45, "pixel_threshold": 0.3}, pred_score=score, anomaly_map=amap),
                _Request({"image_threshold": "high"}, pred_score=score, anomaly_map=amap)]
    plain, overridden, bad = model.execute(requests)
    ref = apply_calibration(cal, score[:, 0], amap)
    np.testing.assert_array_equal(plain.outputs["normalised_score"][:, 0], ref["normalised_score"])
    np.testing.assert_array_equal(plain.outputs["pred_label"][:, 0], ref["pred_label"])
    np.testing.assert_array_equal(plain.outputs["pred_mask"], ref["pred_mask"])
    assert plain.outputs["pred_mask"].any() and not plain.outputs["pred_mask"].all()
    ref = apply_calibration(cal, score[:, 0], amap, image_threshold=0.45, pixel_threshold=0.3)
    np.testing.assert_array_equal(overridden.outputs["pred_label"][:, 0], score[:, 0] > 0.45)
    np.testing.assert_array_equal(overridden.outputs["pred_mask"], amap > 0.3)
    np.testing.assert_array_equal(overridden.outputs["normalised_score"][:, 0], ref["normalised_score"])
    assert bad.error is not None and "image_threshold must be a number" in bad.error.message
    # Without a calibration nothing is flagged, unless a threshold is given in the config or the request.
    monkeypatch.setattr(_Logger, "warnings", [])
    _, model = backend_model("postprocess", build_triton_repo(tmp_path / "none", engine_dir=make_onnx_dir(
        tmp_path / "n")), "postprocess")
    assert any("no calibration" in w for w in _Logger.warnings)
    plain, given = model.execute([_Request(pred_score=score, anomaly_map=amap),
                                  _Request({"image_threshold": 0.4}, pred_score=score, anomaly_map=amap)])
    assert np.isnan(plain.outputs["normalised_score"]).all()
    assert not plain.outputs["pred_label"].any() and not plain.outputs["pred_mask"].any()
    np.testing.assert_array_equal(given.outputs["pred_label"], score > 0.4)
    np.testing.assert_array_equal(given.outputs["pred_mask"], amap > 0.4)


@pytest.mark.parametrize("kind, run_batch", [("cpu", "1"), ("auto", "8")])
def test_ort_engine_batches_requests_and_isolates_bad_ones(tmp_path, onnx_dir, backend_model, kind, run_batch):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=onnx_dir, instance_kind=kind)
    assert parse_config(repo / "pdd_engine" / "config.pbtxt").parameters["run_batch"].string_value == run_batch
    _, model = backend_model("ort_engine", repo, "pdd_engine")
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3, 64, 64), np.float32), rng.standard_normal((1, 3, 64, 64), np.float32)
    nan = a.copy()
    nan[0, 1, 2, 3] = np.nan
    responses = model.execute([{"images": _Tensor("images", a)}, {"images": _Tensor("images", nan)},
                               {"images": _Tensor("images", b)}])
    assert "NaN or infinite" in responses[1].error.message
    for resp, x in ((responses[0], a), (responses[2], b)):
        assert resp.error is None
        np.testing.assert_allclose(resp.outputs["anomaly_map"], x.mean(axis=1), atol=1e-6)
        assert resp.outputs["pred_score"].shape == (len(x), 1)
        np.testing.assert_allclose(resp.outputs["pred_score"][:, 0], x.mean(axis=1).max(axis=(1, 2)), atol=1e-6)


def test_ort_engine_without_weights_says_how_to_regenerate(tmp_path, onnx_dir, backend_model):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=onnx_dir)
    (repo / "pdd_engine" / "1" / "model.onnx").unlink()
    with pytest.raises(RuntimeError, match="pdd export triton-repo"):
        backend_model("ort_engine", repo, "pdd_engine")


# --- Kubernetes manifests ---------------------------------------------------------------------------------

DEPLOY = ROOT / "deploy"


def _manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and {"apiVersion", "kind"} <= set(doc), path
            # kustomize's own file is the one object without a name.
            assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], path
            docs[doc["kind"]] = doc
    return docs


def test_manifests_have_the_required_fields():
    docs = _manifests()
    assert {k: d["apiVersion"] for k, d in docs.items()} == {
        "ConfigMap": "v1", "Deployment": "apps/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
        "Kustomization": "kustomize.config.k8s.io/v1beta1", "PersistentVolumeClaim": "v1",
        "PodMonitor": "monitoring.coreos.com/v1", "Service": "v1"}
    dep = docs["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:") and container["image"].endswith("-py3")
    assert "--model-repository=/models" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert mounts["model-repository"] == "/models" and mounts["dshm"] == "/dev/shm" and set(mounts) == set(volumes)
    assert volumes["model-repository"]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"][
        "metadata"]["name"]

    svc = docs["Service"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]} == {8000: "http", 8001: "grpc", 8002: "metrics"}
    assert docs["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"

    kustomize = docs["Kustomization"]
    assert all((DEPLOY / r).is_file() for r in kustomize["resources"])


def test_hpa_scales_on_the_adapter_metric():
    docs = _manifests()
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": docs["Deployment"]["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    [rule] = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us")
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= set(
        w.split("{")[0] for w in rule["metricsQuery"].replace("(", " ").split() if w.startswith("nv_"))
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_dockerfile_and_readme_agree_with_the_code():
    from export.serve import BACKEND_REQUIREMENTS, NGC_TAG

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"TRITON_TAG={NGC_TAG}" in dockerfile and all(r.split("<")[0] in dockerfile for r in BACKEND_REQUIREMENTS)
    assert f"tritonserver:{NGC_TAG}-py3" in (DEPLOY / "deployment.yaml").read_text()
    readme = (DEPLOY / "README.md").read_text()
    for name in ("deployment.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml", "avg_time_queue_us", "replicas"):
        assert name in readme

