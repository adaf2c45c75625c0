"""``pdd dicom infer``: DICOM files and folders in, a Parametric Map, a Segmentation and an SR per series out.

:func:`infer_series` is the one step every entry point runs (``infer``, ``watch`` and ``listen``'s spool
worker): score a series, write its outputs, return the record that ``results.json`` and the spool keep.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.outputs import SeriesScores, output_uids, write_outputs
from dicom_node.scoring import SeriesScorer
from dicom_node.series import Series, SeriesRefused, assemble, group_series
from pdd.config import atomic_write_text
from pdd.data.readers import DICOM_SUFFIXES, has_dicom_preamble

__all__ = ["collect_dicom", "infer_files", "infer_series"]

log = logging.getLogger(__name__)


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        return has_dicom_preamble(fh.read(132))


def collect_dicom(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """DICOM files named, and those inside folders named (recursively, sorted; by preamble or suffix)."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and _looks_dicom(p))
            if not found:
                raise FileNotFoundError(f"folder {path} holds no DICOM file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def _finding(scores: SeriesScores) -> str:
    if scores.labels is None:
        return "none made (no calibration or threshold)"
    return "abnormal" if scores.labels.any() else "normal"


def infer_series(scorer: SeriesScorer, series: Series, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Score ``series`` and write its outputs into ``out_dir``; the record of what was done.

    The record: source study/series, frames, per-frame and series scores, the finding, the outputs' files
    and UIDs, the thresholds and provenance, and the seconds spent scoring (``infer_s``) and writing.
    """
    t0 = time.perf_counter()
    scores = scorer.score(series)
    t1 = time.perf_counter()
    written = write_outputs(series, scores, scorer.provenance, out_dir)
    t2 = time.perf_counter()
    uids = output_uids(series, scorer.provenance)
    top = scores.series_index
    record: dict[str, Any] = {
        "study_uid": series.study_uid, "series_uid": series.series_uid, "frames": len(series.frames),
        "series_score": float(scores.scores[top]),
        "series_normalised_score": None if scores.normalised is None else float(scores.normalised[top]),
        "finding": _finding(scores), "frame_scores": [float(s) for s in scores.scores],
        "abnormal_frames": None if scores.labels is None else [int(k) + 1 for k in np.flatnonzero(scores.labels)],
        "outputs": {kind: {"file": str(path), "sop_instance_uid": uids[f"{kind}_instance"],
                           "series_uid": uids[f"{kind}_series"]} for kind, path in written.items()},
        "provenance": scorer.provenance.__dict__, "infer_s": t1 - t0, "write_s": t2 - t1,
    }
    if scores.labels is None:
        log.warning("%s: the model has no calibration and no --threshold was given: map and scores written, no "
                    "finding made (run `pdd calibrate`)", series.describe())
    log.info("%s: series score %.4g, finding %s, %.1f s inference, %.1f s writing", series.describe(),
             record["series_score"], record["finding"], t1 - t0, t2 - t1)
    return record


def infer_files(scorer: SeriesScorer, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                skip_bad: bool = False) -> dict[str, Any]:
    """Every series among ``inputs``: outputs in ``out_dir/<Series Instance UID>/``, ``out_dir/results.json``.

    A series that cannot be inferred as it is (:class:`SeriesRefused`) is listed under ``refused`` with the
    reason; an unreadable file stops the run naming it, or with ``skip_bad`` is listed under ``skipped``.
    """
    out = Path(out_dir)
    files = collect_dicom(inputs)
    skipped: list[dict[str, str]] = []
    groups = group_series(files, skipped if skip_bad else None)
    results, refused = [], []
    for (study, series_uid), entries in groups.items():
        try:
            series = assemble(entries)
        except SeriesRefused as exc:
            log.warning("refusing series %s: %s", series_uid, exc)
            refused.append({"study_uid": study, "series_uid": series_uid, "reason": str(exc)})
            continue
        results.append(infer_series(scorer, series, out / series_uid))
    summary = {"provenance": scorer.provenance.__dict__, "series": results, "refused": refused, "skipped": skipped}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    return summary
