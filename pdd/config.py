"""Typed configuration: every size, weight and threshold of PDD lives here, validated on load.

YAML on disk mirrors the dataclasses; unknown keys are errors, not silently ignored::

    >>> from pdd.config import PDDConfig
    >>> cfg = PDDConfig(image_size=128)
    >>> PDDConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdd.impl_names import HEAD_IMPLS, SCAN_CHOICES, canonical_scan_impl

__all__ = [
    "ConfigError", "DataConfig", "LossConfig", "PDDConfig", "TrainConfig", "apply_overrides", "atomic_file",
    "atomic_write_bytes", "atomic_write_text", "resolve_config",
]


class ConfigError(ValueError):
    """A configuration value or file is invalid."""


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[typing.BinaryIO]:
    """Binary file object whose content replaces ``path`` only when the block ends without error.

    Written to a temporary file in the same folder, fsynced, then renamed: a kill never leaves a
    half-written file and never damages the previous one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True)
class LossConfig:
    """Weights and thresholds of L = L_prior + L_plain + div_weight · L_div (the authors' final setting)."""

    prior_mse_weight: float = 0.02
    prior_cos_weight: float = 0.05
    # "plus_cos": the released code's +cos term (pushes the prior student away in angle);
    # "one_minus_cos": the conventional 1 − cos.
    prior_cos_form: str = "plus_cos"
    plain_mse_weight: float = 0.02
    div_weight: float = 0.5
    div_level1_max_cos: float = 0.75
    div_deep_min_cos: float = 0.30

    def validate(self) -> None:
        if self.prior_cos_form not in ("plus_cos", "one_minus_cos"):
            raise ConfigError(f"loss.prior_cos_form must be 'plus_cos' or 'one_minus_cos', got {self.prior_cos_form!r}")
        for name in ("prior_mse_weight", "prior_cos_weight", "plain_mse_weight", "div_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("div_level1_max_cos", "div_deep_min_cos"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"loss.{name} is a cosine and must lie in [-1, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule (the authors': Adam 2e-3, betas (0.5, 0.999), cosine to 2e-4 over 40 epochs)."""

    epochs: int = 100
    batch_size: int = 10
    lr: float = 2e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    cosine_t_max: int = 40
    eta_min: float = 2e-4
    val_fraction: float = 0.1
    eval_every: int = 10
    seed: int = 0
    amp: bool = True
    num_workers: int = 0
    feature_cache: str = "memory"
    max_steps_per_epoch: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"train.epochs and train.batch_size must be ≥ 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.scheduler not in ("cosine", "constant"):
            raise ConfigError(f"train.scheduler must be 'cosine' or 'constant', got {self.scheduler!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.feature_cache not in ("none", "memory", "disk"):
            raise ConfigError(f"train.feature_cache must be 'none', 'memory' or 'disk', got {self.feature_cache!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are read.

    ``max_pixels``, ``max_voxels``, ``max_frames``, ``max_bytes``, ``max_seconds``: the decode budget's
    limits (``pdd.data.readers.DecodeBudget``) where set; None keeps the readers' defaults.
    """

    root: str | None = None
    layout: str = "mvtec"
    class_names: tuple[str, ...] = ()
    skip_bad: bool = False
    max_pixels: int | None = None
    max_voxels: int | None = None
    max_frames: int | None = None
    max_bytes: int | None = None
    max_seconds: float | None = None

    def validate(self) -> None:
        if self.layout not in ("mvtec", "meta_json"):
            raise ConfigError(f"data.layout must be 'mvtec' or 'meta_json', got {self.layout!r}")


@dataclass(frozen=True)
class PDDConfig:
    """The PDD model (and, for training runs, its loss, optimiser and data).

    ``vmamba_weights`` / ``wrn_weights``: None (random init, for tests and speed runs), a local file
    path, or a hub name (``"hub"`` for VMamba; ``"timm"`` = racm_in1k or ``"torchvision"`` =
    IMAGENET1K_V1 for WRN50-2). ``random_teachers``: training refuses a teacher without weights unless
    this says that random teachers are intended (smoke tests, the offline demo, ``brain-synth``).
    """

    model: str = "pdd"
    image_size: int = 256
    vmamba_weights: str | None = None
    wrn_weights: str | None = None
    shared_decoder: bool = True
    decoder_blocks: int = 2
    scan_impl: str = "auto"
    head_impl: str = "reference"
    sigma: float = 4.0
    random_teachers: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        # Old scan names (configs, checkpoints, CLI) map to the current ones with a DeprecationWarning.
        if isinstance(self.scan_impl, str) and self.scan_impl in SCAN_CHOICES:
            object.__setattr__(self, "scan_impl", canonical_scan_impl(self.scan_impl, allow_auto=True))

    def validate(self) -> PDDConfig:
        if self.model not in ("pdd", "rd4ad"):
            raise ConfigError(f"model must be 'pdd' or 'rd4ad', got {self.model!r}")
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(
                f"image_size must be a positive multiple of 32 (the teachers downsample by 32), got {self.image_size}"
            )
        if self.scan_impl not in SCAN_CHOICES:
            raise ConfigError(f"scan_impl must be one of {SCAN_CHOICES}, got {self.scan_impl!r}")
        if self.head_impl not in HEAD_IMPLS:
            raise ConfigError(f"head_impl must be one of {HEAD_IMPLS}, got {self.head_impl!r}")
        if self.sigma <= 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma}")
        if self.decoder_blocks < 1:
            raise ConfigError(f"decoder_blocks must be ≥ 1, got {self.decoder_blocks}")
        self.loss.validate()
        self.train.validate()
        self.data.validate()
        return self

    def teachers_without_weights(self) -> list[tuple[str, str]]:
        """The teachers this model uses that no weights are given for, as ``(name, config key)`` pairs."""
        used = (("WRN50-2", "wrn_weights"),) if self.model == "rd4ad" else (
            ("WRN50-2", "wrn_weights"), ("VMamba-T", "vmamba_weights"))
        return [(name, key) for name, key in used if getattr(self, key) is None]

    def replace(self, **changes: Any) -> PDDConfig:
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PDDConfig:
        return _from_plain(cls, data, source).validate()

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PDDConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _from_plain(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where} must have {len(item_types)} items, got {len(value)}")
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _from_plain(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(cfg: PDDConfig, overrides: list[str]) -> PDDConfig:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a config, validating the result."""
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section of the config")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return PDDConfig.from_dict(data, source="overrides")


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config(name_or_path: str | os.PathLike) -> PDDConfig:
    """A config by file path, or by name among the built-in configs (``pdd/configs/NAME.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return PDDConfig.from_yaml(path)
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return PDDConfig.from_yaml(builtin)
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file {name_or_path!r} and no built-in config of that name; built-in: {names}")
