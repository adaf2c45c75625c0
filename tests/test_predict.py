"""The one prediction loop (pdd.predict.predict_with) over a stand-in predictor, and the one model loader."""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdd.checkpoint import load_model, save_pdd
from pdd.data.readers import ImageReadError
from pdd.predict import BatchPrediction, Item, predict_with


class _Predictor:
    """Scores an image by its mean; batches only images of one shape; refuses the items named ``bad``."""

    reads_files = False

    def __init__(self, max_batch_size: int | None = None, bad: Sequence[str] = (), decide: bool = True) -> None:
        self.max_batch_size, self.bad, self.decide = max_batch_size, set(bad), decide
        self.batches: list[list[str]] = []

    def batch_key(self, item: Item) -> Hashable:
        return item.image.shape

    def predict(self, items: Sequence[Item]) -> BatchPrediction:
        for it in items:
            if it.name in self.bad:
                raise ImageReadError(it.name, "refused by the stand-in")
        self.batches.append([Path(it.name).name for it in items])
        scores = np.array([it.image.mean() for it in items], np.float32)
        maps = np.stack([np.full((4, 4), s, np.float32) for s in scores])
        if not self.decide:
            return BatchPrediction(scores, maps)
        return BatchPrediction(scores, maps, scores, scores > 0.5, maps > 0.5)

    def describe(self) -> dict:
        return {"model": "stand-in"}


def _write(folder: Path, name: str, value: int, shape: tuple[int, int]) -> Path:
    path = folder / name
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def test_one_loop_batches_by_key_and_limit_and_writes_results(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, value, shape in (("a.png", 51, (8, 8)), ("b.png", 204, (8, 8)), ("c.png", 102, (8, 8)),
                               ("d.png", 255, (6, 6))):
        _write(folder, name, value, shape)
    predictor = _Predictor(max_batch_size=2)
    out = tmp_path / "out"
    summary = predict_with(predictor, [folder], out, batch_size=8)
    # At most max_batch_size per batch, and a new batch where the image shape changes.
    assert predictor.batches == [["a.png", "b.png"], ["c.png"], ["d.png"]]
    assert summary["model"] == "stand-in" and summary["scored"] == 4 and summary["skipped"] == []
    assert json.loads((out / "results.json").read_text()) == summary
    scores = [r["score"] for r in summary["results"]]
    np.testing.assert_allclose(scores, [0.2, 0.8, 0.4, 1.0], atol=1e-6)
    assert [r["anomalous"] for r in summary["results"]] == [False, True, False, True]
    assert [r["anomalous_pixels"] for r in summary["results"]] == [0, 16, 0, 16]
    for rec in summary["results"]:
        assert (out / rec["heatmap"]).is_file() and (out / rec["mask"]).is_file()


def test_without_decisions_only_scores_are_reported(tmp_path):
    path = _write(tmp_path, "a.png", 51, (8, 8))
    (rec,) = predict_with(_Predictor(decide=False), [path])["results"]
    assert set(rec) == {"input", "score"} and rec["score"] == pytest.approx(0.2, abs=1e-6)


def test_a_file_the_predictor_refuses_is_named_or_skipped(tmp_path):
    paths = [_write(tmp_path, f"{k}.png", 10 * k, (8, 8)) for k in range(3)]
    with pytest.raises(ImageReadError, match=r"1\.png"):
        predict_with(_Predictor(bad=[str(paths[1])]), paths)
    predictor = _Predictor(bad=[str(paths[1])])
    summary = predict_with(predictor, paths, skip_bad=True)
    assert summary["skipped"] == [{"path": str(paths[1]), "reason": "refused by the stand-in"}]
    assert [r["input"] for r in summary["results"]] == [str(paths[0]), str(paths[2])]
    assert predictor.batches == [["0.png", "2.png"]]
    with pytest.raises(ValueError, match="batch_size"):
        predict_with(predictor, paths, batch_size=0)


def test_load_model_sets_the_image_size_through_the_config(tmp_path):
    """A checkpoint loaded at another input size: the config says so before the model is built."""
    fresh = load_model(config="brain-synth", overrides=["random_teachers=true"], image_size=64)
    assert fresh.cfg.image_size == 64 and not fresh.training
    ckpt = tmp_path / "m.pt"
    save_pdd(fresh, ckpt)
    loaded = load_model(ckpt, image_size=96)
    assert loaded.cfg.image_size == 96
    for name, tensor in fresh.state_dict().items():
        assert (loaded.state_dict()[name] == tensor).all(), name
    with pytest.raises(ValueError, match="not both"):
        load_model(ckpt, config="brain-synth")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        load_model()


class _FileReader(_Predictor):
    """A predictor that decodes files itself (as the server does): records what it was sent, refuses ``bad``."""

    reads_files = True

    def __init__(self, bad: Sequence[str] = ()) -> None:
        super().__init__(bad=bad)
        self.sent: list[tuple[str, bytes | None]] = []

    def batch_key(self, item: Item) -> Hashable:
        return "bytes" if item.data is not None else item.image.shape

    def predict(self, items: Sequence[Item]) -> BatchPrediction:
        for it in items:
            if it.name in self.bad:
                raise ImageReadError(it.name, "refused by the stand-in server")
        self.sent += [(Path(it.name).name, it.data) for it in items]
        scores = np.zeros(len(items), np.float32)
        return BatchPrediction(scores, np.zeros((len(items), 4, 4), np.float32))


def test_files_go_to_a_file_reading_predictor_undecoded(tmp_path, write_dicom):
    """`pdd predict --server`: images and DICOM files are sent as they are (a bomb is never decoded on this
    side); NIfTI slices and preamble-less DICOM files are read here and sent as pixels."""
    import nibabel as nib
    from pydicom import dcmread

    from benchmarks.hostile_files import png

    bomb = png(tmp_path / "bomb.png", 12000, 12000)
    good = _write(tmp_path, "good.png", 10, (8, 8))
    dicom = write_dicom(tmp_path / "ct.dcm", np.arange(64).reshape(8, 8))
    bare = tmp_path / "bare.dcm"
    ds = dcmread(dicom)
    ds.preamble = None
    ds.save_as(bare, enforce_file_format=False, little_endian=True, implicit_vr=False)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    predictor = _FileReader(bad=[str(bomb)])
    inputs = [bomb, good, dicom, bare, tmp_path / "v.nii.gz"]
    summary = predict_with(predictor, inputs, skip_bad=True)
    assert summary["skipped"] == [{"path": str(bomb), "reason": "refused by the stand-in server"}]
    sent = dict(predictor.sent)
    assert sent["good.png"] == good.read_bytes() and sent["ct.dcm"] == dicom.read_bytes()
    assert sent["bare.dcm"] is None and sent["v.nii.gz#slice0"] is None and sent["v.nii.gz#slice1"] is None
    with pytest.raises(ImageReadError, match=r"bomb\.png: refused by the stand-in server"):
        predict_with(predictor, inputs)


def test_local_prediction_refuses_an_over_budget_file_or_skips_it(tmp_path):
    from benchmarks.hostile_files import png
    from pdd.data.readers import DecodeBudget, DecodeBudgetError

    bomb = png(tmp_path / "bomb.png", 12000, 12000)
    good = _write(tmp_path, "good.png", 10, (8, 8))
    with pytest.raises(DecodeBudgetError, match=r"bomb\.png: its header claims 12000 x 12000"):
        predict_with(_Predictor(), [good, bomb])
    summary = predict_with(_Predictor(), [good, bomb], skip_bad=True)
    assert summary["scored"] == 1 and "max_pixels = 33,554,432" in summary["skipped"][0]["reason"]
    strict = predict_with(_Predictor(), [good, bomb], skip_bad=True, budget=DecodeBudget(max_pixels=63))
    assert strict["scored"] == 0 and "max_pixels = 63" in strict["skipped"][0]["reason"]
