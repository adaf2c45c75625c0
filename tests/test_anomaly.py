"""Anomaly head reference against independent scipy / numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from pdd.anomaly import anomaly_head, cosine_distance, gaussian_blur, gaussian_kernel1d


@pytest.mark.parametrize("h, w", [(64, 64), (256, 256), (40, 7), (5, 3), (1, 9)])
def test_gaussian_matches_scipy(h, w):
    maps = torch.rand(3, h, w, dtype=torch.float64)
    ref = np.stack([ndimage.gaussian_filter(m, sigma=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), ref, rtol=0, atol=1e-5)


def test_gaussian_float32_matches_scipy():
    maps = torch.rand(2, 96, 80)
    ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), ref, rtol=0, atol=1e-5)


def test_kernel_has_33_taps_for_sigma_4():
    taps = gaussian_kernel1d(4.0)
    assert taps.shape == (33,)
    assert abs(taps.sum() - 1) < 1e-12


def test_cosine_distance_fp32_accumulation():
    t = torch.randn(2, 2048, 4, 4).half() * 30  # channel sums of squares overflow fp16
    s = torch.randn(2, 2048, 4, 4).half() * 30
    d = cosine_distance(t, s)
    ref = 1 - F.cosine_similarity(t.double(), s.double(), dim=1)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), ref, rtol=0, atol=1e-5)


def test_anomaly_head_matches_independent_computation():
    rng = np.random.default_rng(3)
    size = (48, 40)
    pairs_np = [(rng.standard_normal((2, c, h, w)), rng.standard_normal((2, c, h, w)))
                for c, h, w in ((8, 12, 10), (16, 6, 5), (4, 24, 20))]
    expected = np.zeros((2, *size))
    for t, s in pairs_np:
        cos = (t * s).sum(1) / np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1), 1e-8)
        for b in range(2):
            # scipy's order-1 zoom with grid_mode=False maps corner to corner: align_corners=True.
            zoom = (size[0] / cos.shape[1], size[1] / cos.shape[2])
            expected[b] += ndimage.zoom(1 - cos[b], zoom, order=1, grid_mode=False)
    expected = np.stack([ndimage.gaussian_filter(e, 4.0) for e in expected])
    pairs = [(torch.from_numpy(t).float(), torch.from_numpy(s).float()) for t, s in pairs_np]
    amap, score = anomaly_head(pairs, size)
    assert amap.shape == (2, *size) and amap.dtype == torch.float32
    np.testing.assert_allclose(amap.numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(score.numpy(), expected.reshape(2, -1).max(1), rtol=0, atol=1e-5)


def test_every_image_of_a_batch_is_scored_independently():
    t, s = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)
    amap, score = anomaly_head([(t, s)], 32)
    for i in range(4):
        m1, s1 = anomaly_head([(t[i:i + 1], s[i:i + 1])], 32)
        torch.testing.assert_close(m1[0], amap[i])
        torch.testing.assert_close(s1[0], score[i])


def test_bad_pairs_are_named():
    with pytest.raises(ValueError, match="differ in shape"):
        anomaly_head([(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9))], 32)
    with pytest.raises(ValueError, match="no feature pairs"):
        anomaly_head([], 32)
