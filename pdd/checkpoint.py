"""Self-contained PDD checkpoints: config, every weight (teachers included), calibration and training state.

Written atomically (temporary file, fsync, rename), so a kill mid-write never damages the previous file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from pdd.backbones.weights import WeightsError, check_and_load, load_checkpoint_file
from pdd.calibration import Calibration, CalibrationError
from pdd.config import ConfigError, PDDConfig, atomic_file

__all__ = ["CHECKPOINT_FORMAT", "atomic_torch_save", "load_pdd", "read_calibration", "read_checkpoint", "save_pdd",
           "store_calibration"]

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

    ``overrides`` change run-time settings that do not touch weights (``scan_impl``, ``head_impl``).
    """
    from pdd.baselines import build_model  # the RD4AD baseline shares this checkpoint format

    obj = read_checkpoint(path)
    try:
        cfg = PDDConfig.from_dict(obj["config"], source=f"{path} config")
    except ConfigError as exc:
        raise WeightsError(f"PDD checkpoint {path} has an invalid config: {exc}") from exc
    weight_fields = {"vmamba_weights", "wrn_weights", "image_size", "shared_decoder", "decoder_blocks", "model"}
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
