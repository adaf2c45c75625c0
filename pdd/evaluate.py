"""Evaluation: score every test image, compute the metrics, write scores, metrics and the report.

    >>> # result = evaluate(model, dataset, out_dir="runs/x/eval")   # doctest: +SKIP
    >>> # result.metrics["mean"]["image_auroc"]
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pdd.calibration import Calibration, CalibrationError, OperatingPoint, apply_calibration, fit_operating_point
from pdd.config import atomic_write_text
from pdd.metrics import METRIC_NAMES, compute_metrics, pixel_metrics
from pdd.report import metrics_table, write_report

__all__ = ["EvalResult", "Predictions", "calibrate", "calibrate_predictions", "evaluate", "metrics_table",
           "operating_point_metrics", "predict_dataset", "prediction_metrics"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Predictions:
    """Everything the model said about a dataset, in dataset order."""

    scores: np.ndarray          # (N,) float32
    maps: np.ndarray            # (N, H, W) float32
    labels: np.ndarray          # (N,) int
    masks: np.ndarray           # (N, H, W) bool
    has_mask: np.ndarray        # (N,) bool
    paths: list[str]
    class_names: list[str]
    seconds: float


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: Predictions
    out_dir: Path | None


def predict_dataset(model: nn.Module, dataset: Dataset, batch_size: int = 8,
                    device: torch.device | str = "cpu", num_workers: int = 0) -> Predictions:
    """Run the model over every image of ``dataset`` (no image is skipped or sampled)."""
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    scores, maps, labels, masks, has_mask, paths, names = [], [], [], [], [], [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(loader, desc="scoring", leave=False):
            out = model(batch["image"].to(device))
            scores.append(out.pred_score.float().cpu().numpy())
            maps.append(out.anomaly_map.float().cpu().numpy())
            labels.append(np.asarray(batch["label"]))
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
            has_mask.append(np.asarray(batch["has_mask"], dtype=bool))
            paths += list(batch["path"])
            names += list(batch["class_name"])
    return Predictions(np.concatenate(scores), np.concatenate(maps), np.concatenate(labels).astype(int),
                       np.concatenate(masks), np.concatenate(has_mask), paths, names, time.perf_counter() - t0)


def prediction_metrics(p: Predictions) -> dict[str, Any]:
    """Image metrics on every image; pixel metrics on the normal images and the anomalous ones with masks."""
    anomalous = p.labels == 1
    if not (anomalous & p.has_mask).any():
        return compute_metrics(p.scores, p.labels, class_names=p.class_names)
    if (p.has_mask | ~anomalous).all():
        return compute_metrics(p.scores, p.labels, p.maps, p.masks, class_names=p.class_names)
    res = compute_metrics(p.scores, p.labels, class_names=p.class_names)
    keep = p.has_mask | ~anomalous
    names = np.array(p.class_names)
    for name, values in res["per_class"].items():
        idx = keep & (names == name)
        if (p.labels[idx] == 1).any():
            values.update(pixel_metrics(p.maps[idx], p.masks[idx]))
    keys = set.intersection(*(set(v) for v in res["per_class"].values()))
    res["mean"] = {k: float(np.mean([v[k] for v in res["per_class"].values()])) for k in sorted(keys)}
    if "pooled" in res and (p.labels[keep] == 1).any():
        pooled = res["pooled"]
        pooled.update(pixel_metrics(p.maps[keep], p.masks[keep]))
        pooled["mAD"] = float(np.mean([pooled[k] for k in METRIC_NAMES]))
    res["note"] = "pixel metrics leave out anomalous images without a ground-truth mask"
    return res


def calibrate_predictions(p: Predictions, method: str | None = None, target: float | None = None,
                          source: str = "calibration set") -> Calibration:
    """Image and pixel operating points from a model's predictions (see :mod:`pdd.calibration`).

    With normal and anomalous images: ``method`` (default F1-optimal) on the labels; pixels likewise on the
    ground-truth masks of those that have one (and every pixel of the normal images). With normal images
    only: the false-positive rate ``target`` (default 1 %) on them, for images and for pixels alike.
    """
    labelled = len(set(p.labels.tolist())) == 2
    if not labelled and method not in (None, "fpr"):
        raise CalibrationError(f"{source} holds only {'normal' if p.labels.max() == 0 else 'anomalous'} images: "
                               f"method {method!r} needs labelled normal and anomalous images; give a labelled "
                               f"set or a target false-positive rate")
    what = f"{source}, {len(p.labels)} images" + (f" ({int(p.labels.sum())} anomalous)" if labelled else "")
    image = fit_operating_point(p.scores, p.labels if labelled else None, method=method, target=target,
                                source=what)
    anomalous = p.labels == 1
    with_masks = anomalous & p.has_mask
    if with_masks.any():
        keep = with_masks | ~anomalous
        pixel = fit_operating_point(p.maps[keep], p.masks[keep], method=method, target=target,
                                    source=f"{source}, pixels of {int(keep.sum())} images "
                                           f"({int(with_masks.sum())} with anomaly masks)")
    else:
        normal = ~anomalous
        pixel = fit_operating_point(p.maps[normal], None, method="fpr", target=target if method == "fpr" else None,
                                    source=f"{source}, pixels of {int(normal.sum())} normal images")
    return Calibration(image, pixel)


def calibrate(model: nn.Module, dataset: Dataset, method: str | None = None, target: float | None = None,
              source: str = "calibration set", batch_size: int = 8, device: torch.device | str = "cpu",
              precision: str = "fp32") -> Calibration:
    """Score ``dataset`` and return its calibration (:func:`calibrate_predictions`), recorded as fitted on
    ``precision``'s scores (the model's); the model is unchanged."""
    calibration = calibrate_predictions(predict_dataset(model, dataset, batch_size, device), method, target, source)
    return dataclasses.replace(calibration, precision=precision)


def operating_point_metrics(calibration: Calibration, p: Predictions, source: str) -> dict[str, Any]:
    """How the calibrated thresholds do on ``p``: counts and rates per level, and how each was chosen."""
    out: dict[str, Any] = {}
    image = calibration.image.measured_on(p.scores, p.labels, source)
    out["image"] = {"chosen": calibration.image.describe(), "threshold": image.threshold, **_rates(image)}
    keep = p.has_mask | (p.labels == 0)
    if keep.any():
        point = calibration.pixel_point
        pixel = point.measured_on(p.maps[keep], p.masks[keep], f"{source}, pixels")
        out["pixel"] = {"chosen": point.describe() if calibration.pixel is not None
                        else "the image threshold (no pixel calibration)", "threshold": pixel.threshold,
                        **_rates(pixel)}
    return out


def _rates(point: OperatingPoint) -> dict[str, Any]:
    return {"true_positives": point.true_positives, "false_positives": point.false_positives,
            "true_negatives": point.true_negatives, "false_negatives": point.false_negatives,
            "sensitivity": point.sensitivity, "specificity": point.specificity, "f1": point.f1,
            "summary": point.counts()}


def evaluate(model: nn.Module, dataset: Dataset, out_dir: str | os.PathLike | None = None, batch_size: int = 8,
             device: torch.device | str = "cpu", report: bool = True, title: str = "PDD evaluation",
             extra: dict[str, Any] | None = None) -> EvalResult:
    """Score ``dataset``, compute metrics and (with ``out_dir``) write scores.csv, metrics.json and the report."""
    preds = predict_dataset(model, dataset, batch_size, device)
    if len(set(preds.labels.tolist())) < 2:
        raise ValueError(f"the test set has only {'normal' if preds.labels.max() == 0 else 'anomalous'} images; "
                         f"image metrics need both")
    metrics = prediction_metrics(preds)
    metrics["images"] = {"total": len(preds.scores), "anomalous": int(preds.labels.sum()),
                         "with_mask": int(preds.has_mask.sum()), "seconds": preds.seconds}
    skipped = getattr(dataset, "skipped", [])
    metrics["images"]["skipped_unreadable"] = len(skipped)
    if extra:
        metrics["run"] = extra
    calibration = getattr(model, "calibration", None)
    if calibration is not None:
        metrics["operating_point"] = operating_point_metrics(calibration, preds, "test set")
        decided = apply_calibration(calibration, preds.scores)
    else:
        log.warning("the model has no calibration: no operating point is reported (run `pdd calibrate`)")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf)
        if calibration is None:
            w.writerow(["path", "class", "label", "score"])
            rows = zip(preds.paths, preds.class_names, preds.labels.tolist(), preds.scores.tolist())
        else:
            w.writerow(["path", "class", "label", "score", "normalised_score", "pred_label"])
            rows = zip(preds.paths, preds.class_names, preds.labels.tolist(), preds.scores.tolist(),
                       decided["normalised_score"].tolist(), decided["pred_label"].astype(int).tolist())
        for row in rows:
            w.writerow(row)
        atomic_write_text(out / "scores.csv", buf.getvalue())
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        if report:
            write_report(out, preds, metrics, title=title, skipped=skipped)
    mean = metrics["mean"]
    log.info("image AUROC %.4f%s", mean["image_auroc"],
             f", pixel AUROC {mean['pixel_auroc']:.4f}, AUPRO {mean['aupro']:.4f}" if "aupro" in mean else "")
    return EvalResult(metrics, preds, out)
