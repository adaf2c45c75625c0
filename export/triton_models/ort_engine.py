"""Triton Python-backend model ``pdd_engine``: the PDD ONNX run by ONNX Runtime, either form.

For servers that have only the Python backend (such as the ``tritonserver`` bundled with
``nvidia-pytriton``); servers with the ONNX Runtime or TensorRT backends use those instead.

The config's ``onnx_form`` says which graph ``onnx_file`` holds. ``plugin`` (the default of ``pdd export
triton-repo``): the graph TensorRT gets, whose ``pdd::SS2DScan`` nodes run the compiled CPU scan kernel and
whose ``pdd::AnomalyHead`` node runs the numpy head, as onnxruntime-extensions Python ops from the
``kernels/`` package bundled beside this file (torch-free; loaded from there under a private name). The
graph is moved to the ops' domain when the model loads, as the in-process runtime does it. The kernel is
compiled for this CPU when the model loads (once per machine, then cached), so the server needs a C
compiler; without one initialize fails and says so. ``portable``: standard ONNX ops, nothing to compile.

Input: the ONNX's image input (name from ``config.pbtxt``) FP32 (B, 3, S, S), ImageNet-normalised.
Outputs: ``pred_score`` FP32 (B, 1) (Triton's batched form of the ONNX's (B,)) and ``anomaly_map``
FP32 (B, S, S).

The requests of a dynamic batch run together, in ONNX Runtime calls of at most ``run_batch`` images:
on CPU the portable graph at 256² peaks at 3.9 GiB for one image and 5.6 GiB for eight (session
included, benchmarks/results/export-cpu.md), and the CPU flavour runs one image at a time unless told
otherwise. A request holding NaN or infinite values gets an error response and is
left out. Parameters from ``config.pbtxt``: ``onnx_file`` (beside this file), ``onnx_form`` ("plugin" or
"portable"; absent in repositories generated before the plugin form was served, which hold the portable
one), ``input_name``, ``intra_op_threads`` (0: ONNX Runtime's default; the scan kernel's threads:
``$PDD_CPU_THREADS``, default the CPUs the process may run on), ``run_batch``, ``cpu_mem_arena`` ("0":
return memory to the system after each call instead of keeping ONNX Runtime's arena at its peak).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The bundled kernels package beside this file (the generator's KERNELS_FOLDER), and the module name it is
# imported under: not "kernels", so that it never stands in for, or is shadowed by, another package.
KERNELS_FOLDER = "kernels"
_KERNELS_MODULE = "pdd_served_kernels"


def error_response(message: str) -> pb_utils.InferenceResponse:
    """An error response marked as the client's fault where this Triton version has error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def load_kernels(version_dir: Path) -> ModuleType:
    """The bundled ``kernels`` package's ONNX Runtime ops module (``kernels/ort_ops.py``), imported from its files."""
    folder = version_dir / KERNELS_FOLDER
    if not (folder / "__init__.py").is_file():
        raise pb_utils.TritonModelException(
            f"{folder} is missing: the plugin ONNX form runs its custom nodes with the kernels bundled there; "
            "regenerate the repository with `pdd export triton-repo`")
    if _KERNELS_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_KERNELS_MODULE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[_KERNELS_MODULE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{_KERNELS_MODULE}.ort_ops")


def plugin_graph(path: Path, options: ort.SessionOptions, version_dir: Path) -> bytes:
    """The plugin-form ONNX at ``path`` ready for ONNX Runtime: the CPU scan kernel built (or found in its
    cache), both Python ops registered in ``options``, the graph's custom nodes moved to their domain."""
    ops = load_kernels(version_dir)
    try:
        ops.cpu_lib.load()
    except (ops.cpu_lib.CpuKernelUnavailable, OSError) as exc:
        raise pb_utils.TritonModelException(
            f"{path} is the plugin ONNX form, whose SS2DScan nodes run the CPU scan kernel compiled on this "
            f"server when the model loads, and it cannot be built here: {exc}. Either install a C compiler on "
            "the server (Debian/Ubuntu: apt-get install gcc; or point CC at one), or regenerate the repository "
            "with `pdd export triton-repo --onnx-form portable` (standard ONNX ops only, slower on CPU)") from exc
    ops.configure_session(options, ops.register_ort_ops())
    graph = onnx.load(str(path))
    return ops.to_ort_domain_inplace(graph, ops.CPU_KERNEL).SerializeToString()


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        path = version_dir / params["onnx_file"]
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
        form = params.get("onnx_form", "portable")
        if form not in ("plugin", "portable"):
            raise pb_utils.TritonModelException(f"config parameter onnx_form is {form!r}; expected 'plugin' or "
                                                "'portable'")
        source = plugin_graph(path, options, version_dir) if form == "plugin" else str(path)
        self.session = ort.InferenceSession(source, options, providers=providers)
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
