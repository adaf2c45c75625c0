"""Training: frozen-teacher feature cache, Adam + cosine schedule, atomic checkpoints, resume, DDP.

    >>> from pdd.config import PDDConfig
    >>> # train(PDDConfig.from_yaml("configs/brain-synth.yaml"), out_dir="runs/x")   # doctest: +SKIP

Epochs only run the trainable parts: the teachers are frozen and there is no augmentation, so their
features are computed once (kept fp16 in memory, or in memory-mapped files on disk) and reused. Model
selection uses the distillation loss on a validation split of normal training images, never the test set.
``last.pt`` is written after every epoch (atomically), so a killed run resumes losing at most one epoch.
At the end, the best checkpoint is calibrated on the validation normals (an image and a pixel threshold at
a 1 % false-positive rate, see :mod:`pdd.calibration`), stored in ``best.pt`` and ``calibration.json``.
Multi-GPU: launch with ``torchrun --nproc_per_node N -m pdd.cli train ...`` (nccl on GPU, gloo on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pdd.baselines import RD4ADModel, build_model, rd4ad_loss
from pdd.calibration import Calibration
from pdd.checkpoint import read_checkpoint, save_pdd, store_calibration
from pdd.config import ConfigError, DataConfig, PDDConfig, atomic_write_text
from pdd.data import DecodeBudget, MetaJsonDataset, MVTecStyleDataset, split_train_val
from pdd.evaluate import calibrate
from pdd.losses import pdd_loss
from pdd.model import TeacherFeatures

__all__ = ["FeatureCache", "TrainResult", "check_teachers", "open_dataset", "teacher_features", "train",
           "training_loss"]

log = logging.getLogger(__name__)


def open_dataset(data: DataConfig, split: str, image_size: int, root: str | os.PathLike | None = None) -> Dataset:
    """The dataset a config points at (MVTec-style folders or an ADer meta.json)."""

    root = root or data.root
    if root is None:
        raise ConfigError("no data root: set data.root in the config or pass --data DIR")
    budget = DecodeBudget().replace(max_pixels=data.max_pixels, max_voxels=data.max_voxels, max_frames=data.max_frames,
                                    max_bytes=data.max_bytes, max_seconds=data.max_seconds)
    if data.layout == "meta_json":
        return MetaJsonDataset(root, split=split, image_size=image_size, class_names=list(data.class_names) or None,
                               skip_bad=data.skip_bad, budget=budget)
    return MVTecStyleDataset(root, split=split, image_size=image_size, skip_bad=data.skip_bad, budget=budget)


def teacher_features(model: nn.Module, images: Tensor) -> tuple[Tensor, ...]:
    """Frozen-teacher outputs as a flat tuple (PDD: y1..y4, z1..z4; RD4AD: y1..y3)."""
    with torch.no_grad():
        if isinstance(model, RD4ADModel):
            return tuple(model.teacher(images))[:3]
        tf = model.teachers(images)
        return (*tf.y, *tf.z)


def training_loss(model: nn.Module, feats: Sequence[Tensor]) -> dict[str, Tensor]:
    """Loss terms of the trainable parts, from flat teacher features."""
    if isinstance(model, RD4ADModel):
        y = tuple(feats)
        s3 = model.d1(model.bottleneck(y))
        s2 = model.d2(s3)
        return rd4ad_loss(y, (model.d3(s2), s2, s3))
    tf = TeacherFeatures(tuple(feats[:4]), tuple(feats[4:]))
    return pdd_loss(model.students(*tf), model.cfg.loss)


class _LossModule(nn.Module):
    """forward(teacher features) -> total loss; what DDP wraps (DDP hooks ``forward`` only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *feats: Tensor) -> dict[str, Tensor]:
        return training_loss(self.model, feats)


class FeatureCache:
    """Teacher features of a dataset, fp16, one array per level: in memory or memory-mapped on disk."""

    def __init__(self, model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int,
                 where: str = "memory", folder: Path | None = None, desc: str = "teacher features") -> None:
        self.levels: list[np.ndarray | Tensor] = []
        n = len(dataset)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        start = 0
        for batch in tqdm(loader, desc=desc, leave=False, disable=not _is_main()):
            feats = teacher_features(model, batch["image"].to(device))
            if not self.levels:
                for i, f in enumerate(feats):
                    shape = (n, *f.shape[1:])
                    if where == "disk":
                        assert folder is not None
                        folder.mkdir(parents=True, exist_ok=True)
                        self.levels.append(np.lib.format.open_memmap(folder / f"level{i}.npy", "w+", np.float16, shape))
                    else:
                        self.levels.append(torch.empty(shape, dtype=torch.float16))
            for level, f in zip(self.levels, feats):
                chunk = f.half().cpu()
                level[start:start + len(chunk)] = chunk.numpy() if isinstance(level, np.ndarray) else chunk
            start += len(batch["image"])
        self.nbytes = sum(lv.nbytes if isinstance(lv, np.ndarray) else lv.numel() * 2 for lv in self.levels)

    def __len__(self) -> int:
        return len(self.levels[0])

    def batch(self, index: Sequence[int], device: torch.device) -> tuple[Tensor, ...]:
        idx = np.sort(np.asarray(index))
        out = []
        for lv in self.levels:
            if isinstance(lv, np.ndarray):
                t = torch.from_numpy(np.ascontiguousarray(lv[idx]))
            else:
                t = lv[torch.from_numpy(idx)]
            out.append(t.to(device).float())
        return tuple(out)


@dataclasses.dataclass
class TrainResult:
    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict[str, Any]]
    calibration: Calibration | None = None


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)




def _batches(n: int, batch_size: int, rng: np.random.Generator, rank: int, world: int) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    per_rank = order[rank::world] if world > 1 else order
    # Every rank must run the same number of steps for DDP's all-reduce.
    steps = math.ceil(math.ceil(n / world) / batch_size)
    for s in range(steps):
        idx = per_rank[s * batch_size:(s + 1) * batch_size]
        if len(idx) == 0:
            idx = per_rank[:batch_size]
        yield idx


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the checkpoint ``src`` is now, atomically and, where the file system allows, without a copy.

    A hard link shares the file: the next epoch's ``last.pt`` is a new file renamed over the old name,
    so ``dst`` keeps this epoch's weights.
    """
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _evaluate_loss(loss_mod: nn.Module, cache: FeatureCache | None, data: Dataset | None, model: nn.Module,
                   device: torch.device, batch_size: int, amp: bool) -> float:
    loss_mod.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(device, amp):
        n = len(cache) if cache is not None else len(data)
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size))
            feats = cache.batch(idx, device) if cache is not None else _features_of(model, data, idx, device)
            total += float(training_loss(model, feats)["loss"]) * len(idx)
            count += len(idx)
    loss_mod.train()
    return total / max(count, 1)


def _features_of(model: nn.Module, data: Dataset, idx: np.ndarray, device: torch.device) -> tuple[Tensor, ...]:
    images = torch.stack([data[int(i)]["image"] for i in idx]).to(device)
    return teacher_features(model, images)


_DOWNLOAD_HINT = {"vmamba_weights": "vmamba_weights=hub", "wrn_weights": "wrn_weights=timm|torchvision"}


def check_teachers(cfg: PDDConfig, warn: bool = True) -> None:
    """Refuse to train on random teachers unless the config says they are intended; warn on ``+cos`` with them.

    Random teachers give features that mean nothing about images: a run on them only shows the pipeline
    works. The released ``+cos`` prior term inverts the anomaly maps with such features (the training loss
    goes negative within a few epochs), so configs meant for random teachers use ``one_minus_cos``.
    """
    missing = cfg.teachers_without_weights()
    if not missing:
        return
    names = " and ".join(name for name, _ in missing)
    if not cfg.random_teachers:
        keys = " and ".join(key for _, key in missing)
        downloads = ", ".join(_DOWNLOAD_HINT[key] for _, key in missing)
        raise ConfigError(
            f"the config names no weights for the {names} teacher(s): set {keys} to a weight file (or "
            f"{downloads} to download), see the README section 'Pretrained teachers'; or set "
            f"random_teachers=true if randomly initialised teachers are intended (smoke tests, the offline demo)")
    if not warn:
        return
    log.warning("training with randomly initialised %s teacher(s) (random_teachers: true): the scores will "
                "not mean what PDD's do with pretrained teachers", names)
    if cfg.model == "pdd" and cfg.loss.prior_cos_form == "plus_cos":
        log.warning("loss.prior_cos_form is plus_cos (the released +cos term) with random teachers: it tends to "
                    "invert the anomaly maps; loss.prior_cos_form=one_minus_cos is the form for random teachers")


def _process_device(device: str | None) -> tuple[torch.device, int, int]:
    """This process's device, rank and world size (initialising the process group under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device is None:
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev, rank, world


def _resume_state(cfg: PDDConfig, last_path: Path) -> dict[str, Any]:
    """``last.pt`` to resume from, checked to come from the same config (only train.epochs may change)."""
    if not last_path.is_file():
        raise FileNotFoundError(f"--resume: no {last_path} to resume from (train without --resume first)")
    state = read_checkpoint(last_path)
    saved = PDDConfig.from_dict(state["config"])
    if dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=cfg.train.epochs)) != cfg:
        raise ConfigError(f"--resume: the config differs from the one {last_path} was trained with "
                          f"(only train.epochs may change)")
    return state


def _split(full: Dataset, tc: Any) -> tuple[Dataset, Dataset | None]:
    if tc.val_fraction > 0 and len(full) >= 2:
        return split_train_val(full, tc.val_fraction, seed=tc.seed)
    return Subset(full, list(range(len(full)))), None


def _optimiser(model: nn.Module, tc: Any, dev: torch.device) -> tuple[Any, Any, Any]:
    """Adam, the learning-rate schedule and the gradient scaler (fp16 autocast on GPUs without bf16)."""
    opt = torch.optim.Adam(model.trainable_parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.cosine_t_max, eta_min=tc.eta_min)
             if tc.scheduler == "cosine" else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    use_scaler = dev.type == "cuda" and tc.amp and not torch.cuda.is_bf16_supported()
    return opt, sched, torch.amp.GradScaler("cuda", enabled=use_scaler)


def _train_steps(loss_mod: nn.Module, opt: Any, scaler: Any, batches: list[Any], feats_of: Any,
                 dev: torch.device, amp: bool, label: str) -> dict[str, float]:
    """One epoch's optimiser steps; returns the summed loss terms."""
    sums: dict[str, float] = {}
    bar = tqdm(batches, desc=label, leave=False, disable=not _is_main())
    for idx in bar:
        with _autocast(dev, amp):
            terms = loss_mod(*feats_of(idx))
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: loss is {loss.item()}; lower train.lr or check the data")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return sums


def _feature_caches(model: nn.Module, train_set: Dataset, val_set: Dataset | None, dev: torch.device, tc: Any,
                    out: Path, rank: int) -> tuple[FeatureCache | None, FeatureCache | None]:
    """The teachers' features of both splits, computed once (None, None with train.feature_cache=none)."""
    if tc.feature_cache == "none":
        return None, None
    folder = out / "feature_cache" if tc.feature_cache == "disk" else None
    train_cache = FeatureCache(model, train_set, dev, tc.batch_size, tc.feature_cache,
                               folder and folder / f"train_rank{rank}", "teacher features (train)")
    val_cache = None
    if val_set is not None:
        val_cache = FeatureCache(model, val_set, dev, tc.batch_size, tc.feature_cache,
                                 folder and folder / f"val_rank{rank}", "teacher features (val)")
    return train_cache, val_cache


def _restore(state: dict[str, Any], opt: Any, sched: Any, scaler: Any,
             last_path: Path) -> tuple[int, float, int, list[dict[str, Any]]]:
    """Optimiser, schedule, scaler and RNG from ``last.pt``; returns (start epoch, best val, best epoch, history)."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])  # batch order is re-derived from (seed, epoch)
    if _is_main():
        log.info("resumed from %s at epoch %d", last_path, state["epoch"])
    return state["epoch"] + 1, state["best_val_loss"], state["best_epoch"], state.get("history", [])


def train(cfg: PDDConfig, out_dir: str | os.PathLike, resume: bool = False, device: str | None = None,
          data_root: str | os.PathLike | None = None) -> TrainResult:
    """Train PDD (or the RD4AD baseline) on the normal images of ``cfg.data``; returns where the results are."""
    out = Path(out_dir)
    dev, rank, world = _process_device(device)
    check_teachers(cfg, warn=_is_main())
    tc = cfg.train
    _seed_everything(tc.seed)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "train_log.jsonl"
    state = _resume_state(cfg, last_path) if resume else None
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "config.yaml")

    model = build_model(cfg, dev)
    if state is not None:
        model.load_state_dict(state["state_dict"])
    train_set, val_set = _split(open_dataset(cfg.data, "train", cfg.image_size, data_root), tc)
    if _is_main():
        log.info("training on %d normal images, validating on %d", len(train_set), len(val_set) if val_set else 0)

    t_cache = time.perf_counter()
    train_cache, val_cache = _feature_caches(model, train_set, val_set, dev, tc, out, rank)
    cache_seconds = time.perf_counter() - t_cache

    loss_mod = _LossModule(model).train()
    model.train()
    if world > 1:
        loss_mod = nn.parallel.DistributedDataParallel(loss_mod, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt, sched, scaler = _optimiser(model, tc, dev)
    start_epoch, best_val, best_epoch, history = 1, math.inf, 0, []
    if state is not None:
        start_epoch, best_val, best_epoch, history = _restore(state, opt, sched, scaler, last_path)
    elif _is_main() and log_path.exists():
        log_path.unlink()

    n_train = len(train_cache) if train_cache is not None else len(train_set)

    def feats_of(idx: Any) -> Any:
        return train_cache.batch(idx, dev) if train_cache is not None else _features_of(model, train_set, idx, dev)

    for epoch in range(start_epoch, tc.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng(tc.seed * 100_003 + epoch)
        batches = list(_batches(n_train, tc.batch_size, rng, rank, world))
        if tc.max_steps_per_epoch:
            batches = batches[:tc.max_steps_per_epoch]
        sums = _train_steps(loss_mod, opt, scaler, batches, feats_of, dev, tc.amp, f"epoch {epoch}/{tc.epochs}")
        sched.step()
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                  "steps": len(batches), **{f"train_{k}": v / max(len(batches), 1) for k, v in sums.items()}}
        if val_set is not None and (epoch % max(tc.eval_every, 1) == 0 or epoch == tc.epochs):
            record["val_loss"] = _evaluate_loss(loss_mod, val_cache, val_set, model, dev, tc.batch_size, tc.amp)
        if epoch == start_epoch:
            record["feature_cache_seconds"] = cache_seconds
        history.append(record)
        if _is_main():
            val = record.get("val_loss", record["train_loss"] if val_set is None else None)
            improved = val is not None and val < best_val
            if improved:
                best_val, best_epoch = val, epoch
            save_pdd(model, last_path, epoch=epoch, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     scaler=scaler.state_dict(), best_val_loss=best_val, best_epoch=best_epoch,
                     torch_rng=torch.get_rng_state(), history=history)
            if improved:
                _link_or_copy(last_path, best_path)
            _append_jsonl(log_path, record)
            log.info("epoch %d: %s", epoch, {k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()})
        if dist.is_initialized():
            dist.barrier()
    calibration = None
    if _is_main():
        if not best_path.exists():
            _link_or_copy(last_path, best_path)
        calibration = _calibrate_best(model, val_set, out, dev, tc.batch_size)
    return TrainResult(out, best_path, last_path, best_epoch, best_val, len(history), history, calibration)


def _calibrate_best(model: nn.Module, val_set: Dataset | None, out: Path, device: torch.device,
                    batch_size: int) -> Calibration | None:
    """Calibrate the best checkpoint on the validation normals; store it there and in ``calibration.json``."""

    best_path, last_path = out / "best.pt", out / "last.pt"
    if val_set is None:
        log.warning("no validation split (train.val_fraction is 0): %s has no operating threshold; run "
                    "`pdd calibrate --checkpoint %s --data DIR`", best_path, best_path)
        return None
    model.load_state_dict(read_checkpoint(best_path)["state_dict"])
    model.eval()
    calibration = calibrate(model, val_set, source="validation normals", batch_size=batch_size, device=device)
    # best.pt is a hard link to last.pt when the last epoch was the best: keep it one file.
    linked = os.path.samefile(best_path, last_path)
    store_calibration(best_path, calibration)
    if linked:
        _link_or_copy(best_path, last_path)
    atomic_write_text(out / "calibration.json", json.dumps(calibration.to_dict(), indent=2) + "\n")
    log.info("operating point from %d validation normals: image %s; pixel %s", len(val_set),
             calibration.image.describe(), calibration.pixel_point.describe())
    return calibration
