"""brain-synth: offline template, lesion appearance and masks, deterministic files, dataset round trip."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pdd.data import DEFECTS, MVTecStyleDataset, generate_brain_synth, load_brain_template, render_brain_slice


def test_template_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    template = load_brain_template.__wrapped__()
    assert template.t1.shape == template.gm.shape == template.wm.shape == template.brain.shape
    assert 0.0 <= template.t1.min() and template.t1.max() <= 1.0
    lo, hi = template.z_range
    # The cerebrum spans roughly 80-100 mm of the 1 mm template's axial extent.
    assert 0 < lo < hi < template.t1.shape[2] - 1 and 60 <= hi - lo <= 120


def _ring(img: np.ndarray, mask: np.ndarray, inner: int = 2, outer: int = 6) -> np.ndarray:
    """Brain pixels 2-6 px around the mask (infarcts reach the cortex, so the ring must skip the background)."""
    head = ndimage.binary_fill_holes(ndimage.gaussian_filter(img.astype(float), 1.0) > 30)
    ring = ndimage.binary_dilation(mask, iterations=outer) & ~ndimage.binary_dilation(mask, iterations=inner)
    return ring & head


def test_normal_slice_looks_like_a_brain() -> None:
    img, mask = render_brain_slice(np.random.default_rng(0), image_size=128)
    assert img.dtype == np.uint8 and img.shape == (128, 128) and not mask.any()
    # Dark background (Rayleigh noise only) around a bright, centred brain.
    assert img[:10, :10].mean() < 15
    head = img > 60
    assert 0.25 < head.mean() < 0.7
    cy, cx = np.argwhere(head).mean(axis=0)
    assert abs(cy - 64) < 12 and abs(cx - 64) < 12


@pytest.mark.parametrize("defect", DEFECTS)
def test_lesions_are_masked_inside_the_brain(defect: str) -> None:
    for seed in range(4):
        img, mask = render_brain_slice(np.random.default_rng(seed), image_size=128, defect=defect)
        area = mask.mean()
        assert 0.002 < area < 0.12, f"{defect} seed {seed}: mask covers {area:.4f} of the image"
        # Inside the head: no masked pixel is background.
        assert np.percentile(img[mask], 5) > 25


@pytest.mark.parametrize(
    ("defect", "contrast", "sign"),
    [("haemorrhage", "t1", 1), ("haemorrhage", "flair", 1), ("infarct", "t1", -1), ("infarct", "t2", 1)],
)
def test_lesion_signal_follows_contrast(defect: str, contrast: str, sign: int) -> None:
    diffs = []
    for seed in range(4):
        img, mask = render_brain_slice(np.random.default_rng(seed), image_size=128, defect=defect, contrast=contrast)
        core = ndimage.binary_erosion(mask, iterations=1) if mask.sum() > 40 else mask
        diffs.append(float(img[core].mean()) - float(img[_ring(img, mask)].mean()))
    assert all(sign * d > 15 for d in diffs), f"{defect} on {contrast}: lesion minus surroundings {diffs}"


def test_tumour_changes_its_region() -> None:
    for seed in range(4):
        img, mask = render_brain_slice(np.random.default_rng(seed), image_size=128, defect="tumour")
        ring = float(np.median(img[_ring(img, mask)]))
        assert np.mean(np.abs(img[mask].astype(float) - ring)) > 25


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_layout(tmp_path: Path) -> None:
    kwargs = {"n_train": 3, "n_test_good": 2, "n_test_anomalous": 4, "image_size": 64}
    summary = generate_brain_synth(tmp_path / "a", seed=5, **kwargs)
    generate_brain_synth(tmp_path / "b", seed=5, **kwargs)
    generate_brain_synth(tmp_path / "c", seed=6, **kwargs)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert sorted(a) == sorted(c) and a["train/good/000.png"] != c["train/good/000.png"]
    assert sorted(a) == [
        "README.txt",
        "ground_truth/haemorrhage/000_mask.png",
        "ground_truth/infarct/000_mask.png",
        "ground_truth/tumour/000_mask.png",
        "ground_truth/tumour/001_mask.png",
        "synth.json",
        "test/good/000.png",
        "test/good/001.png",
        "test/haemorrhage/000.png",
        "test/infarct/000.png",
        "test/tumour/000.png",
        "test/tumour/001.png",
        "train/good/000.png",
        "train/good/001.png",
        "train/good/002.png",
    ]
    meta = json.loads(a["synth.json"])
    assert meta == summary and meta["seed"] == 5
    assert meta["counts"] == {
        "train_good": 3,
        "test_good": 2,
        "test_tumour": 2,
        "test_haemorrhage": 1,
        "test_infarct": 1,
    }

    test = MVTecStyleDataset(tmp_path / "a", "test", image_size=64)
    assert [s.label for s in test.samples] == [0, 0, 1, 1, 1, 1]
    for i, sample in enumerate(test.samples):
        item = test[i]
        assert item["has_mask"] == (sample.label == 1)
        assert (item["mask"].sum().item() > 0) == (sample.label == 1)
    from PIL import Image

    mask = np.asarray(Image.open(tmp_path / "a" / "ground_truth" / "tumour" / "000_mask.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 255}


def test_count_scaling_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "s"
    summary = generate_brain_synth(out, count=10, image_size=32)
    # 10 images in the default 200/40/60 proportions: 7 train, 1 good, 2 anomalous.
    assert summary["counts"] == {
        "train_good": 7,
        "test_good": 1,
        "test_tumour": 1,
        "test_haemorrhage": 1,
        "test_infarct": 0,
    }
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_brain_synth(out, count=10, image_size=32)
    (out / "notes.md").write_text("kept")
    generate_brain_synth(out, n_train=1, n_test_good=1, n_test_anomalous=0, image_size=32, overwrite=True)
    assert sorted(p.name for p in (out / "train" / "good").iterdir()) == ["000.png"]
    assert not (out / "ground_truth").exists() and (out / "notes.md").read_text() == "kept"
    assert not list(out.rglob("*.tmp"))


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contrast must be one of"):
        generate_brain_synth(tmp_path, contrast="pd")
    with pytest.raises(ValueError, match="defect must be None or one of"):
        render_brain_slice(np.random.default_rng(0), defect="fracture")


def test_generation_speed(tmp_path: Path) -> None:
    load_brain_template()
    start = time.perf_counter()
    generate_brain_synth(tmp_path / "speed", n_train=12, n_test_good=3, n_test_anomalous=9, image_size=256)
    per_image = (time.perf_counter() - start) / 24
    # 100 images must take well under 30 s.
    assert per_image < 0.2, f"{per_image:.3f} s per 256² image"
