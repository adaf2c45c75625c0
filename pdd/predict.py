"""``pdd predict``: images, folders, DICOM or NIfTI files → scores, heatmap PNGs and a JSON summary.

One loop (:func:`predict_with`) walks the inputs, batches them, asks a :class:`Predictor` for scores and maps
and writes the results; the local PyTorch model (:class:`ModelPredictor`, :func:`predict_files`) and the
served ensemble (``export.client.ServerPredictor``, ``pdd predict --server``) are two predictors.

NIfTI volumes are scored slice by slice along ``nifti_axis``. A file that cannot be read stops the run
with an error naming it, or, with ``skip_bad``, is reported in the summary and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from pdd.calibration import Calibration, apply_calibration
from pdd.config import atomic_write_text
from pdd.data.readers import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    DecodeBudget,
    ImageReadError,
    has_dicom_preamble,
    iter_volume_slices,
    read_image,
    to_model_input,
)
from pdd.report import heatmap_overlay

__all__ = ["BatchPrediction", "Item", "ModelPredictor", "Predictor", "collect_inputs", "predict_files",
           "predict_with"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image to score: pixels read here, or (for predictors that decode files) a DICOM file's bytes."""

    name: str                        # file, or file#slice for volumes
    image: np.ndarray | None = None  # (H, W) or (H, W, 3) in [0, 1]
    data: bytes | None = None        # the encoded file, when the predictor decodes it (``Predictor.reads_files``)


@dataclass(frozen=True)
class BatchPrediction:
    """A predictor's answer for a batch of B items: raw ``scores`` (B,), ``maps`` (B, S, S) float32, and the
    decisions when an operating point is in force: ``normalised`` (B,) (NaN: none), ``labels`` (B,) bool,
    ``masks`` (B, S, S) bool (None where the predictor does not report masks)."""

    scores: np.ndarray
    maps: np.ndarray
    normalised: np.ndarray | None = None
    labels: np.ndarray | None = None
    masks: np.ndarray | None = None


class Predictor(Protocol):
    """What :func:`predict_with` runs: a local model, a server, any runtime that scores batches of items."""

    reads_files: bool   # True: image and DICOM files arrive as ``Item.data`` bytes, decoded by the predictor
    max_batch_size: int | None

    def batch_key(self, item: Item) -> Hashable:
        """Items of one batch share this key (e.g. the pixel shape, for runtimes without a resize)."""
        ...

    def predict(self, items: Sequence[Item]) -> BatchPrediction:
        """Score a batch; raises :class:`ImageReadError` naming an item the predictor cannot decode."""
        ...

    def describe(self) -> dict[str, Any]:
        """The leading fields of ``results.json`` (model, thresholds in force, …)."""
        ...


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, and the readable-looking files inside folders named (recursively, sorted)."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and
                           (p.suffix.lower() in IMAGE_SUFFIXES or _is_nifti(p)))
            if not found:
                raise FileNotFoundError(f"folder {path} holds no image, DICOM or NIfTI file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def _items(files: Sequence[Path], nifti_axis: int, dicom_window: tuple[float, float] | None, skip_bad: bool,
           skipped: list[dict[str, str]], budget: DecodeBudget, files_as_bytes: bool = False) -> Iterator[Item]:
    """Every image of ``files`` (a NIfTI volume's slices, one at a time); with ``files_as_bytes``, the image
    and DICOM files as they are on disk (their size within ``budget.max_bytes``), undecoded."""
    for path in files:
        try:
            if _is_nifti(path):
                for k, sl in enumerate(iter_volume_slices(path, axis=nifti_axis, budget=budget)):
                    yield Item(f"{path}#slice{k}", sl)
            elif files_as_bytes and _sendable(path):
                budget.check_file_size(path, path.stat().st_size)
                yield Item(str(path), data=path.read_bytes())
            else:
                yield Item(str(path), read_image(path, dicom_window=dicom_window, budget=budget))
        except ImageReadError as exc:
            if not skip_bad:
                raise
            log.warning("skipping unreadable file %s: %s", exc.path, exc.reason)
            skipped.append({"path": str(exc.path), "reason": exc.reason})


def _sendable(path: Path) -> bool:
    """Whether a file's bytes can go to a predictor as they are: anything but DICOM without its preamble,
    which only the local reader recognises (by its extension)."""
    with open(path, "rb") as fh:
        return has_dicom_preamble(fh.read(132)) or path.suffix.lower() not in DICOM_SUFFIXES


def _heatmap_png(image: np.ndarray, amap: np.ndarray, path: Path, vmax: float) -> None:
    img = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    img = np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize(amap.shape[::-1], Image.BILINEAR)) / 255.0
    over = heatmap_overlay(img, amap, 0.0, vmax)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray((over * 255).astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))[-120:]


def _mask_png(mask: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    tmp.replace(path)


class ModelPredictor:
    """A local PyTorch PDD (or RD4AD) model as a :class:`Predictor`: files read and resized here.

    Decisions use ``model.calibration``; ``threshold`` / ``pixel_threshold`` (raw scores) replace the calibrated
    ones, and a model without calibration makes decisions only when ``threshold`` is given. ``model`` may be a
    function that builds it: it is then built for the first image read, so that a run whose files are refused
    (over the decode budget, damaged) fails in the time of reading their headers, not of building a model.
    """

    reads_files = False
    max_batch_size = None

    def __init__(self, model: nn.Module | Callable[[], nn.Module], device: torch.device | str = "cpu",
                 threshold: float | None = None, pixel_threshold: float | None = None) -> None:
        self.device, self.threshold, self.pixel_threshold = device, threshold, pixel_threshold
        self._model: nn.Module | None = None
        self._build = None if isinstance(model, nn.Module) else model
        self.calibration: Calibration | None = None
        if isinstance(model, nn.Module):
            self._take(model)

    def _take(self, model: nn.Module) -> None:
        self._model = model.eval()
        self.calibration = getattr(model, "calibration", None)
        if self.calibration is None and self.threshold is not None:
            self.calibration = Calibration.manual(self.threshold, "--threshold")
        if self.calibration is None:
            log.warning("the model has no calibration and no --threshold was given: scores only, no decisions "
                        "(run `pdd calibrate`)")

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._take(self._build())
        return self._model

    def batch_key(self, item: Item) -> Hashable:
        return None  # every image is resized to the model's input size

    def predict(self, items: Sequence[Item]) -> BatchPrediction:
        model = self.model
        size = model.cfg.image_size
        x = torch.stack([to_model_input(it.image, size) for it in items]).to(self.device)
        with torch.inference_mode():
            pred = model(x)
        scores = pred.pred_score.float().cpu().numpy()
        maps = pred.anomaly_map.float().cpu().numpy()
        if self.calibration is None:
            return BatchPrediction(scores, maps)
        decided = apply_calibration(self.calibration, scores, maps, image_threshold=self.threshold,
                                    pixel_threshold=self.pixel_threshold)
        return BatchPrediction(scores, maps, decided["normalised_score"], decided["pred_label"], decided["pred_mask"])

    def describe(self) -> dict[str, Any]:
        return {"model": self.model.cfg.model, "image_size": self.model.cfg.image_size,
                **_decision_summary(self.calibration, self.threshold, self.pixel_threshold)}


def _records(items: Sequence[Item], pred: BatchPrediction, first: int, out: Path | None,
             dicom_window: tuple[float, float] | None, budget: DecodeBudget) -> Iterator[dict[str, Any]]:
    """``results.json`` entries of one batch (numbered from ``first``), writing its heatmaps and masks."""
    vmax = max(float(pred.maps.max()), 1e-6)
    for k, it in enumerate(items):
        rec: dict[str, Any] = {"input": it.name, "score": float(pred.scores[k])}
        name = f"{first + k:05d}_{_safe_name(Path(it.name).name)}.png"
        if pred.labels is not None:
            normalised = float(pred.normalised[k])
            rec["normalised_score"] = None if np.isnan(normalised) else normalised
            rec["anomalous"] = bool(pred.labels[k])
        if pred.masks is not None:
            rec["anomalous_pixels"] = int(pred.masks[k].sum())
            if out is not None:
                (out / "masks").mkdir(exist_ok=True)
                _mask_png(pred.masks[k], out / "masks" / name)
                rec["mask"] = f"masks/{name}"
        if out is not None:
            image = it.image if it.image is not None else read_image(it.name, dicom_window=dicom_window,
                                                                     budget=budget)
            _heatmap_png(image, pred.maps[k], out / "heatmaps" / name, vmax=vmax)
            rec["heatmap"] = f"heatmaps/{name}"
        yield rec


def predict_with(predictor: Predictor, inputs: Sequence[str | os.PathLike],
                 out_dir: str | os.PathLike | None = None, *, batch_size: int = 8, nifti_axis: int = 2,
                 dicom_window: Sequence[float] | None = None, skip_bad: bool = False,
                 budget: DecodeBudget | None = None) -> dict[str, Any]:
    """Score every input with ``predictor``; writes heatmaps, masks and results.json to ``out_dir`` if given.

    Each result has ``input`` and the raw ``score``; with an operating point, ``normalised_score`` (in [0, 1],
    0.5 at the threshold) and ``anomalous``; with masks, ``anomalous_pixels``. A file the predictor cannot
    decode raises :class:`ImageReadError` naming it, or with ``skip_bad`` is listed in ``skipped``; so does a
    file over ``budget`` (what the files read here may claim: :class:`DecodeBudget`, its defaults when None).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = budget or DecodeBudget()
    limit = min(batch_size, predictor.max_batch_size or batch_size)
    files = collect_inputs(inputs)
    window = (float(dicom_window[0]), float(dicom_window[1])) if dicom_window else None
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    skipped: list[dict[str, str]] = []
    results: list[dict[str, Any]] = []
    batch: list[Item] = []

    def flush() -> None:
        while batch:
            try:
                pred = predictor.predict(batch)
            except ImageReadError as exc:
                bad = next((it for it in batch if it.name == str(exc.path)), None)
                if bad is None or not skip_bad:
                    raise
                batch.remove(bad)
                log.warning("skipping unreadable file %s: %s", exc.path, exc.reason)
                skipped.append({"path": str(exc.path), "reason": exc.reason})
                continue
            results.extend(_records(batch, pred, len(results), out, window, budget))
            batch.clear()

    for item in _items(files, nifti_axis, window, skip_bad, skipped, budget, files_as_bytes=predictor.reads_files):
        if batch and (len(batch) == limit or predictor.batch_key(item) != predictor.batch_key(batch[0])):
            flush()
        batch.append(item)
    flush()
    summary = {**predictor.describe(), "scored": len(results), "skipped": skipped, "results": results}
    if out is not None:
        atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    return summary


def predict_files(model: nn.Module, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu", batch_size: int = 8, nifti_axis: int = 2,
                  dicom_window: Sequence[float] | None = None, skip_bad: bool = False,
                  threshold: float | None = None, pixel_threshold: float | None = None,
                  budget: DecodeBudget | None = None) -> dict[str, Any]:
    """Score every input with a local model: :func:`predict_with` over a :class:`ModelPredictor`.

    Decisions use the model's calibration (``model.calibration``): each result has ``normalised_score``
    (in [0, 1], 0.5 at the threshold), ``anomalous`` and ``anomalous_pixels`` (pixels of the mask).
    ``threshold`` / ``pixel_threshold`` (raw scores) replace the calibrated ones; a model without
    calibration makes decisions only when ``threshold`` is given. ``budget``: what each file may claim.
    """
    predictor = ModelPredictor(model, device, threshold=threshold, pixel_threshold=pixel_threshold)
    return predict_with(predictor, inputs, out_dir, batch_size=batch_size, nifti_axis=nifti_axis,
                        dicom_window=dicom_window, skip_bad=skip_bad, budget=budget)


def _decision_summary(calibration: Calibration | None, threshold: float | None,
                      pixel_threshold: float | None) -> dict[str, Any]:
    """The thresholds in force and how they were chosen, for ``results.json``."""
    if calibration is None:
        return {"threshold": None, "pixel_threshold": None, "operating_point": None}
    overridden = threshold is not None or pixel_threshold is not None
    image = calibration.image.threshold if threshold is None else threshold
    if pixel_threshold is None:
        pixel_threshold = image if calibration.pixel is None else calibration.pixel.threshold
    return {"threshold": image, "pixel_threshold": pixel_threshold,
            "operating_point": {"image": calibration.image.describe(), "pixel": calibration.pixel_point.describe(),
                                "overridden": overridden}}
