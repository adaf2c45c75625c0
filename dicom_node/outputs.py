"""The node's answers for one series, written with highdicom: a Parametric Map, a BINARY Segmentation and a
Comprehensive 3D SR (TID 1500 Measurement Report).

* **Parametric Map** (float32, the source's geometry, one frame per source frame): the normalised anomaly map
  (the pixel operating point's logistic, 0.5 at the pixel threshold, in [0, 1]) when the operating point has a
  normalisation, else the raw map; its Real World Value Mapping says which.
* **Segmentation** (BINARY, one segment "PDD anomaly"): the pixels above the pixel threshold. Its Algorithm
  Identification names the algorithm (``PDD``), its version, the weights' SHA-256 and the precision. Written
  only when an operating point is in force.
* **SR** (Comprehensive 3D, TID 1500): per frame the image-level anomaly score (raw, and normalised when
  calibrated) with the frame it refers to; for the series the highest score and, with an operating point, a
  Finding (normal / abnormal) that references the map and the mask's segment.

All three keep the source's Study Instance UID and patient and study attributes, its Frame of Reference, and
reference the source instances. Their Series and SOP Instance UIDs are derived (:func:`output_uids`) from the
study, the source series and its instances, the model's weights, the precision and the thresholds: inferring
the same series with the same model again gives the same UIDs, so a re-sent result replaces itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_node.series import Series
from pdd.config import atomic_file

__all__ = ["KINDS", "Provenance", "SeriesScores", "output_uids", "write_outputs"]

KINDS = ("pm", "seg", "sr")
# Private codes: coding scheme designators starting with 99 are the standard's private range.
_SCHEME = "99PDD"
ANOMALY_SCORE = Code("ANOMALY_SCORE", _SCHEME, "Anomaly score")
NORMALISED_ANOMALY_SCORE = Code("NORM_ANOMALY", _SCHEME, "Normalised anomaly score")
_NO_UNITS = codes.UCUM.NoUnits
_SERIES_NUMBER_OFFSET = {"pm": 1, "seg": 2, "sr": 3}
_MANUFACTURER = "PDD deployment toolkit"


@dataclass(frozen=True)
class Provenance:
    """What made a result: the algorithm, its weights and precision, and the operating point in force."""

    algorithm: str                  # "PDD" (or "RD4AD")
    version: str                    # the pdd-medad version
    weights_sha256: str             # of the checkpoint file, the fresh model's weights, or the served configs
    source: str                     # e.g. "checkpoint best.pt", "config brain-synth (untrained)"
    precision: str                  # "fp32", ...
    image_threshold: float | None   # raw; None: no operating point, no finding
    pixel_threshold: float | None
    normalised: bool                # the map and scores carry the calibrated normalisation

    def identity(self) -> list[str]:
        """The strings an output UID depends on besides the source series."""
        return [self.algorithm, self.version, self.weights_sha256, self.precision, repr(self.image_threshold),
                repr(self.pixel_threshold)]


@dataclass(frozen=True)
class SeriesScores:
    """A series scored frame by frame, N frames of R x C (the source's geometry).

    ``scores`` float64 (N,) raw image scores; ``normalised`` float32 (N,) or None; ``labels`` bool (N,) or None;
    ``pixel_values`` float32 (N, R, C), what the map stores; ``masks`` bool (N, R, C) or None.
    """

    scores: np.ndarray
    normalised: np.ndarray | None
    labels: np.ndarray | None
    pixel_values: np.ndarray
    masks: np.ndarray | None

    @property
    def series_index(self) -> int:
        """The frame with the highest score: the series' score is its score."""
        return int(np.argmax(self.scores))


def output_uids(series: Series, provenance: Provenance) -> dict[str, str]:
    """``{"pm_series": ..., "pm_instance": ..., "seg_series": ..., ...}``: deterministic, see the module docstring."""
    base = [series.study_uid, series.series_uid, *sorted(series.instance_uids), *provenance.identity()]
    return {f"{kind}_{what}": generate_uid(entropy_srcs=[*base, kind, what])
            for kind in KINDS for what in ("series", "instance")}


def _series_number(series: Series, kind: str) -> int:
    source = int(series.sources[0].get("SeriesNumber", 0) or 0)
    return 1000 * source + _SERIES_NUMBER_OFFSET[kind]


def _description(provenance: Provenance, what: str) -> str:
    text = f"{provenance.algorithm} {what} {provenance.precision} sha256:{provenance.weights_sha256[:12]}"
    return text[:64]


def _equipment(provenance: Provenance) -> dict[str, object]:
    return {"manufacturer": _MANUFACTURER, "manufacturer_model_name": provenance.algorithm,
            "software_versions": [f"pdd-medad {provenance.version}", f"precision {provenance.precision}"],
            "device_serial_number": provenance.weights_sha256[:16]}


def _parametric_map(series: Series, scores: SeriesScores, provenance: Provenance, uids: dict[str, str]) -> Dataset:
    values = scores.pixel_values.astype(np.float32, copy=False)
    if provenance.normalised:
        label, explanation, value_range = "PDD_NORM", "PDD normalised anomaly, 0.5 at the pixel threshold", (0.0, 1.0)
        quantity, window = NORMALISED_ANOMALY_SCORE, (0.5, 1.0)
    else:
        lo, hi = float(values.min()), float(values.max())
        label, explanation = "PDD_RAW", "PDD raw anomaly map (uncalibrated model)"
        value_range = (lo, max(hi, lo + 1e-6))
        quantity, window = ANOMALY_SCORE, ((lo + hi) / 2, max(hi - lo, 1e-6))
    mapping = hd.pm.RealWorldValueMapping(lut_label=label, lut_explanation=explanation, unit=_NO_UNITS,
                                          value_range=value_range, slope=1.0, intercept=0.0,
                                          quantity_definition=quantity)
    pm = hd.pm.ParametricMap(
        source_images=list(series.sources), pixel_array=values,
        series_instance_uid=uids["pm_series"], series_number=_series_number(series, "pm"),
        sop_instance_uid=uids["pm_instance"], instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # LINEAR_EXACT: the window maps [centre - width/2, centre + width/2] onto the display range exactly, for
        # the widths below 1 that a float map needs (LINEAR reads width 1 as a threshold).
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=window[0], window_width=window[1], window_explanation=label,
            voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT)],
        content_label="PDD_ANOMALY", content_description=_description(provenance, "anomaly map"),
        content_qualification=hd.ContentQualificationValues.RESEARCH, **_equipment(provenance))
    pm.SeriesDescription = f"{provenance.algorithm} anomaly map"
    return pm


def _algorithm(provenance: Provenance) -> hd.AlgorithmIdentificationSequence:
    parameters = {"weights_sha256": provenance.weights_sha256, "precision": provenance.precision,
                  "model": provenance.source, "pixel_threshold": repr(provenance.pixel_threshold)}
    return hd.AlgorithmIdentificationSequence(name=provenance.algorithm, family=codes.cid7162.ArtificialIntelligence,
                                              version=provenance.version, source=_MANUFACTURER,
                                              parameters=parameters)


def _segmentation(series: Series, scores: SeriesScores, provenance: Provenance, uids: dict[str, str]) -> Dataset:
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=f"{provenance.algorithm} anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(provenance))
    seg = hd.seg.Segmentation(
        source_images=list(series.sources), pixel_array=scores.masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=uids["seg_series"], series_number=_series_number(series, "seg"),
        sop_instance_uid=uids["seg_instance"], instance_number=1, omit_empty_frames=False,
        content_label="PDD_ANOMALY", content_description=_description(provenance, "anomaly mask"),
        **_equipment(provenance))
    seg.SeriesDescription = f"{provenance.algorithm} anomaly mask"
    return seg


def _measurements(index: int, scores: SeriesScores, provenance: Provenance,
                  derived_from: Sequence[hd.sr.SourceImageForMeasurement] | None = None) -> list[hd.sr.Measurement]:
    """The anomaly score of frame ``index`` (raw, and normalised when calibrated); ``derived_from``: its images."""
    algorithm = hd.sr.AlgorithmIdentification(name=provenance.algorithm, version=provenance.version)
    named = [(ANOMALY_SCORE, float(scores.scores[index]))]
    if scores.normalised is not None and provenance.normalised:
        named.append((NORMALISED_ANOMALY_SCORE, float(scores.normalised[index])))
    return [hd.sr.Measurement(name=name, value=value, unit=_NO_UNITS, algorithm_id=algorithm,
                              referenced_images=derived_from) for name, value in named]


def _finding(label: bool) -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(codes.DCM.Finding, codes.SCT.Abnormal if label else codes.SCT.Normal)]


def _frame_source(series: Series, k: int) -> hd.sr.SourceImageForMeasurementGroup:
    frame = series.frames[k]
    multi = int(frame.dataset.get("NumberOfFrames", 1) or 1) > 1
    return hd.sr.SourceImageForMeasurementGroup.from_source_image(
        frame.dataset, referenced_frame_numbers=[frame.frame + 1] if multi else None)


def _derived_frame(image: Dataset, series: Series, k: int) -> int:
    """The 1-based frame of a derived multi-frame image (the map) made from the series' frame ``k``: highdicom
    orders the frames it writes by position, which need not be the series' order."""
    frame = series.frames[k]
    multi = int(frame.dataset.get("NumberOfFrames", 1) or 1) > 1
    for j, group in enumerate(image.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        if ref.ReferencedSOPInstanceUID == frame.dataset.SOPInstanceUID and (
                not multi or int(ref.ReferencedFrameNumber) == frame.frame + 1):
            return j + 1
    raise ValueError(f"{image.SOPInstanceUID}: no frame derived from {frame.dataset.SOPInstanceUID} frame "
                     f"{frame.frame + 1}")


def _report(series: Series, scores: SeriesScores, provenance: Provenance, uids: dict[str, str],
            pm: Dataset, seg: Dataset | None) -> Dataset:
    algorithm = hd.sr.AlgorithmIdentification(name=provenance.algorithm, version=provenance.version)
    groups: list[object] = []
    for k in range(len(series.frames)):
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"frame {k + 1}",
                                                         uid=generate_uid(entropy_srcs=[uids["sr_instance"], str(k)])),
            measurements=_measurements(k, scores, provenance), algorithm_id=algorithm,
            qualitative_evaluations=None if scores.labels is None else _finding(bool(scores.labels[k])),
            source_images=[_frame_source(series, k)]))
    top = scores.series_index
    series_group = {
        "tracking_identifier": hd.sr.TrackingIdentifier(identifier="series",
                                                        uid=generate_uid(entropy_srcs=[uids["sr_instance"], "series"])),
        # The series' score is read off the map: its measurements reference the Parametric Map's frame.
        "measurements": _measurements(top, scores, provenance, [hd.sr.SourceImageForMeasurement(
            pm.SOPClassUID, pm.SOPInstanceUID, referenced_frame_numbers=[_derived_frame(pm, series, top)])]),
        "algorithm_id": algorithm,
    }
    if seg is not None and scores.labels is not None:
        segment = hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                          segment_number=1,
                                          source_series=hd.sr.SourceSeriesForSegmentation(series.series_uid))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=segment, qualitative_evaluations=_finding(bool(scores.labels.any())),
            **series_group))
    else:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**series_group))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[*provenance.identity(), "device"]), name=provenance.algorithm,
            manufacturer_name=_MANUFACTURER, model_name=f"{provenance.algorithm} {provenance.version}",
            serial_number=provenance.weights_sha256[:16]))
    modality = str(series.sources[0].get("Modality", ""))
    procedure = {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion}.get(
        modality, codes.SCT.ImagingProcedure)
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=procedure, imaging_measurements=groups)
    evidence = [*series.sources, pm] + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=uids["sr_series"],
        series_number=_series_number(series, "sr"), sop_instance_uid=uids["sr_instance"], instance_number=1,
        manufacturer=_MANUFACTURER, is_complete=True)
    sr.SeriesDescription = f"{provenance.algorithm} anomaly report"
    return sr


def _copy_source_attributes(out: Dataset, source: Dataset, kind: str) -> None:
    """What highdicom leaves out and validators want: the source's Body Part Examined (it settles whether the
    General Series' Laterality is needed), and for the map an enhanced source's Frame Anatomy (body part and
    frame laterality) in its shared functional groups."""
    if "BodyPartExamined" in source:
        out.BodyPartExamined = source.BodyPartExamined
    shared = source.get("SharedFunctionalGroupsSequence")
    if kind == "pm" and shared and "FrameAnatomySequence" in shared[0]:
        out.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = shared[0].FrameAnatomySequence


def _save(ds: Dataset, path: Path) -> Path:
    with atomic_file(path) as fh:
        ds.save_as(fh, enforce_file_format=True)
    return path


def write_outputs(series: Series, scores: SeriesScores, provenance: Provenance,
                  out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``pm.dcm``, ``seg.dcm`` (when an operating point is in force) and ``sr.dcm`` to ``out_dir``.

    Each file is written atomically; returns {kind: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    uids = output_uids(series, provenance)
    pm = _parametric_map(series, scores, provenance, uids)
    seg = None if scores.masks is None else _segmentation(series, scores, provenance, uids)
    sr = _report(series, scores, provenance, uids, pm, seg)
    written: dict[str, Path] = {}
    for kind, ds in (("pm", pm), ("seg", seg), ("sr", sr)):
        if ds is not None:
            if kind != "sr":  # the SR Document Series has no Body Part Examined
                _copy_source_attributes(ds, series.sources[0], kind)
            written[kind] = _save(ds, out / f"{kind}.dcm")
    return written


def describe_outputs(paths: Sequence[Path]) -> list[str]:
    """One line per output file: SOP class name and SOP Instance UID (for logs)."""
    import pydicom

    lines = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        lines.append(f"{path.name}: {ds.SOPClassUID.name} {ds.SOPInstanceUID}")
    return lines
