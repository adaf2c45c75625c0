"""The node's durable spool: every series is a job on disk, from its first instance to its delivered results.

Layout of ``SPOOL/``::

    jobs/<job id>/job.json        the job's record (state, destinations delivered, attempts, result, errors)
    jobs/<job id>/in/<SOP Instance UID>.dcm     the instances received (Part 10 files, as the sender encoded them)
    jobs/<job id>/out/{pm,seg,sr}.dcm           the results, once inferred
    tmp/                          instances being written (cleared at start)

States: ``receiving`` (instances arriving; complete after the quiet period) -> ``received`` -> ``inferred``
(results written) -> ``sent`` (every destination acknowledged them); or ``refused`` (the series cannot be
inferred as it is: the reason is recorded) or ``failed`` (a destination refused the results). Every change of
state rewrites ``job.json`` atomically, after the files it names are on disk, so a ``kill -9`` at any moment
leaves each job in a state the restarted node finishes from: instances are acknowledged only once their file is
in place; inference and sending are redone from the last recorded state, and give the same UIDs (see
``dicom_node.outputs``). A job's instance and result files are removed once it is sent or refused; its record
stays for ``pdd dicom status``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pdd.config import atomic_write_text

__all__ = ["STATES", "Job", "Spool", "SpoolError"]

log = logging.getLogger(__name__)

STATES = ("receiving", "received", "inferred", "sent", "refused", "failed")
_DONE = ("sent", "refused", "failed")
JOB_FILE = "job.json"


class SpoolError(RuntimeError):
    """The spool folder is unusable (not writable, a damaged record); the message names the file."""


class Job:
    """One series' job: its folder and record. Change it through :class:`Spool`, which persists each change."""

    def __init__(self, folder: Path, record: dict[str, Any]) -> None:
        self.folder = folder
        self.record = record
        # When the last instance arrived (this process's clock): not persisted, a restart waits a quiet period anew.
        self.last_instance = time.monotonic()

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def state(self) -> str:
        return self.record["state"]

    @property
    def inputs(self) -> Path:
        return self.folder / "in"

    @property
    def outputs(self) -> Path:
        return self.folder / "out"

    def instance_files(self) -> list[Path]:
        return sorted(self.inputs.glob("*.dcm"))

    def output_files(self) -> list[Path]:
        return [p for p in (self.outputs / f"{k}.dcm" for k in ("pm", "seg", "sr")) if p.is_file()]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Spool:
    """The jobs under ``root``; thread-safe. ``max_bytes``: the size beyond which :meth:`full` says so."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        try:
            (self.root / "jobs").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / "tmp", ignore_errors=True)
            (self.root / "tmp").mkdir()
        except OSError as exc:
            raise SpoolError(f"spool {self.root} is not usable: {exc}") from None
        for folder in sorted((self.root / "jobs").iterdir()):
            if folder.name.startswith("."):
                shutil.rmtree(folder, ignore_errors=True)  # a job whose creation was cut short: it has no instance
                continue
            self.jobs[folder.name] = Job(folder, self._read(folder))
        self.used_bytes = _folder_bytes(self.root)

    # --- records ---------------------------------------------------------------------------------------------

    @staticmethod
    def _read(folder: Path) -> dict[str, Any]:
        path = folder / JOB_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpoolError(f"{path}: unreadable job record ({exc}); move the folder out of the spool") from None
        if record.get("state") not in STATES:
            raise SpoolError(f"{path}: unknown state {record.get('state')!r}")
        return record

    def _write(self, job: Job) -> None:
        atomic_write_text(job.folder / JOB_FILE, json.dumps(job.record, indent=1))

    def update(self, job: Job, **changes: Any) -> None:
        """Change fields of a job's record and persist it."""
        with self._lock:
            if "state" in changes and changes["state"] not in STATES:
                raise ValueError(f"unknown job state {changes['state']!r}")
            job.record.update(changes)
            job.record["updated"] = time.time()
            self._write(job)

    # --- receiving -------------------------------------------------------------------------------------------

    def full(self, incoming: int = 0) -> bool:
        return self.max_bytes is not None and self.used_bytes + incoming > self.max_bytes

    def temporary(self) -> Path:
        """A fresh path under ``tmp/`` for an instance being written."""
        return self.root / "tmp" / f"{uuid.uuid4().hex}.dcm"

    def _new_job(self, study_uid: str, series_uid: str, origin: str) -> Job:
        digest = hashlib.sha256(f"{study_uid}/{series_uid}".encode()).hexdigest()[:12]
        job_id = f"{time.time_ns() // 1000:016d}-{digest}"
        staging = self.root / "jobs" / f".{job_id}"
        (staging / "in").mkdir(parents=True)
        now = time.time()
        record = {"id": job_id, "state": "receiving", "study_uid": study_uid, "series_uid": series_uid,
                  "origin": origin, "created": now, "updated": now, "delivered": {}, "attempts": 0,
                  "next_attempt": 0.0, "errors": [], "result": None, "timings": {}}
        atomic_write_text(staging / JOB_FILE, json.dumps(record, indent=1))
        folder = self.root / "jobs" / job_id
        staging.rename(folder)
        job = Job(folder, record)
        self.jobs[job_id] = job
        log.info("job %s: new series %s from %s", job_id, series_uid, origin)
        return job

    def add_instance(self, tmp: Path, study_uid: str, series_uid: str, sop_uid: str, origin: str) -> Job:
        """Move a fully written instance file into its series' receiving job (a new job if none is open)."""
        with self._lock:
            job = next((j for j in self.jobs.values() if j.state == "receiving"
                        and j.record["series_uid"] == series_uid and j.record["study_uid"] == study_uid), None)
            if job is None:
                job = self._new_job(study_uid, series_uid, origin)
            target = job.inputs / f"{sop_uid}.dcm"
            replaced = target.stat().st_size if target.exists() else 0
            size = tmp.stat().st_size
            os.replace(tmp, target)
            self.used_bytes += size - replaced
            job.last_instance = time.monotonic()
            job.record.setdefault("first_instance", time.time())
            return job

    # --- moving jobs on ------------------------------------------------------------------------------------

    def in_state(self, state: str) -> Iterator[Job]:
        """Jobs in ``state``, oldest first (a snapshot: safe while other threads add jobs)."""
        with self._lock:
            jobs = [j for _, j in sorted(self.jobs.items()) if j.state == state]
        yield from jobs

    def close_quiet(self, quiet_s: float) -> list[Job]:
        """Receiving jobs without a new instance for ``quiet_s`` seconds become ``received``; returns them."""
        closed = []
        with self._lock:
            now = time.monotonic()
            for job in self.in_state("receiving"):
                if now - job.last_instance >= quiet_s:
                    self.update(job, state="received", instances=len(job.instance_files()), received=time.time())
                    closed.append(job)
        return closed

    def release_files(self, job: Job) -> None:
        """Remove a finished job's instance and result files (its record stays)."""
        with self._lock:
            freed = 0
            for sub in (job.inputs, job.outputs):
                if sub.exists():
                    freed += _folder_bytes(sub)
                    shutil.rmtree(sub)
            self.used_bytes -= freed

    def summary(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(j.record) for _, j in sorted(self.jobs.items())]


def read_jobs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The job records of a spool, oldest first, without opening it for writing (``pdd dicom status``)."""
    jobs = Path(root) / "jobs"
    if not jobs.is_dir():
        raise SpoolError(f"{root} is not a spool (no jobs/ folder)")
    return [Spool._read(folder) for folder in sorted(jobs.iterdir()) if not folder.name.startswith(".")]
