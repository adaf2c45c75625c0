"""PDD training loss: L = L_prior + L_plain + w_div · L_div (weights and thresholds in :class:`LossConfig`).

Per sample, vec() flattens a whole C·H·W map and cos is the cosine of two such vectors; MSE is the mean
over all elements; levels l = 1, 2, 3::

    L_prior = w_pm Σ_l MSE(a_l, t_l) + w_pc Σ_l mean_b c(a_l, t_l)
              c = +cos (as released: pushes the prior student away in angle) or 1 − cos (conventional)
    L_plain = w_um Σ_l MSE(t_l, b_l)
    L_div   = mean_b max(0, cos(a_1, b_1) − τ_1) + Σ_{l=2,3} mean_b max(0, τ_deep − cos(a_l, b_l))

Targets t_l are not detached: the adapters learn through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pdd.config import LossConfig
from pdd.model import PDDFeatures

__all__ = ["flat_cosine", "pdd_loss"]


def flat_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of whole per-sample maps: (B, C, H, W) x2 -> (B,), computed in float32."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


def pdd_loss(feats: PDDFeatures, cfg: LossConfig) -> dict[str, Tensor]:
    """All loss terms; ``"loss"`` is the total to minimise, the rest are for logging."""
    prior_mse = sum(F.mse_loss(a.float(), t.float()) for a, t in zip(feats.prior, feats.targets))
    cos_prior = [flat_cosine(a, t).mean() for a, t in zip(feats.prior, feats.targets)]
    if cfg.prior_cos_form == "plus_cos":
        prior_cos = sum(cos_prior)
    else:
        prior_cos = sum(1.0 - c for c in cos_prior)
    prior = cfg.prior_mse_weight * prior_mse + cfg.prior_cos_weight * prior_cos
    plain = cfg.plain_mse_weight * sum(F.mse_loss(t.float(), b.float()) for t, b in zip(feats.targets, feats.plain))
    cos_ab = [flat_cosine(a, b) for a, b in zip(feats.prior, feats.plain)]
    div = torch.relu(cos_ab[0] - cfg.div_level1_max_cos).mean() + sum(
        torch.relu(cfg.div_deep_min_cos - c).mean() for c in cos_ab[1:]
    )
    total = prior + plain + cfg.div_weight * div
    return {"loss": total, "prior": prior, "plain": plain, "div": div}
