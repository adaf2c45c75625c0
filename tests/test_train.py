"""Training, resume, feature cache, evaluation and the CLI on a tiny brain-synth set (64², random teachers)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pdd.calibration import Calibration
from pdd.checkpoint import load_pdd, read_checkpoint
from pdd.cli import main as pdd_main
from pdd.cli import resolve_config
from pdd.config import ConfigError, apply_overrides
from pdd.evaluate import evaluate
from pdd.train import check_teachers, open_dataset, train

TINY = ["image_size=64", "train.epochs=2", "train.batch_size=4", "train.eval_every=1", "train.amp=false",
        "train.val_fraction=0.25"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from pdd.data import generate_brain_synth

    root = tmp_path_factory.mktemp("synth")
    generate_brain_synth(root, seed=3, image_size=64, n_train=12, n_test_good=4, n_test_anomalous=6)
    return root


def tiny_cfg(synth, *extra):
    return apply_overrides(resolve_config("brain-synth"), [*TINY, f"data.root={synth}", *extra])


def _weights(path):
    return read_checkpoint(path)["state_dict"]


def test_train_writes_checkpoints_and_log(tmp_path, synth):
    result = train(tiny_cfg(synth), tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in log)
    assert log[1]["train_loss"] < log[0]["train_loss"]
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    ckpt = read_checkpoint(result.last_checkpoint)
    assert ckpt["epoch"] == 2 and "optimizer" in ckpt
    # The best checkpoint is calibrated on the 3 validation normals (FPR ≤ 1 %: above the highest of them).
    cal = result.calibration
    assert cal is not None and cal.image.method == "fpr" and cal.image.target == 0.01
    assert (cal.image.normal, cal.image.anomalous, cal.image.false_positives) == (3, 0, 0)
    assert cal.pixel is not None and cal.pixel.normal == 3 * 64 * 64
    assert Calibration.from_dict(read_checkpoint(result.best_checkpoint)["calibration"]) == cal
    assert Calibration.from_dict(json.loads((tmp_path / "run" / "calibration.json").read_text())) == cal
    val_scores = evaluate_scores(load_pdd(result.best_checkpoint), synth, result)
    assert cal.image.threshold == pytest.approx(float(val_scores.max()), rel=1e-5)


def test_resume_continues_exactly(tmp_path, synth):
    train(tiny_cfg(synth), tmp_path / "straight")
    a = _weights(tmp_path / "straight" / "last.pt")
    shutil.rmtree(tmp_path / "straight")  # ~700 MB per checkpoint: keep the test's disk peak at one run's
    train(tiny_cfg(synth, "train.epochs=1"), tmp_path / "resumed")
    train(tiny_cfg(synth), tmp_path / "resumed", resume=True)
    b = _weights(tmp_path / "resumed" / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]


def test_resume_refuses_a_different_config(tmp_path, synth):
    train(tiny_cfg(synth, "train.epochs=1"), tmp_path / "r")
    with pytest.raises(ValueError, match="differs"):
        train(tiny_cfg(synth, "train.lr=0.1"), tmp_path / "r", resume=True)


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_feature_cache_matches_uncached(tmp_path, synth, cache):
    cached = train(tiny_cfg(synth, "train.epochs=1"), tmp_path / "memory").history[0]["train_loss"]
    other = train(tiny_cfg(synth, "train.epochs=1", f"train.feature_cache={cache}"), tmp_path / cache)
    # fp16 cached features vs fp32 live ones: the same training up to fp16 rounding
    assert other.history[0]["train_loss"] == pytest.approx(cached, rel=2e-2)


def test_training_refuses_random_teachers_unless_intended(tmp_path, synth, capsys, caplog):
    cfg = apply_overrides(resolve_config("headct"), [*TINY, f"data.root={synth}"])
    with pytest.raises(ConfigError) as err:
        train(cfg, tmp_path / "refused")
    for part in ("vmamba_weights", "wrn_weights", "Pretrained teachers", "random_teachers=true"):
        assert part in str(err.value)
    assert not (tmp_path / "refused").exists()
    assert pdd_main(["train", "--config", "rd4ad-headct", "--data", str(synth), "--out", str(tmp_path / "r")]) == 2
    message = capsys.readouterr().err
    assert "wrn_weights" in message and "vmamba_weights" not in message  # RD4AD has no VMamba teacher
    # Configs made for random teachers say so, and use the 1 − cos prior term.
    for name in ("brain-synth", "rd4ad-brain-synth"):
        assert resolve_config(name).random_teachers
    assert resolve_config("brain-synth").loss.prior_cos_form == "one_minus_cos"
    with caplog.at_level(logging.WARNING, logger="pdd.train"):
        check_teachers(tiny_cfg(synth))
        assert not any("plus_cos" in r.getMessage() for r in caplog.records)
        check_teachers(tiny_cfg(synth, "loss.prior_cos_form=plus_cos"))
    assert any("plus_cos" in r.getMessage() and "one_minus_cos" in r.getMessage() for r in caplog.records)
    check_teachers(cfg.replace(vmamba_weights="v.pth", wrn_weights="w.pth"))  # weights named: no objection


def test_rd4ad_trains_with_the_same_code(tmp_path, synth):
    cfg = apply_overrides(resolve_config("rd4ad-brain-synth"), [*TINY, "train.epochs=1", f"data.root={synth}"])
    result = train(cfg, tmp_path / "rd4ad")
    model = load_pdd(result.best_checkpoint)
    assert type(model).__name__ == "RD4ADModel"


def evaluate_scores(model, synth, result):
    """Scores of the validation normals a training run held out (the same split as train())."""
    from pdd.data import split_train_val
    from pdd.evaluate import predict_dataset

    full = open_dataset(model.cfg.data, "train", 64, synth)
    _, val = split_train_val(full, model.cfg.train.val_fraction, seed=model.cfg.train.seed)
    return predict_dataset(model, val, batch_size=4).scores


def test_evaluate_calibrate_and_predict_use_the_operating_point(tmp_path, synth, capsys):
    best = train(tiny_cfg(synth, "train.epochs=1"), tmp_path / "run").best_checkpoint
    model = load_pdd(best)
    test_set = open_dataset(model.cfg.data, "test", 64)
    res = evaluate(model, test_set, tmp_path / "eval", batch_size=4)
    assert res.metrics["images"]["total"] == len(test_set) == 10
    assert set(res.metrics["mean"]) >= {"image_auroc", "pixel_auroc", "aupro", "mAD"}
    rows = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[0] == "path,class,label,score,normalised_score,pred_label"
    html = (tmp_path / "eval" / "report.html").read_text()
    for png in ("curves.png", "overlays_most_anomalous.png", "overlays_least_anomalous.png"):
        assert png in html and (tmp_path / "eval" / png).stat().st_size > 1000
    # The operating point on the test set: counts of the calibrated threshold, checked directly.
    op = res.metrics["operating_point"]["image"]
    flagged = res.predictions.scores.astype(np.float64) > model.calibration.image.threshold
    labels = res.predictions.labels == 1
    assert (op["true_positives"], op["false_positives"]) == (int((flagged & labels).sum()),
                                                             int((flagged & ~labels).sum()))
    assert op["sensitivity"] == pytest.approx((flagged & labels).sum() / labels.sum())
    assert "Operating point" in html and "false-positive rate on normals ≤ 0.01" in html
    assert res.metrics["operating_point"]["pixel"]["true_negatives"] > 0

    # pdd calibrate on the labelled split (here the test split stands in for a labelled validation set).
    assert pdd_main(["calibrate", "--checkpoint", str(best), "--data", str(synth), "--target-sensitivity", "0.8",
                     "--out", str(tmp_path / "cal.json"), "--batch-size", "5"]) == 0
    assert "sensitivity ≥ 0.8" in capsys.readouterr().out
    recal = load_pdd(best).calibration
    assert recal.image.method == "sensitivity" and recal.image.anomalous == 6 and recal.image.normal == 4
    assert recal.image.true_positives >= 0.8 * 6
    assert recal.pixel.method == "sensitivity" and recal.pixel.anomalous > 0  # brain-synth has masks
    assert Calibration.from_dict(json.loads((tmp_path / "cal.json").read_text())) == recal
    assert pdd_main(["calibrate", "--checkpoint", str(best), "--data", str(synth), "--split", "train",
                     "--target-specificity", "0.9"]) == 2
    assert "needs labelled normal and anomalous images" in capsys.readouterr().err

    # pdd predict: normalised score, label and mask from the calibration; --threshold replaces it.
    images = sorted((synth / "test").rglob("*.png"))[:3]
    assert pdd_main(["predict", "--checkpoint", str(best), *map(str, images), "--out", str(tmp_path / "p")]) == 0
    out = json.loads((tmp_path / "p" / "results.json").read_text())
    assert json.loads(capsys.readouterr().out) == out
    assert out["threshold"] == recal.image.threshold and out["pixel_threshold"] == recal.pixel.threshold
    for rec in out["results"]:
        assert rec["anomalous"] == (rec["score"] > recal.image.threshold)
        assert (rec["normalised_score"] > 0.5) == rec["anomalous"] and 0 < rec["normalised_score"] < 1
        mask = np.asarray(Image.open(tmp_path / "p" / rec["mask"]))
        assert mask.shape == (64, 64) and int((mask > 0).sum()) == rec["anomalous_pixels"]
    assert pdd_main(["predict", "--checkpoint", str(best), *map(str, images), "--threshold", "-1",
                     "--pixel-threshold", "1e9"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert all(r["anomalous"] and r["anomalous_pixels"] == 0 for r in printed["results"])
    assert printed["operating_point"]["overridden"] is True


def test_cli_eval_with_fresh_config(tmp_path, synth, capsys):
    rc = pdd_main(["eval", "--config", "brain-synth", "--set", "image_size=64", "--data", str(synth),
                   "--out", str(tmp_path / "e"), "--batch-size", "5"])
    assert rc == 0
    assert "image_auroc" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["images"]["total"] == 10


def test_cli_predict_images_dicom_nifti_and_bad_files(tmp_path, synth, capsys):
    import nibabel as nib
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    inputs = tmp_path / "in"
    inputs.mkdir()
    png = sorted((synth / "test" / "tumour").glob("*.png"))[0]
    (inputs / "a.png").write_bytes(png.read_bytes())
    vol = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), inputs / "v.nii.gz")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 40, 40, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.random.default_rng(1).integers(0, 2000, (40, 40))).astype(np.uint16).tobytes()
    ds.save_as(inputs / "c.dcm", enforce_file_format=True)
    (inputs / "broken.png").write_bytes(png.read_bytes()[:100])

    args = ["predict", "--config", "brain-synth", "--set", "image_size=64", str(inputs), "--out", str(tmp_path / "p")]
    assert pdd_main(args) == 2
    assert "broken.png" in capsys.readouterr().err
    assert pdd_main([*args, "--skip-bad", "--threshold", "1.0"]) == 0
    out = json.loads((tmp_path / "p" / "results.json").read_text())
    names = [r["input"] for r in out["results"]]
    assert len(names) == 1 + 1 + 3  # png, dicom, 3 NIfTI slices
    assert any(n.endswith("v.nii.gz#slice2") for n in names)
    assert [s["path"].endswith("broken.png") for s in out["skipped"]] == [True]
    assert all((tmp_path / "p" / r["heatmap"]).is_file() and "anomalous" in r for r in out["results"])


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_ddp_two_processes_on_cpu(tmp_path, synth):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           "-m", "pdd.cli", "train", "--config", "brain-synth", "--data", str(synth), "--out", str(tmp_path / "ddp"),
           *TINY, "train.epochs=1", "train.batch_size=3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1  # only rank 0 writes
    assert log[0]["steps"] == 2  # 9 images over 2 ranks, 3 per step
    model = load_pdd(tmp_path / "ddp" / "best.pt")
    assert dataclasses.asdict(model.cfg)["image_size"] == 64
