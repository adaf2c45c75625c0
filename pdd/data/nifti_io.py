"""NIfTI volumes (.nii, .nii.gz) -> RAS+ float32 slices in [0, 1], read plane by plane under the decode budget.

:class:`NiftiVolume` reads the header only (nibabel), checks the first volume's X × Y × Z, the slice size
and the decompressed bytes against the :class:`~pdd.data.budget.DecodeBudget`, and then reads the voxels
straight from the (gzip) stream one plane of the file's slowest axis at a time: the volume's claim is never
allocated up front, and a gzip stream is never inflated past the first volume. The robust min/max of the
whole volume (:func:`~pdd.data.intensity.robust_range`) takes two passes over the planes; slices along
the file's own plane axis, in ascending RAS order, are then streamed in a third, so memory is one plane
whatever the depth. Slices along another axis (or a plane axis stored descending) need the whole first
volume in its stored type, which the budget bounds.

Volumes are reoriented to the closest RAS+ axes, so ``axis`` 0/1/2 are sagittal/coronal/axial for any
well-formed file, and each slice is rotated (``np.rot90``) so anterior (axial) or superior (sagittal,
coronal) is at the top of the image.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from .budget import Deadline, DecodeBudget, ImageReadError, TimedReader
from .intensity import apply_range, robust_range

__all__ = ["NiftiVolume", "check_axis"]

_AXES = "0 (sagittal), 1 (coronal) or 2 (axial)"


def check_axis(path: str | Path, axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"{path}: nifti axis must be {_AXES}, got {axis}")


class NiftiVolume:
    """The first volume of a NIfTI file, known from its header; :meth:`slices` reads it plane by plane.

    Raises :class:`ImageReadError` (a :class:`~pdd.data.budget.DecodeBudgetError` for a claim over
    ``budget``) for an unreadable header, an unsupported data type or a volume over the budget.
    """

    def __init__(self, path: Path, budget: DecodeBudget, deadline: Deadline) -> None:
        import nibabel as nib
        from nibabel.filebasedimages import ImageFileError
        from nibabel.orientations import io_orientation
        from nibabel.spatialimages import HeaderDataError, HeaderTypeError
        from nibabel.wrapstruct import WrapStructError

        self.path, self.budget, self.deadline = path, budget, deadline
        self.compressed = path.name.lower().endswith(".gz")
        try:
            # Read through the deadline's reader: a header extension that claims gigabytes costs what the file
            # holds. NIfTI-1 and -2 are told apart by their header size (348 or 540, either byte order).
            with self._open() as fh:
                stream = TimedReader(fh, deadline)
                size = stream.read(4)
                kind = nib.Nifti2Image if size in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nib.Nifti1Image
                stream.seek(0)
                img = kind.from_stream(stream)
                # The array proxy holds what the file's header says about its data (offset, type, scaling).
                proxy = img.dataobj
                shape = tuple(int(s) for s in proxy.shape)
                self.dtype = np.dtype(proxy.dtype)
                self.offset = int(proxy.offset)
                self.slope, self.inter = float(proxy.slope), float(proxy.inter)
                self.ornt = io_orientation(img.affine)
        except ImageReadError:
            raise
        except (ImageFileError, HeaderDataError, HeaderTypeError, WrapStructError, OSError, EOFError, ValueError,
                zlib.error, np.linalg.LinAlgError) as exc:
            raise ImageReadError(path, f"corrupt or truncated NIfTI file ({type(exc).__name__}: {exc})") from None
        if not np.isfinite(self.ornt).all() or sorted(self.ornt[:, 0]) != [0, 1, 2]:
            raise ImageReadError(path, "its affine (sform/qform) maps the voxel axes to no set of RAS axes: the "
                                       "header is corrupt")
        if self.dtype.fields is not None or self.dtype.kind not in "biuf":
            raise ImageReadError(path, f"NIfTI data type {self.dtype} is not supported (expected integers or floats)")
        # 2-D images are one plane; time series and vector volumes: the first volume is the anatomy.
        self.shape = (*shape, 1, 1)[:3] if len(shape) < 3 else shape[:3]
        budget.check_volume(path, self.shape, self.dtype.itemsize)
        if not self.compressed:
            needed = self.offset + int(np.prod(self.shape)) * self.dtype.itemsize
            if path.stat().st_size < needed:
                raise ImageReadError(path, f"corrupt or truncated NIfTI file: its header claims {needed:,} bytes, "
                                           f"the file has {path.stat().st_size:,}")

    def _open(self) -> IO[bytes]:
        return gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")

    def depth(self, axis: int) -> int:
        """Slices along RAS axis ``axis``."""
        return self.shape[self._file_axis(axis)]

    def _file_axis(self, axis: int) -> int:
        return int(np.flatnonzero(self.ornt[:, 0] == axis)[0])

    def planes(self) -> Iterator[np.ndarray]:
        """The file's planes (X, Y) along its third axis, in file order, in the stored type."""
        x, y, z = self.shape
        size = x * y * self.dtype.itemsize
        try:
            with self._open() as fh:
                fh.seek(self.offset)
                for k in range(z):
                    self.deadline.check(f"reading plane {k} of {z}")
                    data = fh.read(size)
                    if len(data) < size:
                        raise ImageReadError(self.path, f"corrupt or truncated NIfTI file: its data ends in plane {k} "
                                                        f"of {z}")
                    yield np.frombuffer(data, self.dtype).reshape((x, y), order="F")
        except (OSError, EOFError, zlib.error) as exc:
            raise ImageReadError(self.path, f"corrupt or truncated NIfTI file ({type(exc).__name__}: {exc})") from None

    def _scaled(self, raw: np.ndarray) -> np.ndarray:
        from nibabel.volumeutils import apply_read_scaling

        return np.asarray(apply_read_scaling(raw, self.slope, self.inter), dtype=np.float32)

    def slices(self, axis: int, indices: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """RAS+ slices along ``axis`` at ``indices`` (all when None; negative counts from the end), float32
        (H, W) in [0, 1] on the robust range of the whole volume."""
        from nibabel.orientations import apply_orientation

        check_axis(self.path, axis)
        rows, columns = (self.shape[self._file_axis(a)] for a in (0, 1, 2) if a != axis)
        self.budget.check_image(self.path, rows, columns, what="slice")
        depth = self.depth(axis)
        wanted = list(range(depth)) if indices is None else list(indices)
        for index in wanted:
            if not -depth <= index < depth:
                raise ValueError(f"{self.path}: slice {index} is out of range, axis {axis} has {depth} slices")
        wanted = [i % depth for i in wanted]
        value_range = robust_range(lambda: (self._scaled(p) for p in self.planes()))
        file_axis = self._file_axis(axis)
        streamed = file_axis == 2 and self.ornt[2, 1] > 0 and wanted == sorted(set(wanted))
        if streamed:
            keep = set(wanted)
            planes = (p for k, p in enumerate(self.planes()) if k in keep)
        else:
            volume = np.empty(self.shape, dtype=self.dtype)
            for k, plane in enumerate(self.planes()):
                volume[:, :, k] = plane
            ras = apply_orientation(volume, self.ornt)
        for index in wanted:
            if streamed:
                plane = apply_orientation(next(planes)[:, :, None], self.ornt)
                section = np.take(plane, 0, axis=axis)
            else:
                section = np.take(ras, index, axis=axis)
            out = np.ascontiguousarray(np.rot90(apply_range(self._scaled(section), value_range)))
            with self.deadline.paused():
                yield out
