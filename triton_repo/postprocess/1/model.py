"""Triton Python-backend model ``postprocess``: scores and maps -> decisions with the model's calibration.

Inputs: ``pred_score`` FP32 (B, 1), ``anomaly_map`` FP32 (B, S, S).
Outputs: ``normalised_score`` FP32 (B, 1) in [0, 1], 0.5 at the image threshold (NaN when the export has
no calibration); ``pred_label`` BOOL (B, 1), true where ``pred_score > image threshold``; ``pred_mask``
BOOL (B, S, S), true where ``anomaly_map > pixel threshold``.

Parameters from ``config.pbtxt`` (written by ``export/triton_repo.py``, read at load):

* ``calibration``: the calibration record of the export metadata as JSON ("" when there is none: then
  nothing is flagged unless ``image_threshold`` is set);
* ``image_threshold`` / ``pixel_threshold``: raw thresholds that replace the calibrated ones ("" = keep);
  edit them (or run ``pdd calibrate --export REPO``) and reload the model: no re-export;
* ``random_teachers``: the teachers the model was trained without weights for ("" for none; else a
  warning in the server log).

A request may also carry the parameters ``image_threshold`` / ``pixel_threshold`` (numbers) to replace
the thresholds for itself alone. The decisions and the normalisation are those of ``pdd.calibration``,
copied beside this file as ``pdd_calibration.py``: one implementation for local and served results.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

_CALIBRATION_MODULE = "pdd_calibration.py"


def _load_calibration_module(folder: Path):
    path = folder / _CALIBRATION_MODULE
    if not path.is_file():
        raise pb_utils.TritonModelException(f"{path} is missing; regenerate the repository with "
                                            "`pdd export triton-repo`")
    spec = importlib.util.spec_from_file_location("pdd_calibration", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _number(value: object, what: str) -> float | None:
    """A threshold from a config or request parameter: None when empty, else a finite float."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


class TritonPythonModel:
    """Applies the calibration to each request's scores and map (thresholds overridable per request)."""

    def initialize(self, args: dict[str, str]) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        self.cal = _load_calibration_module(folder)
        # An empty string_value may be left out of the JSON, as protobuf leaves out default values.
        params = {k: v.get("string_value", "") for k, v in json.loads(args["model_config"])["parameters"].items()}
        record = params.get("calibration", "")
        image = _number(params.get("image_threshold"), "config parameter image_threshold")
        self.pixel_threshold = _number(params.get("pixel_threshold"), "config parameter pixel_threshold")
        self.image_threshold = image
        if record:
            self.calibration = self.cal.Calibration.from_dict(json.loads(record), "config parameter calibration")
        elif image is not None:
            self.calibration = self.cal.Calibration.manual(image, "config parameter image_threshold")
        else:
            self.calibration = None
        random_teachers = params.get("random_teachers", "")
        if random_teachers:
            pb_utils.Logger.log_warn(f"PDD postprocess: the served model was trained with randomly initialised "
                                     f"teachers ({random_teachers}): its scores only show that the pipeline works")
        if self.calibration is None:
            pb_utils.Logger.log_warn("PDD postprocess: no calibration in the export: pred_label and pred_mask are "
                                     "always false; run `pdd calibrate --export <repository>`")

    def _thresholds(self, request) -> tuple[float | None, float | None]:
        raw = request.parameters() if hasattr(request, "parameters") else "{}"
        params = json.loads(raw or "{}")
        image = _number(params.get("image_threshold"), "request parameter image_threshold")
        pixel = _number(params.get("pixel_threshold"), "request parameter pixel_threshold")
        return (self.image_threshold if image is None else image,
                self.pixel_threshold if pixel is None else pixel)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            score = pb_utils.get_input_tensor_by_name(request, "pred_score").as_numpy()
            amap = pb_utils.get_input_tensor_by_name(request, "anomaly_map").as_numpy()
            try:
                image, pixel = self._thresholds(request)
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
                continue
            if self.calibration is None and image is None:
                out = {"normalised_score": np.full(score.shape, np.nan, np.float32),
                       "pred_label": np.zeros(score.shape, bool), "pred_mask": np.zeros(amap.shape, bool)}
            else:
                calibration = self.calibration or self.cal.Calibration.manual(image, "request parameter")
                out = self.cal.apply_calibration(calibration, score, amap, image_threshold=image,
                                                 pixel_threshold=pixel)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("normalised_score", out["normalised_score"].reshape(score.shape)),
                pb_utils.Tensor("pred_label", out["pred_label"].reshape(score.shape)),
                pb_utils.Tensor("pred_mask", out["pred_mask"]),
            ]))
        return responses
