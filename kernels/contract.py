"""Input contracts shared by the scan and head implementations of ``kernels/``, ``pdd/`` and ``export/``.

One place for each shape rule: the 1-D selective scan's arguments (:func:`check_scan_inputs`), the SS2D
scan's seven inputs (:func:`ss2d_shapes`, :func:`check_ss2d`; also the contract of the ``SS2DScan`` ONNX
node and TensorRT plugin) and the anomaly head's feature pairs (:func:`check_feature_pairs`, and the
``AnomalyHead`` node's pair count and map stride). Works on torch tensors and numpy arrays alike (only
``.shape`` is read); imports neither torch nor numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["COS_EPS", "DOMAIN", "HEAD_MAP_STRIDE", "HEAD_OP", "HEAD_PAIRS", "SS2D_OP", "SS2D_ROUTES",
           "check_feature_pairs", "check_scan_inputs", "check_ss2d", "ss2d_shapes"]

# The SS2D scan walks the H×W grid along four routes (their geometry: kernels.routes).
SS2D_ROUTES = 4
# Cosine denominator floor of the anomaly head, as torch.nn.functional.cosine_similarity.
COS_EPS = 1e-8
# The plugin ONNX form's custom nodes (export.custom_ops): torch library namespace, ONNX domain and TensorRT
# plugin namespace, and the op names.
DOMAIN = "pdd"
SS2D_OP = "SS2DScan"
HEAD_OP = "AnomalyHead"
HEAD_PAIRS = 6                  # 3 levels × (prior student, plain student)
# The first (teacher, student) pair is WRN layer 1 and its fusion target, at 1/4 of the image.
HEAD_MAP_STRIDE = 4


def check_scan_inputs(u: Any, delta: Any, A: Any, B: Any, C: Any, D: Any | None, z: Any | None,
                      delta_bias: Any | None) -> None:
    """Shapes of the 1-D scan: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, G, N, L)
    with G dividing dim; D, delta_bias (dim,). Raises ValueError naming the tensor and the expected shape."""
    if len(u.shape) != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if len(A.shape) != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if len(t.shape) == 3:
            ok = tuple(t.shape) == (batch, n, length)
        elif len(t.shape) == 4:
            ok = t.shape[0] == batch and tuple(t.shape[2:]) == (n, length) and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (batch={batch}, N={n}, L={length}) or "
                f"(batch, groups dividing dim={dim}, N, L), got {tuple(t.shape)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got {tuple(t.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")


def ss2d_shapes(batch: int, dim: int, height: int, width: int, d_state: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the SS2D scan inputs (x, delta, B, C, A, D, delta_bias), all per-pixel ones in spatial order."""
    return {
        "x": (batch, dim, height, width),
        "delta": (batch, SS2D_ROUTES, dim, height, width),
        "B": (batch, SS2D_ROUTES, d_state, height, width),
        "C": (batch, SS2D_ROUTES, d_state, height, width),
        "A": (SS2D_ROUTES * dim, d_state),
        "D": (SS2D_ROUTES * dim,),
        "delta_bias": (SS2D_ROUTES * dim,),
    }


def check_ss2d(x: Any, delta: Any, B: Any, C: Any, A: Any, D: Any, delta_bias: Any) -> tuple[int, int, int, int, int]:
    """Check the SS2D inputs against :func:`ss2d_shapes`; returns (batch, dim, height, width, d_state)."""
    if len(x.shape) != 4:
        raise ValueError(f"ss2d_scan: x must be (B, D, H, W), got {tuple(x.shape)}")
    batch, dim, height, width = (int(v) for v in x.shape)
    if len(A.shape) != 2 or A.shape[0] != SS2D_ROUTES * dim:
        raise ValueError(f"ss2d_scan: A must be (4·D={SS2D_ROUTES * dim}, N), got {tuple(A.shape)}")
    n = int(A.shape[1])
    given = {"x": x, "delta": delta, "B": B, "C": C, "A": A, "D": D, "delta_bias": delta_bias}
    for name, shape in ss2d_shapes(batch, dim, height, width, n).items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"ss2d_scan: {name} must be {shape}, got {tuple(given[name].shape)}")
    return batch, dim, height, width, n


def check_feature_pairs(pairs: Sequence[tuple[Any, Any]]) -> None:
    """The anomaly head's (teacher, student) pairs: at least one, each (B, C, H, W), one batch size."""
    if not pairs:
        raise ValueError("anomaly head: no feature pairs given")
    batch = pairs[0][0].shape[0]
    for i, (t, s) in enumerate(pairs):
        if len(t.shape) != 4 or len(s.shape) != 4:
            raise ValueError(
                f"anomaly head: pair {i} must be (B, C, H, W) tensors, got {tuple(t.shape)}, {tuple(s.shape)}"
            )
        if t.shape[0] != batch:
            raise ValueError(f"anomaly head: pair {i} has batch {t.shape[0]}, pair 0 has {batch}")
