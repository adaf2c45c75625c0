"""Where results go: a DICOM node by C-STORE (``--dest AET@HOST:PORT``), a DICOMweb STOW-RS endpoint
(``--stow URL``), or a folder (``--out DIR``).

Each destination's :meth:`send` delivers a job's files or raises :class:`SendError`, which says whether trying
again later may help (``transient``: the destination is down, busy or out of resources) or not (it refused the
objects). Output UIDs are deterministic, so sending a job again after a partial delivery or a crash stores the
same objects again, never new ones.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ParametricMapStorage,
    SegmentationStorage,
)

__all__ = ["OUTPUT_SOP_CLASSES", "Destination", "DicomDestination", "FolderDestination", "SendError",
           "StowDestination", "parse_destination"]

log = logging.getLogger(__name__)

OUTPUT_SOP_CLASSES = (ParametricMapStorage, SegmentationStorage, Comprehensive3DSRStorage)
_AE_ADDRESS = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


class SendError(RuntimeError):
    """A delivery failed; ``transient``: the destination may take it later (down, busy, out of resources)."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class Destination:
    """A place results are delivered to; ``name`` keys the job record's ``delivered`` map."""

    name: str

    def send(self, files: Sequence[Path], series_uid: str) -> None:
        """Deliver ``files``, the results for the source series ``series_uid``."""
        raise NotImplementedError


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (AE title, host, port); ValueError naming the expected form."""
    found = _AE_ADDRESS.match(text)
    if found is None or not 0 < int(found["port"]) < 65536:
        raise ValueError(f"--dest {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    return found["aet"], found["host"], int(found["port"])


class DicomDestination(Destination):
    """C-STORE to a DICOM node, as ``calling_aet``; one association per job."""

    def __init__(self, address: str, calling_aet: str = "PDD", timeout_s: float = 30.0) -> None:
        self.aet, self.host, self.port = parse_destination(address)
        self.name = f"dicom:{address}"
        self.calling_aet, self.timeout_s = calling_aet, timeout_s

    def send(self, files: Sequence[Path], series_uid: str) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for sop_class in OUTPUT_SOP_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "is not reachable"
            raise SendError(f"{self.aet}@{self.host}:{self.port} {why}", transient=True)
        try:
            for msg_id, path in enumerate(files, start=1):
                status = assoc.send_c_store(pydicom.dcmread(path), msg_id=msg_id)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError(f"{self.aet}: no answer to C-STORE of {path.name} (connection lost)", True)
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or success with warnings
                    # 0xA7xx: out of resources, worth retrying; 0xA9xx / 0xCxxx: the object is refused.
                    raise SendError(f"{self.aet}: C-STORE of {path.name} failed with status 0x{code:04X}",
                                    transient=(code & 0xFF00) == 0xA700)
        finally:
            assoc.release()


class StowDestination(Destination):
    """STOW-RS to a DICOMweb service (e.g. Orthanc's ``http://host:8042/dicom-web``)."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.name = f"stow:{url}"

    def send(self, files: Sequence[Path], series_uid: str) -> None:
        import requests
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(self.url, timeout=self.timeout_s)
        try:
            client.store_instances([pydicom.dcmread(p) for p in files])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            raise SendError(f"STOW-RS to {self.url} failed: HTTP {code}", transient=code >= 500 or code == 429) \
                from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SendError(f"STOW-RS to {self.url}: not reachable ({type(exc).__name__})", transient=True) from None


class FolderDestination(Destination):
    """Copies results into ``folder/<source Series Instance UID>/`` (atomically, file by file)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.name = f"folder:{self.folder}"

    def send(self, files: Sequence[Path], series_uid: str) -> None:
        for path in files:
            target = self.folder / series_uid / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
