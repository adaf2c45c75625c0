"""The four model configs of the PDD Triton repository: model names, the served network's facts
(:class:`EngineArtifact`, read from an ONNX or TensorRT export's metadata), ``config.pbtxt`` writing and parsing.

:mod:`export.triton_repo` assembles and checks the repository from these.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.metadata import TensorSpec, read_engine_metadata, read_onnx_metadata
from kernels.ort_ops import BUNDLE
from pdd.calibration import Calibration
from pdd.config import ConfigError, PDDConfig
from pdd.data.readers import DecodeBudget

__all__ = [
    "DEFAULT_ONNX_FORM", "DEFAULT_QUEUE_DELAY_US", "ENGINE", "ENSEMBLE", "FLAVOURS", "INSTANCE_KINDS",
    "KERNELS_FOLDER", "MAX_SIDE", "MODEL_NAMES", "POSTPROCESS", "PREPROCESS", "READERS_FOLDER", "EngineArtifact",
    "RepositoryError",
    "artifact_from_engine", "artifact_from_onnx", "check_repository", "config_text", "engine_config",
    "ensemble_config", "parse_config", "postprocess_config", "postprocess_note", "preprocess_config",
    "repository_flavour", "write_config",
]

FLAVOURS = ("tensorrt", "onnxruntime", "python")
# The ONNX form each ONNX-serving flavour exports by default: the python flavour runs the plugin form's
# custom nodes with the compiled CPU scan kernel (~1.4x faster than the portable graph on CPU); Triton's
# ONNX Runtime backend has no Python ops, so it serves the portable form only.
DEFAULT_ONNX_FORM = {"python": "plugin", "onnxruntime": "portable"}
# Where a plugin-form python engine finds the torch-free kernels package (kernels.ort_ops.BUNDLE) beside
# its model.py; export/triton_models/ort_engine.py reads the same name.
KERNELS_FOLDER = "kernels"
# Where the preprocess model finds the image readers (pdd.data.readers.BUNDLE) beside its model.py, imported
# from there as a package; export/triton_models/preprocess.py reads the same name.
READERS_FOLDER = "readers"
ENSEMBLE, PREPROCESS, ENGINE, POSTPROCESS = "pdd", "preprocess", "pdd_engine", "postprocess"
MODEL_NAMES = (ENSEMBLE, PREPROCESS, ENGINE, POSTPROCESS)
# Largest image side the preprocess model accepts: a 4096² RGB image is 48 MiB of uint8 and ~200 MiB as
# float32 before resizing; larger requests are refused rather than risk the server's memory.
MAX_SIDE = 4096
# Dynamic batching of the engine: how long a request may wait for others to share its batch.
DEFAULT_QUEUE_DELAY_US = 500

_OUTPUTS = ("pred_score", "anomaly_map")
_TYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "uint8": mc.TYPE_UINT8, "bool": mc.TYPE_BOOL}
INSTANCE_KINDS = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "gpu": mc.ModelInstanceGroup.KIND_GPU,
          "auto": mc.ModelInstanceGroup.KIND_AUTO}


class RepositoryError(ValueError):
    """The inputs cannot make a valid repository, or a repository on disk is not valid."""


@dataclass(frozen=True)
class EngineArtifact:
    """The network the ``pdd_engine`` step serves, with the facts the other steps need.

    files: name inside the version folder -> source file; input: the float (B, 3, S, S) image tensor;
    outputs: ``pred_score`` (B,) and ``anomaly_map`` (B, S, S) specs; min_batch / max_batch: the batch
    range the artifact accepts (max None: no limit known); random_teachers: the teachers it was trained
    without weights for, as recorded in its config; onnx_form: "portable" or "plugin" for an ONNX export
    (None for a TensorRT engine).
    """

    files: dict[str, Path]
    input: TensorSpec
    outputs: dict[str, TensorSpec]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    calibration: Calibration | None
    max_batch: int | None
    description: str
    min_batch: int = 1
    random_teachers: tuple[str, ...] = ()
    onnx_form: str | None = None


def _square_size(image_size: Sequence[int], where: Path) -> int:
    h, w = (int(v) for v in image_size)
    if h != w:
        raise RepositoryError(f"{where}: image size {h}x{w} is not square; PDD is exported at S x S")
    return h


def _tensors(where: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], preprocess: bool
             ) -> tuple[TensorSpec, dict[str, TensorSpec]]:
    if preprocess:
        raise RepositoryError(f"{where} was exported with preprocessing in the graph (uint8 NHWC input); the "
                              "repository's preprocess model does that work: export without --preprocess")
    if len(inputs) != 1 or inputs[0].dtype not in ("float32", "float16") or len(inputs[0].shape) != 4:
        raise RepositoryError(f"{where}: expected one float image input (B, 3, S, S), found "
                              f"{[(s.name, s.dtype, s.shape) for s in inputs]}")
    found = {s.name: s for s in outputs}
    missing = [n for n in _OUTPUTS if n not in found]
    if missing:
        raise RepositoryError(f"{where}: outputs {missing} are missing (has {sorted(found)}); re-export the model")
    return inputs[0], {n: found[n] for n in _OUTPUTS}


def _normalisation(where: Path, norm: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    except (KeyError, TypeError, ValueError):
        raise RepositoryError(f"{where}: metadata 'normalisation' lacks three-value 'mean' and 'std' "
                              f"({norm})") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise RepositoryError(f"{where}: normalisation mean {mean} / std {std} must be three values, std > 0")
    return mean, std


def _random_teachers(config: dict) -> tuple[str, ...]:
    """Teachers the exported model's config names no weights for (nothing when there is no valid config)."""
    try:
        return tuple(name for name, _ in PDDConfig.from_dict(config).teachers_without_weights()) if config else ()
    except ConfigError:
        return ()


def artifact_from_onnx(path: Path) -> EngineArtifact:
    """An ONNX export (``model.onnx``, either form) and its ``model.json``."""
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise RepositoryError(f"no ONNX file at {path}; export one with `pdd export onnx`")
    meta = read_onnx_metadata(path)
    inp, outs = _tensors(path, meta.inputs, meta.outputs, meta.preprocess)
    mean, std = _normalisation(path, meta.normalisation)
    nodes = f" with custom ops {', '.join(meta.custom_ops)}" if meta.custom_ops else ""
    return EngineArtifact({"model.onnx": path, "model.json": path.with_suffix(".json")}, inp, outs,
                          _square_size(meta.image_size, path), mean, std, meta.calibration, meta.batch[1],
                          f"{meta.form} ONNX{nodes}, opset {meta.opset}, sha256 {meta.sha256[:12]}",
                          random_teachers=_random_teachers(meta.config), onnx_form=meta.form)


def artifact_from_engine(folder: Path) -> EngineArtifact:
    """A TensorRT engine folder from ``export/build_trt.py``: ``engine.plan`` and ``engine.json``."""
    plan = folder / "engine.plan"
    if not plan.is_file():
        raise RepositoryError(f"no TensorRT engine at {plan}; build one with export/build_trt.py")
    meta = read_engine_metadata(folder)
    inp, outs = _tensors(folder, meta.inputs, meta.outputs, meta.preprocess)
    mean, std = _normalisation(folder, meta.normalisation)
    profile = meta.profile.get(inp.name, {})
    if "min" not in profile or "max" not in profile:
        raise RepositoryError(f"{folder / 'engine.json'}: no optimisation profile for input {inp.name!r} "
                              f"(has {sorted(meta.profile)}); rebuild the engine with export/build_trt.py")
    return EngineArtifact({"model.plan": plan, "engine.json": folder / "engine.json"}, inp, outs,
                          _square_size(meta.image_size, folder), mean, std, meta.calibration,
                          int(profile["max"][0]),
                          f"TensorRT {meta.tensorrt_version} engine ({meta.precision}) for {meta.device_name} "
                          f"(compute capability {meta.compute_capability}); the server's TensorRT must be "
                          f"{meta.tensorrt_version}", min_batch=int(profile["min"][0]),
                          random_teachers=_random_teachers(meta.config))


# --- config builders -----------------------------------------------------------------------------------


def _tensor(cls: type, name: str, dtype: int, dims: Sequence[int], **extra: object) -> object:
    return cls(name=name, data_type=dtype, dims=list(dims), **extra)


def _set_params(cfg: mc.ModelConfig, **values: str) -> None:
    for key, value in values.items():
        cfg.parameters[key].string_value = value


def _warmup(batch_sizes: Sequence[int], inputs: dict[str, tuple[int, Sequence[int]]]) -> list[mc.ModelWarmup]:
    """Zero-filled warm-up requests, one per batch size, so the first client does not pay for set-up."""
    return [mc.ModelWarmup(name=f"zeros_batch{b}", batch_size=b, inputs={
        name: mc.ModelWarmup.Input(data_type=dtype, dims=list(dims), zero_data=True)
        for name, (dtype, dims) in inputs.items()}) for b in sorted(set(batch_sizes))]


def _batching(max_batch_size: int, delay_us: int) -> mc.ModelDynamicBatching:
    preferred = [b for b in (2, 4, 8, 16, 32, 64) if b <= max_batch_size][-2:]
    return mc.ModelDynamicBatching(preferred_batch_size=preferred, max_queue_delay_microseconds=delay_us)


def _python_model(name: str, max_batch_size: int) -> mc.ModelConfig:
    return mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size,
                          dynamic_batching=_batching(max_batch_size, 0),
                          instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)])


def preprocess_config(art: EngineArtifact, max_batch_size: int, budget: DecodeBudget) -> mc.ModelConfig:
    """``budget``: the decode budget the server's readers apply to files sent as bytes (its fields as parameters)."""
    s, out_type = art.image_size, _TYPES[art.input.dtype]
    cfg = _python_model(PREPROCESS, max_batch_size)
    cfg.input.extend([
        _tensor(mc.ModelInput, "images", mc.TYPE_UINT8, [-1, -1, -1], optional=True),
        _tensor(mc.ModelInput, "images_encoded", mc.TYPE_STRING, [1], optional=True),
        _tensor(mc.ModelInput, "dicom_window", mc.TYPE_FP32, [2], optional=True),
    ])
    cfg.output.append(_tensor(mc.ModelOutput, "normalised", out_type, [3, s, s]))
    _set_params(cfg, image_size=str(s), max_side=str(MAX_SIDE), output_dtype=art.input.dtype,
                                  mean=",".join(repr(v) for v in art.mean), std=",".join(repr(v) for v in art.std),
                **{f.name: str(getattr(budget, f.name)) for f in dataclasses.fields(budget)})
    cfg.model_warmup.extend(_warmup([1], {"images": (mc.TYPE_UINT8, [s, s, 3])}))
    return cfg


def engine_config(art: EngineArtifact, flavour: str, max_batch_size: int, instance_count: int,
                   instance_kind: str | None, queue_delay_us: int) -> mc.ModelConfig:
    s = art.image_size
    cfg = mc.ModelConfig(name=ENGINE, max_batch_size=max_batch_size,
                         dynamic_batching=_batching(max_batch_size, queue_delay_us))
    kind = instance_kind or {"tensorrt": "gpu", "onnxruntime": "auto", "python": "cpu"}[flavour]
    cfg.instance_group.append(mc.ModelInstanceGroup(kind=INSTANCE_KINDS[kind], count=instance_count))
    score, amap = art.outputs["pred_score"], art.outputs["anomaly_map"]
    cfg.input.append(_tensor(mc.ModelInput, art.input.name, _TYPES[art.input.dtype], [3, s, s]))
    if flavour == "python":
        # Our model.py emits the score as (B, 1) itself.
        cfg.output.append(_tensor(mc.ModelOutput, "pred_score", _TYPES[score.dtype], [1]))
        cfg.backend = "python"
        # On CPU: one image per ONNX Runtime call and no memory arena, to bound the stub's memory (~2 GiB
        # per 256² image); batching buys little there, as the graph is compute-bound.
        on_cpu = kind == "cpu"
        _set_params(cfg, onnx_file="model.onnx", onnx_form=art.onnx_form, input_name=art.input.name,
                    intra_op_threads="0", run_batch="1" if on_cpu else str(max_batch_size),
                    cpu_mem_arena="0" if on_cpu else "1")
    else:
        # The network's score is (B,); Triton needs at least one dimension after the batch one.
        cfg.output.append(_tensor(mc.ModelOutput, "pred_score", _TYPES[score.dtype], [1],
                                  reshape=mc.ModelTensorReshape(shape=[])))
        if flavour == "tensorrt":
            cfg.platform = "tensorrt_plan"
            cfg.optimization.cuda.graphs = True
        else:
            cfg.backend = "onnxruntime"
    cfg.output.append(_tensor(mc.ModelOutput, "anomaly_map", _TYPES[amap.dtype], [s, s]))
    # GPU flavours also warm up the largest batch (memory pools, CUDA graphs); ONNX Runtime on CPU needs
    # no more than one run.
    batches = [1] if flavour == "python" and kind == "cpu" else [1, max_batch_size]
    cfg.model_warmup.extend(_warmup(batches, {art.input.name: (_TYPES[art.input.dtype], [3, s, s])}))
    return cfg


def _threshold_param(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def postprocess_config(art: EngineArtifact, max_batch_size: int, image_threshold: float | None,
                        pixel_threshold: float | None) -> mc.ModelConfig:
    s = art.image_size
    score_type, map_type = _TYPES[art.outputs["pred_score"].dtype], _TYPES[art.outputs["anomaly_map"].dtype]
    cfg = _python_model(POSTPROCESS, max_batch_size)
    cfg.input.extend([_tensor(mc.ModelInput, "pred_score", score_type, [1]),
                      _tensor(mc.ModelInput, "anomaly_map", map_type, [s, s])])
    cfg.output.extend([_tensor(mc.ModelOutput, "normalised_score", mc.TYPE_FP32, [1]),
                       _tensor(mc.ModelOutput, "pred_label", mc.TYPE_BOOL, [1]),
                       _tensor(mc.ModelOutput, "pred_mask", mc.TYPE_BOOL, [s, s])])
    record = "" if art.calibration is None else json.dumps(art.calibration.to_dict(), separators=(",", ":"))
    _set_params(cfg, calibration=record, image_threshold=_threshold_param(image_threshold),
                pixel_threshold=_threshold_param(pixel_threshold), random_teachers=", ".join(art.random_teachers))
    cfg.model_warmup.extend(_warmup([1], {"pred_score": (score_type, [1]), "anomaly_map": (map_type, [s, s])}))
    return cfg


def ensemble_config(art: EngineArtifact, max_batch_size: int) -> mc.ModelConfig:
    s = art.image_size
    Step = mc.ModelEnsembling.Step
    cfg = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=max_batch_size)
    cfg.input.extend([
        _tensor(mc.ModelInput, "images", mc.TYPE_UINT8, [-1, -1, -1], optional=True),
        _tensor(mc.ModelInput, "images_encoded", mc.TYPE_STRING, [1], optional=True),
        _tensor(mc.ModelInput, "dicom_window", mc.TYPE_FP32, [2], optional=True),
    ])
    cfg.output.extend([
        _tensor(mc.ModelOutput, "pred_score", _TYPES[art.outputs["pred_score"].dtype], [1]),
        _tensor(mc.ModelOutput, "anomaly_map", _TYPES[art.outputs["anomaly_map"].dtype], [s, s]),
        _tensor(mc.ModelOutput, "normalised_score", mc.TYPE_FP32, [1]),
        _tensor(mc.ModelOutput, "pred_label", mc.TYPE_BOOL, [1]),
        _tensor(mc.ModelOutput, "pred_mask", mc.TYPE_BOOL, [s, s]),
    ])
    cfg.ensemble_scheduling.step.extend([
        Step(model_name=PREPROCESS, model_version=-1,
             input_map={"images": "images", "images_encoded": "images_encoded", "dicom_window": "dicom_window"},
             output_map={"normalised": "normalised"}),
        Step(model_name=ENGINE, model_version=-1, input_map={art.input.name: "normalised"},
             output_map={"pred_score": "pred_score", "anomaly_map": "anomaly_map"}),
        Step(model_name=POSTPROCESS, model_version=-1,
             input_map={"pred_score": "pred_score", "anomaly_map": "anomaly_map"},
             output_map={"normalised_score": "normalised_score", "pred_label": "pred_label",
                         "pred_mask": "pred_mask"}),
    ])
    return cfg


def config_text(cfg: mc.ModelConfig, role: str) -> str:
    header = "".join(f"# {line}\n" for line in role.splitlines())
    text = f"{header}# Generated by export/triton_repo.py; regenerate it rather than edit it.\n\n"
    return text + text_format.MessageToString(cfg, use_short_repeated_primitives=True)


def write_config(folder: Path, cfg: mc.ModelConfig, role: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config_text(cfg, role), encoding="utf-8")


def postprocess_note(calibration: Calibration | None, threshold: float | None,
                      pixel_threshold: float | None) -> str:
    """The postprocess config's header: the thresholds in force and where they come from."""
    if calibration is None and threshold is None:
        return ("No calibration in the export: nothing is flagged. Set one without re-exporting:\n"
                "pdd calibrate --checkpoint CKPT --data DIR --export <this repository>.")
    lines = []
    if calibration is not None:
        lines.append(f"image {calibration.image.describe()}")
        lines.append(f"pixel {calibration.pixel_point.describe()}")
    for name, value in (("image_threshold", threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None:
            lines.append(f"{name} {value!r} replaces the calibrated one.")
    return "\n".join(lines)


# --- parsing and checks --------------------------------------------------------------------------------


def parse_config(path: str | os.PathLike) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` into Triton's ``ModelConfig`` protobuf; errors name the file and line."""
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path} is not a valid Triton model config: {exc}") from None


def _io_types(cfg: mc.ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    return {t.name: t.data_type for t in cfg.input}, {t.name: t.data_type for t in cfg.output}


def check_repository(root: str | os.PathLike, require_weights: bool = True) -> dict[str, mc.ModelConfig]:
    """Parse every ``<model>/config.pbtxt`` under ``root`` and check the ensemble's wiring; return the configs.

    Checks: each config's name matches its folder and a version folder ``1`` exists; Python-backend models
    have ``1/model.py``, a plugin-form python engine its kernels package (:data:`KERNELS_FOLDER`); with
    ``require_weights``, the engine's ``model.onnx`` / ``model.plan`` exists; each
    ensemble step names a model of the repository, maps only inputs and outputs that model declares, reads
    only ensemble inputs or earlier steps' outputs of the same data type; every ensemble output is produced.
    """
    root = Path(root)
    configs: dict[str, mc.ModelConfig] = {}
    for path in sorted(root.glob("*/config.pbtxt")):
        cfg = parse_config(path)
        folder = path.parent
        if cfg.name != folder.name:
            raise RepositoryError(f"{path}: name {cfg.name!r} differs from its folder {folder.name!r}")
        if not (folder / "1").is_dir():
            raise RepositoryError(f"{folder} has no version folder '1'")
        if cfg.backend == "python" and not (folder / "1" / "model.py").is_file():
            raise RepositoryError(f"{folder / '1' / 'model.py'} is missing")
        weights = {"onnxruntime": "model.onnx", "tensorrt_plan": "model.plan"}.get(cfg.backend or cfg.platform)
        if cfg.backend == "python" and "onnx_file" in cfg.parameters:
            weights = cfg.parameters["onnx_file"].string_value
        if require_weights and weights and not (folder / "1" / weights).is_file():
            raise RepositoryError(f"{folder / '1' / weights} is missing; regenerate the repository with weights")
        form = cfg.parameters["onnx_form"].string_value if "onnx_form" in cfg.parameters else None
        if cfg.backend == "python" and form == "plugin":
            missing = [name for name in BUNDLE if not (folder / "1" / KERNELS_FOLDER / name).is_file()]
            if missing:
                raise RepositoryError(f"{folder / '1' / KERNELS_FOLDER} lacks {missing}, which the plugin-form "
                                      "engine runs its custom nodes with; regenerate the repository")
        configs[cfg.name] = cfg
    if not configs:
        raise RepositoryError(f"{root} holds no <model>/config.pbtxt")
    for name, cfg in configs.items():
        if cfg.platform != "ensemble":
            continue
        available, _ = _io_types(cfg)
        for k, step in enumerate(cfg.ensemble_scheduling.step):
            where = f"{root / name / 'config.pbtxt'} step {k} ({step.model_name})"
            if step.model_name not in configs:
                raise RepositoryError(f"{where}: no model {step.model_name!r} in {root}")
            inputs, outputs = _io_types(configs[step.model_name])
            for key, value in step.input_map.items():
                if key not in inputs:
                    raise RepositoryError(f"{where}: model has no input {key!r} (has {sorted(inputs)})")
                if value not in available:
                    raise RepositoryError(f"{where}: reads {value!r}, which no ensemble input or earlier step "
                                          "provides")
                if available[value] != inputs[key]:
                    raise RepositoryError(f"{where}: {value!r} is {mc.DataType.Name(available[value])}, input "
                                          f"{key!r} wants {mc.DataType.Name(inputs[key])}")
            for key, value in step.output_map.items():
                if key not in outputs:
                    raise RepositoryError(f"{where}: model has no output {key!r} (has {sorted(outputs)})")
                available[value] = outputs[key]
        for out in cfg.output:
            if available.get(out.name) != out.data_type:
                raise RepositoryError(f"{root / name / 'config.pbtxt'}: output {out.name!r} "
                                      f"({mc.DataType.Name(out.data_type)}) is not produced by any step")
    return configs


def repository_flavour(root: str | os.PathLike) -> str:
    """Which ``pdd_engine`` flavour a repository holds: "tensorrt", "onnxruntime" or "python"."""
    cfg = parse_config(Path(root) / ENGINE / "config.pbtxt")
    if cfg.platform == "tensorrt_plan":
        return "tensorrt"
    if cfg.backend in ("onnxruntime", "python"):
        return cfg.backend
    raise RepositoryError(f"{root}/{ENGINE}/config.pbtxt: unknown engine (platform {cfg.platform!r}, "
                          f"backend {cfg.backend!r})")
