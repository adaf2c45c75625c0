"""Triton kernels for the anomaly head of :mod:`pdd.anomaly`, in two launches.

1. ``_cosine_kernel``: 1 − cos over channels for every level at the level's own resolution, fp32 sums,
   written into one packed buffer (B, Σ_l H_l·W_l). This pass reads the features, by far the largest
   tensors, exactly once; at PDD's sizes the buffer holds 10752 values per image.
2. ``_blur_max_kernel``: per output tile, the Gaussian-blurred sum of the bilinearly upsampled maps and
   the per-image max. The tile's halo of the upsampled sum is evaluated straight from the packed maps at
   scipy's reflected coordinates, slab by slab, and both blur passes are products with banded tap
   matrices (``tl.dot``, fp32 'ieee'), so no full-resolution intermediate exists; only the output map
   is written.

Why not one launch: the cosine is a reduction over up to 1024 channels per low-resolution pixel, and
every output tile needs a halo of them. Fusing it into the tile kernel would redo that reduction for
each tile that touches a pixel (and each of its 4 bilinear taps); computing it once at feature
resolution costs one tiny extra buffer and one launch.

The image score is reduced with ``tl.atomic_max`` on fp32: max is exact and order independent, so the
result stays deterministic. Launch 1 initialises the score, so no memset launch is needed.

These kernels are ``impl="triton"`` of :func:`pdd.anomaly.anomaly_head`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kernels.anomaly_head needs Triton: pip install 'triton>=3.2' (or pip install -e '.[gpu]')"
    ) from exc

from kernels.contract import COS_EPS, check_feature_pairs

FeaturePairs = Sequence[tuple[Tensor, Tensor]]

__all__ = ["COSINE_CONFIG", "anomaly_head_triton", "blur_config", "cosine_maps"]

_COS_EPS = tl.constexpr(COS_EPS)
# 64 contiguous pixels × 32 channels per load: 128-byte rows per channel in fp16, and three fp32
# (32, 64) accumulators stay at 48 registers per thread at 4 warps.
COSINE_CONFIG = {"BLOCK_C": 32, "BLOCK_P": 64, "num_warps": 4}
# Output tiles of 32²: with σ = 4 (radius 16) the tile plus its halo is exactly 64 columns, a power of two
# (tl.dot shapes must be), so no column of the halo is wasted. Halo rows come in slabs of 16, the
# smallest tl.dot dimension, with 8 warps: ptxas -v for sm_90 then reports no spills (107 registers), where
# 4 warps, or the whole 64 × 64 halo at once, spilled. One stage: pipelining the slab loop would multi-buffer
# the dot operands in shared memory (204 KB at 3 stages, one program per SM) to prefetch loads that are
# gathers anyway; unpipelined it needs 12 KB.
_TILE = 32
_ROWS = 16


@triton.jit
def _cosine_block(t_ptr, s_ptr, channels, hw, b, start, dst_ptr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """1 − cos over channels for pixels [start, start + BLOCK_P) of image b of one level; writes dst_ptr[p]."""
    offs_p = start + tl.arange(0, BLOCK_P)
    mask_p = offs_p < hw
    base = b * channels * hw
    dot = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    tt = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    ss = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c < channels)[:, None] & mask_p[None, :]
        offs = base + offs_c[:, None] * hw + offs_p[None, :]
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dot += t * s
        tt += t * t
        ss += s * s
    norm = tl.sqrt(tl.sum(tt, axis=0) * tl.sum(ss, axis=0))
    dist = 1.0 - tl.sum(dot, axis=0) / tl.maximum(norm, _COS_EPS)
    tl.store(dst_ptr + offs_p, dist, mask=mask_p)


@triton.jit
def _cosine_kernel(feats, channels, heights, widths,
                   cos_ptr, score_ptr,
                   NUM_LEVELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Launch 1; grid (Σ_l cdiv(H_l·W_l, BLOCK_P), batch).

    feats: (teacher_0, student_0, teacher_1, …) each (batch, C_l, H_l, W_l) fp16|fp32; channels, heights,
    widths: NUM_LEVELS int32 each. Writes cos (batch, Σ_l H_l·W_l) fp32 and score (batch,) = −inf.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    total = 0
    for level in tl.static_range(NUM_LEVELS):
        total += heights[level] * widths[level]
    if pid == 0:
        tl.store(score_ptr + b, float("-inf"))
    first_block = 0
    level_start = 0
    for level in tl.static_range(NUM_LEVELS):
        hw = heights[level] * widths[level]
        blocks = tl.cdiv(hw, BLOCK_P)
        if (pid >= first_block) & (pid < first_block + blocks):
            _cosine_block(feats[2 * level], feats[2 * level + 1], channels[level], hw, b,
                          (pid - first_block) * BLOCK_P, cos_ptr + b * total + level_start, BLOCK_C, BLOCK_P)
        first_block += blocks
        level_start += hw


@triton.jit
def _reflect(i, n):
    """scipy.ndimage 'reflect' (half-sample symmetric, period 2n) of integer coordinates i into [0, n)."""
    m = i % (2 * n)
    m = tl.where(m < 0, m + 2 * n, m)
    return tl.where(m < n, m, 2 * n - 1 - m)


@triton.jit
def _upsampled(level_ptr, level_h, level_w, rows, cols, height, width):
    """Bilinear align_corners sample of one (level_h, level_w) fp32 map at output rows × cols -> (len(rows), len(cols)).

    Source coordinates are computed as torch does: scale = (in − 1)/(out − 1) rounded to fp32, src = scale·dst
    (a one-pixel output only samples dst = 0, so its divisor may be 1 instead of torch's scale 0).
    """
    scale_h = tl.math.div_rn((level_h - 1).to(tl.float32), tl.maximum(height - 1, 1).to(tl.float32))
    scale_w = tl.math.div_rn((level_w - 1).to(tl.float32), tl.maximum(width - 1, 1).to(tl.float32))
    sy = rows.to(tl.float32) * scale_h
    sx = cols.to(tl.float32) * scale_w
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    ly = (sy - y0.to(tl.float32))[:, None]
    lx = (sx - x0.to(tl.float32))[None, :]
    y1 = tl.minimum(y0 + 1, level_h - 1)
    x1 = tl.minimum(x0 + 1, level_w - 1)
    r0 = (y0 * level_w)[:, None]
    r1 = (y1 * level_w)[:, None]
    m00 = tl.load(level_ptr + r0 + x0[None, :])
    m01 = tl.load(level_ptr + r0 + x1[None, :])
    m10 = tl.load(level_ptr + r1 + x0[None, :])
    m11 = tl.load(level_ptr + r1 + x1[None, :])
    return (1.0 - ly) * ((1.0 - lx) * m00 + lx * m01) + ly * ((1.0 - lx) * m10 + lx * m11)


@triton.jit
def _taps(lag, SIGMA: tl.constexpr, RADIUS: tl.constexpr):
    """Unnormalised Gaussian weight of tap lag ∈ [0, 2·RADIUS] (centre at RADIUS), 0 outside."""
    x = (lag - RADIUS).to(tl.float32) / SIGMA
    return tl.where((lag >= 0) & (lag <= 2 * RADIUS), tl.exp(-0.5 * x * x), 0.0)


@triton.jit
def _blur_max_kernel(cos_ptr, heights, widths, height, width,
                     out_ptr, score_ptr,
                     NUM_LEVELS: tl.constexpr, SIGMA: tl.constexpr, RADIUS: tl.constexpr, TILE: tl.constexpr,
                     EXT: tl.constexpr, ROWS: tl.constexpr):
    """Launch 2; grid (cdiv(height, TILE)·cdiv(width, TILE), batch).

    cos: (batch, Σ_l H_l·W_l) fp32 from launch 1; heights, widths: NUM_LEVELS int32 each. Writes the map
    out (batch, height, width) fp32 and folds each tile's max into score (batch,) fp32.
    EXT ≥ TILE + 2·RADIUS is the halo-extended tile width; the halo rows are taken ROWS at a time.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_w = tl.cdiv(width, TILE)
    y0 = (pid // tiles_w) * TILE
    x0 = (pid % tiles_w) * TILE
    ext = tl.arange(0, EXT)
    tile = tl.arange(0, TILE)
    total = 0
    for level in tl.static_range(NUM_LEVELS):
        total += heights[level] * widths[level]
    norm = tl.sum(_taps(ext, SIGMA, RADIUS), axis=0)
    # band_w[e, c]: weight of halo column e for output column c. Both passes are products with such
    # banded matrices; the halo's columns and rows are reflected coordinates, so the padded border
    # never exists in memory.
    band_w = _taps(ext[:, None] - tile[None, :], SIGMA, RADIUS) / norm        # (EXT, TILE)
    cols = _reflect(x0 - RADIUS + ext, width)
    blurred = tl.zeros((TILE, TILE), dtype=tl.float32)
    # Slabs of ROWS halo rows keep the upsampled sum at ROWS × EXT values in registers.
    for r0 in range(0, TILE + 2 * RADIUS, ROWS):
        halo = r0 + tl.arange(0, ROWS)
        rows = _reflect(y0 - RADIUS + halo, height)
        level_ptr = cos_ptr + b * total
        acc = tl.zeros((ROWS, EXT), dtype=tl.float32)
        for level in tl.static_range(NUM_LEVELS):
            acc += _upsampled(level_ptr, heights[level], widths[level], rows, cols, height, width)
            level_ptr += heights[level] * widths[level]
        along_w = tl.dot(acc, band_w, input_precision="ieee")                  # (ROWS, TILE)
        band_h = _taps(halo[None, :] - tile[:, None], SIGMA, RADIUS) / norm    # (TILE, ROWS)
        blurred += tl.dot(band_h, along_w, input_precision="ieee")
    oy = y0 + tile
    ox = x0 + tile
    mask = (oy < height)[:, None] & (ox < width)[None, :]
    tl.store(out_ptr + (b * height + oy[:, None]) * width + ox[None, :], blurred, mask=mask)
    tl.atomic_max(score_ptr + b, tl.max(tl.where(mask, blurred, float("-inf"))))


def blur_config(sigma: float, truncate: float = 4.0) -> dict[str, float | int]:
    """Constexprs of launch 2 for a Gaussian σ: SIGMA, RADIUS (as scipy: int(truncate·σ + 0.5)), TILE, EXT, ROWS."""
    if sigma <= 0:
        raise ValueError(f"gaussian sigma must be positive, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    return {"SIGMA": float(sigma), "RADIUS": radius, "TILE": _TILE, "EXT": triton.next_power_of_2(_TILE + 2 * radius),
            "ROWS": _ROWS, "num_warps": 8, "num_stages": 1}


def _level_sizes(pairs: FeaturePairs) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    for i, (t, s) in enumerate(pairs):
        if t.shape != s.shape:
            raise ValueError(f"anomaly head: pair {i} teacher {tuple(t.shape)} and student {tuple(s.shape)} differ")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"anomaly head: pair {i} must be fp16, bf16 or fp32, got {t.dtype}")
        # Kernels decorated under TRITON_INTERPRET=1 are interpreted on CPU tensors; compiled ones need CUDA.
        if t.device.type != "cuda" and isinstance(_cosine_kernel, triton.runtime.JITFunction):
            raise ValueError(f"anomaly head: pair {i} must be CUDA tensors (CPU only under TRITON_INTERPRET=1), "
                             f"got {t.device}")
    return (tuple(t.shape[1] for t, _ in pairs), tuple(t.shape[2] for t, _ in pairs),
            tuple(t.shape[3] for t, _ in pairs))


def _launch_cosine(pairs: FeaturePairs, cos: Tensor, score: Tensor) -> None:
    channels, heights, widths = _level_sizes(pairs)
    feats = tuple(t.contiguous() for pair in pairs for t in pair)
    blocks = sum(triton.cdiv(h * w, COSINE_CONFIG["BLOCK_P"]) for h, w in zip(heights, widths))
    _cosine_kernel[(blocks, cos.shape[0])](feats, channels, heights, widths, cos, score,
                                           NUM_LEVELS=len(pairs), **COSINE_CONFIG)


def cosine_maps(pairs: FeaturePairs, out: Tensor | None = None) -> Tensor:
    """Launch 1 alone: the packed 1 − cos maps (B, Σ_l H_l·W_l) fp32, level after level, each row-major."""
    check_feature_pairs(pairs)
    _, heights, widths = _level_sizes(pairs)
    ref = pairs[0][0]
    total = sum(h * w for h, w in zip(heights, widths))
    if out is None:
        out = torch.empty(ref.shape[0], total, dtype=torch.float32, device=ref.device)
    elif out.shape != (ref.shape[0], total) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"anomaly head: out must be contiguous ({ref.shape[0]}, {total}) fp32, "
                         f"got {tuple(out.shape)} {out.dtype}")
    score = torch.empty(ref.shape[0], dtype=torch.float32, device=ref.device)
    _launch_cosine(pairs, out, score)
    return out


def anomaly_head_triton(pairs: FeaturePairs, image_size: tuple[int, int], sigma: float = 4.0,
                        out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Anomaly map and score with the two Triton launches; the result of :func:`pdd.anomaly.anomaly_head_ref`.

    pairs: (teacher, student) each (B, C_l, H_l, W_l) fp16|bf16|fp32. Returns (map (B, H, W) fp32,
    score (B,) fp32), written into ``out`` when given.
    """
    check_feature_pairs(pairs)
    _, heights, widths = _level_sizes(pairs)
    height, width = image_size
    ref = pairs[0][0]
    batch = ref.shape[0]
    cfg = blur_config(sigma)
    if out is None:
        out = (torch.empty(batch, height, width, dtype=torch.float32, device=ref.device),
               torch.empty(batch, dtype=torch.float32, device=ref.device))
    amap, score = out
    if amap.shape != (batch, height, width) or amap.dtype != torch.float32 or not amap.is_contiguous():
        raise ValueError(f"anomaly head: out map must be contiguous ({batch}, {height}, {width}) fp32, "
                         f"got {tuple(amap.shape)} {amap.dtype}")
    if score.shape != (batch,) or score.dtype != torch.float32:
        raise ValueError(f"anomaly head: out score must be ({batch},) fp32, got {tuple(score.shape)} {score.dtype}")
    if batch == 0:
        return amap, score
    cos = torch.empty(batch, sum(h * w for h, w in zip(heights, widths)), dtype=torch.float32, device=ref.device)
    _launch_cosine(pairs, cos, score)
    grid = (triton.cdiv(height, cfg["TILE"]) * triton.cdiv(width, cfg["TILE"]), batch)
    _blur_max_kernel[grid](cos, heights, widths, height, width, amap, score, NUM_LEVELS=len(pairs), **cfg)
    return amap, score

