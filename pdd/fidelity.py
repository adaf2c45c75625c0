"""The fidelity gate of a reduced precision: the same checkpoint and images scored in fp32 and in the precision,
compared against fixed limits (:data:`LIMITS`). A precision is offered only where its gate passed.

Figures (``candidate`` against ``reference``, both :class:`pdd.evaluate.Predictions` of the same images):

* |ΔAUROC| of the image scores and of the pixels, |ΔAUPRO| (percentage points, on the labelled test set);
* Spearman's rank correlation of the image scores;
* the lowest per-image Pearson correlation of the maps;
* max |Δ| of the normalised map: the maps divided by the reference maps' range over the whole set
  (max − min of every reference pixel), the largest difference of any pixel;
* decisions flipped: the share of images whose label at the candidate's calibrated threshold differs from
  the reference's at its own (each precision is calibrated on its own scores).

Example::

    >>> result = fidelity_gate("bf16", fp32_predictions, bf16_predictions, fp32_cal, bf16_cal)  # doctest: +SKIP
    >>> print(result.table()); result.passed                                                  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from pdd.calibration import Calibration
from pdd.evaluate import Predictions, prediction_metrics

__all__ = ["LIMITS", "GateResult", "GateRow", "fidelity_gate"]

# name: (limit, "max" when the figure must stay at or below it, "min" at or above), per precision family.
_COMMON = {"image_auroc_pp": 0.5, "pixel_auroc_pp": 0.5, "aupro_pp": 1.0, "normalised_map_max_abs": 2e-2,
           "flipped_fraction": 0.005}
LIMITS: dict[str, dict[str, float]] = {
    "bf16": {**_COMMON, "spearman_scores": 0.999, "pearson_maps_min": 0.99},
    "fp16": {**_COMMON, "spearman_scores": 0.999, "pearson_maps_min": 0.99},
    "int8": {**_COMMON, "spearman_scores": 0.99, "pearson_maps_min": 0.98},
}
_AT_LEAST = ("spearman_scores", "pearson_maps_min")
_LABELS = {"image_auroc_pp": "|ΔAUROC| image (pp)", "pixel_auroc_pp": "|ΔAUROC| pixel (pp)",
           "aupro_pp": "|ΔAUPRO| (pp)", "spearman_scores": "Spearman of image scores",
           "pearson_maps_min": "per-image Pearson of maps (min)", "normalised_map_max_abs": "max |Δ| normalised map",
           "flipped_fraction": "decisions flipped (share of images)"}


@dataclass(frozen=True)
class GateRow:
    name: str
    value: float | None  # None: not measurable on these images (e.g. no masks for pixel metrics)
    limit: float
    at_least: bool

    @property
    def passed(self) -> bool:
        if self.value is None:
            return True
        return self.value >= self.limit if self.at_least else self.value <= self.limit


@dataclass(frozen=True)
class GateResult:
    """The gate of ``precision`` against ``reference`` on ``images`` images; ``passed`` when every row does."""

    precision: str
    reference: str
    images: int
    rows: tuple[GateRow, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def failed(self) -> list[str]:
        return [r.name for r in self.rows if not r.passed]

    def table(self) -> str:
        lines = [f"fidelity gate: {self.precision} against {self.reference}, {self.images} images",
                 f"{'figure':<38} {'value':>12} {'limit':>10}  verdict"]
        for r in self.rows:
            value = "n/a" if r.value is None else f"{r.value:.6g}"
            lines.append(f"{_LABELS[r.name]:<38} {value:>12} {('≥ ' if r.at_least else '≤ ') + f'{r.limit:g}':>10}  "
                         f"{'pass' if r.passed else 'FAIL'}")
        lines.append(f"{self.precision}: {'PASSED' if self.passed else 'FAILED (' + ', '.join(self.failed()) + ')'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "reference": self.reference, "images": self.images,
                "passed": self.passed, "rows": [{**asdict(r), "passed": r.passed} for r in self.rows]}


def _pp(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if key not in a["mean"] or key not in b["mean"]:
        return None
    return abs(float(a["mean"][key]) - float(b["mean"][key])) * 100.0


def fidelity_gate(precision: str, reference: Predictions, candidate: Predictions,
                  reference_calibration: Calibration | None, candidate_calibration: Calibration | None,
                  reference_name: str = "fp32") -> GateResult:
    """Compare ``candidate`` (scored in ``precision``) with ``reference`` on the same images, in the same order.

    Calibrations: each set's own operating point decides its labels; a candidate without one is decided at the
    reference's threshold; without either, no decision is compared (the row reads n/a).
    """
    if precision not in LIMITS:
        raise ValueError(f"no fidelity gate for {precision!r}; gated precisions: {sorted(LIMITS)}")
    if reference.paths != candidate.paths:
        raise ValueError("the fidelity gate compares predictions of the same images in the same order")
    ref_m, cand_m = prediction_metrics(reference), prediction_metrics(candidate)
    maps_r = reference.maps.astype(np.float64)
    maps_c = candidate.maps.astype(np.float64)
    span = float(maps_r.max() - maps_r.min()) or 1.0
    flat_r, flat_c = maps_r.reshape(len(maps_r), -1), maps_c.reshape(len(maps_c), -1)
    pearson = [float(np.corrcoef(r, c)[0, 1]) if r.std() > 0 and c.std() > 0 else float(np.array_equal(r, c))
               for r, c in zip(flat_r, flat_c)]
    flipped: float | None = None
    if reference_calibration is not None:
        decided_r = reference_calibration.image.decide(reference.scores)
        decided_c = (candidate_calibration or reference_calibration).image.decide(candidate.scores)
        flipped = float(np.mean(decided_r != decided_c))
    values = {
        "image_auroc_pp": _pp(ref_m, cand_m, "image_auroc"),
        "pixel_auroc_pp": _pp(ref_m, cand_m, "pixel_auroc"),
        "aupro_pp": _pp(ref_m, cand_m, "aupro"),
        "spearman_scores": float(stats.spearmanr(reference.scores, candidate.scores).statistic),
        "pearson_maps_min": min(pearson),
        "normalised_map_max_abs": float(np.abs(maps_c - maps_r).max() / span),
        "flipped_fraction": flipped,
    }
    limits = LIMITS[precision]
    rows = tuple(GateRow(name, values[name], limits[name], name in _AT_LEAST) for name in _LABELS)
    return GateResult(precision, reference_name, len(reference.scores), rows)
