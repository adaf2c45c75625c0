"""The Python-backend models of the Triton repository (preprocess, postprocess, the ONNX Runtime engine), run
offline against a minimal stand-in of ``triton_python_backend_utils``; split from test_triton_repo.py. The
plugin form's engine runs in a separate process without torch or the project's packages, as on the server
(and because ONNX Runtime takes one registration of its Python ops per process)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from google.protobuf import json_format
from PIL import Image
from triton_fakes import TEMPLATES, backend_utils, calibration, make_onnx_dir, plugin_constants
from triton_fakes import BackendError as _TritonError
from triton_fakes import BackendTensor as _Tensor

from export.triton_repo import (
    MAX_SIDE,
    build_triton_repo,
    parse_config,
)
from kernels.cpu_lib import CpuKernelUnavailable
from kernels.cpu_lib import load as load_cpu_kernel
from pdd.anomaly import anomaly_head_ref
from pdd.calibration import apply_calibration
from pdd.data.readers import read_image, read_image_bytes, to_model_input
from pdd.ss2d import ss2d_scan

# --- the Python-backend models, offline -------------------------------------------------------------------


@pytest.fixture()
def backend_model(monkeypatch):
    """Load a template as the Python backend would, with a minimal ``triton_python_backend_utils``."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", backend_utils())

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
    cal = calibration()
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


# --- the plugin form's engine, as the server runs it: without torch or this project ------------------------

_ENGINE_ALONE = """
import json, sys
from pathlib import Path
for name in ("torch", "pdd", "kernels", "export"):  # none of them exists on the server
    sys.modules[name] = None
sys.path.insert(0, sys.argv[1])  # the backend stand-in only
import importlib.util
import numpy as np
from triton_backend_stub import BackendTensor, backend_utils
sys.modules["triton_python_backend_utils"] = backend_utils()
work = Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("engine_model", work / "repo" / "pdd_engine" / "1" / "model.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.TritonPythonModel()
try:
    model.initialize({"model_config": (work / "config.json").read_text(), "model_version": "1",
                      "model_repository": str(work / "repo" / "pdd_engine"), "model_instance_kind": "CPU",
                      "model_instance_device_id": "0"})
except RuntimeError as exc:  # the stand-in's TritonModelException
    print(exc, file=sys.stderr)
    sys.exit(3)
x = np.load(work / "images.npy")
responses = model.execute([{"images": BackendTensor("images", x[:2])}, {"images": BackendTensor("images", x[2:])}])
assert all(r.error is None for r in responses), [r.error.message for r in responses if r.error]
np.savez(work / "out.npz", **{k: np.concatenate([r.outputs[k] for r in responses]) for k in responses[0].outputs})
assert "torch" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
"""


def _run_engine_alone(work: Path, repo: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``repo``'s engine model.py in a fresh process that cannot import torch or the project's packages,
    in the C locale without UTF-8 mode, as the server's Python-backend stub runs it (files read as text there
    must name their encoding)."""
    cfg = json_format.MessageToJson(parse_config(repo / "pdd_engine" / "config.pbtxt"),
                                    preserving_proto_field_name=True)
    (work / "config.json").write_text(cfg)
    env = {**(os.environ if env is None else env), "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    return subprocess.run([sys.executable, "-c", _ENGINE_ALONE, str(Path(__file__).parent), str(work)],
                          capture_output=True, text=True, timeout=300, env=env)


def _plugin_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What triton_fakes.tiny_plugin_onnx computes, with the PyTorch reference scan and head."""
    c = plugin_constants()
    f = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 4)
    delta, bc = f.unsqueeze(1).repeat(1, 4, 1, 1, 1), f[:, :2].unsqueeze(1).repeat(1, 4, 1, 1, 1)
    y = ss2d_scan(f, delta, bc, bc, *(torch.from_numpy(c[k]) for k in ("A", "D", "delta_bias")), impl="reference")
    amap, score = anomaly_head_ref([(y, f)] * 6, x.shape[-2:], c["sigma"])
    return amap.numpy(), score.numpy()


def test_plugin_engine_runs_the_bundled_kernels_without_torch(tmp_path):
    """The served plugin form: custom nodes run by the bundled torch-free ops (the compiled scan kernel, the numpy
    head) in a process without torch; maps within 1e-5 of the range of the PyTorch reference's."""
    pytest.importorskip("onnxruntime_extensions")
    try:
        load_cpu_kernel()
    except CpuKernelUnavailable as exc:
        pytest.skip(f"the CPU scan kernel cannot be built here: {exc}")
    repo = build_triton_repo(tmp_path / "repo", engine_dir=make_onnx_dir(tmp_path / "onnx", form="plugin"))
    x = np.random.default_rng(4).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "images.npy", x)
    proc = _run_engine_alone(tmp_path, repo)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = np.load(tmp_path / "out.npz")
    ref_map, ref_score = _plugin_reference(x)
    tol = 1e-5 * float(ref_map.max() - ref_map.min())
    np.testing.assert_allclose(out["anomaly_map"], ref_map, rtol=0, atol=tol)
    np.testing.assert_allclose(out["pred_score"][:, 0], ref_score, rtol=0, atol=tol)


def test_plugin_engine_without_a_compiler_says_what_to_do(tmp_path):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=make_onnx_dir(tmp_path / "onnx", form="plugin"))
    np.save(tmp_path / "images.npy", np.zeros((1, 3, 64, 64), np.float32))
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env["PATH"] = str(tmp_path / "no-compilers-here")
    proc = _run_engine_alone(tmp_path, repo, env)
    assert proc.returncode == 3, proc.stderr[-4000:]
    for phrase in ("no C compiler was found", "apt-get install gcc", "--onnx-form portable", "model.onnx"):
        assert phrase in proc.stderr, (phrase, proc.stderr[-2000:])


def test_plugin_engine_without_its_kernels_says_how_to_regenerate(tmp_path, backend_model):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=make_onnx_dir(tmp_path / "onnx", form="plugin"))
    shutil.rmtree(repo / "pdd_engine" / "1" / "kernels")
    with pytest.raises(RuntimeError, match=r"kernels is missing.*pdd export triton-repo"):
        backend_model("ort_engine", repo, "pdd_engine")
