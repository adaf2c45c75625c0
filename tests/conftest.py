"""Shared fixtures: seeded RNG per test, one small PDD model per session, a DICOM writer, a stand-in ONNX
export folder (for the server-repository tests)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
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
    return build_pdd(PDDConfig(image_size=64, scan_impl="eager")).eval()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on the 2 shared cores, OpenMP threads spinning against other jobs make the
    forward passes ~10x slower than a single thread. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float = 1.0,
                 intercept: float = -1024.0, centre: list[float] | None = None,
                 width: list[float] | None = None) -> Path:
    """A CT DICOM file with its preamble: 12-bit values ``stored`` (2-D, or 3-D for frames) as uint16."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.set_pixel_data(stored.astype(np.uint16), photometric, 12)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if centre is not None:
        ds.WindowCenter, ds.WindowWidth = centre, width
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def write_dicom() -> Callable[..., Path]:
    """``write_dicom(path, stored, photometric=, slope=, intercept=, centre=, width=)`` -> path."""
    return _write_dicom


@pytest.fixture()
def onnx_dir(tmp_path: Path) -> Path:
    """A tiny ONNX export with its metadata (tests/triton_fakes.py), for building server repositories."""
    from triton_fakes import make_onnx_dir

    return make_onnx_dir(tmp_path / "onnx")
