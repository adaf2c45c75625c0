"""``pdd dicom watch DIR``: for sites that drop DICOM files in a folder instead of sending them.

Each file that has stopped growing (the same size and modification time on two scans ``poll_s`` apart) is
taken exactly as a C-STORE would be (:meth:`dicom_node.node.Node.receive`) and removed from the folder once it
is in the spool. A file the node refuses is moved to ``DIR/refused/`` with a ``.reason.txt`` beside it. Files
and folders whose names start with a dot are left alone (copy tools write there first).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from dicom_node.node import Node, Refused

__all__ = ["scan_once", "watch"]

log = logging.getLogger(__name__)

REFUSED = "refused"


def _candidates(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (Path(root) == folder and d == REFUSED))
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return out


def scan_once(node: Node, folder: Path, seen: dict[Path, tuple[int, int]]) -> int:
    """Take every file unchanged since the previous scan (``seen`` carries the sizes between scans)."""
    taken = 0
    current: dict[Path, tuple[int, int]] = {}
    for path in _candidates(folder):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        current[path] = (st.st_size, st.st_mtime_ns)
        if seen.get(path) != current[path]:
            continue
        try:
            node.receive(path.read_bytes(), f"folder {folder}")
        except Refused as exc:
            target = folder / REFUSED / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            target.with_name(target.name + ".reason.txt").write_text(f"{exc}\n")
            log.error("%s refused: %s (moved to %s)", path, exc, target)
            continue
        path.unlink()
        current.pop(path)
        taken += 1
    seen.clear()
    seen.update(current)
    return taken


def watch(node: Node, folder: str | os.PathLike, stop: threading.Event, poll_s: float = 1.0) -> None:
    """Scan ``folder`` every ``poll_s`` seconds until ``stop`` is set."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[Path, tuple[int, int]] = {}
    while not stop.is_set():
        scan_once(node, folder, seen)
        stop.wait(poll_s)
