"""Shared fixtures: seeded RNG per test, one small PDD model per session."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_pdd():
    """PDD at 64² with random teachers, eval mode (built once: the teachers are large)."""
    from pdd import PDDConfig, build_pdd

    logging.getLogger("pdd.model").setLevel(logging.ERROR)
    torch.manual_seed(0)
    return build_pdd(PDDConfig(image_size=64, scan_impl="chunked")).eval()
