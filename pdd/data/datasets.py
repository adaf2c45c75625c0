"""Anomaly-detection datasets: MVTec-style folders and ADer ``meta.json`` files.

Both yield dicts::

    {"image": float32 (3, S, S) ImageNet-normalised, "label": int 0 normal / 1 anomalous,
     "mask": float32 (1, S, S) in {0, 1} (zeros for normal images or a missing mask),
     "path": str, "has_mask": bool, "class_name": str}

MVTec layout (one class per root)::

    root/train/good/*.png
    root/test/good/*.png
    root/test/<defect>/*.png
    root/ground_truth/<defect>/<name>_mask.png     (or <name>.png; optional)

ADer ``meta.json`` (multi-class, paths relative to root)::

    {"train": {"brain": [{"img_path": ..., "mask_path": "", "cls_name": "brain",
                          "specie_name": "good", "anomaly": 0}, ...]},
     "test":  {...}}

Files are listed in sorted order, so indices are stable between runs and machines.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from pdd.data.readers import IMAGE_SUFFIXES, DecodeBudget, ImageReadError, read_image, read_mask, to_model_input

__all__ = ["MASK_SUFFIXES", "AnomalyDataset", "MVTecStyleDataset", "MetaJsonDataset", "Sample", "split_train_val"]

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, before reading: where it is and what it is."""

    path: Path
    label: int
    mask_path: Path | None
    class_name: str
    defect: str


class AnomalyDataset(Dataset):
    """Reads :class:`Sample` entries into model-ready dicts; subclasses only list the samples.

    ``samples`` (list of :class:`Sample`) says what each index is without reading it; ``skipped`` lists
    ``(path, reason)`` for files dropped by ``skip_bad``. ``budget``: what each file may claim (the
    readers' :class:`DecodeBudget`); a file over it is unreadable like a damaged one.
    """

    def __init__(self, samples: list[Sample], image_size: int, skip_bad: bool, source: str,
                 budget: DecodeBudget | None = None) -> None:
        if not samples:
            raise ValueError(f"{source}: no images found")
        self.image_size = int(image_size)
        self.budget = budget
        self.skipped: list[tuple[str, str]] = []
        if skip_bad:
            samples = self._drop_unreadable(samples)
            if not samples:
                raise ValueError(f"{source}: every image was unreadable ({len(self.skipped)} skipped)")
        self.samples = samples

    def _drop_unreadable(self, samples: list[Sample]) -> list[Sample]:
        # Reading everything once up front is the only way to know which files are bad before training.
        kept = []
        for sample in samples:
            try:
                read_image(sample.path, budget=self.budget)
                if sample.mask_path is not None:
                    read_mask(sample.mask_path, budget=self.budget)
            except ImageReadError as exc:
                warnings.warn(f"skipping unreadable file {exc.path}: {exc.reason}", stacklevel=3)
                self.skipped.append((exc.path, exc.reason))
                continue
            kept.append(sample)
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = to_model_input(read_image(sample.path, budget=self.budget), self.image_size)
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path, self.image_size, budget=self.budget)
            mask = torch.from_numpy(mask.astype(np.float32))[None]
        else:
            mask = torch.zeros(1, self.image_size, self.image_size, dtype=torch.float32)
        return {
            "image": image,
            "label": sample.label,
            "mask": mask,
            "path": str(sample.path),
            "has_mask": sample.mask_path is not None,
            "class_name": sample.class_name,
        }


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _find_mask(gt_dir: Path, image: Path) -> Path | None:
    for name in (f"{image.stem}_mask", image.stem):
        for suffix in MASK_SUFFIXES:
            candidate = gt_dir / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


class MVTecStyleDataset(AnomalyDataset):
    """One class in the MVTec AD folder layout (see the module docstring).

    ``skip_bad=True`` reads every file once at construction, drops unreadable ones with a warning and lists
    them in ``self.skipped`` as ``(path, reason)``; otherwise the first unreadable file raises
    :class:`ImageReadError` when it is loaded. ``class_name`` defaults to the root folder's name.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 256,
        skip_bad: bool = False,
        class_name: str | None = None,
        budget: DecodeBudget | None = None,
    ) -> None:
        _check_split(split)
        self.root = Path(root)
        self.split = split
        self.class_name = class_name or self.root.resolve().name
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"{split_dir} does not exist; an MVTec-style dataset needs {split}/good/ "
                f"(and test/<defect>/ for the test split) under {self.root}"
            )
        if split == "train":
            if not (split_dir / "good").is_dir():
                raise FileNotFoundError(f"{split_dir / 'good'} does not exist; normal training images go there")
            defects = ["good"]
        else:
            defects = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not defects:
                raise FileNotFoundError(f"{split_dir} has no subfolders; expected test/good/ and test/<defect>/")
        samples: list[Sample] = []
        for defect in defects:
            label = 0 if defect == "good" else 1
            gt_dir = self.root / "ground_truth" / defect
            for image in _list_images(split_dir / defect):
                mask = _find_mask(gt_dir, image) if label == 1 else None
                samples.append(Sample(image, label, mask, self.class_name, defect))
        super().__init__(
            samples,
            image_size,
            skip_bad,
            f"{split_dir} (looked for {', '.join(IMAGE_SUFFIXES)} files in {', '.join(d + '/' for d in defects)})",
            budget,
        )


class MetaJsonDataset(AnomalyDataset):
    """Images listed in an ADer-style ``meta.json`` (see the module docstring); several classes at once.

    ``class_names`` restricts (and orders) the classes; by default all of the split's classes in sorted
    order. Mask paths that are empty mean "no mask" (normal images, or anomalies without ground truth).
    """

    def __init__(
        self,
        root: str | Path,
        meta: str | Path = "meta.json",
        split: str = "train",
        class_names: Sequence[str] | None = None,
        image_size: int = 256,
        skip_bad: bool = False,
        budget: DecodeBudget | None = None,
    ) -> None:
        _check_split(split)
        self.root = Path(root)
        meta_path = self.root / meta
        try:
            info = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{meta_path} does not exist; pass meta= the json file listing the images"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path} is not valid JSON ({exc})") from None
        if not isinstance(info, dict) or not isinstance(info.get(split), dict):
            raise ValueError(f'{meta_path}: expected {{"{split}": {{class_name: [entries...]}}}} at the top level')
        by_class: dict[str, list[dict[str, Any]]] = info[split]
        available = sorted(by_class)
        names = list(class_names) if class_names is not None else available
        unknown = [n for n in names if n not in by_class]
        if unknown:
            raise ValueError(f"{meta_path}: classes {unknown} are not in the {split!r} split; it has {available}")
        self.class_names = names
        samples = []
        for name in names:
            for number, entry in enumerate(by_class[name]):
                try:
                    image = self.root / entry["img_path"]
                    label = int(entry["anomaly"])
                    mask_rel = entry.get("mask_path") or ""
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(
                        f"{meta_path}: {split}/{name} entry {number} needs img_path and anomaly (0/1): {exc!r}"
                    ) from None
                mask = self.root / mask_rel if mask_rel else None
                samples.append(Sample(image, label, mask, entry.get("cls_name", name), entry.get("specie_name", "")))
        super().__init__(samples, image_size, skip_bad, f"{meta_path} ({split}, classes {names})", budget)


def split_train_val(dataset: AnomalyDataset, val_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Split normal training images into (train, val) subsets, per class, deterministically by seed.

    Each class with at least two images keeps at least one image on each side. Indices inside each subset
    are sorted, so the subsets list files in the dataset's order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.array([s.label for s in dataset.samples])
    if labels.any():
        raise ValueError(
            f"split_train_val expects normal training images only, but {int(labels.sum())} are anomalous; "
            "pass the train split"
        )
    rng = np.random.default_rng(seed)
    classes = np.array([s.class_name for s in dataset.samples])
    val: list[int] = []
    for name in sorted(set(classes.tolist())):
        members = np.flatnonzero(classes == name)
        if len(members) < 2:
            continue
        n_val = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val.extend(rng.permutation(members)[:n_val].tolist())
    val_set = set(val)
    train = [i for i in range(len(dataset)) if i not in val_set]
    return Subset(dataset, train), Subset(dataset, sorted(val))
