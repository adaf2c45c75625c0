"""A stand-in for ``triton_python_backend_utils``, the module only the server provides to its Python-backend
models: tensors, responses and errors as plain records, requests as dicts of arrays.

Numpy only, so that a model.py can be run in a process without torch or this project, as on the server.
"""

from __future__ import annotations

import types

import numpy as np


class BackendTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self) -> np.ndarray:
        return self.array


class BackendError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


class BackendResponse:
    def __init__(self, output_tensors: list[BackendTensor] | None = None, error: BackendError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


def backend_utils() -> types.ModuleType:
    """A stand-in ``triton_python_backend_utils``; install it in ``sys.modules`` before loading a model.py."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.TritonError, pb.InferenceResponse = BackendTensor, BackendError, BackendResponse
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.TritonModelException = RuntimeError
    return pb
