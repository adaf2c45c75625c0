"""Scoring a series frame by frame with a local model or the served ensemble, and deciding at the source's
geometry.

A :class:`SeriesScorer` holds a :class:`pdd.predict.Predictor` (``ModelPredictor`` for ``--checkpoint`` /
``--config``, ``export.client.ServerPredictor`` for ``--server``), the operating point in force and the
:class:`~dicom_node.outputs.Provenance` of its results. Frames are decoded by ``pdd/data/readers.py`` (locally,
or by the server's copy of it when it reads the DICOM files itself), batched, scored; each anomaly map is
resized back to the frame's rows x columns (bilinear, :func:`pdd.data.readers.resize_weights`: the inverse of the
model's own resize) and only then thresholded, so the mask has the source's geometry. The operating point is the
model's (or the server's) calibration, with ``--threshold`` / ``--pixel-threshold`` replacing its raw
thresholds exactly as in ``pdd predict``; without either, the scores and the map are written and no finding is
made.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pdd
from dicom_node.outputs import Provenance, SeriesScores
from dicom_node.series import Series, read_frame
from export.client import PDDClient, ServerPredictor
from export.metadata import sha256_file
from pdd.calibration import Calibration, apply_calibration
from pdd.data.readers import resize_weights
from pdd.predict import Item, ModelPredictor, Predictor

__all__ = ["LOCAL_PRECISIONS", "OperatingPoint", "SeriesScorer", "check_local_precision", "local_scorer",
           "server_scorer"]

log = logging.getLogger(__name__)

# The precisions the local PyTorch model runs in; the served ensemble runs in whatever it was built with.
LOCAL_PRECISIONS = ("fp32",)


@dataclass(frozen=True)
class OperatingPoint:
    """The decision rule in force: a calibration (None: none) and the raw thresholds that apply."""

    calibration: Calibration | None
    image_threshold: float | None
    pixel_threshold: float | None

    @classmethod
    def resolve(cls, calibration: Calibration | None, threshold: float | None = None,
                pixel_threshold: float | None = None) -> OperatingPoint:
        """The thresholds ``pdd predict`` applies: overrides first, then the calibration (pixel: its pixel point,
        else the image threshold); a bare ``threshold`` without calibration is a manual operating point."""
        if calibration is None and threshold is not None:
            calibration = Calibration.manual(threshold, "--threshold")
        if calibration is None:
            return cls(None, None, None)
        image = calibration.image.threshold if threshold is None else float(threshold)
        if pixel_threshold is None:
            pixel_threshold = image if calibration.pixel is None else calibration.pixel.threshold
        return cls(calibration, image, float(pixel_threshold))

    @property
    def normalised(self) -> bool:
        """Whether scores and maps get the calibrated normalisation (a hand-set threshold has none)."""
        return self.calibration is not None and self.calibration.pixel_point.scale is not None


def _to_source(maps: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(B, S, S) model-size maps -> float32 (B, rows, columns), bilinear."""
    size = maps.shape[-1]
    out = maps.astype(np.float32, copy=False)
    if (rows, columns) != maps.shape[1:]:
        out = resize_weights(maps.shape[1], rows) @ out @ resize_weights(size, columns).T
    return np.ascontiguousarray(out, dtype=np.float32)


class SeriesScorer:
    """Scores series: ``scorer.score(series) -> SeriesScores``; ``scorer.provenance`` names the model."""

    def __init__(self, predictor: Predictor, point: OperatingPoint, provenance: Provenance, *,
                 batch_size: int = 8, dicom_window: Sequence[float] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.predictor, self.point, self.provenance = predictor, point, provenance
        self.batch_size = min(batch_size, predictor.max_batch_size or batch_size)
        self.window = (float(dicom_window[0]), float(dicom_window[1])) if dicom_window else None

    def _item(self, series: Series, k: int) -> Item:
        frame = series.frames[k]
        name = f"{frame.path}#frame{frame.frame}" if len(series.sources) == 1 and len(series.frames) > 1 \
            else str(frame.path)
        single = int(frame.dataset.get("NumberOfFrames", 1) or 1) == 1
        if self.predictor.reads_files and single:
            return Item(name, data=frame.path.read_bytes())
        return Item(name, read_frame(frame, self.window))

    def _raw(self, series: Series) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores float64 (N,) and maps float32 (N, rows, columns) at the source's geometry."""
        n = len(series.frames)
        scores = np.empty(n, dtype=np.float64)
        maps = np.empty((n, series.rows, series.columns), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            items = [self._item(series, k) for k in range(start, min(start + self.batch_size, n))]
            pred = self.predictor.predict(items)
            scores[start:start + len(items)] = pred.scores
            maps[start:start + len(items)] = _to_source(np.asarray(pred.maps), series.rows, series.columns)
        return scores, maps

    def score(self, series: Series) -> SeriesScores:
        scores, maps = self._raw(series)
        point = self.point
        if point.calibration is None:
            return SeriesScores(scores, None, None, maps, None)
        decided = apply_calibration(point.calibration, scores, maps, image_threshold=point.image_threshold,
                                    pixel_threshold=point.pixel_threshold)
        values = maps
        if point.normalised:
            values = point.calibration.pixel_point.normalise(maps, point.pixel_threshold)
        normalised = decided["normalised_score"] if point.normalised else None
        return SeriesScores(scores, normalised, decided["pred_label"], values, decided["pred_mask"])


def check_local_precision(precision: str) -> None:
    """ValueError unless the local model runs in ``precision``."""
    if precision not in LOCAL_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not available for the local model; it runs in "
                         f"{', '.join(LOCAL_PRECISIONS)}")


def _weights_sha256(model: Any) -> str:
    """SHA-256 of a model's weights, in state-dict order (names and bytes): a fresh model's identity."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def local_scorer(model: Any, *, device: str = "cpu", checkpoint: str | Path | None = None,
                 config: str | None = None, precision: str = "fp32", threshold: float | None = None,
                 pixel_threshold: float | None = None, batch_size: int = 8,
                 dicom_window: Sequence[float] | None = None) -> SeriesScorer:
    """A scorer over a local PyTorch model (``pdd.checkpoint.load_model``'s), named by its checkpoint or config."""
    check_local_precision(precision)
    predictor = ModelPredictor(model, device, threshold=threshold, pixel_threshold=pixel_threshold)
    point = OperatingPoint.resolve(predictor.calibration, threshold, pixel_threshold)
    if checkpoint is not None:
        weights, source = sha256_file(checkpoint), f"checkpoint {Path(checkpoint).name}"
    else:
        weights, source = _weights_sha256(model), f"config {config} (untrained)"
    provenance = Provenance(model.cfg.model.upper(), pdd.__version__, weights, source, precision,
                            point.image_threshold, point.pixel_threshold, point.normalised)
    return SeriesScorer(predictor, point, provenance, batch_size=batch_size, dicom_window=dicom_window)


def _served(client: PDDClient) -> tuple[Calibration | None, list[float | None], str]:
    """The server's calibration, its config's raw threshold overrides (image, pixel) and its models' configs'
    SHA-256 (the ensemble and each step, which name the engine they serve)."""
    post = client.model_config("postprocess")
    params = {k: v.get("string_value", "") for k, v in post.get("parameters", {}).items()}
    overrides = [float(params[k]) if params.get(k) else None for k in ("image_threshold", "pixel_threshold")]
    ensemble = client.model_config()
    steps = [s["model_name"] for s in ensemble.get("ensemble_scheduling", {}).get("step", [])]
    configs = [ensemble] + [client.model_config(name) for name in steps]
    return client.calibration(), overrides, hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()


def server_scorer(client: PDDClient, *, precision: str, threshold: float | None = None,
                  pixel_threshold: float | None = None, batch_size: int = 8,
                  dicom_window: Sequence[float] | None = None) -> SeriesScorer:
    """A scorer over the served ensemble; ``precision`` is what the served engine runs (recorded as given).

    The thresholds are the server's (its calibration and config overrides); ``threshold`` / ``pixel_threshold``
    replace them.
    """
    calibration, (image, pixel), configs_sha = _served(client)
    point = OperatingPoint.resolve(calibration, image if threshold is None else threshold,
                                   pixel if pixel_threshold is None else pixel_threshold)
    provenance = Provenance("PDD", pdd.__version__, configs_sha, f"server {client.url} model {client.model_name}",
                            precision, point.image_threshold, point.pixel_threshold, point.normalised)
    return SeriesScorer(ServerPredictor(client, dicom_window), point, provenance, batch_size=batch_size,
                        dicom_window=dicom_window)
