"""Triton Python-backend model ``pdd_engine``: the portable PDD ONNX run by ONNX Runtime.

For servers that have only the Python backend (such as the ``tritonserver`` bundled with
``nvidia-pytriton``); servers with the ONNX Runtime or TensorRT backends use those instead.

Input: the ONNX's image input (name from ``config.pbtxt``) FP32 (B, 3, S, S), ImageNet-normalised.
Outputs: ``pred_score`` FP32 (B, 1) (Triton's batched form of the ONNX's (B,)) and ``anomaly_map``
FP32 (B, S, S).

The requests of a dynamic batch run together, in ONNX Runtime calls of at most ``run_batch`` images:
on CPU the portable graph at 256² peaks at 3.9 GiB for one image and 5.6 GiB for eight (session
included, benchmarks/results/export-cpu.md), and the CPU flavour runs one image at a time unless told
otherwise. A request holding NaN or infinite values gets an error response and is
left out. Parameters from ``config.pbtxt``: ``onnx_file`` (beside this file), ``input_name``,
``intra_op_threads`` (0: ONNX Runtime's default), ``run_batch``, ``cpu_mem_arena`` ("0": return memory
to the system after each call instead of keeping ONNX Runtime's arena at its peak).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def error_response(message: str) -> pb_utils.InferenceResponse:
    """An error response marked as the client's fault where this Triton version has error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        path = Path(args["model_repository"]) / args["model_version"] / params["onnx_file"]
        if not path.is_file():
            raise pb_utils.TritonModelException(
                f"{path} is missing: the model repository was committed without weights; regenerate it with "
                "`pdd export triton-repo --checkpoint CKPT --flavour python --out REPO`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["intra_op_threads"])
        options.enable_cpu_mem_arena = params["cpu_mem_arena"] == "1"
        self.run_batch = int(params["run_batch"])
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = params["input_name"]

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
        batches, owners = [], []
        for i, request in enumerate(requests):
            x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            if x.shape[0] == 0:
                responses[i] = error_response(f"'{self.input_name}' holds an empty batch")
            elif not np.isfinite(x).all():
                responses[i] = error_response(f"'{self.input_name}' holds NaN or infinite values; send finite "
                                              "normalised pixels")
            else:
                batches.append(x)
                owners.append(i)
        if batches:
            x = np.concatenate(batches)
            try:
                runs = [self.session.run(["pred_score", "anomaly_map"], {self.input_name: x[i:i + self.run_batch]})
                        for i in range(0, len(x), self.run_batch)]
                score = np.concatenate([r[0] for r in runs])
                amap = np.concatenate([r[1] for r in runs])
            except Exception as exc:  # answer every request rather than fail the model
                for i in owners:
                    responses[i] = error_response(f"ONNX Runtime failed: {type(exc).__name__}: {exc}")
            else:
                start = 0
                for i, x in zip(owners, batches):
                    stop = start + x.shape[0]
                    responses[i] = pb_utils.InferenceResponse([
                        pb_utils.Tensor("pred_score", np.ascontiguousarray(score[start:stop, None], np.float32)),
                        pb_utils.Tensor("anomaly_map", np.ascontiguousarray(amap[start:stop], np.float32)),
                    ])
                    start = stop
        return responses

    def finalize(self) -> None:
        self.session = None
