"""Raw intensities -> [0, 1]: the robust min/max of the readers, exact, in memory bounded by one chunk.

The robust range of an array is its 0.5th and 99.5th percentiles (numpy's default ``linear`` method over
the finite values), falling back to the exact min/max when they coincide. :func:`robust_range` computes
it from chunks of the values (a volume's planes, read one at a time) without holding them together: two
passes over the chunks, each adding them to a histogram of the float32 values' bit patterns (the top 16
bits first, then the low 16 bits inside the few bins that hold the wanted ranks), give the exact order
statistics, whatever the number of values. :func:`robust_normalise` is the one-array case.

This file runs inside the inference server's preprocess model too (``export/triton_repo.py`` bundles it):
it imports numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["PIXEL_SCALE", "ROBUST_PERCENTILES", "apply_range", "robust_normalise", "robust_range"]

# uint8 pixel -> [0, 1]. A multiplication, used by every path, so 8-bit pixels give bit-identical floats.
PIXEL_SCALE = 1.0 / 255.0
# Percentiles for the robust min/max: ignores a few hot pixels and burnt-in labels.
ROBUST_PERCENTILES = (0.5, 99.5)

_BINS = 1 << 16


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """The finite float32 values as uint32 keys that sort as the values do (IEEE 754 bits, sign folded)."""
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    finite = np.isfinite(v)
    bits = (v if finite.all() else v[finite]).view(np.uint32)
    # Negative values: all bits flipped; positive ones: the sign bit set (an arithmetic shift spreads the sign).
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    return bits ^ flip


def _key_value(key: int) -> float:
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def robust_range(chunks: Callable[[], Iterable[np.ndarray]]) -> tuple[float, float] | None:
    """The robust (low, high) of all values that ``chunks()`` yields (float32), or None if they are constant.

    ``chunks`` is called twice, each call a fresh pass over the same values (e.g. re-reading a file).
    Exact: the same low and high as ``np.percentile`` over the concatenated values, up to float32 rounding.
    """
    top = np.zeros(_BINS, dtype=np.int64)
    for chunk in chunks():
        top += np.bincount((_sort_keys(chunk) >> 16).view(np.int32), minlength=_BINS)
    n = int(top.sum())
    if n == 0:
        return None
    ranks = {0, n - 1}
    lerps = []
    for q in ROBUST_PERCENTILES:
        pos = q / 100.0 * (n - 1)
        below = int(np.floor(pos))
        lerps.append((below, min(below + 1, n - 1), pos - below))
        ranks |= {below, min(below + 1, n - 1)}
    cumulative = np.cumsum(top)
    # Rank r lies in the top bin whose cumulative count first exceeds r, at r minus the counts before it.
    where = {r: int(np.searchsorted(cumulative, r, side="right")) for r in ranks}
    bins = np.array(sorted(set(where.values())))
    member = np.zeros(_BINS, dtype=bool)
    member[bins] = True
    low = np.zeros((len(bins), _BINS), dtype=np.int64)
    for chunk in chunks():
        keys = _sort_keys(chunk)
        wanted = keys[member[keys >> 16]]
        slot = np.searchsorted(bins, wanted >> 16)
        low += np.bincount(slot * _BINS + (wanted & 0xFFFF), minlength=low.size).reshape(low.shape)
    value = {}
    for r, b in where.items():
        offset = r - (int(cumulative[b - 1]) if b else 0)
        counts = np.cumsum(low[int(np.searchsorted(bins, b))])
        value[r] = _key_value((b << 16) | int(np.searchsorted(counts, offset, side="right")))
    # numpy's linear method: a + (b - a) * t.
    lo, hi = ((value[a] + (value[b] - value[a]) * t) for a, b, t in lerps)
    if hi <= lo:
        lo, hi = value[0], value[n - 1]
    return None if hi <= lo else (lo, hi)


def apply_range(values: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Map ``value_range`` (low, high) to [0, 1] and clip; None (constant values) gives zeros. float32, same shape."""
    values = np.asarray(values, dtype=np.float32)
    if value_range is None:
        return np.zeros(values.shape, dtype=np.float32)
    lo, hi = value_range
    out = (values - np.float32(lo)) / np.float32(hi - lo)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def robust_normalise(values: np.ndarray) -> np.ndarray:
    """Map the 0.5th/99.5th percentiles to 0/1 and clip; any real array -> float32 same shape in [0, 1].

    Falls back to the exact min/max when the percentiles coincide (a small bright object on a flat
    background), and returns zeros for a constant array instead of dividing by zero.
    """
    values = np.asarray(values, dtype=np.float32)
    return apply_range(values, robust_range(lambda: (values,)))
