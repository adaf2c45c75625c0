"""``pdd predict``: images, folders, DICOM or NIfTI files → scores, heatmap PNGs and a JSON summary.

NIfTI volumes are scored slice by slice along ``nifti_axis``. A file that cannot be read stops the run
with an error naming it, or, with ``skip_bad``, is reported in the summary and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pdd.calibration import Calibration, apply_calibration
from pdd.config import atomic_write_text
from pdd.data.readers import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageReadError,
    read_image,
    read_volume_slices,
    to_model_input,
)

__all__ = ["collect_inputs", "predict_files", "predict_server"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    name: str            # file, or file#slice for volumes
    image: np.ndarray    # (H, W) or (H, W, 3) in [0, 1]


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
           skipped: list[dict[str, str]]) -> Iterator[Item]:
    for path in files:
        try:
            if _is_nifti(path):
                for k, sl in enumerate(read_volume_slices(path, axis=nifti_axis)):
                    yield Item(f"{path}#slice{k}", sl)
            else:
                yield Item(str(path), read_image(path, dicom_window=dicom_window))
        except ImageReadError as exc:
            if not skip_bad:
                raise
            log.warning("skipping unreadable file %s: %s", exc.path, exc.reason)
            skipped.append({"path": str(exc.path), "reason": exc.reason})


def _heatmap_png(item: Item, amap: np.ndarray, path: Path, vmax: float) -> None:
    from PIL import Image

    from pdd.report import heatmap_overlay

    img = item.image if item.image.ndim == 3 else np.repeat(item.image[..., None], 3, axis=-1)
    img = np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize(amap.shape[::-1], Image.BILINEAR)) / 255.0
    over = heatmap_overlay(img, amap, 0.0, vmax)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray((over * 255).astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))[-120:]


def _mask_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    tmp.replace(path)


def predict_files(model: nn.Module, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu", batch_size: int = 8, nifti_axis: int = 2,
                  dicom_window: Sequence[float] | None = None, skip_bad: bool = False,
                  threshold: float | None = None, pixel_threshold: float | None = None) -> dict[str, Any]:
    """Score every input with a local model; writes heatmaps, masks and results.json to ``out_dir`` if given.

    Decisions use the model's calibration (``model.calibration``): each result has ``normalised_score``
    (in [0, 1], 0.5 at the threshold), ``anomalous`` and ``anomalous_pixels`` (pixels of the mask).
    ``threshold`` / ``pixel_threshold`` (raw scores) replace the calibrated ones; a model without
    calibration makes decisions only when ``threshold`` is given.
    """
    files = collect_inputs(inputs)
    calibration = getattr(model, "calibration", None)
    if calibration is None and threshold is not None:
        calibration = Calibration.manual(threshold, "--threshold")
    if calibration is None:
        log.warning("the model has no calibration and no --threshold was given: scores only, no decisions "
                    "(run `pdd calibrate`)")
    window = tuple(dicom_window) if dicom_window else None
    size = model.cfg.image_size
    skipped: list[dict[str, str]] = []
    results: list[dict[str, Any]] = []
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
        if calibration is not None:
            (out / "masks").mkdir(exist_ok=True)
    model.eval()
    batch: list[Item] = []

    def flush() -> None:
        x = torch.stack([to_model_input(it.image, size) for it in batch]).to(device)
        with torch.inference_mode():
            pred = model(x)
        scores = pred.pred_score.float().cpu().numpy()
        maps = pred.anomaly_map.float().cpu().numpy()
        decided = (apply_calibration(calibration, scores, maps, image_threshold=threshold,
                                     pixel_threshold=pixel_threshold) if calibration is not None else None)
        for k, (it, s, m) in enumerate(zip(batch, scores, maps)):
            rec: dict[str, Any] = {"input": it.name, "score": float(s)}
            name = f"{len(results):05d}_{_safe_name(Path(it.name).name)}.png"
            if decided is not None:
                normalised = float(decided["normalised_score"][k])
                rec["normalised_score"] = None if np.isnan(normalised) else normalised
                rec["anomalous"] = bool(decided["pred_label"][k])
                rec["anomalous_pixels"] = int(decided["pred_mask"][k].sum())
                if out is not None:
                    _mask_png(decided["pred_mask"][k], out / "masks" / name)
                    rec["mask"] = f"masks/{name}"
            if out is not None:
                png = out / "heatmaps" / name
                _heatmap_png(it, m, png, vmax=max(float(maps.max()), 1e-6))
                rec["heatmap"] = str(png.relative_to(out))
            results.append(rec)
        batch.clear()

    for item in _items(files, nifti_axis, window, skip_bad, skipped):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    summary = {"model": model.cfg.model, "image_size": size,
               **_decision_summary(calibration, threshold, pixel_threshold),
               "scored": len(results), "skipped": skipped, "results": results}
    if out is not None:
        atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    return summary


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


def predict_server(inputs: Sequence[str | os.PathLike], url: str, protocol: str = "http", shm: bool = False,
                   out_dir: str | os.PathLike | None = None, model_name: str = "pdd", batch_size: int = 8,
                   nifti_axis: int = 2, dicom_window: Sequence[float] | None = None,
                   skip_bad: bool = False) -> dict[str, Any]:
    """Score inputs on a Triton Inference Server serving the PDD ensemble (see ``export/client.py``).

    The options mean what they mean for :func:`predict_files`; DICOM files are decoded by the server.
    """
    from export.client import predict_server_files

    return predict_server_files(inputs, url, protocol=protocol, shm=shm, out_dir=out_dir, model_name=model_name,
                                batch_size=batch_size, nifti_axis=nifti_axis, dicom_window=dicom_window,
                                skip_bad=skip_bad)
