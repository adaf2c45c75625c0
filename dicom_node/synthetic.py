"""A synthetic head-CT series for trying the node without patient data: brain-synth slices as CT Image Storage.

Each slice is a brain-synth image (:func:`pdd.data.render_brain_slice`) mapped to Hounsfield units (brain tissue
0–100 HU, air -1000 HU) and written with the attributes a CT scanner writes (patient, study, series, frame of
reference, equipment, image plane, CT image, VOI LUT), axial, 1 mm pixels scaled to the field of view, one slice
every ``slice_mm``. The brain window (centre 50, width 100) shows the slice as brain-synth drew it.

Example::

    >>> paths = write_ct_series("ct", slices=4, image_size=64, seed=0)    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pdd.data.synth import DEFECTS, render_brain_slice

__all__ = ["BRAIN_WINDOW", "FIELD_OF_VIEW_MM", "ct_slice", "write_ct_series"]

BRAIN_WINDOW = (50.0, 100.0)
FIELD_OF_VIEW_MM = 200.0
_INTERCEPT = -1024.0
_AIR_HU = -1000.0
# brain-synth pixels (uint8) below this are background: air in the CT.
_BACKGROUND = 10


def _hounsfield(image: np.ndarray) -> np.ndarray:
    """brain-synth uint8 (S, S) -> HU float (S, S): tissue 0–100 HU, background air."""
    hu = image.astype(np.float64) * (BRAIN_WINDOW[1] / 255.0)
    hu[image < _BACKGROUND] = _AIR_HU
    return hu


def ct_slice(hu: np.ndarray, *, study: Dataset, series_uid: str, frame_of_reference_uid: str, index: int,
             slice_mm: float = 5.0, sop_instance_uid: str | None = None) -> Dataset:
    """One CT Image Storage dataset (with file meta) of HU values ``hu`` (S, S): slice ``index`` of a series.

    ``study`` carries the patient and study attributes (PatientName, PatientID, StudyInstanceUID, ...), copied.
    """
    rows, cols = hu.shape
    ds = Dataset()
    ds.update(study)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid or generate_uid(entropy_srcs=[series_uid, str(index)])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "brain-synth head CT"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "brain-synth"
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = 120
    ds.SliceThickness = slice_mm
    spacing = round(FIELD_OF_VIEW_MM / max(rows, cols), 6)  # a decimal string (DS) holds 16 characters
    ds.PixelSpacing = [spacing, spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, index * slice_mm]
    ds.SliceLocation = index * slice_mm
    stored = np.clip(np.rint(hu - _INTERCEPT), 0, 4095).astype(np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 12)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _INTERCEPT, 1.0, "HU"
    ds.WindowCenter, ds.WindowWidth = BRAIN_WINDOW
    return ds


def _study(seed: int) -> Dataset:
    study = Dataset()
    study.PatientName = "Synth^Brain"
    study.PatientID = f"SYNTH{seed:04d}"
    study.PatientBirthDate = "19700101"
    study.PatientSex = "O"
    study.StudyInstanceUID = generate_uid(entropy_srcs=["brain-synth study", str(seed)])
    study.StudyDate, study.StudyTime = "20240101", "120000"
    study.StudyID = "1"
    study.AccessionNumber = f"ACC{seed:04d}"
    study.ReferringPhysicianName = ""
    return study


def write_ct_series(out_dir: str | os.PathLike, *, slices: int, image_size: int = 512, seed: int = 0,
                    series: int = 0, defects: Sequence[int] = (), slice_mm: float = 5.0) -> list[Path]:
    """Write ``slices`` CT files ``out_dir/slice_0001.dcm`` ... and return their paths.

    ``seed`` picks the study (patient, study UID); ``series`` the series within it; slice k shows a lesion
    (cycling through brain-synth's defects) when k is in ``defects``. Deterministic: the same arguments write
    the same files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = _study(seed)
    series_uid = generate_uid(entropy_srcs=[study.StudyInstanceUID, "series", str(series)])
    frame_of_reference = generate_uid(entropy_srcs=[study.StudyInstanceUID, "frame of reference"])
    paths = []
    for k in range(slices):
        rng = np.random.default_rng(np.random.SeedSequence([seed, series, k]))
        defect = DEFECTS[k % len(DEFECTS)] if k in defects else None
        image, _ = render_brain_slice(rng, image_size=image_size, defect=defect)
        ds = ct_slice(_hounsfield(image), study=study, series_uid=series_uid,
                      frame_of_reference_uid=frame_of_reference, index=k, slice_mm=slice_mm)
        path = out / f"slice_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
