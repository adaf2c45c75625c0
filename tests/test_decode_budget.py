"""The decode budget (pdd/data/budget.py): every class of decode bomb refused from its header, in one line
naming the file, the claim and the limit; compressed streams never inflated past what is needed; the time
bound; raising the limits. The bombs are small files whose headers promise huge images
(benchmarks/hostile_files.py); benchmarks/bombs.py measures time and memory on full-size ones."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import hostile_files as bombs
from pdd.data import MVTecStyleDataset
from pdd.data.budget import Deadline
from pdd.data.readers import (
    DecodeBudget,
    DecodeBudgetError,
    DecodeTimeoutError,
    ImageReadError,
    iter_volume_slices,
    read_header,
    read_image,
    read_image_bytes,
    read_volume_slices,
)

# name: (builder, the budget field exceeded, words of the claim the message must carry)
BOMBS = {
    "png": (lambda d: bombs.png(d / "x.png", 12000, 12000), "max_pixels", "12000 x 12000 = 144,000,000 pixels"),
    "tiff-deflate": (lambda d: bombs.tiff(d / "x.tif", 12000, 12000), "max_pixels", "12000 x 12000"),
    "bmp": (lambda d: bombs.bmp(d / "x.bmp", 12000, 12000), "max_pixels", "12000 x 12000"),
    "jpeg": (lambda d: bombs.jpeg(d / "x.jpg", 9000, 9000), "max_pixels", "9000 x 9000"),
    # Over Pillow's own limit, which Image.open applies before the budget can.
    "jpeg-past-pillow": (lambda d: bombs.jpeg(d / "y.jpg", 60000, 60000), "max_pixels", "more than 178,956,970"),
    "dicom-deflated": (lambda d: bombs.dicom_deflated(d / "x.dcm", 30000, 30000), "max_pixels", "30000 x 30000"),
    "dicom-frames": (lambda d: bombs.dicom_frames(d / "f.dcm", 100_000), "max_frames", "100,000 frames"),
    "dicom-bytes": (lambda d: bombs.dicom_deflated(d / "b.dcm", 1024, 1024, frames=4000), "max_bytes",
                    "8,388,608,000 bytes"),
    "nifti-gz": (lambda d: bombs.nifti_gz(d / "x.nii.gz", (20000, 20000, 4)), "max_voxels",
                 "20000 x 20000 x 4 = 1,600,000,000 voxels"),
    "nifti-depth": (lambda d: bombs.nifti_gz(d / "z.nii.gz", (512, 512, 100_000), version=2), "max_voxels",
                    "512 x 512 x 100000"),
    "nifti-slice": (lambda d: bombs.nifti_gz(d / "s.nii.gz", (20000, 20000, 1)), "max_pixels",
                    "20000 x 20000 = 400,000,000 pixels per slice"),
}


@pytest.mark.parametrize("name", BOMBS)
def test_every_bomb_is_refused_from_its_header_in_one_line(tmp_path, name):
    build, limit, claim = BOMBS[name]
    path = build(tmp_path)
    assert path.stat().st_size < 64 << 10  # the bombs are small files
    with pytest.raises(DecodeBudgetError) as info:
        read_image(path)
    error = info.value
    message = str(error)
    assert "\n" not in message and str(path) in message and claim in message, message
    allowed = getattr(DecodeBudget(), limit)
    assert f"{limit} = {allowed:,}" in message and f"--{limit.replace('_', '-')}" in message
    assert (error.limit, error.allowed) == (limit, allowed) and isinstance(error, ImageReadError)
    if not name.startswith("nifti"):
        # The server's path: the same refusal from the file's bytes, named as the server names them.
        with pytest.raises(DecodeBudgetError, match=r"'images_encoded'\[0\]"):
            read_image_bytes(path.read_bytes(), "'images_encoded'[0]")


def test_a_codestream_that_claims_more_than_its_dicom_header_is_refused(tmp_path):
    """JPEG 2000 frames are checked against the DICOM header before the codec allocates anything."""
    lying = bombs.dicom_jpeg2000(tmp_path / "lie.dcm", 64, 64, claimed=(1000, 1000))
    with pytest.raises(ImageReadError, match=r"lie\.dcm: frame 0's codestream claims 1000 x 1000 pixels, its DICOM "
                                             r"header 64 x 64"):
        read_image(lying)
    huge = bombs.dicom_jpeg2000(tmp_path / "huge.dcm", 64, 64, claimed=(60000, 60000))
    with pytest.raises(ImageReadError, match="codestream claims more than 178,956,970 pixels"):
        read_image(huge)
    honest = bombs.dicom_jpeg2000(tmp_path / "ok.dcm", 64, 64, claimed=(64, 64))
    np.testing.assert_array_equal(read_image(honest), np.zeros((64, 64), np.float32))


def test_deflated_header_elements_are_inflated_only_up_to_a_cap(tmp_path):
    """A ratio bomb: 80 MiB of zeros (80 KB deflated) in a private element before the pixel data."""
    path = bombs.dicom_header_bloat(tmp_path / "bloat.dcm", 80 << 20)
    assert path.stat().st_size < 200 << 10
    with pytest.raises(ImageReadError, match=r"bloat\.dcm: the elements before its pixel data inflate to more than "
                                             r"67,108,864 bytes"):
        read_image(path)
    small = bombs.dicom_header_bloat(tmp_path / "fine.dcm", 1 << 20)
    np.testing.assert_array_equal(read_image(small), np.zeros((64, 64), np.float32))


def test_a_dicom_header_is_read_without_its_pixel_data(tmp_path):
    """read_header: a deflated 12000 x 12000 instance (288 MB of pixels in a 1 MB stream) gives its header at
    the cost of the header; a header that inflates past the cap is refused; a file without a preamble too."""
    path = bombs.dicom_deflated(tmp_path / "big.dcm", 12000, 12000, full=True)
    tracemalloc.start()
    try:
        ds = read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (ds.Rows, ds.Columns) == (12000, 12000) and "PixelData" not in ds
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1.99"
    assert peak < 16 << 20, f"reading the header allocated {peak / 2**20:.0f} MiB"
    with pytest.raises(ImageReadError, match=r"bloat\.dcm: the elements before its pixel data inflate to more"):
        read_header(bombs.dicom_header_bloat(tmp_path / "bloat.dcm", 80 << 20))
    (tmp_path / "plain.dcm").write_bytes(b"\x00" * 200)
    with pytest.raises(ImageReadError, match=r"plain\.dcm: not a DICOM file \(no 'DICM' preamble"):
        read_header(tmp_path / "plain.dcm")


def test_a_deflated_dicom_is_inflated_no_further_than_the_frame_asked_for(tmp_path):
    """The stream turns to garbage halfway through frame 2 of 3: frames 0 and 1 read, frame 2 reaches it."""
    frame = 256 * 256 * 2
    path = bombs.dicom_deflated(tmp_path / "g.dcm", 256, 256, frames=3, garbage_after=2 * frame + frame // 2)
    np.testing.assert_array_equal(read_image(path), np.zeros((256, 256), np.float32))
    np.testing.assert_array_equal(read_image(path, dicom_frame=1), np.zeros((256, 256), np.float32))
    with pytest.raises(ImageReadError, match=r"g\.dcm: corrupt deflate stream"):
        read_image(path, dicom_frame=2)


def test_a_gzipped_nifti_is_inflated_no_further_than_its_first_volume(tmp_path):
    """Four volumes claimed, garbage after two: the first volume reads; garbage inside it is reported."""
    volume = 128 * 128 * 8 * 2
    path = bombs.nifti_gz(tmp_path / "g.nii.gz", (128, 128, 8, 4), garbage_after=2 * volume)
    assert len(read_volume_slices(path)) == 8
    broken = bombs.nifti_gz(tmp_path / "h.nii.gz", (128, 128, 8, 4), garbage_after=volume // 2)
    with pytest.raises(ImageReadError, match=r"h\.nii\.gz: corrupt or truncated NIfTI"):
        read_image(broken)


def test_volume_slices_come_one_at_a_time_and_agree_with_the_list(tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(3).normal(0, 100, (12, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    slices = iter_volume_slices(tmp_path / "v.nii.gz", axis=2)
    assert not isinstance(slices, list)
    first = next(slices)
    listed = read_volume_slices(tmp_path / "v.nii.gz", axis=2)
    np.testing.assert_array_equal(first, listed[0])
    for got, expected in zip(slices, listed[1:], strict=True):
        np.testing.assert_array_equal(got, expected)


def _small_files(tmp_path: Path, write_dicom) -> dict[str, Path]:
    import nibabel as nib

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "a.png")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    return {"png": tmp_path / "a.png", "dicom": write_dicom(tmp_path / "a.dcm", np.arange(64).reshape(8, 8)),
            "deflated": bombs.dicom_deflated(tmp_path / "d.dcm", 64, 64, full=True),
            "nifti": tmp_path / "v.nii.gz"}


@pytest.mark.parametrize("kind", ["png", "dicom", "deflated", "nifti"])
def test_the_time_bound_stops_a_reader_and_says_so(tmp_path, write_dicom, kind):
    """A budget of a nanosecond: every reader checks the clock before its first read and stops."""
    path = _small_files(tmp_path, write_dicom)[kind]
    assert read_image(path).size > 0
    with pytest.raises(DecodeTimeoutError) as info:
        read_image(path, budget=DecodeBudget(max_seconds=1e-9))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "max_seconds = 1e-09 s" in message, message
    assert "--max-seconds" in message and isinstance(info.value, ImageReadError)


def test_the_time_bound_does_not_count_the_callers_time_between_slices():
    deadline = Deadline("v.nii.gz", 0.5)
    with deadline.paused():
        time.sleep(0.6)
    deadline.check("after a pause")
    time.sleep(0.6)
    with pytest.raises(DecodeTimeoutError, match=r"v\.nii\.gz: decoding took longer .* \(reading\)"):
        deadline.check("reading")


def test_raising_and_lowering_the_limits(tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(np.zeros((200, 300), np.uint8)).save(path)
    with pytest.raises(DecodeBudgetError, match="200 x 300 = 60,000 pixels per image, over the decode budget's "
                                                "max_pixels = 50,000"):
        read_image(path, budget=DecodeBudget(max_pixels=50_000))
    assert read_image(path, budget=DecodeBudget(max_pixels=60_000)).shape == (200, 300)
    raised = DecodeBudget().replace(max_pixels=12000 * 12000, max_frames=None)
    assert raised.max_pixels == 144_000_000 and raised.max_frames == DecodeBudget().max_frames
    assert read_image(bombs.png(tmp_path / "wide.png", 6000, 6000, full=True), budget=raised).shape == (6000, 6000)
    for bad in (0, -1, True, "many"):
        with pytest.raises(ValueError, match=r"DecodeBudget\.max_pixels must be a positive number"):
            DecodeBudget(max_pixels=bad)


def test_skip_bad_counts_an_over_budget_file_like_a_damaged_one(tmp_path):
    good = tmp_path / "ds" / "train" / "good"
    good.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(good / "a.png")
    bombs.png(good / "b.png", 12000, 12000)
    with pytest.warns(UserWarning, match="skipping unreadable file"):
        dataset = MVTecStyleDataset(tmp_path / "ds", image_size=32, skip_bad=True)
    assert [s.path.name for s in dataset.samples] == ["a.png"]
    [(path, reason)] = dataset.skipped
    assert path.endswith("b.png") and "max_pixels = 33,554,432" in reason
    strict = MVTecStyleDataset(tmp_path / "ds", image_size=32, budget=DecodeBudget(max_pixels=16 * 16))
    with pytest.raises(DecodeBudgetError, match=r"a\.png: .*32 x 32"):
        strict[0]


def test_pdd_predict_refuses_a_bomb_before_it_builds_a_model(tmp_path, monkeypatch, capsys):
    """The model is built for the first image read: a run whose only file is over the budget fails in the time
    of reading its header, and a good file after it still gets the model."""
    from pdd import checkpoint
    from pdd.cli import main

    built = []
    real = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **kw: built.append(1) or real(*a, **kw))
    bomb = bombs.png(tmp_path / "bomb.png", 12000, 12000)
    assert main(["predict", "--config", "brain-synth", "--set", "image_size=64", str(bomb)]) == 2
    assert built == [] and "bomb.png: its header claims 12000 x 12000" in capsys.readouterr().err
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(good)
    assert main(["predict", "--config", "brain-synth", "--set", "image_size=64", "--threshold", "1", "--skip-bad",
                 str(bomb), str(good)]) == 0
    assert built == [1] and '"scored": 1' in capsys.readouterr().out
