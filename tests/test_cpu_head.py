"""The numpy anomaly head (kernels/cpu_head.py) against the PyTorch reference and scipy; the torch-free
modules of kernels/ (the served python flavour's ONNX Runtime ops) import and run without torch.

Tolerance of the maps and scores: 1e-5 of the map's range (max − min), absolute.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from kernels.cpu_head import anomaly_head_numpy, bilinear_matrix, blur_matrix, cosine_distance_numpy
from kernels.ort_ops import CPU_KERNEL
from pdd.anomaly import anomaly_head_ref
from pdd.impl_names import SCAN_IMPLS

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # of the map's range


def _features(batch: int, levels: list[tuple[int, int, int]], seed: int, structured: bool = True
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two (teacher, student) pairs per level (prior and plain student), fp32. ``structured``: the students
    stray from the teacher more in one region, as around an anomaly; else they are independent of it."""
    rng = np.random.default_rng(seed)
    pairs = []
    for channels, h, w in levels:
        yy, xx = np.mgrid[0:h, 0:w]
        region = np.exp(-((yy / h - 0.3) ** 2 + (xx / w - 0.6) ** 2) / 0.02).astype(np.float32)
        teacher = rng.standard_normal((batch, channels, h, w), dtype=np.float32)
        for _ in range(2):
            noise = rng.standard_normal((batch, channels, h, w), dtype=np.float32)
            student = teacher + (0.3 + 2 * region) * noise if structured else noise
            pairs.append((teacher, student.astype(np.float32)))
    return pairs


def _assert_close(amap: np.ndarray, score: np.ndarray, ref_map: np.ndarray, ref_score: np.ndarray) -> None:
    tol = TOLERANCE * float(ref_map.max() - ref_map.min())
    assert amap.shape == ref_map.shape and amap.dtype == np.float32 and score.dtype == np.float32
    np.testing.assert_allclose(amap, ref_map, rtol=0, atol=tol)
    np.testing.assert_allclose(score, ref_score, rtol=0, atol=tol)


@pytest.mark.parametrize("batch, levels, size, sigma", [
    (2, [(16, 16, 16), (32, 8, 8), (64, 4, 4)], (64, 64), 4.0),            # PDD's layout at 64², narrow
    (3, [(256, 24, 24), (512, 12, 12), (1024, 6, 6)], (96, 96), 4.0),     # PDD's channel counts
    (2, [(8, 12, 10), (16, 6, 5), (4, 24, 20)], (48, 40), 1.0),           # not square, levels out of order
    (2, [(8, 3, 1), (8, 1, 1)], (12, 4), 2.0),                            # maps smaller than the blur
])
def test_matches_the_pytorch_reference(batch, levels, size, sigma):
    pairs = _features(batch, levels, seed=len(levels) + batch)
    ref_map, ref_score = anomaly_head_ref([(torch.from_numpy(t), torch.from_numpy(s)) for t, s in pairs], size,
                                          sigma)
    amap, score = anomaly_head_numpy(pairs, size, sigma)
    _assert_close(amap, score, ref_map.numpy(), ref_score.numpy())


def test_matches_an_independent_fp64_computation():
    """Students independent of the teacher: the map is ~6 everywhere with a small range, where fp32 rounding
    shows most; the numpy head stays within the tolerance of scipy in fp64 (so does the PyTorch reference,
    to ~9e-6 of the range)."""
    pairs = _features(2, [(256, 16, 16), (512, 8, 8), (1024, 4, 4)], seed=7, structured=False)
    size = (64, 64)
    expected = np.zeros((2, *size))
    for t, s in pairs:
        t64, s64 = t.astype(np.float64), s.astype(np.float64)
        cos = (t64 * s64).sum(1) / np.maximum(np.linalg.norm(t64, axis=1) * np.linalg.norm(s64, axis=1), 1e-8)
        for b in range(2):
            # scipy's order-1 zoom with grid_mode=False maps corner to corner: align_corners=True.
            zoom = (size[0] / cos.shape[1], size[1] / cos.shape[2])
            expected[b] += ndimage.zoom(1 - cos[b], zoom, order=1, grid_mode=False)
    expected = np.stack([ndimage.gaussian_filter(e, 4.0) for e in expected])
    amap, score = anomaly_head_numpy(pairs, size, 4.0)
    _assert_close(amap, score, expected, expected.reshape(2, -1).max(1))


@pytest.mark.parametrize("size, sigma", [(64, 4.0), (7, 4.0), (1, 4.0), (40, 1.5)])
def test_blur_matrix_is_scipys_gaussian(size, sigma):
    x = np.random.default_rng(0).random((size, 3))
    np.testing.assert_allclose(blur_matrix(size, sigma) @ x, ndimage.gaussian_filter1d(x, sigma, axis=0),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_size, in_size", [(64, 16), (40, 7), (5, 5), (1, 6), (9, 1), (3, 8)])
def test_bilinear_matrix_is_torch_interpolate(out_size, in_size):
    x = torch.rand(1, 1, in_size, 2, dtype=torch.float64)
    ref = F.interpolate(x, size=(out_size, 2), mode="bilinear", align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(bilinear_matrix(out_size, in_size) @ x[0, 0].numpy(), ref, rtol=0, atol=1e-12)


def test_cosine_of_zero_features_and_refusals():
    zero = np.zeros((1, 4, 2, 2), np.float32)
    np.testing.assert_array_equal(cosine_distance_numpy(zero, zero), np.ones((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_distance_numpy(zero, np.zeros((1, 4, 2, 3), np.float32))
    with pytest.raises(ValueError, match="no feature pairs"):
        anomaly_head_numpy([], (8, 8))
    with pytest.raises(ValueError, match="pair 1 has batch 2"):
        anomaly_head_numpy([(zero, zero), (np.zeros((2, 4, 2, 2)),) * 2], (8, 8))


def test_the_kernel_is_named_as_the_scan_implementations_name_it():
    assert CPU_KERNEL in SCAN_IMPLS


def test_the_server_side_modules_need_no_torch():
    """kernels.contract, cpu_lib, cpu_head and ort_ops import with torch (and the rest of the project) blocked,
    register the ONNX Runtime ops and run the head."""
    script = (
        "import sys\n"
        "for name in ('torch', 'pdd', 'export', 'kernels.cpu_scan', 'kernels.selective_scan'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np\n"
        "from kernels import contract, cpu_head, cpu_lib, ort_ops\n"
        "assert ort_ops.register_ort_ops().endswith('.so')\n"
        "t = np.ones((2, 8, 4, 4), np.float32)\n"
        "amap, score = cpu_head.anomaly_head_numpy([(t, t)] * 6, (16, 16))\n"
        "assert amap.shape == (2, 16, 16) and float(abs(score).max()) < 1e-6, score\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
