"""Self-contained PDD checkpoints: config, every weight (teachers included), calibration and training state.

Written atomically (temporary file, fsync, rename), so a kill mid-write never damages the previous file.

Reduced precisions (:mod:`pdd.precision`) have their own records under ``"precisions"``: per precision its
calibration (fitted on that precision's scores) and its fidelity gates (:mod:`pdd.fidelity`) per CPU
instruction-set level, each with the seconds per image both precisions took; int8's also holds its
quantization (:mod:`pdd.int8`), which its threshold and gates belong to. The fp32 calibration stays
under ``"calibration"``. :func:`choose_precision` reads them for ``--precision auto``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from pdd.backbones.weights import WeightsError, check_and_load, load_checkpoint_file
from pdd.baselines import build_model
from pdd.calibration import Calibration, CalibrationError
from pdd.config import ConfigError, PDDConfig, apply_overrides, atomic_file, resolve_config
from pdd.int8 import Int8Calibration
from pdd.precision import FP32, MODEL_PRECISIONS, ModelPrecision, instruction_set, missing_features

__all__ = ["CHECKPOINT_FORMAT", "atomic_torch_save", "choose_precision", "load_model", "load_pdd", "read_calibration",
           "read_checkpoint", "read_gates", "read_quantization", "save_pdd", "store_calibration", "store_gate",
           "store_quantization"]

CHECKPOINT_FORMAT = "pdd-checkpoint/1"

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file in the same folder and an atomic rename."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def save_pdd(model: torch.nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Save a model built by :func:`pdd.build_pdd` (or the RD4AD baseline) with its config and calibration.

    ``extra`` entries (epoch, optimizer state, metrics, …) are stored beside the weights.
    """
    cfg = model.cfg
    payload = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "state_dict": model.state_dict(), **extra}
    if getattr(model, "calibration", None) is not None:
        payload["calibration"] = model.calibration.to_dict()
    atomic_torch_save(payload, path)


def _precision_record(obj: dict[str, Any], precision: str) -> dict[str, Any]:
    return obj.setdefault("precisions", {}).setdefault(precision, {"calibration": None, "gates": {}})


def read_calibration(obj: dict[str, Any], path: str | os.PathLike, precision: str = "fp32") -> Calibration | None:
    """The calibration of ``precision`` stored in a checkpoint read by :func:`read_checkpoint` (None when that
    precision was never calibrated, or in older checkpoints)."""
    data = obj.get("calibration") if precision == "fp32" else (obj.get("precisions", {}).get(precision) or {}).get(
        "calibration")
    if data is None:
        return None
    try:
        calibration = Calibration.from_dict(data, f"PDD checkpoint {path} calibration ({precision})")
    except CalibrationError as exc:
        raise WeightsError(str(exc)) from exc
    if calibration.precision != precision:
        raise WeightsError(f"PDD checkpoint {path}: the {precision} calibration record says it was fitted in "
                           f"{calibration.precision}; run `pdd calibrate --precision {precision}` again")
    return calibration


def store_calibration(path: str | os.PathLike, calibration: Calibration) -> None:
    """Write ``calibration`` into the checkpoint at ``path`` as its precision's (atomically; weights, training
    state and the other precisions' records kept)."""
    obj = read_checkpoint(path)
    if calibration.precision == "fp32":
        obj["calibration"] = calibration.to_dict()
    else:
        _precision_record(obj, calibration.precision)["calibration"] = calibration.to_dict()
    atomic_torch_save(obj, path)


def read_quantization(obj: dict[str, Any], path: str | os.PathLike) -> Int8Calibration | None:
    """The int8 quantization (:class:`pdd.int8.Int8Calibration`) stored in a checkpoint, or None."""
    data = (obj.get("precisions", {}).get("int8") or {}).get("quantization")
    return None if data is None else Int8Calibration.from_dict(data, f"PDD checkpoint {path}")


def store_quantization(path: str | os.PathLike, quantization: Int8Calibration) -> None:
    """Write an int8 quantization into the checkpoint at ``path`` (atomically). It replaces the int8 record
    whole: a threshold or gate measured with another quantization no longer holds."""
    obj = read_checkpoint(path)
    obj.setdefault("precisions", {})["int8"] = {"calibration": None, "gates": {},
                                                "quantization": quantization.to_dict()}
    atomic_torch_save(obj, path)


def store_gate(path: str | os.PathLike, gate: dict[str, Any], instruction_set: str,
               seconds_per_image: dict[str, float]) -> None:
    """Record a fidelity gate (:meth:`pdd.fidelity.GateResult.to_dict`) of the checkpoint at ``path``, measured on
    a CPU of ``instruction_set`` (:func:`pdd.precision.instruction_set`), with the seconds per image each
    precision took there; it replaces the previous gate of that precision on that level."""
    obj = read_checkpoint(path)
    _precision_record(obj, gate["precision"])["gates"][instruction_set] = {**gate,
                                                                           "seconds_per_image": seconds_per_image}
    atomic_torch_save(obj, path)


def read_gates(obj: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{precision: {instruction_set: gate record}}`` of a checkpoint read by :func:`read_checkpoint`."""
    return {p: dict(rec.get("gates") or {}) for p, rec in (obj.get("precisions") or {}).items()}


def choose_precision(obj: dict[str, Any], instruction_set: str, runnable: Sequence[str]) -> tuple[str, str]:
    """``--precision auto``: the fastest precision among ``runnable`` whose gate passed for this checkpoint on
    ``instruction_set`` (by the seconds per image its gate measured against fp32's), else fp32; with the reason."""
    passed = []
    for precision, gates in read_gates(obj).items():
        gate = gates.get(instruction_set)
        # A gate computed by emulation proves the numbers, not the speed: auto needs one measured natively.
        if precision in runnable and gate and gate.get("passed") and not gate.get("emulated"):
            seconds = gate["seconds_per_image"]
            passed.append((seconds[precision] / seconds["fp32"], precision))
    if not passed:
        return "fp32", f"no reduced precision passed its fidelity gate for this checkpoint on {instruction_set}"
    ratio, best = min(passed)
    if ratio >= 1.0:
        return "fp32", (f"{best} passed its gate on {instruction_set} but was not faster than fp32 ({ratio:.2f}x "
                        f"the time)")
    return best, f"{best} passed its fidelity gate on {instruction_set} and took {ratio:.2f}x fp32's time per image"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a PDD checkpoint file (format tag, config)."""
    obj = load_checkpoint_file(path)
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(
            f"{path} is not a PDD checkpoint (format {obj.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); "
            f"teacher weight files go in the config's vmamba_weights / wrn_weights instead"
        )
    if "state_dict" not in obj or "config" not in obj:
        raise WeightsError(f"PDD checkpoint {path} lacks its 'state_dict' or 'config' entry")
    return obj


def _graph_forms(precision: ModelPrecision) -> bool:
    """A reduced-precision PDD is built in its graph layer forms (Conv2d, ConvTranspose2d): the eager GEMM forms
    are fp32's fast path on the CPU, and oneDNN's bf16 convolutions (AMX) beat them in bf16 (eager, 128², batch 8,
    2 threads, interleaved: 166 ms per image against 269 for the GEMM forms and 258 for fp32)."""
    return precision != FP32


def load_pdd(path: str | os.PathLike, device: torch.device | str = "cpu", precision: ModelPrecision | str = FP32,
             **overrides: Any) -> torch.nn.Module:
    """Rebuild the model of a checkpoint and load every weight strictly.

    ``overrides`` change settings that do not touch weights (``scan_impl``, ``head_impl``, ``image_size``:
    the model is fully convolutional, so the input size sets shapes, not weights). ``precision``: the model is
    cast to it (:meth:`pdd.model.PDDModel.to_precision`) and takes that precision's calibration (fp32's, with
    a warning, when the precision was never calibrated); ``"auto"``: :func:`choose_precision` for this CPU.
    """
    obj = read_checkpoint(path)
    if precision == "auto":
        level = instruction_set()
        runnable = [p for p in MODEL_PRECISIONS if not missing_features(p)]
        name, why = choose_precision(obj, level, runnable)
        log.info("--precision auto: %s (%s)", name, why)
        precision = ModelPrecision(name)
    if not isinstance(precision, ModelPrecision):
        raise ValueError(f"precision must be a pdd.precision.ModelPrecision or 'auto', got {precision!r}")
    try:
        cfg = PDDConfig.from_dict(obj["config"], source=f"{path} config")
    except ConfigError as exc:
        raise WeightsError(f"PDD checkpoint {path} has an invalid config: {exc}") from exc
    weight_fields = {"vmamba_weights", "wrn_weights", "shared_decoder", "decoder_blocks", "model"}
    bad = weight_fields & set(overrides)
    if bad:
        raise ValueError(f"cannot override {sorted(bad)} when loading a checkpoint: they define its weights")
    # Teachers come from the checkpoint itself, so no weight files or downloads are needed.
    cfg = dataclasses.replace(cfg, vmamba_weights=None, wrn_weights=None, **overrides).validate()
    model = build_model(cfg, device="cpu", quiet=True, graph=_graph_forms(precision))
    check_and_load(model, obj["state_dict"], f"PDD checkpoint {path}")
    model.cfg = dataclasses.replace(cfg, vmamba_weights=obj["config"].get("vmamba_weights"),
                                    wrn_weights=obj["config"].get("wrn_weights"))
    model.calibration = read_calibration(obj, path, precision.name)
    model.quantization = read_quantization(obj, path) if model.cfg.model == "pdd" else None
    if precision != FP32:
        if model.cfg.model != "pdd":
            raise ValueError(f"{path}: reduced precision is defined for PDD, not {model.cfg.model!r}")
        if model.calibration is None and read_calibration(obj, path) is not None:
            model.calibration = read_calibration(obj, path)
            log.warning("%s has no %s calibration: using fp32's thresholds (run `pdd calibrate --precision %s`)",
                        path, precision.name, precision.name)
        del obj
        model.to_precision(precision)
    random = model.cfg.teachers_without_weights()
    if random:
        log.warning("%s was trained with randomly initialised %s teacher(s): its scores only show that the "
                    "pipeline works, not what PDD detects (README: 'Pretrained teachers')",
                    path, " and ".join(name for name, _ in random))
    return model.to(device)


def load_model(checkpoint: str | os.PathLike | None = None, config: str | os.PathLike | PDDConfig | None = None, *,
               overrides: Sequence[str] = (), device: torch.device | str = "cpu", scan_impl: str | None = None,
               image_size: int | None = None, precision: ModelPrecision | str = FP32) -> torch.nn.Module:
    """The model every command, exporter and benchmark uses: a checkpoint's, or a fresh one from a config.

    checkpoint: a PDD (or RD4AD) checkpoint, every weight loaded strictly. config: instead of a checkpoint, a
    config name, YAML file or :class:`PDDConfig` for a freshly initialised model (random teachers unless the
    config names weight files), with ``overrides`` (``key=value`` strings). ``scan_impl`` and ``image_size``
    change the config before the model is built, for either source. ``precision``: what the model computes in
    (see :func:`load_pdd`; ``"auto"`` needs a checkpoint's gates). Returns the model in eval mode.

    >>> model = load_model(config="brain-synth", image_size=64, scan_impl="reference")  # doctest: +SKIP
    """
    run_time = {k: v for k, v in (("scan_impl", scan_impl), ("image_size", image_size)) if v}
    if checkpoint is not None:
        if config is not None or overrides:
            raise ValueError(f"give a checkpoint ({checkpoint}) or a config with overrides, not both")
        return load_pdd(checkpoint, device=device, precision=precision, **run_time).eval()
    if config is None:
        raise ValueError("load_model needs a checkpoint, or a config for a freshly initialised model")
    cfg = config if isinstance(config, PDDConfig) else resolve_config(config)
    cfg = apply_overrides(cfg, [f"scan_impl={scan_impl}"] * bool(scan_impl) + list(overrides))
    if image_size:
        cfg = cfg.replace(image_size=image_size)
    log.info("freshly initialised %s model from config %s (no checkpoint)", cfg.model,
             "object" if isinstance(config, PDDConfig) else config)
    if precision == "auto":
        raise ValueError("--precision auto chooses by a checkpoint's fidelity gates: give --checkpoint")
    model = build_model(cfg, device, graph=_graph_forms(precision)).eval()
    if precision != FP32:
        if cfg.model != "pdd":
            raise ValueError(f"reduced precision is defined for PDD, not {cfg.model!r}")
        model.to_precision(precision)
    return model
