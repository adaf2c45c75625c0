"""Loss terms against a hand computation on a small case."""

from __future__ import annotations

import math

import pytest
import torch

from pdd.config import LossConfig
from pdd.losses import pdd_loss
from pdd.model import PDDFeatures


def _vec_cos(a, b):
    a, b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _mse(a, b):
    a, b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def _hand_loss(f: PDDFeatures, cfg: LossConfig):
    batch = f.targets[0].shape[0]
    prior_mse = sum(_mse(a, t) for a, t in zip(f.prior, f.targets))
    cos_at = [sum(_vec_cos(a[i], t[i]) for i in range(batch)) / batch for a, t in zip(f.prior, f.targets)]
    cos_term = sum(cos_at) if cfg.prior_cos_form == "plus_cos" else sum(1 - c for c in cos_at)
    prior = cfg.prior_mse_weight * prior_mse + cfg.prior_cos_weight * cos_term
    plain = cfg.plain_mse_weight * sum(_mse(t, b) for t, b in zip(f.targets, f.plain))
    div = 0.0
    for lvl, (a, b) in enumerate(zip(f.prior, f.plain)):
        for i in range(batch):
            c = _vec_cos(a[i], b[i])
            div += (max(0.0, c - cfg.div_level1_max_cos) if lvl == 0 else max(0.0, cfg.div_deep_min_cos - c)) / batch
    return prior + plain + cfg.div_weight * div, prior, plain, div


def _features():
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 3, 4, 4), (2, 5, 2, 2), (2, 4, 1, 1)]
    t = tuple(torch.randn(s, generator=g) for s in shapes)
    a = tuple(x + 0.5 * torch.randn(x.shape, generator=g) for x in t)
    # level 1 nearly parallel to a (cos > 0.75), deeper levels nearly opposite (cos < 0.30)
    b = (a[0] + 0.1 * torch.randn(shapes[0], generator=g), -a[1], -a[2] + 0.2 * torch.randn(shapes[2], generator=g))
    return PDDFeatures(t, a, b)


@pytest.mark.parametrize("form", ["plus_cos", "one_minus_cos"])
def test_loss_equals_hand_computation(form):
    cfg = LossConfig(prior_cos_form=form)
    f = _features()
    out = pdd_loss(f, cfg)
    total, prior, plain, div = _hand_loss(f, cfg)
    assert div > 0.5  # every hinge of this case is active
    assert out["loss"].item() == pytest.approx(total, rel=1e-6)
    assert out["prior"].item() == pytest.approx(prior, rel=1e-6)
    assert out["plain"].item() == pytest.approx(plain, rel=1e-6)
    assert out["div"].item() == pytest.approx(div, rel=1e-6)


def test_cos_sign_changes_only_the_prior_cos_term():
    f = _features()
    plus = pdd_loss(f, LossConfig(prior_cos_form="plus_cos"))["prior"]
    minus = pdd_loss(f, LossConfig(prior_cos_form="one_minus_cos"))["prior"]
    cos_sum = sum(_vec_cos(a[i], t[i]) / 2 for a, t in zip(f.prior, f.targets) for i in range(2))
    # plus: w·Σcos; one_minus: w·Σ(1 − cos) = w·(3 − Σcos)
    assert (plus - minus).item() == pytest.approx(0.05 * (2 * cos_sum - 3), rel=1e-5)
