"""Triton Python-backend model ``preprocess``: images in, the engine's normalised float batch out.

Inputs (a request carries exactly one of them; the batch dimension B is Triton's):

* ``images``          UINT8 (B, H, W, C), C = 1 (grey) or 3 (RGB), any H, W from 1 to ``max_side``;
* ``images_encoded``  BYTES (B, 1), each element the bytes of an 8-bit PNG / JPEG / BMP / TIFF file
  (grey, RGB, RGBA or palette); images of different sizes may share a request.

Output: ``normalised`` FP32 (B, 3, S, S): pixels / 255, resized bilinearly with antialiasing (the same
resampling as ``pdd.data.to_model_input``: a triangle filter widened by the shrink factor), grey
replicated to three channels, then ``(x - mean) / std``.

Parameters from ``config.pbtxt`` (written by ``export/triton_repo.py`` from the export metadata):
``image_size`` (S), ``mean`` and ``std`` (three comma-separated floats each), ``max_side``, ``output_dtype``
(the engine's input type: float32, or float16 for an fp16 TensorRT engine).

A bad request (both or neither input, a wrong channel count, an empty or oversized image, bytes that
are not an image) gets an error response of its own; the other requests of the batch are served.
This file is self-contained: it runs in the server's Python environment, which needs only numpy
(and Pillow for ``images_encoded``).
"""

from __future__ import annotations

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class RequestError(ValueError):
    """A problem with one request's data: reported to that client, never raised out of ``execute``."""


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear antialiased resampling matrix (n_out, n_in) float32; rows sum to 1.

    A triangle filter whose support widens by the shrink factor when shrinking (what Pillow's and
    ``torch.nn.functional.interpolate(..., antialias=True)``'s bilinear modes do), centred on pixel
    centres (``align_corners=False``). Enlarging reduces to plain bilinear interpolation.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    x = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs((x[None, :] - centres[:, None]) / support), 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def normalise(images: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C), C in {1, 3} -> float32 (B, 3, size, size), resized and normalised."""
    x = images.astype(np.float32) / np.float32(255.0)
    _, h, w, _ = x.shape
    if (h, w) != (size, size):
        # Separable resampling as two matrix products: rows, then columns.
        x = np.einsum("sh,bhwc->bswc", resize_weights(h, size), x)
        x = np.einsum("tw,bswc->bstc", resize_weights(w, size), x)
    x = np.transpose(x, (0, 3, 1, 2))
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)


def check_pixels(images: np.ndarray, max_side: int) -> None:
    """Refuse a uint8 batch that is empty, not (B, H, W, 1|3) or larger than ``max_side``."""
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


def decode(data: bytes, max_side: int, index: int) -> np.ndarray:
    """The bytes of one 8-bit image file -> uint8 (H, W, 3); size checked before the pixels are decoded."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise RequestError("this server's Python environment lacks Pillow, so 'images_encoded' is unavailable; "
                           "send uint8 pixels in 'images' instead") from None
    if not data:
        raise RequestError(f"'images_encoded'[{index}] is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if max(w, h) > max_side:
                raise RequestError(f"'images_encoded'[{index}] is {h}x{w}; the largest side accepted is "
                                   f"{max_side} pixels: downscale before sending")
            if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
                raise RequestError(f"'images_encoded'[{index}] has pixel mode {img.mode} (not 8-bit); send "
                                   "uint8 pixels in 'images' (pdd.data.read_image normalises 16-bit files)")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"'images_encoded'[{index}] ({len(data)} bytes) is not an image file Pillow can "
                           "read (PNG, JPEG, BMP, TIFF)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"'images_encoded'[{index}] ({len(data)} bytes) is a damaged image file: {exc}") from None


def error_response(message: str) -> pb_utils.InferenceResponse:
    """An error response marked as the client's fault where this Triton version has error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """Validates, decodes, resizes and normalises each request; see the module docstring."""

    def initialize(self, args: dict[str, str]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.size = int(params["image_size"])
        self.max_side = int(params["max_side"])
        self.mean = np.array([float(v) for v in params["mean"].split(",")], dtype=np.float32)
        self.std = np.array([float(v) for v in params["std"].split(",")], dtype=np.float32)
        self.dtype = np.dtype(params["output_dtype"])

    def _one(self, request: pb_utils.InferenceRequest) -> np.ndarray:
        pixels = pb_utils.get_input_tensor_by_name(request, "images")
        encoded = pb_utils.get_input_tensor_by_name(request, "images_encoded")
        if (pixels is None) == (encoded is None):
            raise RequestError("send exactly one of 'images' (uint8 pixels) and 'images_encoded' (image file bytes)")
        if pixels is not None:
            images = pixels.as_numpy()
            check_pixels(images, self.max_side)
            return normalise(images, self.size, self.mean, self.std)
        items = encoded.as_numpy().reshape(-1)
        if items.size == 0:
            raise RequestError("'images_encoded' holds an empty batch; send at least one image")
        # Decoded images may differ in size: resize each on its own.
        return np.concatenate([normalise(decode(bytes(item), self.max_side, i)[None], self.size, self.mean,
                                         self.std) for i, item in enumerate(items)])

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
