"""The exported artifacts a benchmark run measures: ONNX exports and TensorRT engines of one model in a
folder, tied to its weights by a fingerprint (:class:`Artifacts`), and how a failed preparation is recorded."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from export.metadata import read_engine_metadata, read_onnx_metadata
from export.onnx_export import export_onnx
from export.runtime import RuntimeUnavailable
from pdd.config import atomic_write_text

__all__ = ["Artifacts", "RuntimeFailed", "error_text", "model_fingerprint"]

_FINGERPRINT = "model-fingerprint.txt"


class RuntimeFailed(RuntimeError):
    """A runtime's preparation failed (e.g. its ONNX export); recorded as failed, not skipped."""



def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: ties exported artifacts to the weights they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 1500 else text[:1500] + " …"


class Artifacts:
    """ONNX exports and TensorRT engines of one model in a folder, tied to its weights by a fingerprint.

    Layout: ``onnx-<form>/model.onnx`` (+ ``model.json``), ``tensorrt-<form>-<precision>/`` (from
    export/build_trt.py) and ``model-fingerprint.txt``. An export is reused when it matches the fingerprint,
    the image size and the batch range.
    """

    def __init__(self, folder: Path, model: torch.nn.Module, image_size: int, max_batch: int,
                 portable_scan: str = "graph-sequential") -> None:
        self.folder, self.model, self.size, self.max_batch = folder, model, image_size, max_batch
        self.portable_scan = portable_scan  # the portable form's scan: graph-sequential on CPU, graph-parallel on GPU
        self._fingerprint: str | None = None
        self._errors: dict[str, str] = {}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def _stamped(self) -> bool:
        stamp = self.folder / _FINGERPRINT
        return stamp.is_file() and stamp.read_text().strip() == self.fingerprint()

    def onnx(self, form: str) -> Path:
        """``onnx-<form>/model.onnx`` for this model, size and batch range (exported unless reusable)."""
        if form in self._errors:
            raise RuntimeFailed(self._errors[form])
        path = self.folder / f"onnx-{form}" / "model.onnx"
        if path.is_file() and path.with_suffix(".json").is_file() and self._stamped():
            meta = read_onnx_metadata(path)
            if (tuple(meta.image_size) == (self.size, self.size) and meta.batch[0] <= 1
                    and meta.batch[1] >= self.max_batch and not meta.preprocess
                    and meta.scan_impl == (self.portable_scan if form == "portable" else "plugin")):
                return path
        print(f"exporting the {form} ONNX form ({self.size}², batch 1..{self.max_batch}"
              f"{f', {self.portable_scan} scans' if form == 'portable' else ''}) …", flush=True)
        start = time.perf_counter()
        try:
            export_onnx(self.model, path.parent, form=form, batch=(1, max(self.max_batch, 2)), image_size=self.size,
                        scan_impl=self.portable_scan if form == "portable" else None)
        except Exception as exc:  # one failed export skips its runtimes, not the benchmark
            self._errors[form] = f"ONNX export of the {form} form failed: {error_text(exc)}"
            raise RuntimeFailed(self._errors[form]) from exc
        atomic_write_text(self.folder / _FINGERPRINT, self.fingerprint() + "\n")
        print(f"  exported in {time.perf_counter() - start:.0f} s", flush=True)
        return path

    def engine_dir(self, form: str, precision: str) -> Path:
        """``tensorrt-<form>-<precision>``, checked to be built from this folder's export of this model."""
        folder = self.folder / f"tensorrt-{form}-{precision}"
        build = (f"python export/build_trt.py --onnx {self.folder}/onnx-{form}/model.onnx --precision {precision} "
                 f"--batch 1:{self.max_batch}:{self.max_batch} --out {folder}")
        if not (folder / "engine.json").is_file():
            raise RuntimeUnavailable(f"no {precision} engine of the {form} form at {folder}; build it with "
                                     f"`python benchmarks/run.py --prepare-only --artifacts {self.folder}` then "
                                     f"`{build}`")
        source = self.folder / f"onnx-{form}" / "model.json"
        if not source.is_file() or not self._stamped():
            raise RuntimeUnavailable(f"{folder} was not built from an export of this run's model; rebuild: `{build}`")
        if read_engine_metadata(folder).onnx_sha256 != read_onnx_metadata(source).sha256:
            raise RuntimeUnavailable(f"{folder} was built from another ONNX file than {source}; rebuild: `{build}`")
        return folder
