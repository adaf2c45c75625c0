"""Self-contained PDD checkpoints: config, every weight (teachers included), calibration and training state.

Written atomically (temporary file, fsync, rename), so a kill mid-write never damages the previous file.
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

__all__ = ["CHECKPOINT_FORMAT", "atomic_torch_save", "load_model", "load_pdd", "read_calibration", "read_checkpoint",
           "save_pdd", "store_calibration"]

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


def read_calibration(obj: dict[str, Any], path: str | os.PathLike) -> Calibration | None:
    """The calibration stored in a checkpoint read by :func:`read_checkpoint` (None in older checkpoints)."""
    data = obj.get("calibration")
    if data is None:
        return None
    try:
        return Calibration.from_dict(data, f"PDD checkpoint {path} calibration")
    except CalibrationError as exc:
        raise WeightsError(str(exc)) from exc


def store_calibration(path: str | os.PathLike, calibration: Calibration) -> None:
    """Write ``calibration`` into the checkpoint at ``path`` (atomically; weights and training state kept)."""
    obj = read_checkpoint(path)
    obj["calibration"] = calibration.to_dict()
    atomic_torch_save(obj, path)


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


def load_pdd(path: str | os.PathLike, device: torch.device | str = "cpu", **overrides: Any) -> torch.nn.Module:
    """Rebuild the model of a checkpoint and load every weight strictly.

    ``overrides`` change settings that do not touch weights (``scan_impl``, ``head_impl``, ``image_size``:
    the model is fully convolutional, so the input size sets shapes, not weights).
    """
    obj = read_checkpoint(path)
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
    model = build_model(cfg, device="cpu", quiet=True)
    check_and_load(model, obj["state_dict"], f"PDD checkpoint {path}")
    model.cfg = dataclasses.replace(cfg, vmamba_weights=obj["config"].get("vmamba_weights"),
                                    wrn_weights=obj["config"].get("wrn_weights"))
    model.calibration = read_calibration(obj, path)
    random = model.cfg.teachers_without_weights()
    if random:
        log.warning("%s was trained with randomly initialised %s teacher(s): its scores only show that the "
                    "pipeline works, not what PDD detects (README: 'Pretrained teachers')",
                    path, " and ".join(name for name, _ in random))
    return model.to(device)


def load_model(checkpoint: str | os.PathLike | None = None, config: str | os.PathLike | PDDConfig | None = None, *,
               overrides: Sequence[str] = (), device: torch.device | str = "cpu", scan_impl: str | None = None,
               image_size: int | None = None) -> torch.nn.Module:
    """The model every command, exporter and benchmark uses: a checkpoint's, or a fresh one from a config.

    checkpoint: a PDD (or RD4AD) checkpoint, every weight loaded strictly. config: instead of a checkpoint, a
    config name, YAML file or :class:`PDDConfig` for a freshly initialised model (random teachers unless the
    config names weight files), with ``overrides`` (``key=value`` strings). ``scan_impl`` and ``image_size``
    change the config before the model is built, for either source. Returns the model in eval mode.

    >>> model = load_model(config="brain-synth", image_size=64, scan_impl="reference")  # doctest: +SKIP
    """
    run_time = {k: v for k, v in (("scan_impl", scan_impl), ("image_size", image_size)) if v}
    if checkpoint is not None:
        if config is not None or overrides:
            raise ValueError(f"give a checkpoint ({checkpoint}) or a config with overrides, not both")
        return load_pdd(checkpoint, device=device, **run_time).eval()
    if config is None:
        raise ValueError("load_model needs a checkpoint, or a config for a freshly initialised model")
    cfg = config if isinstance(config, PDDConfig) else resolve_config(config)
    cfg = apply_overrides(cfg, [f"scan_impl={scan_impl}"] * bool(scan_impl) + list(overrides))
    if image_size:
        cfg = cfg.replace(image_size=image_size)
    log.info("freshly initialised %s model from config %s (no checkpoint)", cfg.model,
             "object" if isinstance(config, PDDConfig) else config)
    return build_model(cfg, device).eval()
