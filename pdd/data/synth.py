"""brain-synth: a built-in brain-MRI anomaly benchmark generated from the MNI152 template shipped with nilearn.

Normal images are axial slices of the 1 mm MNI152 2009 template (T1 intensities, or T2-/FLAIR-like
intensities composed from its grey/white-matter/CSF maps) at a random level of the cerebrum, seen through
a random small rigid-plus-scale transform (rotation ±8°, scale ±6 %, shift ±8 mm, ±4° out-of-plane tilt), a
smooth elastic warp, an intensity curve (gamma), a smooth multiplicative bias field, slight blur and
Rician noise.

Anomalous images add one lesion with a pixel mask:

* ``tumour``: irregular mass, ring-enhancing (necrotic core, bright rim) or solid, inside a larger
  peritumoural oedema that spreads along white matter, pushing the surrounding anatomy outward (mass effect);
* ``haemorrhage``: hyperintense irregular blob with optional dark haemosiderin rim and slight mass effect;
* ``infarct``: wedge from a deep apex out to the cortex (an arterial territory), CSF-like signal.

Lesion signal follows the contrast: T1 lesions look as after gadolinium (enhancing rim or solid mass bright,
oedema and infarcts dark); on T2/FLAIR oedema and infarcts are bright. Haemorrhage is bright on all three.
The mask covers every tissue that was changed (tumour masks include the oedema, like a "whole tumour" label).

Everything is numpy/scipy and deterministic: image ``i`` of split ``s`` draws from its own
``np.random.SeedSequence([seed, s, i])``, so the same seed writes byte-identical PNGs.

Example::

    >>> summary = generate_brain_synth("data/brain_synth", seed=0)      # 200 / 40 / 60 images
    >>> ds = MVTecStyleDataset("data/brain_synth", split="test")
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["CONTRASTS", "DEFECTS", "BrainTemplate", "generate_brain_synth", "load_brain_template", "render_brain_slice"]

DEFECTS = ("tumour", "haemorrhage", "infarct")
CONTRASTS = ("t1", "t2", "flair")

# Field of view of the output image; the MNI brain is about 140 x 175 mm.
_FOV_MM = 200.0
# Slices whose brain area is at least this fraction of the largest slice's: skips the skull base and vertex.
_MIN_AREA_FRACTION = 0.6
# Tissue signal per contrast. T1 values match the template's own means (WM 0.87, GM 0.65, CSF 0.30);
# lesion values are set from the usual radiological appearance of each tissue on that contrast.
_SIGNAL = {
    "t1": {"wm": 0.87, "gm": 0.65, "csf": 0.30, "oedema": 0.50, "necrosis": 0.28, "enhancing": 1.10,
           "solid": 0.98, "blood": 1.10, "haemosiderin": 0.18, "infarct": 0.36},
    "t2": {"wm": 0.40, "gm": 0.55, "csf": 0.95, "oedema": 0.80, "necrosis": 0.90, "enhancing": 0.62,
           "solid": 0.66, "blood": 0.86, "haemosiderin": 0.12, "infarct": 0.84},
    "flair": {"wm": 0.45, "gm": 0.58, "csf": 0.10, "oedema": 0.90, "necrosis": 0.40, "enhancing": 0.74,
              "solid": 0.76, "blood": 0.88, "haemosiderin": 0.14, "infarct": 0.88},
}  # fmt: skip
# Brightest signal above (1.10, enhancing T1) lands at about 0.92 of the 8-bit range before gamma/bias.
_DISPLAY_SCALE = 1.0 / 1.2
# Smallest visible lesion (mm²) and how many slices to try before giving up.
_MIN_LESION_MM2 = 30.0
_LESION_TRIES = 12
_SPLIT_CODES = {"train": 0, "test_good": 1, "tumour": 2, "haemorrhage": 3, "infarct": 4}
_DEFAULT_COUNTS = (200, 40, 60)


@dataclass(frozen=True)
class BrainTemplate:
    """MNI152 volumes cropped to the brain, float32 (X, Y, Z) at 1 mm, RAS voxel axes.

    ``t1``/``gm``/``wm``/``csf``/``brain`` are intensities or tissue probabilities in [0, 1];
    ``z_range`` the usable axial slice indices (inclusive); ``centre`` the in-plane (x, y) brain centre.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    z_range: tuple[int, int]
    centre: tuple[float, float]


@lru_cache(maxsize=1)
def load_brain_template() -> BrainTemplate:
    """Load the MNI152 T1 and GM/WM templates from nilearn's bundled data (no network) and crop them."""
    try:
        from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template
    except ImportError:
        raise ImportError("brain-synth needs nilearn for the MNI152 template: pip install 'pdd-medad[data]'") from None
    t1_img = load_mni152_template(resolution=1)
    # Slicing below treats voxel indices as RAS millimetres, which holds for the bundled 1 mm template.
    if not np.allclose(t1_img.affine[:3, :3], np.eye(3)):
        raise RuntimeError(f"expected the 1 mm RAS MNI152 template from nilearn, got affine\n{t1_img.affine}")
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    # The bundled template is skull-stripped: every brain voxel is non-zero.
    inside = t1 > 0
    # Stripping also blanked the basal cisterns, which would show as background holes in low slices; a real
    # scan shows CSF there. Fill holes slice by slice (in-plane structure only) and give them CSF signal.
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    cisterns = ndimage.binary_fill_holes(inside, structure=in_plane) & ~inside
    t1[cisterns] = float(np.median(t1[inside & (gm + wm < 0.1)]))
    brain = (inside | cisterns).astype(np.float32)
    lo = [max(int(a.min()) - 4, 0) for a in np.nonzero(brain)]
    hi = [int(a.max()) + 5 for a in np.nonzero(brain)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, gm, wm, brain = (np.ascontiguousarray(v[box]) for v in (t1, gm, wm, brain))
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    area = brain.sum(axis=(0, 1))
    levels = np.flatnonzero(area >= _MIN_AREA_FRACTION * area.max())
    xs, ys = np.nonzero(brain.any(axis=2))
    centre = ((xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0)
    return BrainTemplate(t1, gm, wm, csf, brain, (int(levels.min()), int(levels.max())), centre)


def _smooth_field(rng: np.random.Generator, size: int, nodes: int, std: float) -> np.ndarray:
    """Random smooth field float32 (size, size): cubic interpolation of a (nodes, nodes) Gaussian grid."""
    coarse = rng.normal(0.0, std, (nodes, nodes))
    t = np.linspace(0.0, nodes - 1.0, size)
    ii, jj = np.meshgrid(t, t, indexing="ij")
    return ndimage.map_coordinates(coarse, [ii, jj], order=3, mode="nearest").astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float, amount: float) -> np.ndarray:
    """Multiplicative texture 1 + amount·n, n smoothed white noise rescaled to unit std; float64 ``shape``."""
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma_px)
    return 1.0 + amount * noise / noise.std()


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _harmonics(rng: np.random.Generator, angle: np.ndarray, strength: float) -> np.ndarray:
    """Irregular outline 1 + Σ_k a_k cos(kθ + φ_k), k = 2..6, amplitudes decaying with k."""
    out = np.ones_like(angle)
    for k in range(2, 7):
        out += rng.normal(0.0, strength / k) * np.cos(k * angle + rng.uniform(0.0, 2 * np.pi))
    return np.maximum(out, 0.35)


def _blob_coordinate(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, centre: np.ndarray, radius: float,
                     strength: float) -> np.ndarray:
    """Normalised radius (0 at the centre, 1 on an irregular elliptical outline) float32 like ``u``."""
    du, dv = u - centre[0], v - centre[1]
    # Random elongation and orientation, so blobs are not all round.
    phi, ratio = rng.uniform(0, np.pi), rng.uniform(0.7, 1.0)
    a = (du * np.cos(phi) + dv * np.sin(phi)) / ratio
    b = -du * np.sin(phi) + dv * np.cos(phi)
    return np.hypot(a, b) / (radius * _harmonics(rng, np.arctan2(b, a), strength))


@dataclass
class _View:
    """How an output image maps into the template (everything in mm, output-plane coordinates)."""

    z0: float
    angle: float
    scale: float
    shift: np.ndarray
    tilt: np.ndarray
    warp_u: np.ndarray
    warp_v: np.ndarray


def _random_view(rng: np.random.Generator, template: BrainTemplate, size: int) -> _View:
    return _View(
        z0=rng.uniform(template.z_range[0], template.z_range[1]),
        angle=np.deg2rad(rng.uniform(-8.0, 8.0)),
        scale=rng.uniform(0.94, 1.06),
        shift=rng.uniform(-8.0, 8.0, 2),
        tilt=np.tan(np.deg2rad(rng.uniform(-4.0, 4.0, 2))),
        warp_u=_smooth_field(rng, size, 5, 1.8),
        warp_v=_smooth_field(rng, size, 5, 1.8),
    )


def _sample(template: BrainTemplate, view: _View, u: np.ndarray, v: np.ndarray,
            volumes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Sample template volumes (trilinear) at output-plane points (u, v) mm; each float32 like ``u``."""
    uw, vw = u + view.warp_u, v + view.warp_v
    c, s = np.cos(view.angle), np.sin(view.angle)
    # A head `scale` times larger shows template point p/scale at output point p.
    ut = (c * uw - s * vw) / view.scale + view.shift[0]
    vt = (s * uw + c * vw) / view.scale + view.shift[1]
    # Radiological display: image right is the patient's left (−x), image down is posterior (−y).
    coords = np.stack(
        [template.centre[0] - ut, template.centre[1] - vt, view.z0 + view.tilt[0] * ut + view.tilt[1] * vt]
    )
    return {
        name: ndimage.map_coordinates(
            getattr(template, name), coords, order=1, mode="constant", cval=0.0, prefilter=False
        )
        for name in volumes
    }


def _mass_effect(u: np.ndarray, v: np.ndarray, centre: np.ndarray, strength: float,
                 reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Displace anatomy radially away from ``centre``: output point p shows the tissue from p_src, closer in.

    p_src = c + (p − c)(1 − k·exp(−(ρ/L)²)) is monotonic in ρ for k < 1, so the warp never folds.
    """
    du, dv = u - centre[0], v - centre[1]
    shrink = 1.0 - strength * np.exp(-(du * du + dv * dv) / (reach * reach))
    return centre[0] + du * shrink, centre[1] + dv * shrink


def _pick_centre(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, tissue: dict[str, np.ndarray],
                 margin_mm: float, pixel_mm: float) -> np.ndarray | None:
    """A parenchymal point at least ``margin_mm`` inside the brain, as (u, v) mm; None if the slice has none."""
    brain = tissue["brain"] > 0.5
    depth = ndimage.distance_transform_edt(brain) * pixel_mm
    ok = np.flatnonzero((depth >= margin_mm) & (tissue["csf"] < 0.5))
    if ok.size == 0:
        return None
    k = ok[rng.integers(ok.size)]
    return np.array([u.flat[k], v.flat[k]])


_Layers = list[tuple[np.ndarray, "np.ndarray | float"]]


def _tumour(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, centre: np.ndarray, radius: float,
            tissue: dict[str, np.ndarray], sig: dict[str, float]) -> _Layers:
    """Layers (alpha, signal), painted in order: oedema, then the mass, then a necrotic core if any."""
    oedema_q = _blob_coordinate(rng, u, v, centre, radius * rng.uniform(1.8, 2.6), 0.5)
    # Oedema runs along white-matter tracts and spares the cortex: weight its extent by WM probability.
    extent = _smoothstep(1.3 - oedema_q) * (0.4 + 0.6 * tissue["wm"])
    oedema = _smoothstep((extent - 0.3) / 0.25)
    core_q = _blob_coordinate(rng, u, v, centre, radius, 0.3)
    edge = 1.5 / radius
    mass = _smoothstep((1.0 - core_q) / edge)
    # Oedema surrounds the mass: drop islands that the WM weighting cut off from it.
    parts, _ = ndimage.label((oedema >= 0.5) | (mass >= 0.5))
    own = parts == parts.flat[np.argmin((u - centre[0]) ** 2 + (v - centre[1]) ** 2)]
    oedema = oedema * ndimage.binary_dilation(own, iterations=2)
    texture = _texture(rng, u.shape, 1.5, 0.06)
    layers: _Layers = [(oedema, sig["oedema"] * rng.uniform(0.92, 1.08))]
    if rng.random() < 0.6:
        # Ring-enhancing: bright rim of irregular thickness around a necrotic core.
        inner = rng.uniform(0.45, 0.7) * _harmonics(rng, np.arctan2(v - centre[1], u - centre[0]), 0.15)
        necrosis = _smoothstep((inner - core_q) / edge)
        layers.append((mass, sig["enhancing"] * rng.uniform(0.95, 1.05) * texture))
        layers.append((necrosis, sig["necrosis"] * rng.uniform(0.9, 1.1) * texture))
    else:
        layers.append((mass, sig["solid"] * rng.uniform(0.9, 1.1) * texture))
    return layers


def _haemorrhage(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, centre: np.ndarray, radius: float,
                 sig: dict[str, float]) -> _Layers:
    q = _blob_coordinate(rng, u, v, centre, radius, 0.35)
    edge = 1.5 / radius
    blob = _smoothstep((1.0 - q) / edge)
    # Clot of mixed age: patchy signal inside.
    texture = _texture(rng, u.shape, 2.0, 0.08)
    layers: _Layers = []
    if rng.random() < 0.5:
        layers.append((_smoothstep((1.0 - q) / edge), sig["haemosiderin"]))
        blob = _smoothstep((rng.uniform(0.75, 0.88) - q) / edge)
    layers.append((blob, sig["blood"] * rng.uniform(0.95, 1.05) * texture))
    return layers


def _infarct(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, tissue: dict[str, np.ndarray],
             sig: dict[str, float], pixel_mm: float) -> _Layers | None:
    """Wedge from a deep apex fanning out to a cortical arc, within the brain."""
    brain = tissue["brain"] > 0.5
    rim = brain & ~ndimage.binary_erosion(brain, iterations=2)
    candidates = np.flatnonzero(rim)
    if candidates.size == 0:
        return None
    k = candidates[rng.integers(candidates.size)]
    surface = np.array([u.flat[k], v.flat[k]])
    inward = np.array([u[brain].mean(), v[brain].mean()]) - surface
    inward /= max(float(np.hypot(*inward)), 1e-6)
    depth = rng.uniform(30.0, 60.0)
    apex = surface + depth * inward
    du, dv = u - apex[0], v - apex[1]
    rho = np.hypot(du, dv)
    rel = np.angle(np.exp(1j * (np.arctan2(dv, du) - np.arctan2(-inward[1], -inward[0]))))
    # Territory borders are not straight: wobble the half-angle with a smooth field.
    half = np.deg2rad(rng.uniform(20.0, 40.0)) * (1.0 + _smooth_field(rng, u.shape[0], 8, 0.12))
    soft = 1.5 * pixel_mm
    sector = _smoothstep((half - np.abs(rel)) * np.maximum(rho, soft) / soft)
    radial = _smoothstep((rho - 4.0) / soft) * _smoothstep((1.3 * depth - rho) / soft)
    # Below full replacement, so the gyral pattern still shows through as in a real territory infarct.
    alpha = sector * radial * _smoothstep((tissue["brain"] - 0.3) / 0.4) * rng.uniform(0.75, 0.92)
    texture = _texture(rng, u.shape, 1.5, 0.06)
    return [(alpha, sig["infarct"] * rng.uniform(0.9, 1.1) * texture)]


def _lesion(rng: np.random.Generator, defect: str, template: BrainTemplate, view: _View, u: np.ndarray, v: np.ndarray,
            volumes: tuple[str, ...], sig: dict[str, float],
            pixel_mm: float) -> tuple[dict[str, np.ndarray], _Layers] | None:
    """Tissue sampled around one lesion (with its mass effect) and the lesion's layers; None if it fits nowhere."""
    tissue = _sample(template, view, u, v, ("brain", "csf"))
    radius = rng.uniform(8.0, 22.0) if defect == "tumour" else rng.uniform(5.0, 14.0)
    if defect == "infarct":
        tissue = _sample(template, view, u, v, volumes)
        found = _infarct(rng, u, v, tissue, sig, pixel_mm)
        return None if found is None else (tissue, found)
    centre = _pick_centre(rng, u, v, tissue, radius + 4.0, pixel_mm)
    if centre is None:
        return None
    if defect == "tumour":
        su, sv = _mass_effect(u, v, centre, rng.uniform(0.35, 0.6), radius * 2.0 + 5.0)
        tissue = _sample(template, view, su, sv, volumes)
        return tissue, _tumour(rng, u, v, centre, radius, tissue, sig)
    su, sv = _mass_effect(u, v, centre, rng.uniform(0.15, 0.35), radius * 1.5 + 4.0)
    return _sample(template, view, su, sv, volumes), _haemorrhage(rng, u, v, centre, radius, sig)


def render_brain_slice(rng: np.random.Generator, *, image_size: int = 256, defect: str | None = None,
                       contrast: str = "t1") -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial brain slice: uint8 (S, S) image and bool (S, S) lesion mask (all False if normal)."""
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"defect must be None or one of {DEFECTS}, got {defect!r}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    template = load_brain_template()
    pixel_mm = _FOV_MM / image_size
    t = (np.arange(image_size, dtype=np.float32) + 0.5) * pixel_mm - _FOV_MM / 2.0
    v, u = np.meshgrid(t, t, indexing="ij")
    view = _random_view(rng, template, image_size)
    sig = {k: val * rng.uniform(0.95, 1.05) for k, val in _SIGNAL[contrast].items()}
    volumes = ("brain", "gm", "wm", "csf") + (("t1",) if contrast == "t1" else ())

    layers: _Layers = []
    mask = np.zeros(u.shape, dtype=bool)
    if defect is None:
        tissue = _sample(template, view, u, v, volumes)
    else:
        for _ in range(_LESION_TRIES):
            found = _lesion(rng, defect, template, view, u, v, volumes, sig, pixel_mm)
            if found is not None:
                tissue, layers = found
                # Lesions live in the brain: the soft brain outline clips them and their masks alike.
                layers = [(alpha * tissue["brain"], signal) for alpha, signal in layers]
                mask = np.any([alpha >= 0.5 for alpha, _ in layers], axis=0)
                if mask.sum() * pixel_mm**2 >= _MIN_LESION_MM2:
                    break
            # Too little room happens near the ends of the slice range: try another level.
            view.z0 = rng.uniform(*template.z_range)
        else:
            raise RuntimeError(
                f"brain-synth: no room for a {defect} in {_LESION_TRIES} slices; is the template intact?"
            )

    if contrast == "t1":
        image = tissue["t1"]
    else:
        image = sig["gm"] * tissue["gm"] + sig["wm"] * tissue["wm"] + sig["csf"] * tissue["csf"]
    for alpha, signal in layers:
        image = image * (1.0 - alpha) + alpha * signal

    image = np.clip(image * _DISPLAY_SCALE, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    image = image * rng.uniform(0.92, 1.08) * np.exp(_smooth_field(rng, image_size, 4, 0.12))
    image = ndimage.gaussian_filter(image, rng.uniform(0.2, 0.7))
    sigma = rng.uniform(0.008, 0.025)
    # Magnitude of complex Gaussian noise: Rician in tissue, Rayleigh in the background, as in real MRI.
    image = np.hypot(image + rng.normal(0.0, sigma, image.shape), rng.normal(0.0, sigma, image.shape))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask


def _resolve_counts(count: int | None, n_train: int | None, n_test_good: int | None,
                    n_test_anomalous: int | None) -> tuple[int, int, int]:
    if count is None:
        base = _DEFAULT_COUNTS
    else:
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        total = sum(_DEFAULT_COUNTS)
        train = round(count * _DEFAULT_COUNTS[0] / total)
        good = round(count * _DEFAULT_COUNTS[1] / total)
        base = (train, good, count - train - good)
    out = tuple(b if n is None else int(n) for b, n in zip(base, (n_train, n_test_good, n_test_anomalous)))
    if min(out) < 0:
        raise ValueError(f"image counts must not be negative, got train/test-good/anomalous {out}")
    return out  # type: ignore[return-value]


def _save_png(array: np.ndarray, path: Path) -> None:
    # Write-then-rename: an interrupted run leaves at worst a stray temporary file, never a truncated PNG.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


_OUTPUTS = ("train", "test", "ground_truth", "synth.json", "README.txt")


def generate_brain_synth(out_dir: str | Path, *, seed: int = 0, count: int | None = None, image_size: int = 256,
                         n_train: int | None = None, n_test_good: int | None = None,
                         n_test_anomalous: int | None = None, contrast: str = "t1",
                         overwrite: bool = False) -> dict[str, Any]:
    """Write brain-synth in the MVTec layout under ``out_dir`` and return its description (also in synth.json).

    Counts default to 200 train / 40 test-good / 60 anomalous (20 per defect); ``count`` rescales that
    total in the same proportions and ``n_*`` override single counts. Layout: ``train/good/000.png``,
    ``test/good/000.png``, ``test/<defect>/000.png``, ``ground_truth/<defect>/000_mask.png`` (0/255),
    ``synth.json`` and ``README.txt`` (written last, so their presence marks a complete run). A non-empty
    ``out_dir`` is refused unless ``overwrite=True``, which replaces only the entries listed above.
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    n_tr, n_good, n_anom = _resolve_counts(count, n_train, n_test_good, n_test_anomalous)
    per_defect = {d: n_anom // len(DEFECTS) + (i < n_anom % len(DEFECTS)) for i, d in enumerate(DEFECTS)}
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose an empty folder or pass overwrite=True")
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    width = max(3, len(str(max(n_tr, n_good, n_anom, 1) - 1)))
    jobs: list[tuple[str, str | None, int, Path]] = []
    jobs += [("train", None, i, out / "train" / "good") for i in range(n_tr)]
    jobs += [("test_good", None, i, out / "test" / "good") for i in range(n_good)]
    for defect, n in per_defect.items():
        jobs += [(defect, defect, i, out / "test" / defect) for i in range(n)]
    for folder in {j[3] for j in jobs} | {out / "ground_truth" / d for d, n in per_defect.items() if n}:
        folder.mkdir(parents=True, exist_ok=True)

    for split, defect, index, folder in jobs:
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))
        image, mask = render_brain_slice(rng, image_size=image_size, defect=defect, contrast=contrast)
        name = f"{index:0{width}d}"
        _save_png(image, folder / f"{name}.png")
        if defect is not None:
            _save_png(mask.astype(np.uint8) * 255, out / "ground_truth" / defect / f"{name}_mask.png")

    summary = {
        "name": "brain-synth",
        "source": "ICBM 2009a nonlinear symmetric MNI152 template (1 mm) bundled with nilearn",
        "seed": seed,
        "image_size": image_size,
        "contrast": contrast,
        "counts": {"train_good": n_tr, "test_good": n_good, **{f"test_{d}": n for d, n in per_defect.items()}},
        "defects": list(DEFECTS),
    }
    _write_text(json.dumps(summary, indent=2) + "\n", out / "synth.json")
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    _write_text(
        f"brain-synth: synthetic axial brain MRI ({contrast}) with tumour, haemorrhage and infarct lesions.\n"
        f"Generated from the MNI152 template with seed {seed}, {image_size}x{image_size} 8-bit grey PNG.\n"
        f"Images: {counts}.\n"
        "Layout: train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png (0 or 255).\n"
        "Regenerate with pdd.data.generate_brain_synth(out_dir, seed=...); same seed, same bytes.\n",
        out / "README.txt",
    )
    return summary
