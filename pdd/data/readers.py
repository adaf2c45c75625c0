"""Read medical images (PNG/JPEG/BMP/TIFF, DICOM, NIfTI) into float arrays, and turn them into model inputs.

Every reader returns ``float32`` in ``[0, 1]``: ``(H, W)`` for grey images, ``(H, W, 3)`` for colour ones.
How raw values reach ``[0, 1]``:

* 8-bit Pillow images: ``value * PIXEL_SCALE`` (1/255; the stored bytes already are a display image);
* 16-bit / 32-bit / float Pillow images, DICOM without a window, NIfTI: robust min/max, i.e. the 0.5th and
  99.5th percentiles map to 0 and 1 (clipped); a constant image becomes all zeros (:mod:`.intensity`);
* DICOM with a window (from the file or ``dicom_window``): the DICOM linear VOI function, after
  RescaleSlope/RescaleIntercept; MONOCHROME1 is inverted so that bright always means dense / high signal
  (:mod:`.dicom_io`).

NIfTI volumes are reoriented to the closest RAS+ axes first, so ``axis`` 0/1/2 are sagittal/coronal/axial
for any well-formed file, and each slice is rotated (``np.rot90``) so anterior (axial) or superior (sagittal,
coronal) is at the top of the image. ``np.rot90(slice_map, -1)`` undoes the rotation (:mod:`.nifti_io`).

**The decode budget.** Every reader takes ``budget=`` (a :class:`DecodeBudget`; its defaults when None) and
checks the file's header against it before any pixel is decoded: pixels per image, voxels per volume, frames,
decompressed bytes, and a time bound per file. Over it, the reader raises :class:`DecodeBudgetError` or
:class:`DecodeTimeoutError`, both an :class:`ImageReadError` naming the file, the claim and the limit
(:mod:`.budget`). Volumes are read plane by plane (:func:`iter_volume_slices`).

Preprocessing (decoded image -> model input) is defined here once: :func:`resize_rgb` (to float RGB
(B, S, S, 3) in [0, 1]) then :func:`normalise_nhwc`, which takes numpy arrays or torch tensors, so local
prediction (:func:`to_model_input`), the ONNX graph's in-graph preprocessing (``ExportablePDD.normalise``)
and the server's preprocess model all run the same formula.

:func:`read_image_bytes` decodes the bytes of one file the same way (what an inference server receives).
The readers need numpy and Pillow (pydicom and nibabel load only for their formats), not torch: Triton
Inference Server's preprocess model runs these very files (:data:`BUNDLE`, this module and the modules it
imports, which import each other relatively for that reason), which ``export/triton_repo.py`` bundles into
the model repository. Only :func:`to_model_input` and :func:`read_mask` import torch, when called.

Example::

    >>> img = read_image("case_001.dcm", dicom_window=(40, 80))   # head CT, brain window
    >>> x = to_model_input(img, 256)                               # (3, 256, 256), ImageNet-normalised
"""

from __future__ import annotations

import gzip
import io
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .budget import (
    DEFAULT_BUDGET,
    Deadline,
    DecodeBudget,
    DecodeBudgetError,
    DecodeTimeoutError,
    ImageReadError,
    TimedReader,
    check_side,
)
from .dicom_io import read_dicom, read_dicom_header
from .intensity import PIXEL_SCALE, robust_normalise
from .nifti_io import NiftiVolume, check_axis

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUNDLE",
    "DICOM_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PIXEL_SCALE",
    "DecodeBudget",
    "DecodeBudgetError",
    "DecodeTimeoutError",
    "ImageReadError",
    "has_dicom_preamble",
    "image_batch",
    "iter_volume_slices",
    "normalise_nhwc",
    "preprocess",
    "read_header",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "read_volume_slices",
    "resize_rgb",
    "resize_weights",
    "robust_normalise",
    "to_model_input",
]

# The files of pdd/data/ that read images without this project around them: what the server's preprocess
# model carries (export/triton_repo.py copies them into one folder, imported there as a package).
BUNDLE = ("readers.py", "budget.py", "intensity.py", "dicom_io.py", "nifti_io.py")

# The normalisation every model input gets; export metadata and the server's config record these values.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Files a folder-based dataset treats as one 2-D image each; NIfTI volumes are not among them.
IMAGE_SUFFIXES = PILLOW_SUFFIXES + DICOM_SUFFIXES

_PILLOW_FORMATS = "PNG, JPEG, BMP, TIFF"
# Pillow warns of images over its MAX_IMAGE_PIXELS (89 M) as it opens them; the decode budget decides right
# after, from the same header, with an error that names the file, so the warning only adds noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Read one 2-D image as float32 ``(H, W)`` (grey) or ``(H, W, 3)`` (colour) in [0, 1].

    The format is chosen from the file's content (DICOM preamble, NIfTI magic, else Pillow), with the
    extension as a fallback. ``dicom_window`` is ``(centre, width)`` in rescaled units (HU for CT) and
    overrides the file's window; ``dicom_frame`` picks the frame of a multi-frame DICOM. ``nifti_axis``
    and ``nifti_slice`` pick one slice of a volume (default: the middle one; negative counts from the end).
    ``budget``: what the file may claim (default :class:`DecodeBudget`'s defaults).
    Raises :class:`ImageReadError` for missing, truncated, undecodable or over-budget files.
    """
    path = Path(path)
    budget = budget or DEFAULT_BUDGET
    kind = _sniff(path)
    deadline = budget.deadline(path)
    if kind == "nifti":
        check_axis(path, nifti_axis)
        volume = NiftiVolume(path, budget, deadline)
        index = volume.depth(nifti_axis) // 2 if nifti_slice is None else nifti_slice
        return next(volume.slices(nifti_axis, [index]))
    budget.check_file_size(path, path.stat().st_size)
    with open(path, "rb") as fh:
        if kind == "dicom":
            return read_dicom(fh, str(path), dicom_window, dicom_frame, budget, deadline)
        return _read_pillow(fh, str(path), f"{_PILLOW_FORMATS}, DICOM or NIfTI", budget, deadline)


def read_header(path: str | Path, *, budget: DecodeBudget | None = None):
    """The header of a DICOM file (every element before the pixel data) as a pydicom Dataset, without reading
    the pixel data: a deflated dataset is inflated no further than its header. The file must have its
    preamble; ``budget`` bounds its size on disk and the time (default :class:`DecodeBudget`'s defaults).
    Raises :class:`ImageReadError`."""
    path = Path(path)
    budget = budget or DEFAULT_BUDGET
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(path, f"cannot open it ({exc.strerror or exc})") from None
    budget.check_file_size(path, size)
    with open(path, "rb") as fh:
        return read_dicom_header(fh, str(path), budget.deadline(path))


def read_image_bytes(
    data: bytes,
    name: str = "<bytes>",
    *,
    dicom_window: tuple[float, float] | None = None,
    dicom_frame: int = 0,
    max_side: int | None = None,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Read one 2-D image from the bytes of a file, as :func:`read_image` reads the file itself.

    ``data``: a PNG / JPEG / BMP / TIFF file, or a DICOM file with its preamble (``DICM`` at byte 128; NIfTI
    volumes are sliced by the sender with :func:`read_volume_slices`). ``name`` is what errors call the data.
    ``max_side``: refuse images with a larger side, checked from the header before the pixels are decoded.
    ``budget``: what the file may claim (default :class:`DecodeBudget`'s defaults).
    Raises :class:`ImageReadError` for data that is empty, too large, or not a readable image.
    """
    budget = budget or DEFAULT_BUDGET
    if not data:
        raise ImageReadError(name, "file is empty")
    deadline = budget.deadline(name)
    if has_dicom_preamble(data):
        return read_dicom(io.BytesIO(data), name, dicom_window, dicom_frame, budget, deadline, max_side)
    return _read_pillow(io.BytesIO(data), name, f"{_PILLOW_FORMATS}, or DICOM with its 128-byte preamble", budget,
                        deadline, max_side)


def iter_volume_slices(path: str | Path, axis: int = 2, slices: Sequence[int] | None = None, *,
                       budget: DecodeBudget | None = None) -> Iterator[np.ndarray]:
    """The slices of a NIfTI volume one at a time, float32 ``(H, W)`` in [0, 1]: memory holds one plane.

    ``axis`` is a RAS+ axis (0 sagittal, 1 coronal, 2 axial); ``slices`` lists indices along it (all when
    None). The whole volume shares one robust min/max so intensities are comparable between slices. The
    header is checked against ``budget`` (and the whole volume read for its intensity range) before the
    first slice is returned; ``budget.max_seconds`` counts the reading, not the time the caller spends
    between slices.
    """
    path = Path(path)
    budget = budget or DEFAULT_BUDGET
    if _sniff(path) != "nifti":
        raise ImageReadError(path, "not a NIfTI file (expected .nii or .nii.gz with a NIfTI header)")
    check_axis(path, axis)
    return NiftiVolume(path, budget, budget.deadline(path)).slices(axis, slices)


def read_volume_slices(path: str | Path, axis: int = 2, slices: Sequence[int] | None = None, *,
                       budget: DecodeBudget | None = None) -> list[np.ndarray]:
    """A NIfTI volume as a list of float32 ``(H, W)`` slices in [0, 1]: :func:`iter_volume_slices`, collected."""
    return list(iter_volume_slices(path, axis, slices, budget=budget))


def _bytes_per_sample(mode: str) -> int:
    return 2 if "16" in mode else 4 if mode in ("I", "F") else 1


def _read_pillow(source: IO[bytes], name: str, formats: str, budget: DecodeBudget, deadline: Deadline,
                 max_side: int | None = None) -> np.ndarray:
    """``formats``: what the error for an unrecognised file says is expected instead."""
    try:
        with Image.open(TimedReader(source, deadline)) as img:
            # Image.open parsed the header only: the claim is checked before anything is decoded.
            budget.check_image(name, img.height, img.width, samples=len(img.getbands()),
                               bytes_per_sample=_bytes_per_sample(img.mode))
            check_side(name, img.height, img.width, max_side)
            img.load()
            deadline.check("converting the pixels")
            # Cameras and some scanners store the display orientation in EXIF only.
            img = ImageOps.exif_transpose(img)
            return _pillow_to_array(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, f"unrecognised image format (expected {formats})") from None
    except Image.DecompressionBombError:
        # Pillow's own limit, checked in Image.open before the budget can be: the same refusal.
        pillow = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if budget.max_pixels < pillow:
            raise DecodeBudgetError(name, f"its header claims more than {pillow:,} pixels per image", "max_pixels",
                                    budget.max_pixels) from None
        raise ImageReadError(name, f"its header claims more than {pillow:,} pixels per image, over Pillow's own "
                                   "limit (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, struct.error) as exc:
        # Pillow's plugins fail on corrupt data with these too (a TIFF strip offset stored as a fraction: TypeError).
        raise ImageReadError(name, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from None


def _pillow_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return robust_normalise(np.asarray(img))
    if mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.float32) * np.float32(PIXEL_SCALE)
    # Palette, RGBA, CMYK, YCbCr...: alpha carries no anatomy, so it is dropped.
    return np.asarray(img.convert("RGB"), dtype=np.float32) * np.float32(PIXEL_SCALE)


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


def read_mask(path: str | Path, size: int | None = None, *, budget: DecodeBudget | None = None) -> np.ndarray:
    """Read a ground-truth mask (any non-zero pixel is anomalous) as bool ``(size, size)`` (native size if None).

    Shrinking uses an area-weighted majority (antialiased bilinear, >= 0.5) so thin defects survive as well
    as they can. ``budget``: as for :func:`read_image`.
    """
    import torch
    import torch.nn.functional as F

    path = Path(path)
    budget = budget or DEFAULT_BUDGET
    deadline = budget.deadline(path)
    try:
        with open(path, "rb") as fh, Image.open(TimedReader(fh, deadline)) as img:
            budget.check_image(path, img.height, img.width, samples=len(img.getbands()),
                               bytes_per_sample=_bytes_per_sample(img.mode), what="mask")
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
