"""What fuzzing the readers found (benchmarks/fuzz_readers.py), one regression test per finding, and a short
run of the harness itself so that it keeps working. Every finding was an exception other than the
project's ImageReadError escaping a reader; each test rebuilds its input from a valid file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pdd.data.readers import ImageReadError, read_image, read_image_bytes


def _nifti_gz(path: Path, image: nib.Nifti1Image | nib.Nifti2Image, patch: tuple[int, bytes] | None = None) -> Path:
    data = bytearray(image.to_bytes())
    if patch is not None:
        data[patch[0]:patch[0] + len(patch[1])] = patch[1]
    path.write_bytes(gzip.compress(bytes(data)))
    return path


def test_nifti_with_a_corrupt_magic_string(tmp_path):
    """nibabel's HeaderDataError escaped (found on a NIfTI-2 series whose magic became 'o+2')."""
    volume = np.ones((4, 3, 2, 2), np.float32)
    path = _nifti_gz(tmp_path / "bad.nii.gz", nib.Nifti2Image(volume, np.eye(4)), patch=(4, b"o+2\x00"))
    with pytest.raises(ImageReadError, match=r"bad\.nii\.gz: corrupt or truncated NIfTI file \(HeaderDataError: "
                                             r"magic string 'o\+2' is not valid"):
        read_image(path)


def test_nifti_whose_affine_orients_no_axis(tmp_path):
    """An affine with two nearly parallel columns: nibabel's orientation is NaN for one axis (IndexError)."""
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[1, 0] = 2.2e32
    path = _nifti_gz(tmp_path / "skew.nii.gz", nib.Nifti1Image(np.ones((8, 6, 5), np.int16), affine))
    with pytest.raises(ImageReadError, match=r"skew\.nii\.gz: its affine .* maps the voxel axes to no set of RAS"):
        read_image(path)


def _dicom_bytes(tmp_path: Path, write_dicom) -> bytes:
    return write_dicom(tmp_path / "ct.dcm", np.arange(64).reshape(8, 8) + 1000, intercept=-1024.0).read_bytes()


def test_dicom_whose_rescale_intercept_is_not_a_number(tmp_path, write_dicom):
    """A decimal string ',1024' (a flipped bit of '-1024'): float() raised ValueError."""
    data = _dicom_bytes(tmp_path, write_dicom)
    assert data.count(b"-1024") == 1
    with pytest.raises(ImageReadError, match=r"upload: .*RescaleIntercept"):
        read_image_bytes(data.replace(b"-1024", b",1024"), "upload")


def test_dicom_whose_transfer_syntax_uid_names_no_transfer_syntax(tmp_path, write_dicom):
    """The file meta's transfer syntax replaced by another UID of the same length: pydicom's UID raised
    ValueError ('UID is not a transfer syntax')."""
    data = _dicom_bytes(tmp_path, write_dicom)
    explicit = b"1.2.840.10008.1.2.1\x00"
    assert data.count(explicit) == 1
    with pytest.raises(ImageReadError, match=r"upload: its transfer syntax UID '1\.2\.840\.10008\.1\.1' names no "
                                             r"transfer syntax"):
        read_image_bytes(data.replace(explicit, b"1.2.840.10008.1.1\x00\x00\x00"), "upload")


def test_dicom_with_an_unknown_value_representation(tmp_path, write_dicom):
    """Rows' VR 'US' became 'TS': pydicom raised NotImplementedError when the value was first used."""
    data = _dicom_bytes(tmp_path, write_dicom)
    rows = b"\x28\x00\x10\x00US"
    assert data.count(rows) == 1
    with pytest.raises(ImageReadError, match=r"upload: corrupt DICOM header element \(NotImplementedError: With tag "
                                             r"\(0028,0010\) got exception: Unknown Value Representation 'TS'") as info:
        read_image_bytes(data.replace(rows, b"\x28\x00\x10\x00TS"), "upload")
    assert "Traceback" not in str(info.value)


FINDINGS = Path(__file__).resolve().parent / "data" / "fuzz-findings"


@pytest.mark.parametrize("name", sorted(p.name for p in FINDINGS.glob("*.bin")))
def test_the_inputs_the_fuzz_runs_found(tmp_path, name):
    """The inputs the 600-s runs found, each an image or an ImageReadError now, in bounded memory.

    Second run (results.md): a TIFF whose strip offset is stored as a fraction (RATIONAL), which Pillow hands
    to seek(): TypeError, now a corrupt-image error. First run (run1-results.md): 11 MemoryErrors under a
    4 GiB address space. A PNG chunk, a TIFF tag and a NIfTI-2 header extension whose length fields
    claim up to 4 GiB made Pillow and nibabel ask for that many bytes in one read (4.3 GB, 1.2 GB and 0.56 GB
    allocated for files of 61 bytes to 1.5 KB); io file objects allocate what read(n) asks for before
    reading. They now read through TimedReader, which reads 4 MiB pieces up to the end of the data."""
    import tracemalloc

    from benchmarks.fuzz_readers import FUZZ_BUDGET
    from pdd.data.readers import DecodeBudget

    data = (FINDINGS / name).read_bytes()
    budget = DecodeBudget(**FUZZ_BUDGET)
    tracemalloc.start()
    try:
        if "nifti" in name:
            path = tmp_path / "case.nii.gz"
            path.write_bytes(data)
            read = lambda: read_image(path, budget=budget)  # noqa: E731
        else:
            read = lambda: read_image_bytes(data, name, budget=budget)  # noqa: E731
        try:
            assert read().dtype == np.float32
        except ImageReadError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 1e6:.0f} MB allocated"


def test_a_short_fuzz_round_finds_nothing(tmp_path):
    """The harness itself: one seeded round over every seed format, in this process."""
    pytest.importorskip("hypothesis")
    from benchmarks.fuzz_readers import run_round, seeds

    result = run_round(seed=0, examples=60, out=tmp_path)
    assert result["finding"] is None, result["finding"]
    assert result["executions"] == 60 and sum(result["outcomes"].values()) == 60
    assert result["outcomes"]["decoded"] > 0 and len(seeds()) == 22
