"""Read medical images (PNG/JPEG/BMP/TIFF, DICOM, NIfTI) into float arrays, and turn them into model inputs.

Every reader returns ``float32`` in ``[0, 1]``: ``(H, W)`` for grey images, ``(H, W, 3)`` for colour ones.
How raw values reach ``[0, 1]``:

* 8-bit Pillow images: ``value * PIXEL_SCALE`` (1/255; the stored bytes already are a display image);
* 16-bit / 32-bit / float Pillow images, DICOM without a window, NIfTI: robust min/max, i.e. the 0.5th and
  99.5th percentiles map to 0 and 1 (clipped); a constant image becomes all zeros;
* DICOM with a window (from the file or ``dicom_window``): the DICOM linear VOI function, after
  RescaleSlope/RescaleIntercept; MONOCHROME1 is inverted so that bright always means dense / high signal.

NIfTI volumes are reoriented to the closest RAS+ axes first, so ``axis`` 0/1/2 are sagittal/coronal/axial
for any well-formed file, and each slice is rotated (``np.rot90``) so anterior (axial) or superior (sagittal,
coronal) is at the top of the image. ``np.rot90(slice_map, -1)`` undoes the rotation.

Preprocessing (decoded image -> model input) is defined here once: :func:`resize_rgb` (to float RGB
(B, S, S, 3) in [0, 1]) then :func:`normalise_nhwc`, which takes numpy arrays or torch tensors, so local
prediction (:func:`to_model_input`), the ONNX graph's in-graph preprocessing (``ExportablePDD.normalise``)
and the server's preprocess model all run the same formula.

:func:`read_image_bytes` decodes the bytes of one file the same way (what an inference server receives).
The readers need numpy and Pillow (pydicom and nibabel load only for their formats), not torch: Triton
Inference Server's preprocess model runs this very file, which ``export/triton_repo.py`` bundles into the
model repository. Only :func:`to_model_input` and :func:`read_mask` import torch, when called.

Example::

    >>> img = read_image("case_001.dcm", dicom_window=(40, 80))   # head CT, brain window
    >>> x = to_model_input(img, 256)                               # (3, 256, 256), ImageNet-normalised
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PIXEL_SCALE",
    "ImageReadError",
    "has_dicom_preamble",
    "image_batch",
    "normalise_nhwc",
    "preprocess",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "read_volume_slices",
    "resize_rgb",
    "resize_weights",
    "robust_normalise",
    "to_model_input",
]

# The normalisation every model input gets; export metadata and the server's config record these values.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# uint8 pixel -> [0, 1]. A multiplication, used by every path, so 8-bit pixels give bit-identical floats.
PIXEL_SCALE = 1.0 / 255.0

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Files a folder-based dataset treats as one 2-D image each; NIfTI volumes are not among them.
IMAGE_SUFFIXES = PILLOW_SUFFIXES + DICOM_SUFFIXES

_PILLOW_FORMATS = "PNG, JPEG, BMP, TIFF"
# Percentiles for the robust min/max: ignores a few hot pixels and burnt-in labels.
_ROBUST_PERCENTILES = (0.5, 99.5)


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def robust_normalise(values: np.ndarray) -> np.ndarray:
    """Map the 0.5th/99.5th percentiles to 0/1 and clip; any real array -> float32 same shape in [0, 1].

    Falls back to the exact min/max when the percentiles coincide (a small bright object on a flat
    background), and returns zeros for a constant array instead of dividing by zero.
    """
    values = np.asarray(values, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    lo, hi = np.percentile(finite, _ROBUST_PERCENTILES)
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = (values - np.float32(lo)) / np.float32(hi - lo)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def has_dicom_preamble(head: bytes) -> bool:
    """Whether a file's first bytes (at least 132) are a DICOM Part 10 preamble: ``DICM`` at byte 128."""
    return head[128:132] == b"DICM"


def _sniff(path: Path) -> str:
    """Return "dicom", "nifti" or "pillow" from the file's first bytes, falling back to its extension."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file ({exc.strerror or exc})") from None
    if not head:
        raise ImageReadError(path, "file is empty")
    suffix = _suffix(path)
    if has_dicom_preamble(head) or suffix in DICOM_SUFFIXES:
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        # A gzip stream: look at the decompressed header to tell NIfTI from anything else.
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(352)
        except (OSError, EOFError, zlib.error) as exc:
            raise ImageReadError(path, f"corrupt gzip stream ({exc})") from None
    # NIfTI-1 keeps its magic at byte 344, NIfTI-2 at byte 4.
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00") or suffix in NIFTI_SUFFIXES:
        return "nifti"
    return "pillow"


def read_image(
    path: str | Path,
    *,
    dicom_window: tuple[float, float] | None = None,
    dicom_frame: int = 0,
    nifti_axis: int = 2,
    nifti_slice: int | None = None,
) -> np.ndarray:
    """Read one 2-D image as float32 ``(H, W)`` (grey) or ``(H, W, 3)`` (colour) in [0, 1].

    The format is chosen from the file's content (DICOM preamble, NIfTI magic, else Pillow), with the
    extension as a fallback. ``dicom_window`` is ``(centre, width)`` in rescaled units (HU for CT) and
    overrides the file's window; ``dicom_frame`` picks the frame of a multi-frame DICOM. ``nifti_axis``
    and ``nifti_slice`` pick one slice of a volume (default: the middle one; negative counts from the end).
    Raises :class:`ImageReadError` for missing, truncated or undecodable files.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "dicom":
        return _read_dicom(path, str(path), dicom_window, dicom_frame)
    if kind == "nifti":
        _check_axis(path, nifti_axis)
        volume = _read_nifti_volume(path)
        index = volume.shape[nifti_axis] // 2 if nifti_slice is None else nifti_slice
        return _nifti_slices(path, volume, nifti_axis, [index])[0]
    return _read_pillow(path, str(path), f"{_PILLOW_FORMATS}, DICOM or NIfTI")


def read_image_bytes(
    data: bytes,
    name: str = "<bytes>",
    *,
    dicom_window: tuple[float, float] | None = None,
    dicom_frame: int = 0,
    max_side: int | None = None,
) -> np.ndarray:
    """Read one 2-D image from the bytes of a file, as :func:`read_image` reads the file itself.

    ``data``: a PNG / JPEG / BMP / TIFF file, or a DICOM file with its preamble (``DICM`` at byte 128; NIfTI
    volumes are sliced by the sender with :func:`read_volume_slices`). ``name`` is what errors call the data.
    ``max_side``: refuse images with a larger side, checked from the header before the pixels are decoded.
    Raises :class:`ImageReadError` for data that is empty, too large, or not a readable image.
    """
    if not data:
        raise ImageReadError(name, "file is empty")
    if has_dicom_preamble(data):
        return _read_dicom(io.BytesIO(data), name, dicom_window, dicom_frame, max_side)
    return _read_pillow(io.BytesIO(data), name, f"{_PILLOW_FORMATS}, or DICOM with its 128-byte preamble", max_side)


def _check_side(name: str, height: int, width: int, max_side: int | None) -> None:
    if max_side is not None and max(height, width) > max_side:
        raise ImageReadError(name, f"the image is {height}x{width} pixels; the largest side accepted is {max_side} "
                                   "pixels: downscale it first")


def read_volume_slices(path: str | Path, axis: int = 2, slices: Sequence[int] | None = None) -> list[np.ndarray]:
    """Read a NIfTI volume as a list of float32 ``(H, W)`` slices in [0, 1], for per-slice prediction.

    ``axis`` is a RAS+ axis (0 sagittal, 1 coronal, 2 axial); ``slices`` lists indices along it (all when
    None). The whole volume shares one robust min/max so intensities are comparable between slices.
    """
    path = Path(path)
    if _sniff(path) != "nifti":
        raise ImageReadError(path, "not a NIfTI file (expected .nii or .nii.gz with a NIfTI header)")
    _check_axis(path, axis)
    volume = _read_nifti_volume(path)
    return _nifti_slices(path, volume, axis, list(range(volume.shape[axis]) if slices is None else slices))


def _read_pillow(source: Path | IO[bytes], name: str, formats: str, max_side: int | None = None) -> np.ndarray:
    """``formats``: what the error for an unrecognised file says is expected instead."""
    try:
        with Image.open(source) as img:
            _check_side(name, img.height, img.width, max_side)
            img.load()
            # Cameras and some scanners store the display orientation in EXIF only.
            img = ImageOps.exif_transpose(img)
            return _pillow_to_array(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, f"unrecognised image format (expected {formats})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(name, f"corrupt or truncated image data ({exc})") from None


def _pillow_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return robust_normalise(np.asarray(img))
    if mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.float32) * np.float32(PIXEL_SCALE)
    # Palette, RGBA, CMYK, YCbCr...: alpha carries no anatomy, so it is dropped.
    return np.asarray(img.convert("RGB"), dtype=np.float32) * np.float32(PIXEL_SCALE)


def _first(value: object) -> float:
    """First entry of a possibly multi-valued DICOM number (WindowCenter can hold several windows)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def _dicom_attr(ds: object, frame: int, sequence: str, keyword: str) -> object | None:
    """A frame's attribute from the top level, else the enhanced-DICOM per-frame or shared groups."""
    value = getattr(ds, keyword, None)
    if value is not None:
        return value
    for groups_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = getattr(ds, groups_name, None)
        if groups is None or index >= len(groups):
            continue
        items = getattr(groups[index], sequence, None)
        if items:
            value = getattr(items[0], keyword, None)
            if value is not None:
                return value
    return None


def _read_dicom(source: Path | IO[bytes], name: str, window: tuple[float, float] | None, frame: int,
                max_side: int | None = None) -> np.ndarray:
    # pydicom and nibabel belong to the optional "data" extra, so they load only when such a file shows up.
    import pydicom

    try:
        ds = pydicom.dcmread(source, force=True)
    except Exception as exc:
        # force=True parses anything, so garbage fails with arbitrary exception types; all mean "not DICOM".
        raise ImageReadError(name, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        hint = "" if getattr(ds, "preamble", None) else " (and no DICOM preamble: it may not be a DICOM file at all)"
        raise ImageReadError(name, f"DICOM file has no pixel data{hint}")
    _check_side(name, int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0), max_side)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        # pydicom raises a wide range of types (missing codec, bad length, unknown syntax); all mean the same.
        raise ImageReadError(name, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames > 1:
        if not -n_frames <= frame < n_frames:
            raise ValueError(f"{name}: dicom_frame={frame} is out of range, the file has {n_frames} frames")
        pixels = pixels[frame]
        frame %= n_frames
    elif frame not in (0, -1):
        raise ValueError(f"{name}: dicom_frame={frame} is out of range, the file has a single frame")
    if samples == 3:
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        return np.clip(pixels.astype(np.float32) / np.float32(2**bits - 1), 0.0, 1.0)
    if pixels.ndim != 2:
        raise ImageReadError(name, f"expected a 2-D grey frame, got pixel array of shape {pixels.shape}")

    values = pixels.astype(np.float64)
    slope = _dicom_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _dicom_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    values = values * (1.0 if slope is None else _first(slope)) + (0.0 if intercept is None else _first(intercept))

    if window is None:
        centre = _dicom_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter")
        width = _dicom_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth")
        if centre is not None and width is not None and _first(width) >= 1:
            window = (_first(centre), _first(width))
    if window is not None:
        centre, width = float(window[0]), float(window[1])
        if width < 1:
            raise ValueError(f"{name}: DICOM window width must be >= 1, got {width}")
        if width == 1:
            # The standard's width-1 window is a threshold at centre − 0.5.
            out = (values > centre - 0.5).astype(np.float32)
        else:
            # DICOM PS3.3 C.11.2.1.2.1 linear VOI function, output range [0, 1].
            out = np.clip((values - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
    else:
        out = robust_normalise(values)
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out


def _read_nifti_volume(path: Path) -> np.ndarray:
    """Whole NIfTI volume, RAS+ oriented, float32 (X, Y, Z) in [0, 1] (first volume of a 4-D series)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.orientations import apply_orientation, io_orientation

    try:
        img = nib.load(path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ImageReadError(path, f"corrupt or truncated NIfTI file ({type(exc).__name__}: {exc})") from None
    if data.ndim == 2:
        data = data[:, :, None]
    while data.ndim > 3:
        # Time series or vector volumes: the first volume is the anatomy.
        data = data[..., 0]
    data = apply_orientation(data, io_orientation(img.affine))
    return robust_normalise(data)


def _check_axis(path: Path, axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"{path}: nifti axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis}")


def _nifti_slices(path: Path, volume: np.ndarray, axis: int, indices: list[int]) -> list[np.ndarray]:
    depth = volume.shape[axis]
    out = []
    for index in indices:
        if not -depth <= index < depth:
            raise ValueError(f"{path}: slice {index} is out of range, axis {axis} has {depth} slices")
        out.append(np.ascontiguousarray(np.rot90(np.take(volume, index, axis=axis))))
    return out


def image_batch(img: np.ndarray) -> np.ndarray:
    """One image (H, W), (H, W, 1) or (H, W, 3), as a reader returns it -> a batch of one (1, H, W, 1|3)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected one image of shape (H, W) or (H, W, 3), got {arr.shape}")
    return arr[None]


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


def resize_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, 1|3) uint8 pixels or float in [0, 1] -> float32 (B, size, size, 3) in [0, 1], grey replicated.

    Separable: rows, then columns, each one matrix product with :func:`resize_weights`.
    """
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"expected images (batch, height, width, 1 or 3 channels), got shape {images.shape}")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) * np.float32(PIXEL_SCALE)
    elif np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32, copy=False)
    else:
        raise ValueError(f"expected uint8 pixels or a float image in [0, 1], got dtype {images.dtype}")
    _, h, w, _ = x.shape
    if h != size:
        x = np.tensordot(resize_weights(h, size), x, axes=([1], [1])).transpose(1, 0, 2, 3)
    if w != size:
        x = np.tensordot(x, resize_weights(w, size), axes=([2], [1])).transpose(0, 1, 3, 2)
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    return np.ascontiguousarray(x)


def _channels_first_float32(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    # The two array libraries spell these operations differently; everything else below is shared.
    if isinstance(x, np.ndarray):
        return x.transpose(0, 3, 1, 2).astype(np.float32)
    return x.permute(0, 3, 1, 2).float()


def _per_channel(like: np.ndarray | torch.Tensor, values: Sequence[float]) -> np.ndarray | torch.Tensor:
    """``values`` as a float32 (1, 3, 1, 1) constant of ``like``'s library (and device)."""
    if isinstance(like, np.ndarray):
        return np.asarray(values, dtype=np.float32).reshape(1, 3, 1, 1)
    return like.new_tensor(values).reshape(1, 3, 1, 1)


def normalise_nhwc(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(B, H, W, 3) uint8 RGB or float RGB in [0, 1] -> float32 (B, 3, H, W) ImageNet-normalised.

    ``x``: a numpy array or a torch tensor (the result is of the same library); the scale applies to uint8
    only. Traced by ``torch.onnx.export`` it becomes Transpose, Cast, Mul, Sub, Div.
    """
    if x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"normalise_nhwc expects RGB images (batch, height, width, 3), got shape {tuple(x.shape)}")
    dtype = str(x.dtype).removeprefix("torch.")  # the same words for numpy and torch dtypes
    if dtype not in ("uint8", "float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"normalise_nhwc expects uint8 pixels or a float image in [0, 1], got dtype {dtype}")
    nchw = _channels_first_float32(x)
    if dtype == "uint8":
        nchw = nchw * PIXEL_SCALE
    return (nchw - _per_channel(nchw, IMAGENET_MEAN)) / _per_channel(nchw, IMAGENET_STD)


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, 1|3) uint8 or float in [0, 1] -> float32 (B, 3, size, size): local and server preprocessing."""
    return normalise_nhwc(resize_rgb(images, size))


def to_model_input(img: np.ndarray, image_size: int) -> torch.Tensor:
    """Float image (H, W) or (H, W, 3) in [0, 1] -> float32 tensor (3, S, S), resized and ImageNet-normalised.

    Resizing is bilinear with antialiasing (no aliasing when shrinking large radiographs); grey images are
    replicated to three channels. The same computation as the server's (:func:`preprocess`).
    """
    import torch

    arr = np.asarray(img)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"to_model_input expects a float image in [0, 1], got dtype {arr.dtype}; use read_image")
    return torch.from_numpy(preprocess(image_batch(arr), image_size)[0])


def read_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read a ground-truth mask (any non-zero pixel is anomalous) as bool ``(size, size)`` (native size if None).

    Shrinking uses an area-weighted majority (antialiased bilinear, >= 0.5) so thin defects survive as well
    as they can.
    """
    import torch
    import torch.nn.functional as F

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                # Palette index 0 is background in every mask format we know; colours are irrelevant.
                raw = np.asarray(img) != 0
            elif img.mode in ("RGB", "RGBA", "LA"):
                bands = np.asarray(img.convert("RGB"))
                raw = bands.any(axis=2)
            else:
                raw = np.asarray(img) != 0
    except FileNotFoundError:
        raise ImageReadError(path, "mask file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "unrecognised mask image format (expected PNG, BMP or TIFF)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"corrupt or truncated mask ({exc})") from None
    if raw.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D mask, got shape {raw.shape}")
    if size is None or raw.shape == (size, size):
        return raw
    x = torch.from_numpy(raw.astype(np.float32))[None, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x[0, 0] >= 0.5).numpy()
