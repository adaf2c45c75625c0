"""Anomaly head: where the students fail to reproduce the teacher targets.

For each (teacher, student) pair of feature maps (B, C_l, H_l, W_l)::

    m_l = 1 − cos_c(teacher, student)               per pixel, cosine over channels, float32 sums
    M   = Σ_l bilinear_up(m_l)                      align_corners=True, to the image size
    M   = gaussian(M, σ)                            truncate 4σ, scipy.ndimage's 'reflect' border
    score = max(M)                                  per image

One API (:func:`anomaly_head`) with implementations behind ``impl=``: ``"reference"`` (PyTorch, exports
to standard ONNX ops) and ``"triton"`` (the kernels of ``kernels/anomaly_head.py``, loaded on first use).
The reference's numpy twin, for ONNX Runtime and servers without torch, is
:func:`kernels.cpu_head.anomaly_head_numpy`; the Gaussian's taps and border are defined there.

Example::

    >>> import torch
    >>> from pdd.anomaly import anomaly_head
    >>> t, s = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    >>> amap, score = anomaly_head([(t, s)], image_size=(64, 64))
    >>> amap.shape, score.shape
    (torch.Size([2, 64, 64]), torch.Size([2]))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.contract import COS_EPS, check_feature_pairs
from kernels.cpu_head import gaussian_kernel1d, reflect_indices
from pdd.impl_names import HEAD_IMPLS

__all__ = [
    "COS_EPS",
    "HEAD_IMPLS",
    "anomaly_head",
    "anomaly_head_ref",
    "cosine_distance",
    "gaussian_blur",
    "gaussian_kernel1d",
    "reflect_indices",
]

log = logging.getLogger(__name__)

FeaturePairs = Sequence[tuple[Tensor, Tensor]]


def gaussian_blur(maps: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian over the last two dims with scipy.ndimage.gaussian_filter's border handling.

    maps: (B, H, W) float. Equals ``scipy.ndimage.gaussian_filter(m, sigma)`` per image.
    """
    if maps.dim() != 3:
        raise ValueError(f"gaussian_blur expects (B, H, W), got shape {tuple(maps.shape)}")
    taps = gaussian_kernel1d(sigma, truncate)
    radius = len(taps) // 2
    _, h, w = maps.shape
    weight = torch.as_tensor(taps, dtype=maps.dtype, device=maps.device)
    rows = torch.as_tensor(reflect_indices(h, radius), device=maps.device)
    cols = torch.as_tensor(reflect_indices(w, radius), device=maps.device)
    x = maps.index_select(2, cols).unsqueeze(1)                     # (B, 1, H, W + 2r)
    x = F.conv2d(x, weight.view(1, 1, 1, -1))                       # along W
    x = F.conv2d(x.index_select(2, rows), weight.view(1, 1, -1, 1))  # along H
    return x.squeeze(1)


def cosine_distance(teacher: Tensor, student: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """1 − cos over channels per pixel, computed and summed in ``dtype`` (float32: what pdd.precision's policy
    gives the head in every precision): (B, C, H, W) x2 -> (B, H, W) in ``dtype``."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"anomaly head: teacher {tuple(teacher.shape)} and student {tuple(student.shape)} differ in shape"
        )
    t, s = teacher.to(dtype), student.to(dtype)
    dot = (t * s).sum(1)
    norm = torch.sqrt((t * t).sum(1) * (s * s).sum(1))
    return 1.0 - dot / norm.clamp_min(COS_EPS)


def anomaly_head_ref(pairs: FeaturePairs, image_size: tuple[int, int], sigma: float = 4.0,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """PyTorch anomaly head, computed in ``dtype``. Returns (map (B, H, W), score (B,)) in ``dtype``."""
    check_feature_pairs(pairs)
    total = None
    for teacher, student in pairs:
        m = cosine_distance(teacher, student, dtype).unsqueeze(1)
        m = F.interpolate(m, size=image_size, mode="bilinear", align_corners=True).squeeze(1)
        total = m if total is None else total + m
    smoothed = gaussian_blur(total, sigma)
    return smoothed, smoothed.flatten(1).amax(1)


def _triton_head() -> Callable[..., tuple[Tensor, Tensor]]:
    try:
        from kernels.anomaly_head import anomaly_head_triton  # optional: needs Triton
    except ImportError as exc:
        raise RuntimeError(f"anomaly head impl='triton' is not available: {exc}. Use impl='reference' on CPU.") from exc
    return anomaly_head_triton


def anomaly_head(pairs: FeaturePairs, image_size: int | tuple[int, int], sigma: float = 4.0,
                 impl: str = "reference", dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Anomaly map and image score from (teacher, student) feature pairs.

    pairs: list of (teacher, student), each (B, C_l, H_l, W_l) bf16|fp16|fp32. Returns
    (map (B, H, W) smoothed, score (B,) = max of the map), computed in ``dtype`` (float32, the policy's; the
    Triton kernels compute in float32 only).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if impl not in HEAD_IMPLS:
        raise ValueError(f"unknown anomaly head implementation {impl!r}; expected one of {HEAD_IMPLS}")
    if impl == "reference":
        return anomaly_head_ref(pairs, tuple(image_size), sigma, dtype)
    if dtype != torch.float32:
        raise ValueError(f"the Triton anomaly head computes in float32, not {dtype}")
    return _triton_head()(pairs, tuple(image_size), sigma)
