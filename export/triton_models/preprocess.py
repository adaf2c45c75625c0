"""Triton Python-backend model ``preprocess``: images in, the engine's normalised float batch out.

Inputs (a request carries exactly one of ``images`` and ``images_encoded``; the batch dimension B is Triton's):

* ``images``          UINT8 (B, H, W, C), C = 1 (grey) or 3 (RGB), any H, W from 1 to ``max_side``;
* ``images_encoded``  BYTES (B, 1), each element the bytes of one file: PNG / JPEG / BMP / TIFF (8- or
  16-bit, grey, RGB, RGBA or palette) or DICOM with its preamble (rescale slope and intercept, the file's
  window, MONOCHROME1 inverted); images of different sizes may share a request;
* ``dicom_window``    FP32 (B, 2), optional, with ``images_encoded`` only: (centre, width) per image in
  rescaled units (HU for CT), overriding the DICOM file's own window; ignored for other formats.

Files are decoded, resized and normalised by the ``readers/`` folder beside this file: the files of
``pdd/data/`` named by ``pdd.data.readers.BUNDLE``, which ``export/triton_repo.py`` places there and which are
imported as one package, so the server computes exactly what ``pdd predict`` does locally
(``readers.preprocess``) and decodes under the same decode budget (``readers.DecodeBudget``). Output:
``normalised`` FP32 (B, 3, S, S): the image in [0, 1] (uint8 pixels times 1/255), resized bilinearly with
antialiasing, grey replicated to three channels, then ImageNet-normalised by ``readers.normalise_nhwc``, the
function an ONNX export traces into its graph.

Parameters from ``config.pbtxt`` (written by ``export/triton_repo.py`` from the export metadata):
``image_size`` (S), ``mean`` and ``std`` (three comma-separated floats each: the normalisation the model
was exported with, which must be the readers' own), ``max_side``, ``output_dtype`` (the engine's input
type: float32, or float16 for an fp16 TensorRT engine), and the decode budget's fields (``max_pixels``,
``max_voxels``, ``max_frames``, ``max_bytes``, ``max_seconds``; the readers' defaults where absent).

A bad request (both or neither input, a wrong channel count, an empty or oversized image, bytes that
are not an image) gets an error response of its own; the other requests of the batch are served. A file
that cannot be decoded gets the reader's error, ``cannot read image 'images_encoded'[i]: <reason>``, with
the index of the file in its request (clients map it back to their file).
The server's Python environment needs numpy and Pillow, and pydicom for DICOM files.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from types import ModuleType

import numpy as np
import triton_python_backend_utils as pb_utils

# The bundled readers beside this file (the generator's READERS_FOLDER), and the package name they are
# imported under: not "pdd", so that they never stand in for, or are shadowed by, the project.
READERS_FOLDER = "readers"
_READERS_PACKAGE = "pdd_served_readers"


class RequestError(ValueError):
    """A problem with one request's data: reported to that client, never raised out of ``execute``."""


def check_pixels(images: np.ndarray, max_side: int, max_pixels: int) -> None:
    """Refuse a uint8 batch that is empty, not (B, H, W, 1|3), or with images over ``max_side`` or ``max_pixels``."""
    if images.ndim != 4:
        raise RequestError(f"'images' must be uint8 (batch, height, width, channels), got shape {images.shape}")
    b, h, w, c = images.shape
    if b == 0:
        raise RequestError("'images' holds an empty batch; send at least one image")
    if c not in (1, 3):
        raise RequestError(f"'images' must have 1 (grey) or 3 (RGB) channels in the last axis, got {c} "
                           f"(shape {images.shape}); drop the alpha channel of RGBA images")
    if h == 0 or w == 0:
        raise RequestError(f"'images' has an empty image (shape {images.shape})")
    if max(h, w) > max_side:
        raise RequestError(f"'images' is {h}x{w}; the largest side accepted is {max_side} pixels: "
                           "downscale before sending")
    if h * w > max_pixels:
        raise RequestError(f"'images' is {h}x{w} = {h * w:,} pixels per image, over the decode budget's max_pixels "
                           f"= {max_pixels:,}: downscale before sending")


def load_readers(version_dir: Path) -> ModuleType:
    """The image readers bundled beside this model (``readers/readers.py`` and the modules it imports)."""
    folder = version_dir / READERS_FOLDER
    if not (folder / "readers.py").is_file():
        raise pb_utils.TritonModelException(f"{folder / 'readers.py'} is missing; regenerate the repository with "
                                            "`pdd export triton-repo`, which places it there")
    # A package made from the folder alone (it has no __init__.py): its modules import each other relatively.
    for name in [m for m in sys.modules if m == _READERS_PACKAGE or m.startswith(f"{_READERS_PACKAGE}.")]:
        del sys.modules[name]
    package = types.ModuleType(_READERS_PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[_READERS_PACKAGE] = package
    return importlib.import_module(f"{_READERS_PACKAGE}.readers")


def decode_budget(readers: ModuleType, params: dict[str, str]) -> object:
    """The readers' DecodeBudget with the fields config.pbtxt sets (its defaults for the others)."""
    fields = {"max_pixels": int, "max_voxels": int, "max_frames": int, "max_bytes": int, "max_seconds": float}
    try:
        return readers.DecodeBudget(**{k: kind(params[k]) for k, kind in fields.items() if params.get(k)})
    except ValueError as exc:
        raise pb_utils.TritonModelException(f"config.pbtxt: {exc}") from None


def check_normalisation(readers: ModuleType, params: dict[str, str]) -> None:
    """Refuse a repository whose configured mean/std are not the normalisation the bundled readers apply."""
    for key, expected in (("mean", readers.IMAGENET_MEAN), ("std", readers.IMAGENET_STD)):
        configured = [float(v) for v in params[key].split(",")]
        if not np.allclose(configured, expected, rtol=0, atol=1e-7):
            raise pb_utils.TritonModelException(
                f"config.pbtxt parameter {key!r} is {configured}, but the bundled readers.py normalises with "
                f"{list(expected)}; regenerate the repository with `pdd export triton-repo`")


def dicom_windows(tensor: object, batch: int) -> np.ndarray | None:
    """The optional ``dicom_window`` input as float64 (B, 2), checked against the batch of files."""
    if tensor is None:
        return None
    windows = np.asarray(tensor.as_numpy(), dtype=np.float64)
    if windows.shape != (batch, 2):
        raise RequestError(f"'dicom_window' must be FP32 (batch, 2) = (centre, width) per file, got shape "
                           f"{windows.shape} for {batch} files")
    if not np.isfinite(windows).all() or (windows[:, 1] < 1).any():
        raise RequestError(f"'dicom_window' needs finite centres and widths >= 1, got {windows.tolist()}")
    return windows


def error_response(message: str) -> pb_utils.InferenceResponse:
    """An error response marked as the client's fault where this Triton version has error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """Validates, decodes, resizes and normalises each request; see the module docstring."""

    def initialize(self, args: dict[str, str]) -> None:
        self.readers = load_readers(Path(args["model_repository"]) / args["model_version"])
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.size = int(params["image_size"])
        self.max_side = int(params["max_side"])
        check_normalisation(self.readers, params)
        self.budget = decode_budget(self.readers, params)
        self.dtype = np.dtype(params["output_dtype"])

    def _one(self, request: pb_utils.InferenceRequest) -> np.ndarray:
        pixels = pb_utils.get_input_tensor_by_name(request, "images")
        encoded = pb_utils.get_input_tensor_by_name(request, "images_encoded")
        window = pb_utils.get_input_tensor_by_name(request, "dicom_window")
        if (pixels is None) == (encoded is None):
            raise RequestError("send exactly one of 'images' (uint8 pixels) and 'images_encoded' (image file bytes)")
        if pixels is not None:
            if window is not None:
                raise RequestError("'dicom_window' applies to DICOM files in 'images_encoded'; pixels in 'images' "
                                   "are already windowed")
            images = pixels.as_numpy()
            check_pixels(images, self.max_side, self.budget.max_pixels)
            return self.readers.preprocess(images, self.size)
        items = encoded.as_numpy().reshape(-1)
        if items.size == 0:
            raise RequestError("'images_encoded' holds an empty batch; send at least one image")
        windows = dicom_windows(window, items.size)
        out = []
        for i, item in enumerate(items):
            try:
                image = self.readers.read_image_bytes(
                    bytes(item), f"'images_encoded'[{i}]", max_side=self.max_side, budget=self.budget,
                    dicom_window=None if windows is None else tuple(windows[i]))
            except ImportError as exc:
                raise RequestError(f"'images_encoded'[{i}] needs {exc.name}, which this server's Python "
                                   f"environment lacks: pip install {exc.name}") from None
            except ValueError as exc:  # the reader's ImageReadError, or a window it refuses
                raise RequestError(str(exc)) from None
            # Decoded images may differ in size: resize each on its own.
            out.append(self.readers.preprocess(self.readers.image_batch(image), self.size))
        return np.concatenate(out)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            try:
                out = self._one(request)
            except RequestError as exc:
                responses.append(error_response(str(exc)))
                continue
            except Exception as exc:  # one request's failure must not fail the batch
                responses.append(error_response(f"preprocess failed: {type(exc).__name__}: {exc}"))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("normalised", out.astype(self.dtype))]))
        return responses
