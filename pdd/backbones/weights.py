"""Loading weight files with errors that say which file, which tensor and what to do."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsError", "check_and_load", "load_checkpoint_file"]

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, or does not fit the model."""


def load_checkpoint_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """Read a ``torch.save`` file into a dict, with a clear error for missing or damaged files.

    Files are read with ``weights_only=True`` (no code runs). Some official checkpoints also pickle
    config objects; reading those needs ``allow_pickle=True`` and should only be done for trusted files.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsError(f"weight file {path} is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if not allow_pickle and "weights_only" in str(exc):
            raise WeightsError(
                f"weight file {path} holds pickled objects besides tensors; if you trust it, load it with "
                f"allow_pickle=True (CLI: --allow-pickle), or re-save only its state dict"
            ) from exc
        raise WeightsError(f"weight file {path} is not a readable PyTorch checkpoint: {exc}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsError(
            f"weight file {path} is truncated or not a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            f"download it again"
        ) from exc
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weight file {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _preview(names: Iterable[str], limit: int = 6) -> str:
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_and_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                   ignore: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module`` strictly, reporting every mismatch by name and shape.

    Keys starting with a prefix in ``ignore`` (e.g. an unused classifier) are dropped first.
    """
    prefixes = tuple(ignore)
    state = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    own = module.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_preview(unexpected)}")
    for key in sorted(set(own) & set(state)):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != own[key].shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s", len(state), source)
