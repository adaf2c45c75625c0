"""DICOM files -> float32 images in [0, 1], each file's claim checked against the decode budget first.

:func:`read_dicom` parses the header (every element before the pixel data), checks rows × columns, the
frame count and the decompressed size against the :class:`~pdd.data.budget.DecodeBudget`, then decodes the
one frame asked for with pydicom:

* native pixel data: only that frame is read from the file;
* encapsulated (JPEG, JPEG-LS, JPEG 2000, RLE): the frame's own JPEG-family codestream header must agree
  with the DICOM header's rows and columns before the codec sees it (a codestream may claim far more than
  its DICOM header); RLE decodes into the size of the DICOM header;
* Deflated Explicit VR Little Endian: the dataset is inflated a bounded piece at a time, first the
  elements before the pixel data (at most :data:`MAX_HEADER_BYTES`), then the pixel data up to the end of
  the frame asked for, never the rest.

Values: RescaleSlope/RescaleIntercept, then the window (given, else the file's) by the DICOM linear VOI
function, else the robust min/max; MONOCHROME1 is inverted so that bright always means dense / high signal.
Runs inside the inference server's preprocess model too (``export/triton_repo.py`` bundles it).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .budget import Deadline, DecodeBudget, ImageReadError, Inflater, TimedReader, check_side
from .intensity import robust_normalise

__all__ = ["MAX_HEADER_BYTES", "read_dicom", "read_dicom_header"]

# The elements before the pixel data of a deflated dataset may take this much once inflated (a header of a
# few KiB is usual; icons and private blobs make some larger).
MAX_HEADER_BYTES = 64 << 20
_FIRST_HEADER_PIECE = 64 << 10
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float Pixel Data, Double Float Pixel Data
# Explicit-VR value representations whose length field has 4 bytes (after 2 reserved ones).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Encapsulated transfer syntaxes whose frames' codestream headers are checked: JPEG (baseline, extended,
# lossless), JPEG-LS, by their SOF marker; JPEG 2000 and High-Throughput JPEG 2000, by Pillow.
_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
         "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_JPEG_2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
              "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
# JPEG start-of-frame markers (SOF0-SOF15 without DHT, JPG and DAC; SOF55 of JPEG-LS).
_SOF_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}


def _meta_end(head: bytes) -> int:
    """Where the dataset starts in a file with a preamble: past group 0002 (always explicit VR little endian)."""
    pos = 132
    while pos + 8 <= len(head) and struct.unpack_from("<H", head, pos)[0] == 2:
        if head[pos + 4:pos + 6] in _LONG_VRS:
            if pos + 12 > len(head):
                break
            pos += 12 + struct.unpack_from("<I", head, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", head, pos + 6)[0]
    return pos


def _file_meta(fp: IO[bytes]) -> tuple[Any, int]:
    """The file meta information (None without a preamble) and the offset of the dataset after it."""
    import pydicom

    head = fp.read(_FIRST_HEADER_PIECE)
    fp.seek(0)
    if head[128:132] != b"DICM":
        return None, 0
    end = _meta_end(head)
    meta = pydicom.dcmread(io.BytesIO(head[:end]), force=True).file_meta
    return meta, end


def _pixel_element(fp: IO[bytes]) -> tuple[int, int] | None:
    """At the position pydicom stops before pixel data: (tag, offset of the value) or None (no pixel data)."""
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return None
    tag = (struct.unpack_from("<H", head, 0)[0] << 16) | struct.unpack_from("<H", head, 2)[0]
    if tag not in _PIXEL_TAGS:
        return None
    return tag, start + (12 if head[4:6] in _LONG_VRS else 8)


def _claim(name: str, ds: Any, frame: int, budget: DecodeBudget, max_side: int | None) -> int:
    """Check the header's claim against the budget (and ``max_side``); the frame index, made non-negative."""
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageReadError(name, f"DICOM header has a malformed image size ({exc})") from None
    budget.check_image(name, rows, columns, samples=samples, bytes_per_sample=bits / 8, frames=frames)
    check_side(name, rows, columns, max_side)
    if frames > 1 and not -frames <= frame < frames:
        raise ValueError(f"{name}: dicom_frame={frame} is out of range, the file has {frames} frames")
    if frames == 1 and frame not in (0, -1):
        raise ValueError(f"{name}: dicom_frame={frame} is out of range, the file has a single frame")
    return frame % frames


def _frame_bytes(ds: Any) -> float:
    bits = int(ds.get("BitsAllocated", 8) or 8)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits / 8


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG / JPEG-LS codestream's start-of-frame marker."""
    pos = 2
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker in _SOF_MARKERS:
            return struct.unpack_from(">HH", data, pos + 5)
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    raise ValueError("no start-of-frame marker")


def _check_codestream(name: str, ds: Any, syntax: str, index: int) -> None:
    """An encapsulated frame's JPEG-family codestream must claim the header's rows and columns."""
    from PIL import Image
    from pydicom.encaps import get_frame

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        data = get_frame(ds.PixelData, index, number_of_frames=frames)
        if syntax in _JPEG:
            height, width = _jpeg_size(data)
        else:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise ImageReadError(name, f"frame {index}'s codestream claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} "
                                   f"pixels, its DICOM header {ds.Rows} x {ds.Columns}") from None
    except Exception as exc:
        raise ImageReadError(name, f"cannot read the header of frame {index}'s codestream "
                                   f"({type(exc).__name__}: {exc})") from None
    if (height, width) != (int(ds.Rows), int(ds.Columns)):
        raise ImageReadError(name, f"frame {index}'s codestream claims {height} x {width} pixels, its DICOM header "
                                   f"{ds.Rows} x {ds.Columns}")


def _converted(name: str, ds: Any) -> Any:
    """``ds`` with every element's value converted now: pydicom converts them when first used, and a corrupt
    value (an unknown VR, a number that is not one) fails then with any exception type."""
    try:
        ds.walk(lambda dataset, element: element.value)
    except Exception as exc:
        # pydicom appends the whole traceback to the message of a failure inside walk(): keep its first words.
        said = str(exc).split("Traceback")[0].strip()
        raise ImageReadError(name, f"corrupt DICOM header element ({type(exc).__name__}: {said})") from None
    return ds


def _parse(fp: IO[bytes], name: str, **kwargs: Any) -> Any:
    import pydicom

    try:
        ds = pydicom.dcmread(fp, force=True, **kwargs)
    except ImageReadError:
        raise
    except Exception as exc:
        # force=True parses anything, so garbage fails with arbitrary exception types; all mean "not DICOM".
        raise ImageReadError(name, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    return _converted(name, ds)


def _no_pixels(name: str, ds: Any) -> ImageReadError:
    hint = "" if getattr(ds, "preamble", None) else " (and no DICOM preamble: it may not be a DICOM file at all)"
    return ImageReadError(name, f"DICOM file has no pixel data{hint}")


def _decode(name: str, call: Any) -> np.ndarray:
    try:
        return call()
    except ImageReadError:
        raise
    except Exception as exc:
        # pydicom raises a wide range of types (missing codec, bad length, unknown syntax); all mean the same.
        raise ImageReadError(name, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None


def _read_stored(fp: IO[bytes], name: str, meta: Any, frame: int, budget: DecodeBudget,
                 max_side: int | None) -> tuple[Any, np.ndarray, int]:
    """A file that is not deflated: (header, the frame's stored values, frame index)."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import UID

    ds = _parse(fp, name, stop_before_pixels=True)
    if _pixel_element(fp) is None:
        raise _no_pixels(name, ds)
    index = _claim(name, ds, frame, budget, max_side)
    syntax = UID(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    if syntax is not None and not syntax.is_transfer_syntax:
        raise ImageReadError(name, f"its transfer syntax UID {str(syntax)!r} names no transfer syntax")
    fp.seek(0)
    if syntax is not None and syntax.is_compressed:
        full = _parse(fp, name)
        if syntax in _JPEG or syntax in _JPEG_2000:
            _check_codestream(name, full, syntax, index)
        return ds, _decode(name, lambda: pixel_array(full, index=index)), index
    if syntax is None:
        # No file meta: the encoding pydicom recognised while parsing.
        implicit, little = ds.original_encoding
        syntax = UID("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
    return ds, _decode(name, lambda: pixel_array(fp, index=index, transfer_syntax_uid=syntax)), index


def _deflated_header(fp: IO[bytes], name: str, meta: Any, start: int,
                     deadline: Deadline) -> tuple[Any, tuple[int, int] | None, Inflater]:
    """The elements before the pixel data of a deflated dataset, inflated a bounded piece at a time: (header,
    the pixel element's (tag, value offset) in the inflated stream or None, the inflater to go on with)."""
    from pydicom.filereader import read_dataset

    fp.seek(start)
    inflater = Inflater(fp.read(), name, deadline)
    size = _FIRST_HEADER_PIECE
    while True:
        inflater.fill(size)
        buffer = io.BytesIO(bytes(inflater.out))
        try:
            ds = read_dataset(buffer, False, True, stop_when=lambda tag, vr, length: int(tag) in _PIXEL_TAGS)
            element = _pixel_element(buffer)
        except Exception as exc:
            if inflater.done:
                raise ImageReadError(name, f"not a readable deflated DICOM dataset ({type(exc).__name__}: "
                                           f"{exc})") from None
            element = None
        if element is not None or inflater.done:
            break
        if size >= MAX_HEADER_BYTES:
            raise ImageReadError(name, f"the elements before its pixel data inflate to more than {MAX_HEADER_BYTES:,} "
                                       "bytes: not a plausible DICOM header")
        size *= 4
    ds = _converted(name, ds)
    ds.file_meta = meta
    return ds, element, inflater


def _read_deflated(fp: IO[bytes], name: str, meta: Any, start: int, frame: int, budget: DecodeBudget,
                   max_side: int | None, deadline: Deadline) -> tuple[Any, np.ndarray, int]:
    """A deflated dataset, inflated no further than the end of the frame asked for."""
    from pydicom.pixels import pixel_array

    ds, element, inflater = _deflated_header(fp, name, meta, start, deadline)
    if element is None:
        raise _no_pixels(name, ds)
    index = _claim(name, ds, frame, budget, max_side)
    tag, offset = element
    need = offset + int(np.ceil((index + 1) * _frame_bytes(ds)))
    if not inflater.fill(need):
        raise ImageReadError(name, f"its deflated pixel data ends after {len(inflater.out) - offset:,} bytes, "
                                   f"short of frame {index}")
    # The frames up to the one asked for, as a dataset pydicom decodes natively.
    keyword = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}[tag]
    setattr(ds, keyword, bytes(inflater.out[offset:need]))
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = index + 1
    return ds, _decode(name, lambda: pixel_array(ds, index=index)), index


def _open_meta(fp: IO[bytes], name: str) -> tuple[Any, int]:
    try:
        return _file_meta(fp)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(name, f"unreadable DICOM file meta information ({type(exc).__name__}: {exc})") from None


def read_dicom_header(source: IO[bytes], name: str, deadline: Deadline) -> Any:
    """The header of a DICOM file with its preamble (every element before the pixel data, the file meta
    attached) as a pydicom Dataset, read through the deadline; a deflated dataset is inflated no further than
    its header (at most :data:`MAX_HEADER_BYTES`). Raises :class:`ImageReadError`."""
    fp = TimedReader(source, deadline)
    meta, start = _open_meta(fp, name)
    if meta is None:
        raise ImageReadError(name, "not a DICOM file (no 'DICM' preamble at byte 128)")
    if str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        return _deflated_header(fp, name, meta, start, deadline)[0]
    return _parse(fp, name, stop_before_pixels=True)


def read_dicom(source: IO[bytes], name: str, window: tuple[float, float] | None, frame: int,
               budget: DecodeBudget, deadline: Deadline, max_side: int | None = None) -> np.ndarray:
    """One frame of a DICOM file (``source``: seekable binary, read through the deadline) as float32 (H, W) or
    (H, W, 3) in [0, 1]. ``name`` is what errors call the file. Raises :class:`ImageReadError`."""
    fp = TimedReader(source, deadline)
    meta, start = _open_meta(fp, name)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        ds, pixels, index = _read_deflated(fp, name, meta, start, frame, budget, max_side, deadline)
    else:
        ds, pixels, index = _read_stored(fp, name, meta, frame, budget, max_side)
    deadline.check("converting the pixels")
    return _to_unit(name, ds, pixels, index, window)


def _number(name: str | Path, ds: Any, frame: int, sequence: str, keyword: str) -> float | None:
    """A frame's numeric attribute (the first of several values: WindowCenter can hold several windows), from
    :func:`_attr`; None where absent. A value that is not a number is a corrupt header."""
    value = _attr(ds, frame, sequence, keyword)
    if value is None:
        return None
    try:
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError) as exc:
        raise ImageReadError(name, f"DICOM attribute {keyword} is not a number ({value!r}: {exc})") from None


def _attr(ds: object, frame: int, sequence: str, keyword: str) -> object | None:
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


def _to_unit(name: str | Path, ds: Any, pixels: np.ndarray, frame: int,
             window: tuple[float, float] | None) -> np.ndarray:
    """Stored values of one frame -> [0, 1]: rescale, window (or robust range), MONOCHROME1 inverted."""
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        bits = int(_number(name, ds, frame, "", "BitsStored") or 8)
        if not 1 <= bits <= 32:
            raise ImageReadError(name, f"DICOM attribute BitsStored is {bits}, not 1 to 32")
        return np.clip(pixels.astype(np.float32) / np.float32(2**bits - 1), 0.0, 1.0)
    if pixels.ndim != 2:
        raise ImageReadError(name, f"expected a 2-D grey frame, got pixel array of shape {pixels.shape}")
    values = pixels.astype(np.float64)
    slope = _number(name, ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _number(name, ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    values = values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)

    if window is None:
        centre = _number(name, ds, frame, "FrameVOILUTSequence", "WindowCenter")
        width = _number(name, ds, frame, "FrameVOILUTSequence", "WindowWidth")
        # A file's window that is absent, narrower than 1 or not finite is no window: the robust range instead.
        if centre is not None and width is not None and width >= 1 and np.isfinite([centre, width]).all():
            window = (centre, width)
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
