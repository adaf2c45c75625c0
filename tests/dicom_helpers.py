"""Helpers for the DICOM node's tests: dciodvfy (dicom3tools), an SR content walker, small series."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's ``Error`` and ``Warning`` lines for one file (the test fails if dicom3tools is missing)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy is not installed: apt-get install dicom3tools (.ci/run does)")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def assert_valid(path: str | Path) -> list[str]:
    """No dciodvfy errors; returns the warnings that are not the known private-code / dictionary ones."""
    path = Path(path)
    errors, warnings = dciodvfy(path)
    assert errors == [], f"{path.name}: dciodvfy errors:\n" + "\n".join(errors)
    known = ("<99PDD>", "<QUANTITY>")  # our private coding scheme; a defined term newer than dicom3tools 2022
    return [w for w in warnings if not any(k in w for k in known)]


def content_items(ds: Dataset) -> Iterator[Dataset]:
    """Every SR content item, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""


def referenced_uids(ds: Dataset) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in a dataset."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))
            elif elem.VR == "SQ":
                for child in elem.value:
                    walk(child)

    walk(ds)
    return found
