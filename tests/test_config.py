"""Typed config: YAML round trip, validation, overrides."""

from __future__ import annotations

import pytest

from pdd.config import ConfigError, PDDConfig, apply_overrides


def test_yaml_round_trip(tmp_path):
    cfg = PDDConfig(image_size=128, shared_decoder=False).replace(sigma=2.0)
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert PDDConfig.from_yaml(path) == cfg


def test_defaults_are_the_authors():
    cfg = PDDConfig()
    assert cfg.loss.prior_cos_form == "plus_cos"
    assert (cfg.loss.prior_mse_weight, cfg.loss.prior_cos_weight, cfg.loss.div_weight) == (0.02, 0.05, 0.5)
    assert (cfg.train.lr, cfg.train.betas, cfg.train.eta_min, cfg.train.cosine_t_max) == (2e-3, (0.5, 0.999), 2e-4, 40)
    assert cfg.shared_decoder and cfg.sigma == 4.0


@pytest.mark.parametrize("data, match", [
    ({"image_size": 100}, "multiple of 32"),
    ({"imagesize": 256}, "unknown key"),
    ({"loss": {"prior_cos_form": "minus"}}, "prior_cos_form"),
    ({"loss": {"div_weight": "high"}}, "must be a number"),
    ({"train": {"epochs": 0}}, "epochs"),
    ({"scan_impl": "fast"}, "scan_impl"),
])
def test_validation_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        PDDConfig.from_dict(data)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("image_size: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        PDDConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        PDDConfig.from_yaml(tmp_path / "none.yaml")


def test_overrides():
    cfg = apply_overrides(PDDConfig(), ["train.epochs=5", "loss.prior_cos_form=one_minus_cos", "image_size=128"])
    assert (cfg.train.epochs, cfg.loss.prior_cos_form, cfg.image_size) == (5, "one_minus_cos", 128)
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(PDDConfig(), ["train.epoch=5"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(PDDConfig(), ["train.epochs"])


def test_scan_impl_names_and_the_deprecated_alias():
    from pdd.impl_names import SCAN_IMPLS

    for name in ("auto", *SCAN_IMPLS):
        assert PDDConfig(scan_impl=name).validate().scan_impl == name
    with pytest.warns(DeprecationWarning, match="'chunked' is deprecated; use 'eager'"):
        cfg = apply_overrides(PDDConfig(), ["scan_impl=chunked"])
    assert cfg.scan_impl == "eager"
