"""``pdd dicom infer``'s outputs: Parametric Map, BINARY Segmentation and TID 1500 SR for a synthetic CT series,
checked against the model run by hand, against the source series, and by dciodvfy (dicom3tools); geometry that
is refused; deterministic UIDs."""

from __future__ import annotations

import dataclasses
import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from dicom_helpers import assert_valid, concept, content_items, referenced_uids
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage, SegmentationStorage

from dicom_node.infer import infer_files
from dicom_node.outputs import output_uids
from dicom_node.scoring import OperatingPoint, SeriesScorer, local_scorer
from dicom_node.series import SeriesRefused, assemble, group_series
from dicom_node.synthetic import ct_slice, write_ct_series
from pdd.calibration import Calibration, fit_operating_point
from pdd.data.readers import read_image, to_model_input
from pdd.predict import ModelPredictor

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 96  # the source's geometry; the model runs at 64², so maps are resized back


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_ct_series(tmp_path_factory.mktemp("ct"), slices=4, image_size=SIZE, defects=[2])


@pytest.fixture(scope="module")
def reference(ct, small_pdd):
    """Scores and maps at the source's geometry, computed here from the readers and the model directly."""
    x = torch.stack([to_model_input(read_image(p), small_pdd.cfg.image_size) for p in ct])
    with torch.inference_mode():
        out = small_pdd(x)
    maps = F.interpolate(out.anomaly_map[:, None].float(), size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False)[:, 0]
    return out.pred_score.double().numpy(), maps.numpy()


@pytest.fixture(scope="module")
def calibration(reference):
    scores, maps = reference
    # Thresholds inside the observed range, so that the series has normal and abnormal frames and pixels.
    image = fit_operating_point(scores, target=0.5, source="the test series")
    pixel = fit_operating_point(maps.ravel(), target=0.02, source="the test series' pixels")
    return Calibration(image, pixel)


def _in_source_order(pm: pydicom.Dataset, ct) -> np.ndarray:
    """The map's frames in the order of the source files (highdicom orders frames by position)."""
    index = {str(pydicom.dcmread(p).SOPInstanceUID): k for k, p in enumerate(ct)}
    order = [index[g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
             for g in pm.PerFrameFunctionalGroupsSequence]
    out = np.empty_like(pm.pixel_array)
    out[order] = pm.pixel_array
    return out


def _seg_in_source_order(path, ct) -> np.ndarray:
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in ct]
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids)[..., 0].astype(bool)


def _scorer(model, point: OperatingPoint) -> SeriesScorer:
    scorer = local_scorer(model, config="test")
    return SeriesScorer(ModelPredictor(model), point,
                        dataclasses.replace(scorer.provenance, image_threshold=point.image_threshold,
                                            pixel_threshold=point.pixel_threshold, normalised=point.normalised),
                        batch_size=3)


@pytest.fixture(scope="module")
def inferred(ct, small_pdd, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    scorer = _scorer(small_pdd, OperatingPoint.resolve(calibration))
    summary = infer_files(scorer, [ct[0].parent], out)
    (record,) = summary["series"]
    files = {kind: pydicom.dcmread(o["file"]) for kind, o in record["outputs"].items()}
    return scorer, record, files


def test_outputs_pass_dciodvfy(inferred):
    _, record, _ = inferred
    assert sorted(record["outputs"]) == ["pm", "seg", "sr"]
    for kind, o in record["outputs"].items():
        warnings = assert_valid(o["file"])
        assert warnings == [], f"{kind}: unexpected dciodvfy warnings {warnings}"


def test_outputs_keep_the_study_and_frame_of_reference(ct, inferred):
    *_, files = inferred
    src = pydicom.dcmread(ct[0])
    assert files["pm"].SOPClassUID == ParametricMapStorage
    assert files["seg"].SOPClassUID == SegmentationStorage
    assert files["sr"].SOPClassUID == Comprehensive3DSRStorage
    for kind, ds in files.items():
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "StudyDate",
                        "AccessionNumber", "StudyID"):
            assert ds[keyword].value == src[keyword].value, (kind, keyword)
        assert ds.SeriesInstanceUID not in (src.SeriesInstanceUID,)
        assert ds.Manufacturer == "PDD deployment toolkit"
        assert referenced_uids(ds) >= {str(pydicom.dcmread(p).SOPInstanceUID) for p in ct}, kind
    for kind in ("pm", "seg"):
        assert files[kind].FrameOfReferenceUID == src.FrameOfReferenceUID
        assert files[kind].BodyPartExamined == "HEAD"
        assert "precision fp32" in files[kind].SoftwareVersions
    assert len({ds.SeriesInstanceUID for ds in files.values()}) == 3


def test_map_and_mask_are_the_model_output_at_the_source_geometry(ct, reference, calibration, inferred):
    _, record, files = inferred
    scores, maps = reference
    point = calibration.pixel
    expected = 1.0 / (1.0 + np.exp(-(maps.astype(np.float64) - point.threshold) / point.scale))
    pm = files["pm"]
    assert pm.pixel_array.shape == (4, SIZE, SIZE)
    # Each frame is derived from one slice and lies at its position (highdicom orders the frames by position).
    slices = {str(ds.SOPInstanceUID): (k, ds.ImagePositionPatient) for k, ds in
              enumerate(pydicom.dcmread(p) for p in ct)}
    for j, group in enumerate(pm.PerFrameFunctionalGroupsSequence):
        k, position = slices[group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert list(group.PlanePositionSequence[0].ImagePositionPatient) == list(position)
        np.testing.assert_allclose(pm.pixel_array[j], expected[k], atol=2e-5)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "PDD_NORM" and "0.5 at the pixel threshold" in mapping.LUTExplanation
    mask = _seg_in_source_order(record["outputs"]["seg"]["file"], ct)
    near = np.abs(maps - point.threshold) < 1e-5 * max(1.0, abs(point.threshold))  # float32 rounding at the edge
    assert np.array_equal(mask[~near], (maps > point.threshold)[~near])
    assert 0 < mask.sum() < mask.size
    np.testing.assert_allclose(record["frame_scores"], scores, rtol=1e-5)
    seg = pydicom.dcmread(record["outputs"]["seg"]["file"])
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "PDD" and algorithm.AlgorithmVersion == "0.1.0"
    parameters = algorithm.AlgorithmParameters
    assert record["provenance"]["weights_sha256"] in parameters and "fp32" in parameters


def test_report_has_the_scores_and_a_finding_that_references_map_and_mask(reference, calibration, inferred):
    _, record, files = inferred
    scores, _ = reference
    sr = files["sr"]
    items = list(content_items(sr))
    raw = [float(i.MeasuredValueSequence[0].NumericValue) for i in items if concept(i) == "Anomaly score"]
    # One score per frame, then the series' (the highest).
    np.testing.assert_allclose(raw, [*scores, scores.max()], rtol=1e-5)
    findings = [str(i.ConceptCodeSequence[0].CodeMeaning) for i in items if concept(i) == "Finding"]
    labels = scores > calibration.image.threshold
    assert findings == [("Abnormal" if lab else "Normal") for lab in labels] + ["Abnormal" if labels.any() else
                                                                                "Normal"]
    assert record["finding"] == ("abnormal" if labels.any() else "normal")
    assert record["abnormal_frames"] == [k + 1 for k in np.flatnonzero(labels)]
    refs = referenced_uids(sr)
    assert files["pm"].SOPInstanceUID in refs and files["seg"].SOPInstanceUID in refs


def test_uids_are_deterministic(ct, small_pdd, calibration, inferred, tmp_path):
    scorer, record, files = inferred
    again = infer_files(scorer, [ct[0].parent], tmp_path)["series"][0]
    assert {k: o["sop_instance_uid"] for k, o in again["outputs"].items()} == \
        {k: o["sop_instance_uid"] for k, o in record["outputs"].items()}
    assert pydicom.dcmread(again["outputs"]["pm"]["file"]).FloatPixelData == files["pm"].FloatPixelData
    series = assemble(next(iter(group_series(ct).values())))
    uids = output_uids(series, scorer.provenance)
    assert uids["pm_instance"] == files["pm"].SOPInstanceUID
    assert output_uids(series, dataclasses.replace(scorer.provenance, precision="fp16")) != uids
    assert output_uids(series, dataclasses.replace(scorer.provenance, weights_sha256="0" * 64)) != uids
    shorter = assemble(next(iter(group_series(ct[:3]).values())))
    assert output_uids(shorter, scorer.provenance)["pm_series"] != uids["pm_series"]


def test_without_an_operating_point_the_map_and_scores_are_written_and_no_finding(ct, small_pdd, reference,
                                                                                   tmp_path):
    summary = infer_files(_scorer(small_pdd, OperatingPoint.resolve(None)), ct, tmp_path)
    (record,) = summary["series"]
    assert sorted(record["outputs"]) == ["pm", "sr"] and record["finding"].startswith("none made")
    for o in record["outputs"].values():
        assert_valid(o["file"])
    pm = pydicom.dcmread(record["outputs"]["pm"]["file"])
    np.testing.assert_allclose(_in_source_order(pm, ct), reference[1], rtol=1e-5, atol=1e-5)
    assert pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel == "PDD_RAW"
    sr = pydicom.dcmread(record["outputs"]["sr"]["file"])
    assert not [i for i in content_items(sr) if concept(i) == "Finding"]
    assert json.loads((tmp_path / "results.json").read_text())["series"][0]["abnormal_frames"] is None


def test_a_hand_set_threshold_makes_a_mask_without_normalisation(ct, small_pdd, reference, tmp_path):
    scores, maps = reference
    t = float(np.median(maps))
    (record,) = infer_files(_scorer(small_pdd, OperatingPoint.resolve(None, float(np.median(scores)), t)), ct,
                            tmp_path)["series"]
    for o in record["outputs"].values():
        assert_valid(o["file"])
    mask = _seg_in_source_order(record["outputs"]["seg"]["file"], ct)
    near = np.abs(maps - t) < 1e-5
    assert np.array_equal(mask[~near], (maps > t)[~near])
    pm = pydicom.dcmread(record["outputs"]["pm"]["file"])
    assert pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel == "PDD_RAW"


def test_a_multi_frame_enhanced_ct_gives_the_same_scores(ct, small_pdd, calibration, inferred, tmp_path):
    _, record, _ = inferred
    legacy = [pydicom.dcmread(p) for p in ct]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=pydicom.uid.generate_uid(), series_number=7,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    summary = infer_files(_scorer(small_pdd, OperatingPoint.resolve(calibration)), [tmp_path / "enhanced.dcm"],
                          tmp_path / "out")
    (multi,) = summary["series"]
    np.testing.assert_allclose(multi["frame_scores"], record["frame_scores"], rtol=1e-5)
    for o in multi["outputs"].values():
        assert_valid(o["file"])
    assert pydicom.dcmread(multi["outputs"]["pm"]["file"]).NumberOfFrames == 4


# --- geometry that is refused ------------------------------------------------------------------------------


def _headers(n: int = 3, size: int = 16, **changes):
    """n CT headers of one series (no files): ``changes`` maps a slice index to a function editing it."""
    study = pydicom.Dataset()
    study.StudyInstanceUID, study.PatientID = "1.2.3", "P"
    out = []
    for k in range(n):
        ds = ct_slice(np.zeros((size, size)), study=study, series_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5",
                      index=k)
        for edit in changes.get(f"s{k}", []) + changes.get("all", []):
            edit(ds)
        out.append((f"slice{k}.dcm", ds))
    return out


@pytest.mark.parametrize("changes, reason", [
    ({"all": [lambda d: setattr(d, "GantryDetectorTilt", 12.0)]}, "gantry tilt of 12°"),
    ({"s1": [lambda d: setattr(d, "ImagePositionPatient", [-98.0, -100.0, 5.0])]}, "do not stack along their normal"),
    ({"s2": [lambda d: setattr(d, "ImagePositionPatient", [-100.0, -100.0, 5.0])]}, "two frames at one position"),
    ({"s1": [lambda d: setattr(d, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1])]}, "mixed orientations"),
    ({"s1": [lambda d: setattr(d, "PixelSpacing", [1.0, 1.0])]}, "mixed pixel spacings"),
    ({"s1": [lambda d: setattr(d, "FrameOfReferenceUID", "1.2.9")]}, "mixed frames of reference"),
    ({"s0": [lambda d: setattr(d, "Rows", 8)]}, "mixed image sizes"),
    ({"s0": [lambda d: delattr(d, "ImagePositionPatient")]}, "lack a patient position"),
])
def test_inconsistent_geometry_is_refused_with_the_reason(changes, reason):
    with pytest.raises(SeriesRefused, match=reason):
        assemble(_headers(**changes))


def test_slices_are_ordered_along_the_normal_and_planar_images_by_instance_number():
    entries = _headers(4)
    shuffled = [entries[k] for k in (2, 0, 3, 1)]
    assert [f.dataset.InstanceNumber for f in assemble(shuffled).frames] == [1, 2, 3, 4]
    planar = _headers(3, all=[lambda d: delattr(d, "ImagePositionPatient")])
    for _, ds in planar:
        del ds.FrameOfReferenceUID
    series = assemble([planar[k] for k in (1, 2, 0)])
    assert not series.volume and [f.dataset.InstanceNumber for f in series.frames] == [1, 2, 3]


# --- the command line ----------------------------------------------------------------------------------------


def test_pdd_dicom_infer_writes_the_three_outputs_per_series(ct, tmp_path, capsys):
    from pdd.cli import main

    argv = ["dicom", "infer", str(ct[0].parent), "--out", str(tmp_path), "--config", "brain-synth", "--set",
            "image_size=64", "--set", "scan_impl=eager", "--threshold", "4.0", "--pixel-threshold", "4.1"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    (record,) = summary["series"]
    assert record["frames"] == 4 and record["finding"] in ("normal", "abnormal")
    assert summary["provenance"]["source"] == "config brain-synth (untrained)"
    assert summary["provenance"]["image_threshold"] == 4.0 and summary["provenance"]["pixel_threshold"] == 4.1
    for kind in ("pm", "seg", "sr"):
        assert_valid(tmp_path / record["series_uid"] / f"{kind}.dcm")
    assert record["abnormal_frames"] == [k + 1 for k, s in enumerate(record["frame_scores"]) if s > 4.0]


def test_pdd_dicom_refuses_a_precision_the_local_model_does_not_run_before_loading_it(ct, tmp_path, capsys):
    from pdd.cli import main

    code = main(["dicom", "infer", str(ct[0]), "--out", str(tmp_path), "--config", "brain-synth",
                 "--precision", "fp16"])
    assert code == 2 and "precision 'fp16' is not available for the local model" in capsys.readouterr().err


def test_the_listener_decodes_every_transfer_syntax_it_accepts():
    from pydicom.pixels import get_decoder

    from dicom_node.scp import TRANSFER_SYNTAXES

    assert [ts.name for ts in TRANSFER_SYNTAXES if not get_decoder(ts).is_available] == []
