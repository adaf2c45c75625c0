"""Readers (Pillow, DICOM, NIfTI), model-input conversion, datasets and the train/val split."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from torch.utils.data import DataLoader

from pdd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageReadError,
    MetaJsonDataset,
    MVTecStyleDataset,
    read_image,
    read_image_bytes,
    read_mask,
    read_volume_slices,
    robust_normalise,
    split_train_val,
    to_model_input,
)

# ---------------------------------------------------------------------------------------------- helpers


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path)
    return path


def _linear_voi(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, written out case by case."""
    lo, hi = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    out = ((x - (centre - 0.5)) / (width - 1) + 0.5).astype(np.float64)
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, out))


# ---------------------------------------------------------------------------------------------- Pillow


def test_robust_normalise_closed_form_and_constant() -> None:
    # Percentiles of 0..1000 with linear interpolation: 0.5th = 5, 99.5th = 995.
    out = robust_normalise(np.arange(1001, dtype=np.float64))
    assert out.dtype == np.float32
    assert out[[0, 5, 500, 995, 1000]] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0], abs=1e-6)
    const = robust_normalise(np.full((4, 5), 7.0))
    assert not np.isnan(const).any() and np.all(const == 0.0)
    # A single bright pixel on a flat background: percentiles coincide, so exact min/max is used.
    spot = np.zeros((50, 50))
    spot[3, 4] = 9.0
    assert robust_normalise(spot)[3, 4] == 1.0


def test_read_png_8bit_grey_rgb_rgba_palette(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    out = read_image(_png(tmp_path / "g.png", grey))
    assert out.dtype == np.float32 and out.shape == (9, 7)
    np.testing.assert_allclose(out, grey / 255.0, atol=1e-7)

    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    out = read_image(_png(tmp_path / "rgba.png", rgba))
    assert out.shape == (6, 5, 3)
    np.testing.assert_allclose(out, rgba[..., :3] / 255.0, atol=1e-7)

    pal = Image.new("P", (4, 3))
    pal.putpalette([0, 0, 0, 255, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 1] * 3)
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    np.testing.assert_allclose(out[0, 2], np.array([10, 20, 30]) / 255.0, atol=1e-7)
    np.testing.assert_allclose(out[0, 1], [1.0, 0.0, 0.0], atol=1e-7)

    la = np.stack([grey, np.full_like(grey, 128)], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png"), grey / 255.0, atol=1e-7)


def test_read_16bit_png_and_float_tiff_use_robust_range(tmp_path: Path) -> None:
    values = (np.arange(1001, dtype=np.uint16) * 4)[:1000].reshape(40, 25)
    out = read_image(_png(tmp_path / "x16.png", values))
    np.testing.assert_allclose(out, robust_normalise(values.astype(np.float64)), atol=1e-6)
    # 12-bit data in a 16-bit container still spans [0, 1].
    assert out.min() == 0.0 and out.max() == 1.0

    floats = np.linspace(-3.0, 5.0, 1001, dtype=np.float32)[:1000].reshape(40, 25)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    np.testing.assert_allclose(read_image(tmp_path / "f.tif"), robust_normalise(floats), atol=1e-6)


def test_read_jpeg_and_bmp(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "r.jpg", quality=95)
    np.testing.assert_allclose(read_image(tmp_path / "r.jpg"), ramp / 255.0, atol=4 / 255)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    np.testing.assert_allclose(read_image(tmp_path / "c.bmp"), rgb / 255.0, atol=1e-7)


def test_unreadable_files_raise_image_read_error(tmp_path: Path) -> None:
    good = _png(tmp_path / "ok.png", np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all" * 20)
    (tmp_path / "empty.png").write_bytes(b"")
    for name, reason in [
        ("cut.png", "truncated"),
        ("junk.png", "unrecognised image format"),
        ("empty.png", "empty"),
        ("missing.png", "not found"),
    ]:
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(tmp_path / name)
        assert name in str(info.value) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------- DICOM


def test_dicom_rescale_and_first_of_multi_valued_window(tmp_path: Path, write_dicom) -> None:
    stored = np.array([[0, 1000, 1040, 1064], [1100, 1500, 3000, 4095]])
    path = write_dicom(tmp_path / "ct.dcm", stored, centre=[40.0, 400.0], width=[80.0, 2000.0])
    hu = stored - 1024.0
    np.testing.assert_allclose(read_image(path), _linear_voi(hu, 40.0, 80.0), atol=1e-6)
    # Spot values: HU 16 -> (16 − 39.5)/79 + 0.5 = 0.20253.
    assert read_image(path)[0, 2] == pytest.approx(0.2025316, abs=1e-6)
    np.testing.assert_allclose(
        read_image(path, dicom_window=(400.0, 2000.0)), _linear_voi(hu, 400.0, 2000.0), atol=1e-6
    )
    np.testing.assert_array_equal(read_image(path, dicom_window=(16.0, 1.0)), hu > 15.5)
    with pytest.raises(ValueError, match="width must be >= 1"):
        read_image(path, dicom_window=(40.0, 0.5))


def test_dicom_slope_no_window_and_monochrome1(tmp_path: Path, write_dicom) -> None:
    stored = np.arange(1001).reshape(7, 143)
    path = write_dicom(tmp_path / "a.dcm", stored, slope=2.0, intercept=-100.0)
    np.testing.assert_allclose(read_image(path), robust_normalise(stored * 2.0 - 100.0), atol=1e-6)
    inv = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", centre=[500.0], width=[1000.0])
    expected = 1.0 - _linear_voi(stored - 1024.0, 500.0, 1000.0)
    np.testing.assert_allclose(read_image(inv), expected, atol=1e-6)


def test_dicom_multiframe_picks_frame(tmp_path: Path, write_dicom) -> None:
    frames = np.stack([np.full((4, 4), 1024), np.full((4, 4), 1064), np.full((4, 4), 1200)])
    path = write_dicom(tmp_path / "mf.dcm", frames, centre=[40.0], width=[80.0])
    assert read_image(path)[0, 0] == pytest.approx(0.0, abs=1e-6)  # HU 0 is just below the window
    assert read_image(path, dicom_frame=1)[0, 0] == pytest.approx(_linear_voi(np.array(40.0), 40, 80), abs=1e-6)
    assert read_image(path, dicom_frame=-1)[0, 0] == 1.0
    with pytest.raises(ValueError, match="3 frames"):
        read_image(path, dicom_frame=3)


def test_broken_dicom_files(tmp_path: Path, write_dicom) -> None:
    path = write_dicom(tmp_path / "ok.dcm", np.full((64, 64), 500))
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError, match=r"cut\.dcm.*pixel data"):
        read_image(tmp_path / "cut.dcm")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.PatientName = "Nobody"
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(tmp_path / "nopix.dcm")


def test_read_image_bytes_decodes_as_read_image(tmp_path: Path, write_dicom) -> None:
    """The bytes of a file (what the server receives) read exactly as the file does, DICOM options included."""
    stored = np.arange(1200).reshape(30, 40) * 3
    ct = write_dicom(tmp_path / "ct.dcm", stored, slope=0.5, intercept=-300.0, centre=[100.0], width=[500.0])
    mono1 = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", slope=2.0, intercept=-100.0)
    deep = _png(tmp_path / "deep.png", (np.arange(600).reshape(20, 30) * 97).astype(np.uint16))
    for path, window in ((ct, None), (ct, (50.0, 80.0)), (mono1, None), (deep, None)):
        np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), dicom_window=window),
                                      read_image(path, dicom_window=window))
    # Windowed DICOM: the linear VOI of the rescaled values (HU = stored / 2 − 300).
    np.testing.assert_allclose(read_image_bytes(ct.read_bytes()), _linear_voi(stored * 0.5 - 300.0, 100.0, 500.0),
                               atol=1e-6)


def test_read_image_bytes_refusals_name_the_data(tmp_path: Path, write_dicom) -> None:
    big = write_dicom(tmp_path / "big.dcm", np.zeros((8, 70)))
    small = write_dicom(tmp_path / "small.dcm", np.zeros((8, 8)))
    cases = [(b"", "file is empty"), (b"%PDF-1.4 not an image", "unrecognised image format"),
             (small.read_bytes()[:-100], "pixel data"), (big.read_bytes(), "largest side accepted is 64")]
    for data, phrase in cases:
        with pytest.raises(ImageReadError, match=rf"cannot read image upload\[3\]: .*{phrase}"):
            read_image_bytes(data, "upload[3]", max_side=64)
    wide = _png(tmp_path / "wide.png", np.zeros((4, 65), np.uint8))
    with pytest.raises(ImageReadError, match="is 4x65 pixels"):
        read_image_bytes(wide.read_bytes(), max_side=64)


def test_readers_run_without_torch(tmp_path: Path, write_dicom) -> None:
    """The server's preprocess runs the bundled readers in an environment without torch (or this package)."""
    import shutil
    import subprocess
    import sys

    import pdd.data.readers as readers

    version = tmp_path / "1"
    (version / "readers").mkdir(parents=True)
    for name in readers.BUNDLE:
        shutil.copy2(Path(readers.__file__).parent / name, version / "readers" / name)
    path = write_dicom(tmp_path / "ct.dcm", np.arange(64).reshape(8, 8) * 40, centre=[40.0], width=[400.0])
    template = Path(__file__).resolve().parents[1] / "export" / "triton_models" / "preprocess.py"
    # The preprocess model's own loader, with a stand-in for the module only Triton provides.
    code = ("import importlib.util, sys, types; sys.modules['torch'] = None; sys.modules['pdd'] = None; "
            "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils'); "
            f"spec = importlib.util.spec_from_file_location('preprocess', {str(template)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"r = m.load_readers(__import__('pathlib').Path({str(version)!r})); "
            f"print(float(r.read_image_bytes(open({str(path)!r}, 'rb').read()).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(float(read_image(path).sum()), rel=1e-6)


# ---------------------------------------------------------------------------------------------- NIfTI


def _volume() -> np.ndarray:
    """(X, Y, Z) = (6, 5, 4) volume with a distinct value per voxel, laid out in RAS order."""
    return np.arange(120, dtype=np.float32).reshape(6, 5, 4)


def test_nifti_slices_are_reoriented_to_ras(tmp_path: Path) -> None:
    vol = _volume()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "ras.nii")
    # Same anatomy stored left-to-right (LAS): x axis flipped in the array and in the affine.
    las_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    las_affine[0, 3] = 5.0
    nib.save(nib.Nifti1Image(vol[::-1].copy(), las_affine), tmp_path / "las.nii.gz")
    norm = robust_normalise(vol)
    for name in ("ras.nii", "las.nii.gz"):
        slices = read_volume_slices(tmp_path / name, axis=2)
        assert len(slices) == 4
        for k, sl in enumerate(slices):
            np.testing.assert_allclose(sl, np.rot90(norm[:, :, k]), atol=1e-6)
        np.testing.assert_allclose(read_image(tmp_path / name, nifti_slice=1), slices[1], atol=0)
    # Default: the middle slice; other axes.
    np.testing.assert_allclose(read_image(tmp_path / "ras.nii"), np.rot90(norm[:, :, 2]), atol=1e-6)
    sag = read_volume_slices(tmp_path / "las.nii.gz", axis=0, slices=[0, 5])
    np.testing.assert_allclose(sag[1], np.rot90(norm[5]), atol=1e-6)
    with pytest.raises(ValueError, match="slice 4 is out of range"):
        read_image(tmp_path / "ras.nii", nifti_slice=4)


def test_nifti_4d_first_volume_and_truncated(tmp_path: Path) -> None:
    vol4 = np.stack([_volume(), -_volume()], axis=-1)
    nib.save(nib.Nifti1Image(vol4, np.eye(4)), tmp_path / "t.nii.gz")
    np.testing.assert_allclose(
        read_image(tmp_path / "t.nii.gz", nifti_slice=0), np.rot90(robust_normalise(_volume())[:, :, 0]), atol=1e-6
    )
    big = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(big, np.eye(4)), tmp_path / "big.nii.gz")
    data = (tmp_path / "big.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz.*corrupt or truncated NIfTI"):
        read_image(tmp_path / "cut.nii.gz")
    raw = gzip.decompress(data)
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.nii"):
        read_volume_slices(tmp_path / "cut.nii")


# ---------------------------------------------------------------------------------------------- model input, masks


def test_to_model_input_normalises_and_replicates() -> None:
    x = to_model_input(np.full((10, 12), 0.5, np.float32), 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(x[c], torch.full((8, 8), (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-6)
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 1] = 1.0
    y = to_model_input(rgb, 4)
    assert y[1, 0, 0].item() == pytest.approx((1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1], abs=1e-6)
    with pytest.raises(ValueError, match="float image"):
        to_model_input(np.zeros((4, 4), np.uint8), 4)


def test_to_model_input_antialiases_when_shrinking() -> None:
    # A one-pixel checkerboard shrunk 4x must average to grey, not alias to black or white.
    board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    x = to_model_input(board, 16)
    grey = (0.5 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(x[0, 2:-2, 2:-2], torch.full((12, 12), grey), atol=1e-5)


def test_read_mask_binary_and_resized(tmp_path: Path) -> None:
    m = np.zeros((8, 8), np.uint8)
    m[0:4, 0:4] = 255
    m[7, 7] = 1  # any non-zero value is anomalous
    path = _png(tmp_path / "m.png", m)
    full = read_mask(path)
    assert full.dtype == bool and full.sum() == 17
    small = read_mask(path, 4)
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True  # the lone pixel is a minority of its 2x2 block
    np.testing.assert_array_equal(small, expected)
    with pytest.raises(ImageReadError, match=r"nope\.png"):
        read_mask(tmp_path / "nope.png", 4)


# ---------------------------------------------------------------------------------------------- datasets


def _mvtec_tree(root: Path) -> None:
    rng = np.random.default_rng(0)

    def img() -> np.ndarray:
        return rng.integers(0, 256, (20, 20), dtype=np.uint8)

    for i in (2, 0, 1):
        _png(root / "train" / "good" / f"{i:03d}.png", img())
    _png(root / "test" / "good" / "000.png", img())
    _png(root / "test" / "tumour" / "000.png", img())
    _png(root / "test" / "tumour" / "001.png", img())
    _png(root / "test" / "bleed" / "000.png", img())
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:10] = 255
    _png(root / "ground_truth" / "tumour" / "000_mask.png", mask)
    _png(root / "ground_truth" / "bleed" / "000.png", mask)
    (root / "train" / "good" / "notes.txt").write_text("ignored")


def test_mvtec_dataset_items_and_order(tmp_path: Path) -> None:
    root = tmp_path / "brain"
    _mvtec_tree(root)
    train = MVTecStyleDataset(root, "train", image_size=16)
    assert [Path(s.path).name for s in train.samples] == ["000.png", "001.png", "002.png"]
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"] == 0 and item["has_mask"] is False and item["class_name"] == "brain"
    assert item["mask"].shape == (1, 16, 16) and item["mask"].sum() == 0

    test = MVTecStyleDataset(root, "test", image_size=10)
    got = [(s.defect, Path(s.path).name, s.label, s.mask_path is not None) for s in test.samples]
    assert got == [
        ("bleed", "000.png", 1, True),
        ("good", "000.png", 0, False),
        ("tumour", "000.png", 1, True),
        ("tumour", "001.png", 1, False),
    ]
    m = test[0]["mask"]
    assert m.shape == (1, 10, 10) and m.dtype == torch.float32
    # Rows 5:15 and cols 5:10 of 20 become rows 2.5:7.5 and cols 2.5:5 of 10 (majority vote at the edges).
    assert m.sum().item() == pytest.approx(15.0, abs=5.0)
    assert test[3]["has_mask"] is False and test[3]["mask"].sum() == 0
    batch = next(iter(DataLoader(test, batch_size=4)))
    assert batch["image"].shape == (4, 3, 10, 10) and batch["label"].tolist() == [1, 0, 1, 1]


def test_mvtec_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train"):
        MVTecStyleDataset(tmp_path, "train")
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        MVTecStyleDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        MVTecStyleDataset(tmp_path, "validation")


def test_skip_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _mvtec_tree(root)
    (root / "train" / "good" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.warns(UserWarning, match=r"001\.png"):
        ds = MVTecStyleDataset(root, "train", image_size=8, skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 1 and ds.skipped[0][0].endswith("001.png")
    strict = MVTecStyleDataset(root, "train", image_size=8)
    strict[0]
    with pytest.raises(ImageReadError, match=r"001\.png"):
        strict[1]


def _meta_tree(root: Path) -> None:
    _mvtec_tree(root / "brain")
    _mvtec_tree(root / "chest")

    def entries(cls: str, split: str) -> list[dict]:
        out = []
        for p in sorted((root / cls / split).rglob("*.png")):
            rel = p.relative_to(root).as_posix()
            anomalous = p.parent.name != "good"
            gt = root / cls / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
            mask = gt.relative_to(root).as_posix() if anomalous and gt.exists() else ""
            out.append(
                {
                    "img_path": rel,
                    "mask_path": mask,
                    "cls_name": cls,
                    "specie_name": p.parent.name,
                    "anomaly": int(anomalous),
                }
            )
        return out

    meta = {s: {c: entries(c, s) for c in ("chest", "brain")} for s in ("train", "test")}
    (root / "meta.json").write_text(json.dumps(meta))


def test_meta_json_dataset(tmp_path: Path) -> None:
    _meta_tree(tmp_path)
    both = MetaJsonDataset(tmp_path, split="test", image_size=12)
    assert both.class_names == ["brain", "chest"] and len(both) == 8
    item = both[2]
    assert item["class_name"] == "brain" and item["label"] == 1 and item["has_mask"] is True
    assert item["mask"].sum() > 0
    chest = MetaJsonDataset(tmp_path, split="train", class_names=["chest"])
    assert len(chest) == 3 and {s.class_name for s in chest.samples} == {"chest"}
    with pytest.raises(ValueError, match=r"classes \['liver'\] are not in the 'test' split"):
        MetaJsonDataset(tmp_path, split="test", class_names=["liver"])
    with pytest.raises(FileNotFoundError, match=r"other\.json"):
        MetaJsonDataset(tmp_path, meta="other.json")


def test_split_train_val_is_deterministic_and_per_class(tmp_path: Path) -> None:
    _meta_tree(tmp_path)
    ds = MetaJsonDataset(tmp_path, split="train")
    train, val = split_train_val(ds, 0.34, seed=7)
    train2, val2 = split_train_val(ds, 0.34, seed=7)
    assert train.indices == train2.indices and val.indices == val2.indices
    assert sorted(train.indices + val.indices) == list(range(6))
    assert [ds.samples[i].class_name for i in val.indices] == ["brain", "chest"]
    picks = {tuple(split_train_val(ds, 0.34, seed=s)[1].indices) for s in range(20)}
    assert len(picks) > 1  # the seed matters
    with pytest.raises(ValueError, match="normal training images only"):
        split_train_val(MetaJsonDataset(tmp_path, split="test"), 0.2)


def test_no_warning_for_clean_dataset(tmp_path: Path) -> None:
    _mvtec_tree(tmp_path / "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = MVTecStyleDataset(tmp_path / "x", "test", skip_bad=True)
    assert ds.skipped == []
