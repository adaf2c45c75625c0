"""Operating points: from calibration scores to a threshold, a score normalisation and the counts behind them.

The decision rule is the same everywhere (``pdd eval``, ``pdd predict``, the runtimes, the server):
an image is anomalous when ``score > image threshold``, a pixel when ``map value > pixel threshold``.
Scores are raw model outputs; the normalisation only makes them readable.

How a threshold is chosen (``method``), on calibration scores with or without labels:

* ``"fpr"`` (normals only, target α, default 0.01): the lowest threshold that at most ⌊α·n⌋ of the n
  normals exceed, i.e. the most sensitive threshold whose false-positive rate on them is ≤ α;
* ``"f1_max"`` (labels): the threshold of highest F1 = 2TP / (2TP + FP + FN), the highest threshold
  among equal F1 values;
* ``"sensitivity"`` (labels, target S): the highest threshold whose sensitivity TP / (TP + FN) is ≥ S;
* ``"specificity"`` (labels, target S): the lowest threshold whose specificity TN / (TN + FP) is ≥ S.

Each method decides which calibration scores are flagged: all scores ≥ some score u. Every threshold
from the next lower distinct score v up to u gives the same counts; the threshold is their midpoint
(v + u) / 2, as far from both as possible. When nothing is flagged it is the highest score; when
everything is, it lies below the lowest by half the scores' range. Thresholds are float64 and scores are
compared with them in float64, so a float32 score never rounds onto the threshold.

Normalisation (for people; decisions never use it): a logistic ``1 / (1 + exp(-(x - t) / w))``. It is
strictly increasing, so ranks (and every AUROC) are unchanged, maps the threshold t to exactly 0.5 and
any score into (0, 1); w is chosen so that the median calibration normal maps to 0.1:
``w = (t - median) / ln 9``. (anomalib instead maps [min, max] linearly around the threshold and clips,
which ties every score outside the calibration range; the logistic keeps their order.) In float32 scores
more than about 17 w above or below t saturate to 1 or 0.

This module needs only numpy: the server's postprocess model imports a copy of it, so that the served
decisions and the local ones come from one implementation.

Example::

    >>> import numpy as np
    >>> from pdd.calibration import fit_operating_point
    >>> normal = np.array([1.0, 1.1, 1.2, 1.3, 2.0])
    >>> op = fit_operating_point(normal, target=0.2)      # no labels: false-positive rate ≤ 20 %
    >>> op.threshold, op.false_positives
    (1.65, 1)
    >>> float(op.normalise(np.array([op.threshold]))[0])
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_FORMAT",
    "DEFAULT_TARGET_FPR",
    "METHODS",
    "Calibration",
    "CalibrationError",
    "OperatingPoint",
    "apply_calibration",
    "fit_operating_point",
]

CALIBRATION_FORMAT = "pdd-calibration/1"
METHODS = ("fpr", "f1_max", "sensitivity", "specificity", "manual")
DEFAULT_TARGET_FPR = 0.01
# The median calibration normal maps to 0.1 = 1 / (1 + 9): w = (t - median) / ln 9.
_MEDIAN_NORMALISED = 0.1


class CalibrationError(ValueError):
    """Calibration data or a stored calibration record is unusable; the message says why and what to do."""


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on one kind of score (image scores or map pixels), how it was chosen, what it does.

    threshold: raw score; anomalous when score > threshold. scale: w of the logistic normalisation (None
    when unknown: a threshold typed by hand). method / target: see the module docstring (target: α for
    "fpr", S for "sensitivity" / "specificity", None otherwise). source: what it was calibrated on.
    normal / anomalous: how many calibration samples (images or pixels) of each kind; true_positives /
    false_positives: how many of those the threshold flags.
    """

    threshold: float
    scale: float | None
    method: str
    target: float | None
    source: str
    normal: int
    anomalous: int
    true_positives: int
    false_positives: int

    @property
    def true_negatives(self) -> int:
        return self.normal - self.false_positives

    @property
    def false_negatives(self) -> int:
        return self.anomalous - self.true_positives

    @property
    def sensitivity(self) -> float | None:
        return self.true_positives / self.anomalous if self.anomalous else None

    @property
    def specificity(self) -> float | None:
        return self.true_negatives / self.normal if self.normal else None

    @property
    def precision(self) -> float | None:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged and self.anomalous else None

    @property
    def f1(self) -> float | None:
        if not self.anomalous:
            return None
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denominator

    def decide(self, values: Any, threshold: float | None = None) -> np.ndarray:
        """bool array, True where ``values > threshold`` (default: this point's), compared in float64."""
        t = self.threshold if threshold is None else float(threshold)
        return np.asarray(values, dtype=np.float64) > t

    def normalise(self, values: Any, threshold: float | None = None) -> np.ndarray:
        """float32 array in [0, 1] (NaN without a scale): the logistic centred on the threshold (0.5 there)."""
        x = np.asarray(values, dtype=np.float64)
        if self.scale is None:
            return np.full(x.shape, np.nan, dtype=np.float32)
        t = self.threshold if threshold is None else float(threshold)
        # exp overflows to inf far below t, which gives 0 exactly: the intended limit.
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-(x - t) / self.scale))).astype(np.float32)

    def describe(self) -> str:
        """One line: how it was chosen and what it does on the calibration set."""
        if self.method == "fpr":
            how = f"false-positive rate on normals ≤ {self.target:g}"
        elif self.method in ("sensitivity", "specificity"):
            how = f"{self.method} ≥ {self.target:g}"
        else:
            how = "highest F1" if self.method == "f1_max" else "set by hand"
        head = f"threshold {self.threshold:.6g} ({how}; {self.source})"
        return head if self.method == "manual" else f"{head}; {self.counts()}"

    def counts(self) -> str:
        """The confusion counts and the rates they define, e.g. ``TP 3, FP 0, TN 4, FN 1; sensitivity 0.750 …``."""
        text = (f"TP {self.true_positives}, FP {self.false_positives}, TN {self.true_negatives}, "
                f"FN {self.false_negatives}")
        rates = [f"{name} {value:.3f}" for name in ("sensitivity", "specificity", "f1")
                 if (value := getattr(self, name)) is not None]
        return "; ".join([text, *rates])

    def measured_on(self, scores: Any, labels: Any = None, source: str = "") -> OperatingPoint:
        """The same threshold with the counts it gives on other scores (labels 0/1, None: all normal)."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        y = np.zeros(s.size, dtype=bool) if labels is None else np.asarray(labels).ravel().astype(bool)
        if y.size != s.size:
            raise CalibrationError(f"{source}: {s.size} scores but {y.size} labels")
        flagged = self.decide(s)
        return replace(self, source=source, normal=int((~y).sum()), anomalous=int(y.sum()),
                       true_positives=int((flagged & y).sum()), false_positives=int((flagged & ~y).sum()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> OperatingPoint:
        names = [f for f in cls.__dataclass_fields__]
        missing = [n for n in names if n not in data]
        if missing:
            raise CalibrationError(f"{where}: the operating point lacks {missing}; run `pdd calibrate` again")
        point = cls(**{n: data[n] for n in names})
        if point.method not in METHODS:
            raise CalibrationError(f"{where}: unknown method {point.method!r}; expected one of {METHODS}")
        if not math.isfinite(point.threshold) or (point.scale is not None and not point.scale > 0):
            raise CalibrationError(f"{where}: threshold {point.threshold} must be finite and scale "
                                   f"{point.scale} positive; run `pdd calibrate` again")
        return point


@dataclass(frozen=True)
class Calibration:
    """The image operating point and, when pixel maps were calibrated, the pixel one.

    Without a pixel point, masks use the image threshold: the image score is the map's maximum, so an
    image is then flagged exactly when its mask is not empty. ``precision``: the precision whose scores it
    was fitted on (``pdd.precision``; each precision's scores differ slightly, so each has its own thresholds).
    """

    image: OperatingPoint
    pixel: OperatingPoint | None = None
    format: str = CALIBRATION_FORMAT
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "precision": self.precision, "image": self.image.to_dict(),
                "pixel": None if self.pixel is None else self.pixel.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "calibration") -> Calibration:
        if not isinstance(data, Mapping) or data.get("format") != CALIBRATION_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise CalibrationError(f"{where} is not a {CALIBRATION_FORMAT} record (format {found!r})")
        image = OperatingPoint.from_dict(data.get("image") or {}, f"{where} image")
        pixel = data.get("pixel")
        precision = data.get("precision", "fp32")  # records written before precisions existed are fp32's
        if not isinstance(precision, str):
            raise CalibrationError(f"{where}: precision {precision!r} is not a precision name")
        return cls(image, None if pixel is None else OperatingPoint.from_dict(pixel, f"{where} pixel"),
                   precision=precision)

    @classmethod
    def manual(cls, threshold: float, source: str = "set by hand") -> Calibration:
        """A threshold known without calibration data (e.g. an old ``anomaly_threshold``): no normalisation."""
        return cls(OperatingPoint(float(threshold), None, "manual", None, source, 0, 0, 0, 0))

    @property
    def pixel_point(self) -> OperatingPoint:
        return self.image if self.pixel is None else self.pixel


def apply_calibration(calibration: Calibration, scores: Any, maps: Any = None, *,
                      image_threshold: float | None = None, pixel_threshold: float | None = None
                      ) -> dict[str, np.ndarray]:
    """Scores (B,) [and maps (B, H, W)] -> ``normalised_score`` float32 (B,), ``pred_label`` bool (B,)
    [and ``pred_mask`` bool (B, H, W)].

    ``image_threshold`` / ``pixel_threshold`` (raw) replace the calibrated ones (the normalisation then
    centres on them, so 0.5 stays the decision boundary); without a pixel point, masks use the image one.
    """
    img = calibration.image
    out = {"normalised_score": img.normalise(scores, image_threshold),
           "pred_label": img.decide(scores, image_threshold)}
    if maps is not None:
        if pixel_threshold is None and calibration.pixel is None:
            pixel_threshold = image_threshold
        out["pred_mask"] = calibration.pixel_point.decide(maps, pixel_threshold)
    return out


def _cut(distinct_desc: np.ndarray, flagged: int) -> float:
    """Threshold flagging exactly the ``flagged`` highest of the distinct values (descending)."""
    d = distinct_desc
    if flagged == 0:
        return float(d[0])
    if flagged < len(d):
        return float((d[flagged - 1] + d[flagged]) / 2.0)
    spread = float(d[0] - d[-1]) or max(abs(float(d[-1])), 1.0)
    return float(d[-1] - spread / 2.0)


def fit_operating_point(scores: Any, labels: Any = None, *, method: str | None = None,
                        target: float | None = None, source: str = "calibration set") -> OperatingPoint:
    """Choose a threshold on ``scores`` (float (N,), any shape is flattened) and fit the normalisation.

    labels: None (all normal) or 0/1 of the same size. method: "fpr" (default without labels, target
    default 0.01), "f1_max" (default with labels), "sensitivity" or "specificity" (target required).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise CalibrationError(f"{source}: no scores to calibrate on")
    if not np.isfinite(s).all():
        raise CalibrationError(f"{source}: scores contain NaN or inf; check the model output")
    if labels is None:
        y = np.zeros(s.size, dtype=bool)
    else:
        y = np.asarray(labels).ravel()
        if y.size != s.size or not np.isin(y, (0, 1)).all():
            raise CalibrationError(f"{source}: labels must be 0/1, one per score ({s.size}), got {y.size} values "
                                   f"{np.unique(y)[:5]}")
        y = y.astype(bool)
    method = method or ("fpr" if labels is None else "f1_max")
    if method not in METHODS[:-1]:
        raise CalibrationError(f"unknown calibration method {method!r}; expected one of {METHODS[:-1]}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if method != "fpr" and (n_pos == 0 or n_neg == 0):
        raise CalibrationError(f"{source}: method {method!r} needs normal and anomalous samples, got {n_neg} "
                               f"normal and {n_pos} anomalous; without labels use the false-positive rate")
    if n_neg == 0:
        raise CalibrationError(f"{source}: no normal samples; the false-positive rate is measured on normals")
    if method == "fpr":
        target = DEFAULT_TARGET_FPR if target is None else float(target)
    elif method == "f1_max":
        target = None
    elif target is None:
        raise CalibrationError(f"method {method!r} needs a target in [0, 1]")
    if target is not None and not 0.0 <= target <= 1.0:
        raise CalibrationError(f"calibration target must lie in [0, 1], got {target}")

    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    # Counts when flagging every score >= the j-th distinct value (descending); index 0 = flag nothing.
    ends = np.flatnonzero(np.append(s_desc[1:] != s_desc[:-1], True))
    distinct = s_desc[ends]
    tp = np.concatenate(([0], np.cumsum(y_desc)[ends]))
    fp = np.concatenate(([0], np.cumsum(~y_desc)[ends]))
    eps = 1e-9  # targets such as 0.95 · 20 must count as 19, not 19.000000000000004
    if method == "fpr" or method == "specificity":
        allowed = (target if method == "fpr" else 1.0 - target) * n_neg + eps
        flagged = int(np.flatnonzero(fp <= allowed)[-1])                 # lowest threshold meeting it
    elif method == "sensitivity":
        flagged = int(np.flatnonzero(tp >= target * n_pos - eps)[0])     # highest threshold meeting it
    else:
        f1 = 2.0 * tp / (tp + fp + n_pos)
        flagged = int(np.argmax(f1))                                     # first maximum: highest threshold
    threshold = _cut(distinct, flagged)
    return OperatingPoint(threshold, _scale(threshold, s, y), method, target, source, n_neg, n_pos,
                          int(tp[flagged]), int(fp[flagged]))


def _scale(threshold: float, scores: np.ndarray, anomalous: np.ndarray) -> float:
    """w of the logistic: the median normal maps to 0.1; falls back on the scores' range when degenerate."""
    spread = threshold - float(np.median(scores[~anomalous]))
    if not spread > 0:
        spread = float(scores.max() - scores.min())
    if not spread > 0:
        spread = max(abs(threshold), 1.0) * 1e-3
    return spread / math.log(1.0 / _MEDIAN_NORMALISED - 1.0)

