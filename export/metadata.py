"""Metadata written beside every exported artifact: what it is, how it was made, what it needs to run.

``model.onnx`` gets ``model.json`` (:class:`OnnxMetadata`); a TensorRT engine folder holds
``engine.plan`` and ``engine.json`` (:class:`EngineMetadata`). Serving reads these files instead of
guessing: input layout and normalisation, batch range, the calibration (operating thresholds and score
normalisation, :class:`pdd.calibration.Calibration`) once one is known. An
engine only runs on the TensorRT version and GPU compute capability that built it, so
:func:`check_engine_compatible` refuses any other, naming both sides.

Every file is written atomically (temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernels.target import parse_ptx_isa, version_text
from pdd.calibration import Calibration, CalibrationError
from pdd.config import atomic_write_bytes
from pdd.impl_names import DEPRECATED_SCAN_GRAPHS

__all__ = [
    "ENGINE_FILE",
    "ENGINE_FORMAT",
    "ENGINE_METADATA",
    "ONNX_FORMAT",
    "EngineMetadata",
    "EngineMismatch",
    "MetadataError",
    "OnnxMetadata",
    "TensorSpec",
    "atomic_write_bytes",
    "check_engine_compatible",
    "metadata_path",
    "read_engine_metadata",
    "read_onnx_metadata",
    "sha256_file",
    "sha256_texts",
    "store_metadata_calibration",
    "versions",
    "write_metadata",
]

ONNX_FORMAT = "pdd-onnx/1"
ENGINE_FORMAT = "pdd-tensorrt-engine/1"
ENGINE_FILE = "engine.plan"
ENGINE_METADATA = "engine.json"


class MetadataError(ValueError):
    """A metadata file is missing, unreadable or not of the expected kind."""


class EngineMismatch(RuntimeError):
    """A TensorRT engine was built for another TensorRT version, GPU or source model than the one at hand."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype ('float32', 'uint8', …) and shape (ints, or a name for dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


# The old metadata field ``scan_graph`` against the scan implementation it names (the plugin form wrote "plugin").
_SCAN_IMPLS_BY_GRAPH = {**DEPRECATED_SCAN_GRAPHS, "plugin": "plugin"}
_SCAN_GRAPHS_BY_IMPL = {v: k for k, v in _SCAN_IMPLS_BY_GRAPH.items()}


@dataclass
class OnnxMetadata:
    """Beside ``<name>.onnx`` as ``<name>.json``."""

    form: str
    opset: int
    file: str
    sha256: str
    size_bytes: int
    nodes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    image_size: tuple[int, int]
    batch: tuple[int, int]
    preprocess: bool
    input_layout: str
    normalisation: dict[str, Any]
    config: dict[str, Any]
    custom_ops: list[str]
    precision: str = "fp32"
    versions: dict[str, str] = field(default_factory=dict)
    # The SS2D scan implementation the graph was built with: "graph-sequential" or "graph-parallel" (portable
    # form), "plugin" (custom ops). Files written before it existed have ``scan_graph``, mapped on reading.
    scan_impl: str = "graph-parallel"
    # The checkpoint's calibration; serving and the runtimes turn scores into decisions with it. Files written
    # before it existed have ``anomaly_threshold`` (a bare threshold), read as a manual calibration.
    calibration: Calibration | None = None
    format: str = ONNX_FORMAT

    @property
    def scan_graph(self) -> str:
        """Deprecated: the old name of :attr:`scan_impl` ("sequential", "parallel" or "plugin")."""
        return _SCAN_GRAPHS_BY_IMPL.get(self.scan_impl, self.scan_impl)


@dataclass
class EngineMetadata:
    """Beside ``engine.plan`` as ``engine.json``."""

    engine_file: str
    engine_sha256: str
    precision: str
    onnx_form: str
    onnx_sha256: str
    kernels_sha256: str
    plugins: list[str]
    tensorrt_version: str
    device_name: str
    compute_capability: str
    profile: dict[str, dict[str, list[int]]]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    image_size: tuple[int, int]
    preprocess: bool
    normalisation: dict[str, Any]
    config: dict[str, Any]
    # The plugin kernels' PTX: its .target (e.g. "sm_90a"), its highest .version (e.g. "9.0") and the Triton
    # that wrote it; None in engines without plugins (portable form) and in metadata older than these fields.
    cuda_arch: str | None = None
    ptx_isa: str | None = None
    triton_version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    calibration: Calibration | None = None
    format: str = ENGINE_FORMAT


def metadata_path(artifact: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.json``; ``engine.plan`` -> ``engine.json``."""
    return Path(artifact).with_suffix(".json")


def write_metadata(path: str | os.PathLike, meta: OnnxMetadata | EngineMetadata) -> Path:
    """Write ``meta`` as indented JSON (atomically) and return the path."""
    data = dataclasses.asdict(meta)
    data["calibration"] = None if meta.calibration is None else meta.calibration.to_dict()
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def _load(path: str | os.PathLike, expected_format: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file {path} does not exist; re-export the artifact to write it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MetadataError(f"metadata file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise MetadataError(f"{path} is not {expected_format} metadata (format {found!r})")
    return data


def _specs(items: Iterable[Mapping[str, Any]]) -> list[TensorSpec]:
    return [TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in items]


def _from_dict(cls: type, data: dict[str, Any], path: str | os.PathLike) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise MetadataError(f"metadata file {path} lacks {missing}; re-export the artifact")
    values = {k: v for k, v in data.items() if k in names}
    try:
        if values.get("calibration") is not None:
            values["calibration"] = Calibration.from_dict(values["calibration"], f"{path} calibration")
        elif data.get("anomaly_threshold") is not None:
            values["calibration"] = Calibration.manual(data["anomaly_threshold"], f"anomaly_threshold of {path}")
    except CalibrationError as exc:
        raise MetadataError(str(exc)) from None
    if cls is OnnxMetadata and "scan_impl" not in data and "scan_graph" in data:
        values["scan_impl"] = _SCAN_IMPLS_BY_GRAPH.get(data["scan_graph"], data["scan_graph"])
    for key in ("inputs", "outputs"):
        values[key] = _specs(values[key])
    for key in ("image_size", "batch"):
        if key in values:
            values[key] = tuple(values[key])
    return cls(**values)


def read_onnx_metadata(path: str | os.PathLike) -> OnnxMetadata:
    """Read ``model.json`` (pass the JSON path, or the ONNX path beside it)."""
    path = Path(path)
    if path.suffix == ".onnx":
        path = metadata_path(path)
    return _from_dict(OnnxMetadata, _load(path, ONNX_FORMAT), path)


def read_engine_metadata(path: str | os.PathLike) -> EngineMetadata:
    """Read ``engine.json`` (pass the JSON path, the engine path, or the engine folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / ENGINE_METADATA
    elif path.suffix == ".plan":
        path = metadata_path(path)
    return _from_dict(EngineMetadata, _load(path, ENGINE_FORMAT), path)


def store_metadata_calibration(path: str | os.PathLike, calibration: Calibration) -> Path:
    """Write ``calibration`` into the metadata of an export (``model.onnx`` / ``model.json``, or an engine
    folder / ``engine.json``) without re-exporting it; returns the metadata file."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".plan" or path.name == ENGINE_METADATA:
        meta: OnnxMetadata | EngineMetadata = read_engine_metadata(path)
        target = path / ENGINE_METADATA if path.is_dir() else metadata_path(path)
    else:
        meta = read_onnx_metadata(path)
        target = metadata_path(path)
    meta.calibration = calibration
    return write_metadata(target, meta)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_texts(texts: Mapping[str, str]) -> str:
    """One hash over named texts (e.g. tactic -> PTX), independent of the mapping's order."""
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(name.encode())
        h.update(b"\0")
        h.update(texts[name].encode())
        h.update(b"\0")
    return h.hexdigest()


def versions(*modules: str) -> dict[str, str]:
    """Installed versions of the named packages (only those that import)."""
    import importlib

    out = {}
    for name in modules:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except (ImportError, AttributeError):
            continue
    return out


def _major_minor_patch(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:3])


def check_engine_compatible(meta: EngineMetadata, *, tensorrt_version: str, compute_capability: str,
                            device_name: str | None = None, onnx_sha256: str | None = None,
                            kernels_sha256: str | None = None, driver_ptx_isa: int | None = None,
                            where: str = "engine") -> list[str]:
    """Raise :class:`EngineMismatch` unless the engine can run here; return warnings that do not block.

    Blocking: another TensorRT version (major.minor.patch), another compute capability (plugin kernels in
    ``sm_90a`` code run on 9.0 only), plugin PTX newer than ``driver_ptx_isa`` (the highest PTX ISA this
    driver loads, ``kernels.target.driver_ptx_isa()``), and (when given) another source ONNX or kernel PTX
    than the engine was built from. Another device name with the same compute capability only warns:
    TensorRT runs it, possibly with tactics tuned for the other GPU.
    """
    problems = []
    if _major_minor_patch(meta.tensorrt_version) != _major_minor_patch(tensorrt_version):
        problems.append(f"it was built with TensorRT {meta.tensorrt_version}, this is TensorRT {tensorrt_version}")
    if meta.compute_capability != compute_capability:
        arch = f"; its plugin kernels are {meta.cuda_arch} code" if meta.cuda_arch else ""
        problems.append(f"it was built for compute capability {meta.compute_capability} ({meta.device_name}"
                        f"{arch}), this GPU has {compute_capability}" + (f" ({device_name})" if device_name else ""))
    if meta.ptx_isa and driver_ptx_isa is not None and parse_ptx_isa(meta.ptx_isa) > driver_ptx_isa:
        here = version_text(driver_ptx_isa)
        problems.append(f"its plugin kernels are PTX ISA {meta.ptx_isa} and this NVIDIA driver loads PTX up to "
                        f"{here}: update the driver, or rebuild with --ptx-isa {here}")
    if onnx_sha256 is not None and meta.onnx_sha256 != onnx_sha256:
        problems.append(f"it was built from ONNX sha256 {meta.onnx_sha256[:12]}…, the ONNX at hand has "
                        f"{onnx_sha256[:12]}…")
    if kernels_sha256 is not None and meta.kernels_sha256 != kernels_sha256:
        problems.append(f"its plugin kernels (PTX sha256 {meta.kernels_sha256[:12]}…) differ from the current "
                        f"kernels ({kernels_sha256[:12]}…)")
    if problems:
        raise EngineMismatch(f"refusing to load {where}: " + "; ".join(problems)
                             + ". Rebuild it here with: python export/build_trt.py ...")
    warnings = []
    if device_name is not None and meta.device_name != device_name:
        warnings.append(f"{where} was tuned on {meta.device_name}, running on {device_name} (same compute "
                        f"capability {compute_capability}); rebuild for best speed")
    return warnings
