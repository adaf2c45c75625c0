"""One preprocessing definition: local prediction, the exported graph and the server agree on the same files.

The three paths from a file to the model's normalised input (B, 3, S, S):

* local: ``read_image`` then ``to_model_input`` (what ``pdd predict``, ``pdd eval`` and training run);
* in the graph: ``ExportablePDD.normalise`` (uint8 NHWC in), run eagerly and traced into ONNX and run by
  ONNX Runtime; for files with more than 8 bits the same function under torch on the decoded float image;
* the server: the committed example repository's ``preprocess/1/model.py`` loaded as Triton Inference
  Server's Python backend loads it (its ``readers.py`` is ``pdd/data/readers.py``), fed the file's bytes.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import json_format
from PIL import Image
from torch import nn
from triton_fakes import BackendTensor, backend_utils

from export.onnx_export import ExportablePDD
from export.triton_repo import parse_config
from pdd.data.readers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIXEL_SCALE,
    image_batch,
    normalise_nhwc,
    preprocess,
    read_image,
    resize_rgb,
    to_model_input,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "triton_repo" / "preprocess"
# The committed example repository's input size: the server model below runs with its config unchanged.
SIZE = 256


def _torch_reference(img: np.ndarray, size: int) -> np.ndarray:
    """The preprocessing written with torch's own operations: antialiased bilinear resize, then the formula."""
    x = torch.from_numpy(image_batch(img).astype(np.float32)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).numpy()


# --- the files ---------------------------------------------------------------------------------------------


def _write_png(path: Path, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture()
def files(tmp_path: Path, write_dicom) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:260]
    smooth = (np.sin(yy / 17.0) * np.cos(xx / 23.0) * 1800 + 2048).astype(np.uint16)
    volume = rng.normal(100.0, 30.0, (40, 48, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "brain.nii.gz")
    return {
        "rgb8_at_size": _write_png(tmp_path / "rgb.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
        "grey8_at_size": _write_png(tmp_path / "grey.png", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)),
        "rgb8_resized": _write_png(tmp_path / "small.png", rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)),
        "grey16_resized": _write_png(tmp_path / "deep.png", smooth),
        "dicom_resized": write_dicom(tmp_path / "ct.dcm", smooth[:200, :180] // 2, slope=0.5, intercept=-500.0,
                                     centre=[200.0], width=[700.0]),
        "nifti_slice": tmp_path / "brain.nii.gz",
    }


# --- the server's preprocess model, loaded as the Python backend loads it ----------------------------------


@pytest.fixture()
def server_preprocess(monkeypatch):
    """``preprocess/1/model.py`` of the committed example repository, initialised with its own config.pbtxt."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", backend_utils())
    spec = importlib.util.spec_from_file_location("_server_preprocess", EXAMPLE / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = parse_config(EXAMPLE / "config.pbtxt")
    assert int(config.parameters["image_size"].string_value) == SIZE
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_repository": str(EXAMPLE), "model_version": "1"})
    return model


def _serve(model, request: dict[str, np.ndarray]) -> np.ndarray:
    [response] = model.execute([{name: BackendTensor(name, array) for name, array in request.items()}])
    assert response.error is None, response.error.message
    return response.outputs["normalised"]


# --- the in-graph normalisation, traced into ONNX ----------------------------------------------------------


class _InGraphNormalise(nn.Module):
    """Only ``ExportablePDD.normalise``, so the ONNX graph holds the preprocessing alone (no weights)."""

    def __init__(self, exportable: ExportablePDD) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the model's weights stay out of this graph.
        self.__dict__["normalise"] = exportable.normalise

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalise(images)


@pytest.fixture(scope="module")
def in_graph(tmp_path_factory, small_pdd) -> tuple[ExportablePDD, ort.InferenceSession]:
    exportable = ExportablePDD(small_pdd, form="portable", preprocess=True)
    path = tmp_path_factory.mktemp("onnx") / "normalise.onnx"
    example = torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8)
    torch.onnx.export(_InGraphNormalise(exportable).eval(), (example,), path, dynamo=True, input_names=["images"],
                      output_names=["normalised"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    return exportable, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- the tests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rgb8_at_size", "grey8_at_size", "rgb8_resized", "grey16_resized",
                                  "dicom_resized", "nifti_slice"])
def test_local_and_server_agree_exactly(files, server_preprocess, name):
    """Same reader, same resampling, same formula: bit-identical, whichever input the server gets."""
    path = files[name]
    decoded = read_image(path)
    local = to_model_input(decoded, SIZE).numpy()[None]
    assert local.shape == (1, 3, SIZE, SIZE) and local.dtype == np.float32
    if name == "nifti_slice":
        # A server gets NIfTI as slices read by the client; the numpy path it runs on them:
        served = server_preprocess.readers.preprocess(image_batch(decoded), SIZE)
    else:
        served = _serve(server_preprocess, {"images_encoded": np.array([[path.read_bytes()]], dtype=np.object_)})
    np.testing.assert_array_equal(served, local)


@pytest.mark.parametrize("name", ["rgb8_at_size", "grey8_at_size"])
def test_uint8_pixels_agree_exactly_in_every_path(files, server_preprocess, in_graph, name):
    """8-bit files at the model's size: local, server (pixels and bytes), eager graph module and ONNX agree."""
    exportable, session = in_graph
    path = files[name]
    local = to_model_input(read_image(path), SIZE).numpy()[None]
    with Image.open(path) as img:
        pixels = np.array(img.convert("RGB"))[None]
    served_pixels = _serve(server_preprocess, {"images": pixels})
    served_bytes = _serve(server_preprocess, {"images_encoded": np.array([[path.read_bytes()]], dtype=np.object_)})
    eager = exportable.normalise(torch.from_numpy(pixels)).numpy()
    [onnx_out] = session.run(None, {"images": pixels})
    for label, out in (("server pixels", served_pixels), ("server bytes", served_bytes), ("eager", eager)):
        np.testing.assert_array_equal(out, local, err_msg=label)
    # ONNX Runtime may fuse Sub and Div differently from numpy; the same formula to float32 rounding.
    np.testing.assert_allclose(onnx_out, local, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["rgb8_resized", "grey16_resized", "dicom_resized", "nifti_slice"])
def test_normalisation_under_torch_matches_numpy(files, name):
    """The one formula on a torch tensor (as traced into the graph) equals it on the numpy array."""
    rgb = resize_rgb(image_batch(read_image(files[name])), SIZE)
    np.testing.assert_allclose(normalise_nhwc(torch.from_numpy(rgb)).numpy(), normalise_nhwc(rgb), atol=1e-6, rtol=0)
    pixels = np.clip(np.rint(rgb / PIXEL_SCALE), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(normalise_nhwc(torch.from_numpy(pixels)).numpy(), normalise_nhwc(pixels),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["rgb8_resized", "grey16_resized", "dicom_resized", "nifti_slice"])
def test_resampling_matches_torch_antialiased_bilinear(files, name):
    """The numpy resampling (what runs without torch on the server) against torch's own implementation."""
    decoded = read_image(files[name])
    np.testing.assert_allclose(preprocess(image_batch(decoded), SIZE), _torch_reference(decoded, SIZE),
                               atol=2e-6, rtol=0)


def test_constants_and_refusals(server_preprocess):
    """One set of constants; wrong inputs and a repository with another normalisation are refused by name."""
    pixels = np.array([[[[0, 255, 51]]]], dtype=np.uint8)
    expected = (np.array([0.0, 1.0, 0.2]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(normalise_nhwc(pixels)[0, :, 0, 0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\(batch, height, width, 3\), got shape \(1, 4, 4, 1\)"):
        normalise_nhwc(np.zeros((1, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="got dtype int64"):
        normalise_nhwc(torch.zeros(1, 4, 4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="got dtype uint16"):
        resize_rgb(np.zeros((1, 4, 4, 3), np.uint16), 2)
    config = json.loads(json_format.MessageToJson(parse_config(EXAMPLE / "config.pbtxt"),
                                                  preserving_proto_field_name=True))
    config["parameters"]["std"]["string_value"] = "0.5,0.5,0.5"
    with pytest.raises(RuntimeError, match=r"'std' is \[0.5, 0.5, 0.5\].*regenerate"):
        type(server_preprocess)().initialize({"model_config": json.dumps(config), "model_repository": str(EXAMPLE),
                                              "model_version": "1"})
