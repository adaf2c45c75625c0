"""A DICOM series as the node infers it: instance headers grouped by study and series, frames in slice order,
geometry checked.

A series is either a **volume** (every frame has a Frame of Reference, orientation and position: CT, MR,
enhanced multi-frame CT/MR) or a set of **planar images** without patient geometry (CR/DX, Secondary
Capture): both are scored frame by frame. What is not guessed, and refused with a :class:`SeriesRefused`
naming the reason: frames of different sizes, a mix of volume and planar images, different orientations,
pixel spacings or frames of reference, gantry tilt (the tag, or positions that do not stack along the slice
normal), two frames at one position, several multi-frame files in one series.

Pixel data is never decoded here: :func:`read_frame` decodes one frame through ``pdd/data/readers.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from pdd.data import readers
from pdd.data.readers import ImageReadError, read_image

__all__ = ["Frame", "Series", "SeriesRefused", "assemble", "group_series", "read_frame", "read_header"]

log = logging.getLogger(__name__)

# Direction cosines agree to this (unit vectors), positions to this fraction of the pixel spacing.
_COSINE_TOLERANCE = 1e-4
_POSITION_TOLERANCE = 0.01


class SeriesRefused(ValueError):
    """A series the node does not infer (inconsistent geometry, mixed sizes, ...); the message says why."""


@dataclass(frozen=True)
class Frame:
    """One 2-D frame to score: ``frame`` of the file ``path`` (0 for single-frame files)."""

    path: Path
    frame: int
    dataset: Dataset   # the file's header (no pixel data), shared by the frames of a multi-frame file


@dataclass(frozen=True)
class Series:
    """The frames of one series in slice order, and the headers they come from (the outputs' sources)."""

    study_uid: str
    series_uid: str
    frames: tuple[Frame, ...]
    sources: tuple[Dataset, ...]   # one header per file, in the order of ``frames``
    volume: bool                   # True: patient geometry (positions, orientation); False: planar images

    @property
    def rows(self) -> int:
        return int(self.sources[0].Rows)

    @property
    def columns(self) -> int:
        return int(self.sources[0].Columns)

    @property
    def instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.sources]

    def describe(self) -> str:
        head = self.sources[0]
        kind = "volume" if self.volume else "planar images"
        return (f"series {self.series_uid} ({getattr(head, 'Modality', '?')}, {len(self.frames)} frames of "
                f"{self.rows}x{self.columns}, {kind})")


def read_header(path: str | Path) -> Dataset:
    """The header of a DICOM file (everything but the pixel data), read under the decode budget: a deflated
    instance is inflated no further than its header; :class:`ImageReadError` if unreadable."""
    return readers.read_header(path)


def read_frame(frame: Frame, dicom_window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode one frame through the project's readers: float32 (H, W) or (H, W, 3) in [0, 1]."""
    return read_image(frame.path, dicom_window=dicom_window, dicom_frame=frame.frame)


def group_series(paths: Iterable[str | Path], skipped: list[dict[str, str]] | None = None
                 ) -> dict[tuple[str, str], list[tuple[Path, Dataset]]]:
    """Headers of ``paths`` grouped by (Study Instance UID, Series Instance UID).

    An unreadable file, or one without the UIDs and size, raises :class:`ImageReadError` naming it; when a
    ``skipped`` list is given it is logged and appended there instead (``{"path", "reason"}``).
    """
    groups: dict[tuple[str, str], list[tuple[Path, Dataset]]] = {}
    for path in paths:
        try:
            ds = read_header(path)
            missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns")
                       if k not in ds]
            if missing:
                raise ImageReadError(path, f"the DICOM header lacks {', '.join(missing)}")
        except ImageReadError as exc:
            if skipped is None:
                raise
            log.warning("skipping unreadable file %s: %s", exc.path, exc.reason)
            skipped.append({"path": exc.path, "reason": exc.reason})
            continue
        groups.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), []).append((Path(path), ds))
    return groups


def _functional(ds: Dataset, frame: int, sequence: str, keyword: str) -> object | None:
    """An attribute of an enhanced multi-frame file's frame (per-frame group first, then the shared one)."""
    for groups_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups is None or index >= len(groups):
            continue
        items = groups[index].get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None


def _plane(ds: Dataset, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(orientation (6,), position (3,), spacing (2,)) of a frame, None for an image without patient geometry."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        orientation = _functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        position = _functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
        spacing = _functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    else:
        orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        spacing = ds.get("PixelSpacing")
    if orientation is None or position is None or "FrameOfReferenceUID" not in ds:
        return None
    if spacing is None:
        raise SeriesRefused(f"{ds.SOPInstanceUID}: an image with a patient position but no pixel spacing")
    return (np.asarray(orientation, dtype=np.float64), np.asarray(position, dtype=np.float64),
            np.asarray(spacing, dtype=np.float64))


def _frames(entries: Sequence[tuple[Path, Dataset]]) -> list[Frame]:
    frames = []
    for path, ds in entries:
        count = int(ds.get("NumberOfFrames", 1) or 1)
        frames += [Frame(path, k, ds) for k in range(count)]
    return frames


def _check_same(what: str, values: Sequence[object]) -> None:
    distinct = sorted({str(v) for v in values})
    if len(distinct) > 1:
        raise SeriesRefused(f"mixed {what}: {', '.join(distinct[:4])}")


def _order_volume(frames: list[Frame], planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[Frame]:
    """Frames sorted along the slice normal, after checking that they form one untilted stack."""
    orientation, _, spacing = planes[0]
    for o, _, s in planes[1:]:
        if not np.allclose(o, orientation, atol=_COSINE_TOLERANCE):
            raise SeriesRefused(f"mixed orientations: {orientation.round(4).tolist()} and {o.round(4).tolist()}")
        if not np.allclose(s, spacing, rtol=1e-4):
            raise SeriesRefused(f"mixed pixel spacings: {spacing.tolist()} and {s.tolist()} mm")
    _check_same("frames of reference", [f.dataset.FrameOfReferenceUID for f in frames])
    tilts = {float(f.dataset.get("GantryDetectorTilt", 0) or 0) for f in frames}
    if any(abs(t) > 1e-3 for t in tilts):
        raise SeriesRefused(f"gantry tilt of {max(tilts, key=abs):g}°: the slices are sheared, resample the "
                            "series without tilt first")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.stack([p for _, p, _ in planes])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    tolerance = _POSITION_TOLERANCE * float(spacing.min())
    if len(steps) and np.any(np.abs(along) <= tolerance):
        k = int(np.flatnonzero(np.abs(along) <= tolerance)[0])
        raise SeriesRefused(f"two frames at one position {positions[k].round(3).tolist()}: a duplicate or a "
                            "second stack in the series")
    sideways = np.linalg.norm(steps - along[:, None] * normal[None], axis=1)
    if len(steps) and sideways.max() > tolerance:
        raise SeriesRefused(f"the slices do not stack along their normal (offset {sideways.max():.3g} mm "
                            "sideways between neighbours): gantry tilt or an irregular series")
    return [frames[i] for i in order]


def assemble(entries: Sequence[tuple[Path, Dataset]]) -> Series:
    """One series from its files' headers (as :func:`group_series` returns them), or :class:`SeriesRefused`."""
    if not entries:
        raise SeriesRefused("no instances")
    heads = [ds for _, ds in entries]
    _check_same("study instance UIDs", [ds.StudyInstanceUID for ds in heads])
    _check_same("series instance UIDs", [ds.SeriesInstanceUID for ds in heads])
    _check_same("image sizes", [f"{ds.Rows}x{ds.Columns}" for ds in heads])
    _check_same("samples per pixel", [ds.get("SamplesPerPixel", 1) for ds in heads])
    uids = [str(ds.SOPInstanceUID) for ds in heads]
    if len(set(uids)) != len(uids):
        raise SeriesRefused("the same SOP Instance UID twice")
    multi = [ds for ds in heads if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi and len(heads) > 1:
        raise SeriesRefused(f"{len(multi)} multi-frame file(s) among {len(heads)} files: one multi-frame file "
                            "per series, or single-frame files only")
    frames = _frames(entries)
    planes = [_plane(f.dataset, f.frame) for f in frames]
    located = [p is not None for p in planes]
    if any(located) and not all(located):
        raise SeriesRefused(f"{located.count(False)} of {len(frames)} frames lack a patient position or frame of "
                            "reference while the others have one")
    volume = all(located)
    if volume:
        frames = _order_volume(frames, planes)  # type: ignore[arg-type]
    else:
        frames.sort(key=lambda f: (int(f.dataset.get("InstanceNumber", 0) or 0), f.frame))
    sources: list[Dataset] = []
    for f in frames:
        if not any(f.dataset is s for s in sources):
            sources.append(f.dataset)
    return Series(str(heads[0].StudyInstanceUID), str(heads[0].SeriesInstanceUID), tuple(frames), tuple(sources),
                  volume)
