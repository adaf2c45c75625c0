"""The anomaly head in numpy: the twin of :func:`pdd.anomaly.anomaly_head_ref` for servers without torch.

Same maths as the reference, per (teacher, student) pair of feature maps (B, C_l, H_l, W_l)::

    m_l = 1 − cos_c(teacher, student)     per pixel, fp32 sums, denominator floored at COS_EPS
    M   = gaussian(Σ_l bilinear_up(m_l))  align_corners=True; truncate 4σ, scipy.ndimage's 'reflect' border
    score = max(M)                        per image

Upsampling and blur are linear, so both become matrices: per level, ``A_l = G_H · U_l`` (H, H_l) and
``B_l = (G_W · V_l)ᵀ`` (W_l, W) with ``U_l``, ``V_l`` the bilinear interpolation and ``G`` the blur with its
reflected border folded in, and ``M = Σ_l A_l m_l B_l``. Pairs of one resolution (the prior and the plain
student of a level) are summed before their two products. The matrices are built once per size in fp64 and
applied in fp32. This module needs numpy only; it is the ONNX Runtime ``AnomalyHead`` op of
:mod:`kernels.ort_ops` in the served CPU flavour, and holds the Gaussian's taps for :mod:`pdd.anomaly` too.

Example::

    >>> import numpy as np
    >>> t, s = np.ones((2, 8, 16, 16), np.float32), np.ones((2, 8, 16, 16), np.float32)
    >>> amap, score = anomaly_head_numpy([(t, s)], (64, 64), sigma=4.0)
    >>> amap.shape, score.shape
    ((2, 64, 64), (2,))
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from .contract import COS_EPS, check_feature_pairs

__all__ = ["anomaly_head_numpy", "bilinear_matrix", "blur_matrix", "cosine_distance_numpy", "gaussian_kernel1d",
           "level_operators", "reflect_indices"]

# Channels per step of the cosine's sums: a step's products stay in the CPU's cache instead of a full-size
# temporary going through memory (the features are the largest arrays the head reads).
_CHANNEL_STEP = 32


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised taps of scipy.ndimage's Gaussian: radius int(truncate·σ + 0.5) (33 taps for σ=4)."""
    if sigma <= 0:
        raise ValueError(f"gaussian sigma must be positive, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


@lru_cache(maxsize=64)
def reflect_indices(size: int, radius: int) -> tuple[int, ...]:
    """Source index of every padded position under scipy's 'reflect' mode (d c b a | a b c d | d c b a).

    That is numpy's 'symmetric' padding, repeated as often as the radius needs, not torch's 'reflect'.
    """
    return tuple(int(i) for i in np.pad(np.arange(size), radius, mode="symmetric"))


def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(size, size) fp64 G with ``G @ x`` = scipy's 1-D Gaussian of x along its first axis, border included."""
    taps = gaussian_kernel1d(sigma, truncate)
    radius = len(taps) // 2
    source = np.asarray(reflect_indices(size, radius))
    rows = np.repeat(np.arange(size), len(taps))
    cols = source[np.arange(size)[:, None] + np.arange(len(taps))[None, :]].ravel()
    g = np.zeros((size, size))
    np.add.at(g, (rows, cols), np.tile(taps, size))
    return g


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) fp64 U with ``U @ x`` = linear interpolation along x's first axis, align_corners=True
    (corner samples on corner samples), as torch's bilinear ``F.interpolate``."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bilinear resize needs sizes >= 1, got {in_size} -> {out_size}")
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = np.arange(out_size) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    u = np.zeros((out_size, in_size))
    np.add.at(u, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(u, (np.arange(out_size), hi), frac)
    return u


@lru_cache(maxsize=32)
def level_operators(level: tuple[int, int], image_size: tuple[int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(A (H, H_l), B (W_l, W)) fp32 such that ``A @ m @ B`` is the blurred, upsampled map of one level."""
    (h, w), (height, width) = level, image_size
    left = blur_matrix(height, sigma) @ bilinear_matrix(height, h)
    right = (blur_matrix(width, sigma) @ bilinear_matrix(width, w)).T
    return np.ascontiguousarray(left, np.float32), np.ascontiguousarray(right, np.float32)


def cosine_distance_numpy(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """1 − cos over channels per pixel, summed in fp32: (B, C, H, W) x2 -> (B, H, W) fp32."""
    if teacher.shape != student.shape:
        raise ValueError(f"anomaly head: teacher {teacher.shape} and student {student.shape} differ in shape")
    batch, channels, height, width = teacher.shape
    t = np.asarray(teacher, np.float32).reshape(batch, channels, height * width)
    s = np.asarray(student, np.float32).reshape(batch, channels, height * width)
    dot, tt, ss = (np.zeros((batch, height * width), np.float32) for _ in range(3))
    for c in range(0, channels, _CHANNEL_STEP):
        tc, sc = t[:, c:c + _CHANNEL_STEP], s[:, c:c + _CHANNEL_STEP]
        dot += np.einsum("bcp,bcp->bp", tc, sc)
        tt += np.einsum("bcp,bcp->bp", tc, tc)
        ss += np.einsum("bcp,bcp->bp", sc, sc)
    norm = np.sqrt(tt * ss)
    return (1.0 - dot / np.maximum(norm, np.float32(COS_EPS))).reshape(batch, height, width)


def anomaly_head_numpy(pairs: Sequence[tuple[np.ndarray, np.ndarray]], image_size: tuple[int, int],
                       sigma: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly map and score from (teacher, student) pairs, each (B, C_l, H_l, W_l) float (any float dtype).

    Returns (map (B, H, W) fp32, score (B,) fp32 = max of the map): :func:`pdd.anomaly.anomaly_head_ref`'s.
    """
    check_feature_pairs(pairs)
    size = (int(image_size[0]), int(image_size[1]))
    by_level: dict[tuple[int, int], np.ndarray] = {}
    for teacher, student in pairs:
        level = (int(teacher.shape[2]), int(teacher.shape[3]))
        m = cosine_distance_numpy(teacher, student)
        by_level[level] = m if level not in by_level else by_level[level] + m
    total = None
    for level, m in by_level.items():
        left, right = level_operators(level, size, float(sigma))
        part = left @ m @ right
        total = part if total is None else total + part
    amap = np.ascontiguousarray(total, np.float32)
    return amap, amap.reshape(amap.shape[0], size[0] * size[1]).max(axis=1)
