"""The decode budget: what a file's header may claim before any of its pixels is decoded, and how long
decoding one file may take.

Every reader in :mod:`pdd.data.readers` takes a :class:`DecodeBudget` (``budget=``; the defaults when none
is given) and checks the file's claim against it from the header alone: the pixels of one image or frame,
the voxels of one volume, the frames of a multi-frame file and the bytes the pixel data takes once
decompressed. A claim over the budget raises :class:`DecodeBudgetError` before anything is allocated for
it; a file that takes longer than ``max_seconds`` raises :class:`DecodeTimeoutError`. Both are
:class:`ImageReadError`, so ``--skip-bad`` counts them like damaged files. The defaults serve real data: a
4096² radiograph twice over, a 512 × 512 × 2000 CT, an enhanced multi-frame series of 4096 frames.

Decompression is never trusted: compressed streams (a deflated DICOM dataset, a gzipped NIfTI) are inflated
a bounded piece at a time (:class:`Inflater`, or a plane at a time) and never beyond what the header
claims, so a stream that inflates to more than its header says is never inflated past that claim.

The time bound is checked wherever the readers get control back: at every read of the encoded file
(:class:`TimedReader`, which Pillow's and pydicom's decoders read through), every inflated piece and every
volume plane. A decoder that works in one call on data already read (a JPEG 2000 frame, a libtiff strip)
is bounded by the pixel budget of its output.

This file runs inside the inference server's preprocess model too (``export/triton_repo.py`` bundles it):
it imports nothing outside the standard library.

Example::

    >>> from pdd.data.readers import DecodeBudget, read_image
    >>> img = read_image("mammogram.dcm", budget=DecodeBudget(max_pixels=6000 * 5000))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "DEFAULT_BUDGET",
    "Deadline",
    "DecodeBudget",
    "DecodeBudgetError",
    "DecodeTimeoutError",
    "ImageReadError",
    "Inflater",
    "TimedReader",
    "check_side",
]


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        # One line, whatever the library below said: errors end up in logs and on terminals.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"cannot read image {self.path}: {self.reason}")


class DecodeBudgetError(ImageReadError):
    """A file's header claims more than the decode budget allows; nothing of it was decoded.

    ``claim``: what the file says (e.g. ``"its header claims 12000 x 12000 = 144,000,000 pixels per image"``);
    ``limit``: the :class:`DecodeBudget` field exceeded (``"max_pixels"``); ``allowed``: its value.
    """

    def __init__(self, path: str | Path, claim: str, limit: str, allowed: int) -> None:
        self.claim, self.limit, self.allowed = claim, limit, allowed
        flag = limit.replace("_", "-")
        super().__init__(path, f"{claim}, over the decode budget's {limit} = {allowed:,} "
                               f"(raise it with --{flag} if the file is genuine)")


class DecodeTimeoutError(ImageReadError):
    """Decoding a file took longer than the decode budget's ``max_seconds``; it was stopped."""


@dataclass(frozen=True)
class DecodeBudget:
    """How much one file may claim and take: checked from its header before any pixel is decoded.

    ``max_pixels``: rows × columns of one 2-D image or frame (default 2²⁵ = 33,554,432: 5792²);
    ``max_voxels``: X × Y × Z of one volume (default 2²⁹ = 536,870,912: 512 × 512 × 2048);
    ``max_frames``: frames of one multi-frame DICOM file (default 4096);
    ``max_bytes``: bytes the pixel data claims once decompressed (all frames of a DICOM file, the first
    volume of a NIfTI file), and the size of a file read whole (default 2³² = 4 GiB: a float32 CT of
    512 × 512 × 2048);
    ``max_seconds``: wall time to decode one file (default 120 s).
    """

    max_pixels: int = 2**25
    max_voxels: int = 2**29
    max_frames: int = 4096
    max_bytes: int = 2**32
    max_seconds: float = 120.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"DecodeBudget.{f.name} must be a positive number, got {value!r}")

    def replace(self, **changes: int | float | None) -> DecodeBudget:
        """This budget with the fields given (None: keep this budget's value), e.g. from command-line options."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check_image(self, name: str | Path, rows: int, columns: int, *, samples: int = 1, bytes_per_sample: float = 1,
                    frames: int = 1, what: str = "image") -> None:
        """Refuse a 2-D image (or ``frames`` of them) whose claimed size is over the budget."""
        rows, columns, frames = int(rows), int(columns), int(frames)
        if rows < 1 or columns < 1:
            raise ImageReadError(name, f"its header claims an empty {what} ({rows} x {columns} pixels)")
        if frames < 1:
            raise ImageReadError(name, f"its header claims {frames} frames")
        if rows * columns > self.max_pixels:
            raise DecodeBudgetError(name, f"its header claims {rows} x {columns} = {rows * columns:,} pixels per "
                                          f"{what}", "max_pixels", self.max_pixels)
        if frames > self.max_frames:
            raise DecodeBudgetError(name, f"its header claims {frames:,} frames", "max_frames", self.max_frames)
        self.check_bytes(name, rows * columns * samples * bytes_per_sample * frames,
                         f"{frames:,} x {rows} x {columns} x {samples} samples")

    def check_volume(self, name: str | Path, shape: tuple[int, ...], bytes_per_voxel: float) -> None:
        """Refuse a volume (X, Y, Z) whose claimed voxel count or decompressed size is over the budget."""
        x, y, z = (int(s) for s in shape)
        if min(x, y, z) < 1:
            raise ImageReadError(name, f"its header claims an empty volume ({x} x {y} x {z} voxels)")
        voxels = x * y * z
        if voxels > self.max_voxels:
            raise DecodeBudgetError(name, f"its header claims a volume of {x} x {y} x {z} = {voxels:,} voxels",
                                    "max_voxels", self.max_voxels)
        self.check_bytes(name, voxels * bytes_per_voxel, f"{x} x {y} x {z} voxels")

    def check_bytes(self, name: str | Path, nbytes: float, of: str) -> None:
        """Refuse ``nbytes`` of decompressed data (``of``: what they hold, for the message)."""
        if nbytes > self.max_bytes:
            raise DecodeBudgetError(name, f"its header claims {int(nbytes):,} bytes of pixel data ({of})", "max_bytes",
                                    self.max_bytes)

    def check_file_size(self, name: str | Path, nbytes: int) -> None:
        """Refuse a file to be read whole that is larger than ``max_bytes``."""
        if nbytes > self.max_bytes:
            raise DecodeBudgetError(name, f"the file is {nbytes:,} bytes", "max_bytes", self.max_bytes)

    def deadline(self, name: str | Path) -> Deadline:
        """The time bound of decoding one file, starting now."""
        return Deadline(name, self.max_seconds)


DEFAULT_BUDGET = DecodeBudget()


def check_side(name: str | Path, rows: int, columns: int, max_side: int | None) -> None:
    """Refuse an image with a side over ``max_side`` (None: no limit); the server's limit for its inputs."""
    if max_side is not None and max(rows, columns) > max_side:
        raise ImageReadError(name, f"the image is {rows}x{columns} pixels; the largest side accepted is {max_side} "
                                   "pixels: downscale it first")


class Deadline:
    """``seconds`` of decoding ``name``, counted from now; :meth:`check` raises :class:`DecodeTimeoutError` after.

    Time spent inside :meth:`paused` does not count: a reader that yields slices one by one pauses while
    its caller works on each.
    """

    def __init__(self, name: str | Path, seconds: float) -> None:
        self.name, self.seconds = name, seconds
        self.end = time.monotonic() + seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.end += time.monotonic() - start

    def check(self, stage: str) -> None:
        if time.monotonic() > self.end:
            raise DecodeTimeoutError(self.name, f"decoding took longer than the decode budget's max_seconds = "
                                                f"{self.seconds:g} s ({stage}); raise it with --max-seconds if "
                                                "the file is genuine")


class TimedReader(io.RawIOBase):
    """A binary file object that checks a :class:`Deadline` at every read: decoders read through it.

    ``read(n)`` reads at most :data:`_READ_PIECE` bytes at a time and returns at the end of the data, so a
    length field that claims gigabytes (a PNG chunk, a TIFF tag, a NIfTI extension) costs what the file
    holds, not what it claims: ``io`` file objects allocate the ``n`` bytes asked for before reading.
    """

    def __init__(self, raw: IO[bytes], deadline: Deadline) -> None:
        super().__init__()
        self.raw, self.deadline = raw, deadline

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        self.deadline.check("reading the file")
        return self.raw.readinto(buffer)

    def read(self, size: int | None = -1) -> bytes:
        parts, left = [], -1 if size is None or size < 0 else size
        while left != 0:
            self.deadline.check("reading the file")
            piece = self.raw.read(_READ_PIECE if left < 0 else min(left, _READ_PIECE))
            if not piece:
                break
            parts.append(piece)
            left = left if left < 0 else left - len(piece)
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


_READ_PIECE = 4 << 20
# Compressed input fed to zlib per call, and the most output taken per call: small enough that a deadline
# check comes every few milliseconds, large enough that the calls cost nothing.
_INFLATE_IN = 1 << 20
_INFLATE_OUT = 4 << 20


class Inflater:
    """A deflate stream inflated a bounded amount at a time: ``fill(n)`` inflates until ``out`` holds n bytes.

    ``data``: the compressed bytes; ``wbits``: zlib's (-15: a raw deflate stream, as DICOM's deflated
    transfer syntax stores it). ``done`` turns true at the end of the stream (or of the data, if truncated).
    """

    def __init__(self, data: bytes, name: str | Path, deadline: Deadline, wbits: int = -zlib.MAX_WBITS) -> None:
        self._data, self._pos = memoryview(data), 0
        self._zlib = zlib.decompressobj(wbits)
        self.name, self.deadline = name, deadline
        self.out = bytearray()
        self.done = False

    def fill(self, size: int) -> bool:
        """Inflate until ``out`` holds ``size`` bytes or the stream ends; whether it holds ``size`` bytes."""
        while len(self.out) < size and not self.done:
            self.deadline.check("inflating")
            source = self._zlib.unconsumed_tail
            if not source:
                source = self._data[self._pos:self._pos + _INFLATE_IN]
                self._pos += len(source)
            try:
                piece = self._zlib.decompress(source, min(_INFLATE_OUT, size - len(self.out)))
            except zlib.error as exc:
                raise ImageReadError(self.name, f"corrupt deflate stream ({exc})") from None
            self.out += piece
            drained = not piece and not self._zlib.unconsumed_tail and self._pos >= len(self._data)
            self.done = self._zlib.eof or drained
        return len(self.out) >= size
