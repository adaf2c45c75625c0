"""Shared fixtures: seeded RNG per test, one small PDD model per session."""

from __future__ import annotations

import logging
from collections.abc import Iterator

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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on the 2 shared cores, OpenMP threads spinning against other jobs make the
    forward passes ~10x slower than a single thread. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
