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

from pdd.config import atomic_write_text
from pdd.metrics import IMAGE_METRICS, METRIC_NAMES, compute_metrics, pixel_metrics

__all__ = ["EvalResult", "evaluate", "predict_dataset"]

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


def _metrics(p: Predictions) -> dict[str, Any]:
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


def evaluate(model: nn.Module, dataset: Dataset, out_dir: str | os.PathLike | None = None, batch_size: int = 8,
             device: torch.device | str = "cpu", report: bool = True, title: str = "PDD evaluation",
             extra: dict[str, Any] | None = None) -> EvalResult:
    """Score ``dataset``, compute metrics and (with ``out_dir``) write scores.csv, metrics.json and the report."""
    preds = predict_dataset(model, dataset, batch_size, device)
    if len(set(preds.labels.tolist())) < 2:
        raise ValueError(f"the test set has only {'normal' if preds.labels.max() == 0 else 'anomalous'} images; "
                         f"image metrics need both")
    metrics = _metrics(preds)
    metrics["images"] = {"total": len(preds.scores), "anomalous": int(preds.labels.sum()),
                         "with_mask": int(preds.has_mask.sum()), "seconds": preds.seconds}
    skipped = getattr(dataset, "skipped", [])
    metrics["images"]["skipped_unreadable"] = len(skipped)
    if extra:
        metrics["run"] = extra
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "class", "label", "score"])
        for row in zip(preds.paths, preds.class_names, preds.labels.tolist(), preds.scores.tolist()):
            w.writerow(row)
        atomic_write_text(out / "scores.csv", buf.getvalue())
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        if report:
            from pdd.report import write_report

            write_report(out, preds, metrics, title=title, skipped=skipped)
    mean = metrics["mean"]
    log.info("image AUROC %.4f%s", mean["image_auroc"],
             f", pixel AUROC {mean['pixel_auroc']:.4f}, AUPRO {mean['aupro']:.4f}" if "aupro" in mean else "")
    return EvalResult(metrics, preds, out)


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one row per class plus the mean over classes and the pooled metrics, percentages."""
    mean = metrics["mean"]
    keys = [k for k in (*IMAGE_METRICS, "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mAD") if k in mean]
    lines = ["| class | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    rows = list(metrics["per_class"].items())
    if len(rows) > 1:
        rows.append(("mean", mean))
        if "pooled" in metrics:
            rows.append(("pooled", metrics["pooled"]))
    for name, vals in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * vals[k]:.1f}" if k in vals else "–" for k in keys) + " |")
    return "\n".join(lines)
