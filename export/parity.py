"""Does an exported graph compute what PyTorch computes? Maps, score order and image AUROC compared.

The bar (fp32): every anomaly map within ``1e-4 × (map range)`` of the reference, image scores in the
same order (rank-identical), and the image AUROC on a small labelled set equal to 3 decimals. No dataset is
needed: :func:`labelled_images` draws smooth textures and puts a bright blob in every second one, so the
labels are known; whatever the AUROC is (random teachers score arbitrarily), both sides must agree on it.

Example::

    >>> from export.parity import labelled_images, run_parity       # doctest: +SKIP
    >>> images, labels = labelled_images(8, 64)                       # doctest: +SKIP
    >>> run_parity(torch_rt, onnx_rt, images, labels).ok()            # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from export.runtime import Runtime
from pdd.data.readers import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE, normalise_nhwc

__all__ = ["MAP_TOLERANCE", "ParityReport", "compare_predictions", "labelled_images", "predict_all", "run_parity",
           "to_pixels"]

# Largest map error allowed, relative to the reference map's range (max − min over the set), in fp32.
MAP_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityReport:
    """Candidate versus reference on one labelled set."""

    reference: str
    candidate: str
    images: int
    map_max_abs_error: float
    map_mean_abs_error: float
    map_range: float
    map_relative_error: float
    score_max_abs_error: float
    rank_identical: bool
    auroc_reference: float
    auroc_candidate: float

    def ok(self, map_tolerance: float = MAP_TOLERANCE) -> bool:
        """Maps within tolerance, identical score ranks, AUROC equal to 3 decimals."""
        return (self.map_relative_error <= map_tolerance and self.rank_identical
                and round(self.auroc_reference, 3) == round(self.auroc_candidate, 3))

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.candidate} vs {self.reference} on {self.images} images: map max |Δ| "
                f"{self.map_max_abs_error:.3g} ({self.map_relative_error:.2e} of range {self.map_range:.3g}), "
                f"score max |Δ| {self.score_max_abs_error:.3g}, "
                f"ranks {'identical' if self.rank_identical else 'DIFFER'}, "
                f"AUROC {self.auroc_reference:.4f} vs {self.auroc_candidate:.4f}")


def labelled_images(n: int = 8, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n smooth random RGB textures, every second one with a bright Gaussian blob (label 1).

    Returns images (n, 3, size, size) float32 ImageNet-normalised and labels (n,) int64 (0 normal, 1 anomalous).
    """
    if n < 2:
        raise ValueError(f"a labelled set needs at least one image of each label, got n={n}")
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0.3, 0.7, (n, 3, max(size // 16, 2), max(size // 16, 2))).astype(np.float32))
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy()
    images += rng.normal(0.0, 0.02, images.shape).astype(np.float32)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in np.flatnonzero(labels):
        cy, cx = rng.uniform(size / 4, 3 * size / 4, 2)
        radius = rng.uniform(size / 16, size / 8)
        images[i] += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    images = np.clip(images, 0.0, 1.0)
    return normalise_nhwc(images.transpose(0, 2, 3, 1)), labels.astype(np.int64)


def to_pixels(normalised: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float (B, 3, H, W) -> the uint8 RGB pixels (B, H, W, 3) it came from (rounded): the
    inverse of :func:`pdd.data.readers.normalise_nhwc`, for feeding the same test images to uint8 inputs."""
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    rgb = (normalised * std + mean) / np.float32(PIXEL_SCALE)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def predict_all(runtime: Runtime, images: np.ndarray, batch: int = 2) -> dict[str, np.ndarray]:
    """Run ``runtime`` over ``images`` (N, …) in batches: ``pred_score`` (N,), ``anomaly_map`` (N, H, W)."""
    parts = [runtime.predict(images[i:i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("pred_score", "anomaly_map")}


def compare_predictions(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], labels: np.ndarray,
                        reference_name: str = "reference", candidate_name: str = "candidate") -> ParityReport:
    """Compare two prediction dicts of the same images (see :class:`ParityReport`)."""
    from sklearn.metrics import roc_auc_score

    ref_map, cand_map = reference["anomaly_map"], candidate["anomaly_map"]
    if ref_map.shape != cand_map.shape:
        raise ValueError(f"{candidate_name} maps {ref_map.shape} and {reference_name} maps {cand_map.shape} differ")
    err = np.abs(ref_map.astype(np.float64) - cand_map.astype(np.float64))
    span = float(ref_map.max() - ref_map.min())
    ref_score, cand_score = reference["pred_score"], candidate["pred_score"]
    return ParityReport(
        reference=reference_name, candidate=candidate_name, images=len(labels),
        map_max_abs_error=float(err.max()), map_mean_abs_error=float(err.mean()), map_range=span,
        map_relative_error=float(err.max() / span) if span > 0 else float(err.max()),
        score_max_abs_error=float(np.abs(ref_score.astype(np.float64) - cand_score).max()),
        rank_identical=bool(np.array_equal(np.argsort(ref_score, kind="stable"),
                                           np.argsort(cand_score, kind="stable"))),
        auroc_reference=float(roc_auc_score(labels, ref_score)),
        auroc_candidate=float(roc_auc_score(labels, cand_score)),
    )


def run_parity(reference: Runtime, candidate: Runtime, images: np.ndarray, labels: np.ndarray,
               batch: int = 2) -> ParityReport:
    """Predict ``images`` with both runtimes (batches of ``batch``) and compare."""
    return compare_predictions(predict_all(reference, images, batch), predict_all(candidate, images, batch), labels,
                               reference.name, candidate.name)
