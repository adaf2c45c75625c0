"""Triton Python-backend model ``postprocess``: scores and maps -> decisions with the export threshold.

Inputs: ``pred_score`` FP32 (B, 1), ``anomaly_map`` FP32 (B, S, S).
Outputs: ``pred_label`` BOOL (B, 1), true where ``pred_score > threshold``; ``pred_mask`` BOOL (B, S, S),
true where ``anomaly_map > threshold`` (the image score is the map's maximum, so an image is flagged
exactly when its mask is not empty).

``threshold`` comes from ``config.pbtxt`` (parameter ``anomaly_threshold``, from the export metadata).
When none was known at export it is ``inf``: nothing is flagged and clients must threshold
``pred_score`` themselves.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Compares each request's scores and map with one threshold."""

    def initialize(self, args: dict[str, str]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.threshold = np.float32(float(params["anomaly_threshold"]))

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            score = pb_utils.get_input_tensor_by_name(request, "pred_score").as_numpy()
            amap = pb_utils.get_input_tensor_by_name(request, "anomaly_map").as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("pred_label", score > self.threshold),
                pb_utils.Tensor("pred_mask", amap > self.threshold),
            ]))
        return responses
