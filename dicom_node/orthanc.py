"""A local Orthanc (the Debian package ``orthanc``, plus ``orthanc-dicomweb`` for DICOMweb) on loopback ports:
the PACS the node's tests and benchmark talk to, and a way to try the node before routing a hospital's PACS.

:class:`Orthanc` writes a configuration into its folder (storage and index there, loopback only, no
authentication, the node as a known modality), starts ``Orthanc CONFIG.json``, waits for its REST API and
stops the process it started. One instance per folder (Orthanc locks its index).

Example::

    >>> with Orthanc("pacs", dicom_port=4242, http_port=8042, peers={"pdd": ("PDD", "127.0.0.1", 11112)}) as pacs:
    ...     pacs.upload(paths)                          # doctest: +SKIP
    ...     pacs.post("/modalities/pdd/store", pacs.get("/studies"))   # route the studies to the node
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["DICOMWEB_PLUGIN", "Orthanc", "OrthancError", "orthanc_binary"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancError(RuntimeError):
    """Orthanc is missing, did not start, or answered a request with an error."""


def orthanc_binary() -> str:
    """The Orthanc executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise OrthancError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
    return found


class Orthanc:
    """An Orthanc server in ``folder`` with DICOM on ``dicom_port`` and REST on ``http_port`` (127.0.0.1).

    ``peers``: modalities it may send to, ``{name: (AE title, host, port)}``; ``dicomweb``: load the DICOMweb
    plugin (STOW-RS at ``dicomweb_url``).
    """

    def __init__(self, folder: str | os.PathLike, *, dicom_port: int, http_port: int, aet: str = "ORTHANC",
                 peers: dict[str, tuple[str, str, int]] | None = None, dicomweb: bool = False) -> None:
        self.folder = Path(folder)
        self.dicom_port, self.http_port, self.aet = dicom_port, http_port, aet
        self.peers, self.dicomweb = dict(peers or {}), dicomweb
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def address(self) -> str:
        """``AET@127.0.0.1:PORT``, as ``pdd dicom listen --dest`` takes it."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        if self.dicomweb and not DICOMWEB_PLUGIN.is_file():
            raise OrthancError(f"the DICOMweb plugin {DICOMWEB_PLUGIN} is missing: apt-get install orthanc-dicomweb")
        storage = str(self.folder / "storage")
        return {
            "Name": f"PDD test PACS {self.aet}", "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "StorageDirectory": storage, "IndexDirectory": storage,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "DicomModalities": {name: list(peer) for name, peer in self.peers.items()},
            "HttpServerEnabled": True, "DicomServerEnabled": True, "OrthancExplorerEnabled": False,
            "ConcurrentJobs": 1, "StableAge": 60,
            # Orthanc's largest (default 16 KiB): the node's results arrive in fewer, larger PDUs.
            "MaximumPduLength": 131072,
        }

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([orthanc_binary(), str(path)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
            try:
                self.get("/system")
                return self
            except OrthancError:
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer on {self.url} within {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "orthanc.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # --- REST ------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
                 ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as rsp:
                return rsp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise OrthancError(f"{method} {path}: {exc}") from None

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        return json.loads(self._request("POST", path, json.dumps(payload).encode()) or b"null")

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """The resources (patient, study, series, instance) a DICOM UID or ID names; [] if none."""
        return json.loads(self._request("POST", "/tools/lookup", uid.encode(), "text/plain"))

    def file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file")

    def upload(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Store DICOM files through the REST API; their Orthanc instance ids."""
        return [json.loads(self._request("POST", "/instances", Path(p).read_bytes(), "application/dicom"))["ID"]
                for p in paths]

    def series_by_uid(self) -> dict[str, dict[str, Any]]:
        """Every stored series, ``{Series Instance UID: the /series/{id} record}``."""
        out = {}
        for sid in self.get("/series"):
            record = self.get(f"/series/{sid}")
            out[record["MainDicomTags"]["SeriesInstanceUID"]] = record
        return out
