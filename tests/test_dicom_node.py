"""The DICOM node against a real PACS: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback ports.

Orthanc routes a synthetic CT series to ``pdd dicom listen`` (a separate process) and gets three new series
back in the same study, read here through its REST API and checked by dciodvfy; the node is killed with
SIGKILL mid-series and mid-job and restarted on its spool, and every result still arrives once. An in-process
node (the session's small model) covers what a PACS administrator relies on: C-ECHO, corrupt instances,
the full spool, the calling-AE list, the destination going down and coming back, STOW-RS, the watched folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import assert_valid, referenced_uids
from pydicom.uid import Comprehensive3DSRStorage, CTImageStorage, ParametricMapStorage, SegmentationStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from benchmarks import hostile_files as bombs
from benchmarks.common import free_ports
from dicom_node.node import Node, Refused
from dicom_node.orthanc import Orthanc
from dicom_node.scoring import local_scorer
from dicom_node.scp import serve
from dicom_node.send import DicomDestination, FolderDestination, StowDestination
from dicom_node.spool import Spool, read_jobs
from dicom_node.synthetic import write_ct_series
from dicom_node.watch import scan_once

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
RESULT_CLASSES = {ParametricMapStorage, SegmentationStorage, Comprehensive3DSRStorage}


def _wait(condition: Callable[[], object], timeout_s: float, what: str, log: Callable[[], str] = str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log()}")


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    names = ("orthanc_dicom", "orthanc_http", "node", "inproc")
    return dict(zip(names, free_ports(len(names))))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, ports) -> Iterator[Orthanc]:
    peers = {"pdd": ("PDD", "127.0.0.1", ports["node"])}
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), dicom_port=ports["orthanc_dicom"],
                     http_port=ports["orthanc_http"], peers=peers, dicomweb=True)
    with server:
        yield server


def _series_files(tmp_path_factory, series: int, slices: int = 4) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp(f"ct{series}"), slices=slices, image_size=64, seed=1,
                           series=series, defects=[1])


def _send(files, port: int, aet: str = "PDD", calling: str = "MODALITY") -> list[int]:
    """C-STORE ``files`` (paths or datasets) to a node; the statuses (None: no answer)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established, "the node did not accept the association"
    try:
        out = []
        for msg_id, f in enumerate(files, start=1):
            ds = f if isinstance(f, pydicom.Dataset) else pydicom.dcmread(f)
            status = assoc.send_c_store(ds, msg_id=msg_id)
            out.append(getattr(status, "Status", None))
        return out
    finally:
        assoc.release()


def _results_in(pacs: Orthanc, source_series_uid: str) -> dict[str, list[str]]:
    """The result series Orthanc holds for a source series: {SOP Class UID: [SOP Instance UIDs]}."""
    out: dict[str, list[str]] = {}
    for sid in pacs.get("/series"):
        for iid in pacs.get(f"/series/{sid}")["Instances"]:
            tags = pacs.get(f"/instances/{iid}/simplified-tags")
            if tags["SOPClassUID"] in RESULT_CLASSES and source_series_uid in json.dumps(
                    pacs.get(f"/instances/{iid}/tags?simplify")):
                out.setdefault(tags["SOPClassUID"], []).append(tags["SOPInstanceUID"])
    return out


# --- the node as its own process ---------------------------------------------------------------------------


class NodeProcess:
    """``pdd dicom listen`` on ``port`` with a fresh 64² model and fixed thresholds, logging to ``log``."""

    def __init__(self, spool: Path, port: int, dest: str, log: Path) -> None:
        self.spool, self.port, self.dest, self.log = spool, port, dest, log
        self.process: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        cmd = [sys.executable, "-m", "pdd.cli", "dicom", "listen", "--aet", "PDD", "--host", "127.0.0.1",
               "--port", str(self.port), "--dest", self.dest, "--spool", str(self.spool),
               "--config", "brain-synth", "--set", "image_size=64", "--set", "scan_impl=eager",
               "--threshold", "4.0", "--pixel-threshold", "4.1", "--quiet-s", "1", "--retry-s", "0.5",
               "--retry-max-s", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as fh:
            self.process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _wait(lambda: self.process.poll() is not None or b"listening on" in self.log.read_bytes()[start:], 120,
              "the node to listen", self.tail)
        assert self.process.poll() is None, f"the node exited:\n{self.tail()}"
        return self

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""


@pytest.fixture()
def node_process(tmp_path, ports, pacs) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path / "spool", ports["node"], pacs.address, tmp_path / "node.log")
    yield node
    node.stop()


def test_orthanc_routes_a_series_to_the_node_and_stores_three_results(node_process, pacs, tmp_path_factory):
    files = _series_files(tmp_path_factory, series=0)
    source = [pydicom.dcmread(p) for p in files]
    pacs.upload(files)
    study_id = pacs.lookup(source[0].StudyInstanceUID)[0]["ID"]
    node_process.start()
    echo = AE(ae_title="MODALITY")
    echo.add_requested_context(Verification)
    assoc = echo.associate("127.0.0.1", node_process.port, ae_title="PDD")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    # What an administrator does: route the study from the PACS to the node.
    routed = pacs.post("/modalities/pdd/store", {"Resources": [study_id], "Synchronous": True})
    assert routed["FailedInstancesCount"] == 0 and routed["InstancesCount"] == 4
    _wait(lambda: len(pacs.get(f"/studies/{study_id}")["Series"]) == 4, 60, "three result series",
          node_process.tail)
    results = _results_in(pacs, source[0].SeriesInstanceUID)
    assert {k: len(v) for k, v in results.items()} == {c: 1 for c in RESULT_CLASSES}
    sources = {str(ds.SOPInstanceUID) for ds in source}
    stored = {}
    for sop_class, (uid,) in results.items():
        (found,) = pacs.lookup(uid)
        path = tmp_path_factory.mktemp("stored") / "result.dcm"
        path.write_bytes(pacs.file(found["ID"]))
        assert_valid(path)
        stored[sop_class] = pydicom.dcmread(path)
        ds = stored[sop_class]
        assert ds.StudyInstanceUID == source[0].StudyInstanceUID and ds.PatientID == source[0].PatientID
        assert referenced_uids(ds) >= sources
    # The report's references resolve in the PACS: the map and the mask it names are stored there.
    sr = stored[Comprehensive3DSRStorage]
    for sop_class in (ParametricMapStorage, SegmentationStorage):
        assert stored[sop_class].SOPInstanceUID in referenced_uids(sr)
        assert pacs.lookup(stored[sop_class].SOPInstanceUID)
    for sop_uid in referenced_uids(sr):
        assert pacs.lookup(sop_uid), f"{sop_uid} referenced by the SR is not in the PACS"
    (job,) = read_jobs(node_process.spool)
    assert job["state"] == "sent" and job["result"]["frames"] == 4
    status = subprocess.run([sys.executable, "-m", "pdd.cli", "dicom", "status", "--spool", str(node_process.spool)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert status.returncode == 0 and "1 sent" in status.stdout and job["id"] in status.stdout


def test_a_node_killed_mid_series_and_mid_job_finishes_every_job_once(node_process, pacs, tmp_path_factory):
    files = _series_files(tmp_path_factory, series=1)
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    node_process.start()
    assert _send(files[:2], node_process.port) == [0, 0]
    node_process.kill9()                                    # mid-series: two instances acknowledged
    node_process.start()
    assert _send(files[2:], node_process.port) == [0, 0]   # the rest join the same job after the restart
    # Kill again as soon as the series is complete (inference under way or done, results maybe sent).
    _wait(lambda: any(j["state"] != "receiving" for j in read_jobs(node_process.spool)), 30, "the quiet period",
          node_process.tail)
    node_process.kill9()
    node_process.start()
    _wait(lambda: all(j["state"] == "sent" for j in read_jobs(node_process.spool)), 60, "delivery",
          node_process.tail)
    (job,) = read_jobs(node_process.spool)
    assert job["result"]["frames"] == 4
    # Each result once, under the UIDs the job recorded: a re-send after the kill stored the same objects.
    expected = {_CLASS[kind]: [o["sop_instance_uid"]] for kind, o in job["result"]["outputs"].items()}
    assert _results_in(pacs, series_uid) == expected


_CLASS = {"pm": ParametricMapStorage, "seg": SegmentationStorage, "sr": Comprehensive3DSRStorage}


# --- the node in this process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(small_pdd):
    return local_scorer(small_pdd, config="test (64²)", threshold=4.0, pixel_threshold=4.1, batch_size=4)


@pytest.fixture()
def inproc(tmp_path, ports, scorer):
    """``start(destinations, allowed=(), **node options) -> (node, port)``: an in-process node, stopped after."""
    running = []

    def start(destinations, allowed=(), max_bytes=None, **kw):
        while running:  # one node at a time on the port (a test may restart it on its spool)
            node, server = running.pop()
            server.shutdown()
            node.stop()
        options = {"quiet_s": 0.5, "retry_s": 0.3, "retry_max_s": 0.6, **kw}
        node = Node(Spool(tmp_path / "spool", max_bytes=max_bytes), scorer, destinations, **options).start()
        running.append((node, serve(node, "PDD", "127.0.0.1", ports["inproc"], allowed)))
        return node, ports["inproc"]

    yield start
    for node, server in running:
        server.shutdown()
        node.stop()


def _delivered(node: Node) -> bool:
    return bool(node.spool.jobs) and all(j.state == "sent" for j in node.spool.jobs.values())


def test_a_corrupt_instance_is_refused_and_the_rest_of_its_series_goes_on_by_stow(inproc, pacs, tmp_path_factory,
                                                                                 caplog):
    files = _series_files(tmp_path_factory, series=2)
    node, port = inproc([StowDestination(pacs.dicomweb_url)])
    bad = pydicom.dcmread(files[1])
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 3]      # truncated pixel data
    assert _send([files[0], bad, files[2], files[3]], port) == [0x0000, 0xC000, 0x0000, 0x0000]
    assert any("corrupt instance" in r.message and str(bad.SOPInstanceUID) in r.message for r in caplog.records)
    _wait(lambda: _delivered(node), 60, "delivery by STOW-RS")
    (job,) = node.spool.jobs.values()
    assert job.record["result"]["frames"] == 3 and list(job.record["delivered"]) == [f"stow:{pacs.dicomweb_url}"]
    results = _results_in(pacs, str(bad.SeriesInstanceUID))
    assert {k: len(v) for k, v in results.items()} == {c: 1 for c in RESULT_CLASSES}
    assert not any(job.folder.glob("in/*")), "a sent job's instances are removed from the spool"


def test_a_full_spool_refuses_instances_and_then_associations(inproc, tmp_path_factory, tmp_path, caplog):
    files = _series_files(tmp_path_factory, series=3, slices=2)
    size = files[0].stat().st_size
    destination = FolderDestination(tmp_path / "out")
    node, port = inproc([destination], max_bytes=int(1.5 * size), quiet_s=3600)
    assert _send(files, port) == [0x0000, 0xA700]                 # the second would overfill it
    assert "spool is full" in caplog.text
    # The same spool under a lower limit (as while results wait for a destination that is down): not one more
    # byte fits, and associations are refused before any data is sent.
    node, port = inproc([destination], max_bytes=size // 2, quiet_s=3600)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assert ae.associate("127.0.0.1", port, ae_title="PDD").is_rejected
    assert "Local limit exceeded" in caplog.text and "Rejected Transient" in caplog.text
    assert len(node.spool.jobs) == 1 and len(next(iter(node.spool.jobs.values())).instance_files()) == 1


def test_only_listed_calling_aets_and_image_classes_in_decodable_syntaxes_are_accepted(inproc, tmp_path, caplog):
    _, port = inproc([FolderDestination(tmp_path / "out")], allowed=("MODALITY",))
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage)
    assert ae.associate("127.0.0.1", port, ae_title="PDD").is_rejected
    assert "Calling AE title not recognised" in caplog.text
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, pydicom.uid.JPEGLSLossless)           # no decoder installed
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.481.1")                        # RT Image: not scored
    assoc = ae.associate("127.0.0.1", port, ae_title="PDD")
    assert assoc.is_established
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)}
    assert rejected == {CTImageStorage: 0x04, "1.2.840.10008.5.1.4.1.1.481.1": 0x03}


def test_results_wait_while_the_destination_is_down_and_arrive_when_it_returns(inproc, pacs, tmp_path_factory):
    files = _series_files(tmp_path_factory, series=4)
    node, port = inproc([DicomDestination(pacs.address)])
    pacs.stop()
    try:
        assert _send(files, port) == [0] * 4
        _wait(lambda: any(j.record["attempts"] >= 2 for j in node.spool.jobs.values()), 60, "failed attempts")
        (job,) = node.spool.jobs.values()
        assert job.state == "inferred" and "not reachable" in job.record["errors"][-1]
    finally:
        pacs.start()
    _wait(lambda: _delivered(node), 60, "delivery after the destination came back")
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert {k: len(v) for k, v in _results_in(pacs, series_uid).items()} == {c: 1 for c in RESULT_CLASSES}


def test_a_watched_folder_takes_stable_files_and_sets_corrupt_ones_aside(inproc, tmp_path, tmp_path_factory):
    files = _series_files(tmp_path_factory, series=5, slices=3)
    drop = tmp_path / "drop"
    node, _ = inproc([FolderDestination(tmp_path / "out")])
    (drop / "study").mkdir(parents=True)
    for f in files:
        (drop / "study" / f.name).write_bytes(f.read_bytes())
    (drop / "study" / "broken.dcm").write_bytes(files[0].read_bytes()[:1500])
    seen: dict = {}
    assert scan_once(node, drop, seen) == 0                       # first sight: not yet known to be complete
    assert scan_once(node, drop, seen) == 3
    assert sorted(p.name for p in drop.rglob("*") if p.is_file()) == ["broken.dcm", "broken.dcm.reason.txt"]
    assert "corrupt instance" in (drop / "refused" / "study" / "broken.dcm.reason.txt").read_text()
    _wait(lambda: _delivered(node), 60, "the results in the output folder")
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    written = sorted(p.name for p in (tmp_path / "out" / series_uid).iterdir())
    assert written == ["pm.dcm", "seg.dcm", "sr.dcm"]
    pm = pydicom.dcmread(tmp_path / "out" / series_uid / "pm.dcm")
    assert pm.NumberOfFrames == 3 and np.isfinite(pm.pixel_array).all()


def test_a_deflated_bomb_sent_to_the_node_costs_its_header_not_its_pixels(scorer, tmp_path):
    """An instance whose 1 MB deflate stream holds 288 MB of pixels: the node reads its header (inflated no
    further than the pixel data) and refuses it with a failure status; memory stays at the header's size."""
    path = bombs.dicom_deflated(tmp_path / "bomb.dcm", 12000, 12000, full=True)
    assert path.stat().st_size < 2 << 20
    node = Node(Spool(tmp_path / "spool"), scorer, [FolderDestination(tmp_path / "out")])
    data = path.read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(Refused) as refused:
            node.receive(data, "MODALITY@127.0.0.1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.status == 0xC000 and "lacks StudyInstanceUID" in str(refused.value)
    assert peak < 16 << 20, f"receiving the bomb allocated {peak / 2**20:.0f} MiB"
    assert not node.spool.jobs and not list((tmp_path / "spool").rglob("*.dcm"))
