"""Small files whose headers promise huge images: one builder per class of decode bomb, for the tests, the
fuzz harness's seeds and ``benchmarks/bombs.py``.

Each builder writes a file that is valid as far as its header goes. With ``full=False`` (the tests) the
data after the header is a token (a few bytes of compressed zeros): the file is a few hundred bytes and
decodes nowhere. With ``full=True`` (the benchmark) the compressed data really holds every pixel the
header claims, streamed through zlib a row block at a time, so the file is what a hospital folder could
hold (a 12000² zero PNG is ~140 KB) and a reader without a budget decodes it all.

Example::

    >>> png(Path("bomb.png"), 12000, 12000, full=True)   # doctest: +SKIP
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "bmp",
    "dicom_deflated",
    "dicom_frames",
    "dicom_header_bloat",
    "dicom_jpeg2000",
    "jpeg",
    "nifti_gz",
    "png",
    "tiff",
]

_BLOCK = 1 << 22  # bytes of zeros compressed per call


def _zeros(nbytes: int) -> Iterator[bytes]:
    block = bytes(min(nbytes, _BLOCK))
    while nbytes > 0:
        yield block[:min(nbytes, _BLOCK)]
        nbytes -= _BLOCK


def _compressed_zeros(nbytes: int, wbits: int = zlib.MAX_WBITS, prefix: bytes = b"") -> bytes:
    """``prefix`` then ``nbytes`` zeros, compressed (zlib stream, or raw deflate with wbits=-15)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    parts = [comp.compress(prefix)]
    parts += [comp.compress(b) for b in _zeros(nbytes)]
    return b"".join(parts) + comp.flush()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(path: Path, width: int, height: int, *, full: bool = False) -> Path:
    """8-bit grey PNG claiming width × height; ``full``: an IDAT holding every (zero) row."""
    rows = height if full else 1
    comp = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0, then the row
    idat = b"".join(comp.compress(row) for _ in range(rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def tiff(path: Path, width: int, height: int, *, full: bool = False) -> Path:
    """16-bit grey TIFF, deflate-compressed in one strip, claiming width × height."""
    strip = _compressed_zeros(width * height * 2 if full else 2 * width)
    entries = [(256, 4, width), (257, 4, height), (258, 3, 16), (259, 3, 8), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip)
    return path


def bmp(path: Path, width: int, height: int) -> Path:
    """24-bit BMP claiming width × height, with one row of data."""
    row = bytes((3 * width + 3) // 4 * 4)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(row), 0, 0, 14 + len(info))
    path.write_bytes(header + info + row)
    return path


def jpeg(path: Path, width: int, height: int) -> Path:
    """A small valid baseline JPEG whose start-of-frame marker is patched to claim width × height."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    path.write_bytes(bytes(data))
    return path


def _dicom_header(rows: int, columns: int, frames: int | None, syntax: str) -> tuple[object, object]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds, ds.file_meta


def _dicom_bytes(ds: object, meta: object) -> tuple[bytes, bytes]:
    """(preamble and file meta of ``meta``, ``ds`` encoded explicit VR little endian)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return head.getvalue(), body.getvalue()


def _pixel_element(nbytes: int) -> bytes:
    """(7FE0,0010) OW with a defined length (at most the largest even 32-bit one), without its value."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, min(nbytes, 0xFFFFFFFE))


def dicom_deflated(path: Path, rows: int, columns: int, *, full: bool = False, frames: int | None = None,
                   garbage_after: int | None = None) -> Path:
    """Deflated Explicit VR Little Endian, 16-bit, claiming ``frames`` (or one) rows × columns frames.

    ``full``: the deflate stream holds every zero pixel, else a token 64 bytes. ``garbage_after``: the
    stream holds that many bytes of (zero) pixel data, then turns to bytes that are not deflate data (a
    reader that inflates that far fails).
    """
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds, meta = _dicom_header(rows, columns, frames, DeflatedExplicitVRLittleEndian)
    head, body = _dicom_bytes(ds, meta)
    pixel_bytes = rows * columns * 2 * (frames or 1)
    body += _pixel_element(pixel_bytes)
    if garbage_after is not None:
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        parts = [comp.compress(body)] + [comp.compress(b) for b in _zeros(garbage_after)]
        path.write_bytes(head + b"".join(parts) + comp.flush(zlib.Z_SYNC_FLUSH) + b"\xff" * 64)
        return path
    path.write_bytes(head + _compressed_zeros(pixel_bytes if full else 64, -zlib.MAX_WBITS, prefix=body))
    return path


def dicom_header_bloat(path: Path, bloat_bytes: int) -> Path:
    """Deflated DICOM of a 64 × 64 image behind a private OB element of ``bloat_bytes`` zeros (a ratio bomb)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds, meta = _dicom_header(64, 64, None, DeflatedExplicitVRLittleEndian)
    head, body = _dicom_bytes(ds, meta)
    # (0009,0010) private creator, then (0009,1000) OB holding the zeros; both sort before the pixel data.
    creator = b"BOMB"
    body += struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", len(creator)) + creator
    body += struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, bloat_bytes)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body)] + [comp.compress(b) for b in _zeros(bloat_bytes)]
    parts.append(comp.compress(_pixel_element(64 * 64 * 2) + bytes(64 * 64 * 2)))
    path.write_bytes(head + b"".join(parts) + comp.flush())
    return path


def dicom_frames(path: Path, frames: int, rows: int = 64, columns: int = 64) -> Path:
    """Native multi-frame DICOM claiming ``frames`` frames, holding the pixels of one."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds, meta = _dicom_header(rows, columns, frames, ExplicitVRLittleEndian)
    head, body = _dicom_bytes(ds, meta)
    path.write_bytes(head + body + _pixel_element(rows * columns * 2 * frames) + bytes(rows * columns * 2))
    return path


def dicom_jpeg2000(path: Path, rows: int, columns: int, claimed: tuple[int, int]) -> Path:
    """JPEG 2000 (lossless) DICOM of rows × columns whose codestream's SIZ marker claims ``claimed`` (h, w)."""
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    buf = io.BytesIO()
    Image.fromarray(np.zeros((rows, columns), np.uint16)).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)
    stream = bytearray(buf.getvalue())
    siz = stream.index(b"\xff\x51")
    # SIZ: marker, Lsiz, Rsiz, then Xsiz and Ysiz (image width and height on the reference grid).
    struct.pack_into(">II", stream, siz + 6, claimed[1], claimed[0])
    ds, meta = _dicom_header(rows, columns, None, JPEG2000Lossless)
    head, body = _dicom_bytes(ds, meta)
    value = encapsulate([bytes(stream)])
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    path.write_bytes(head + body + element + value + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return path


def nifti_gz(path: Path, shape: tuple[int, ...], *, full: bool = False, garbage_after: int | None = None,
             version: int = 1) -> Path:
    """gzipped NIfTI-``version`` (1, or 2 for dimensions over 32767), int16, claiming ``shape``. ``full``:
    every (zero) voxel is in the stream, else a token 64 bytes; ``garbage_after``: the stream holds that
    many bytes of (zero) voxels, then turns to bytes that are not deflate data (a reader that inflates that
    far fails)."""
    import nibabel as nib

    header = nib.Nifti1Header() if version == 1 else nib.Nifti2Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = len(header.binaryblock) + 4
    raw = header.binaryblock + bytes(4)
    nbytes = garbage_after if garbage_after is not None else 2 * int(np.prod(shape)) if full else 64
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc, size = zlib.crc32(raw), len(raw)
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", comp.compress(raw)]
    for block in _zeros(nbytes):
        parts.append(comp.compress(block))
        crc, size = zlib.crc32(block, crc), size + len(block)
    if garbage_after is not None:
        parts += [comp.flush(zlib.Z_SYNC_FLUSH), b"\xff" * 64]
    else:
        parts += [comp.flush(), struct.pack("<II", crc, size & 0xFFFFFFFF)]
    path.write_bytes(b"".join(parts))
    return path
