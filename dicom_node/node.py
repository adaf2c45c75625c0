"""The node's work loop: instances in (C-STORE or a watched folder), series out through the spool.

:class:`Node` owns the spool and two worker threads. The **inference worker** closes series after the quiet
period (``quiet_s`` without a new instance), assembles each into a :class:`~dicom_node.series.Series` (or
records why it is refused), infers it and writes its results (:func:`dicom_node.infer.infer_series`). The
**sender** delivers results to every destination, retrying with exponential back-off (``retry_s`` doubling up
to ``retry_max_s``) while a destination is down or busy; a destination that refuses the objects outright fails
the job after three attempts. Both pick their work from the spool's states, so a restarted node carries on
where the killed one stopped.

:meth:`Node.receive` is how instances get in: the file is written to the spool's ``tmp/``, its header read and
its pixels decoded through ``pdd/data/readers.py`` (a corrupt instance is refused there, naming it), then moved
into its series' job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_node.infer import infer_series
from dicom_node.scoring import SeriesScorer
from dicom_node.send import Destination, SendError
from dicom_node.series import SeriesRefused, assemble, read_header
from dicom_node.spool import Job, Spool
from pdd.data.readers import ImageReadError, read_image

__all__ = ["Node", "Refused"]

log = logging.getLogger(__name__)

_PERMANENT_FAILURES_ALLOWED = 3


class Refused(ValueError):
    """An instance the node does not take; ``status`` is the DIMSE status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class Node:
    """Receives instances into ``spool``, infers series with ``scorer``, delivers to ``destinations``."""

    def __init__(self, spool: Spool, scorer: SeriesScorer, destinations: Sequence[Destination], *,
                 quiet_s: float = 10.0, retry_s: float = 5.0, retry_max_s: float = 300.0,
                 dicom_window: Sequence[float] | None = None) -> None:
        if not destinations:
            raise ValueError("the node needs at least one destination (--dest, --stow or --out)")
        self.spool, self.scorer, self.destinations = spool, scorer, list(destinations)
        self.quiet_s, self.retry_s, self.retry_max_s = quiet_s, retry_s, retry_max_s
        self.window = (float(dicom_window[0]), float(dicom_window[1])) if dicom_window else None
        self._stop = threading.Event()
        self._wake_sender = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- instances in --------------------------------------------------------------------------------------

    def receive(self, data: bytes, origin: str) -> Job:
        """Take one instance (a Part 10 file's bytes); :class:`Refused` with the DIMSE status when not taken."""
        if self.spool.full(len(data)):
            raise Refused(f"the spool is full ({self.spool.used_bytes / 1e6:.1f} MB of "
                          f"{self.spool.max_bytes / 1e6:.1f} MB)", 0xA700)
        tmp = self.spool.temporary()
        sop = "?"
        try:
            _write(tmp, data)
            ds = read_header(tmp)
            sop = str(ds.get("SOPInstanceUID", "?"))
            missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k not in ds]
            if missing:
                raise ImageReadError(tmp, f"the DICOM header lacks {', '.join(missing)}")
            # Decoding the first frame decodes the file's pixel data: a damaged instance is refused now, while
            # the sender can still be told, not when its series is inferred.
            read_image(tmp, dicom_window=self.window)
        except ValueError as exc:  # ImageReadError, or pixel attributes the readers reject
            tmp.unlink(missing_ok=True)
            reason = exc.reason if isinstance(exc, ImageReadError) else str(exc)
            raise Refused(f"corrupt instance {sop} from {origin}: {reason}", 0xC000) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.spool.add_instance(tmp, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                       str(ds.SOPInstanceUID), origin)

    # --- workers -------------------------------------------------------------------------------------------

    def start(self) -> Node:
        # Series still receiving when a previous run stopped wait a full quiet period from now, so that their
        # senders, refused meanwhile, can send the rest into the same job.
        for job in self.spool.in_state("receiving"):
            job.last_instance = time.monotonic()
        for name, target in (("pdd-dicom-infer", self._infer_loop), ("pdd-dicom-send", self._send_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current step (the spool keeps everything not finished)."""
        self._stop.set()
        self._wake_sender.set()
        for thread in self._threads:
            thread.join(timeout_s)

    def _infer_loop(self) -> None:
        while not self._stop.is_set():
            self.spool.close_quiet(self.quiet_s)
            job = next(self.spool.in_state("received"), None)
            if job is None:
                self._stop.wait(0.2)
                continue
            self.infer(job)

    def infer(self, job: Job) -> None:
        """Assemble, infer and write one received job's results (or record why its series is refused)."""
        t0 = time.time()
        try:
            series = assemble([(p, read_header(p)) for p in job.instance_files()])
        except (SeriesRefused, ImageReadError) as exc:
            log.warning("job %s: series %s refused: %s", job.id, job.record["series_uid"], exc)
            self.spool.update(job, state="refused", errors=[*job.record["errors"], str(exc)])
            self.spool.release_files(job)
            return
        try:
            result = infer_series(self.scorer, series, job.outputs)
        except ImageReadError as exc:
            log.error("job %s: %s", job.id, exc)
            self.spool.update(job, state="refused", errors=[*job.record["errors"], str(exc)])
            self.spool.release_files(job)
            return
        timings = {**job.record["timings"], "inferred_at": time.time(), "infer_step_s": time.time() - t0}
        self.spool.update(job, state="inferred", result=result, timings=timings, next_attempt=0.0)
        self._wake_sender.set()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            due = [j for j in self.spool.in_state("inferred") if j.record["next_attempt"] <= now]
            for job in due:
                if self._stop.is_set():
                    return
                self.send(job)
            self._wake_sender.wait(0.5)
            self._wake_sender.clear()

    def send(self, job: Job) -> None:
        """Deliver one inferred job to every destination not yet acknowledged; schedule a retry on failure."""
        files = job.output_files()
        delivered = dict(job.record["delivered"])
        errors: list[str] = []
        transient = True
        for dest in self.destinations:
            if delivered.get(dest.name):
                continue
            try:
                dest.send(files, job.record["series_uid"])
            except SendError as exc:
                errors.append(str(exc))
                transient = transient and exc.transient
                continue
            delivered[dest.name] = time.time()
            self.spool.update(job, delivered=delivered)
        if not errors:
            timings = {**job.record["timings"], "sent_at": time.time()}
            self.spool.update(job, state="sent", timings=timings)
            self.spool.release_files(job)
            log.info("job %s: results for series %s delivered to %s", job.id, job.record["series_uid"],
                     ", ".join(d.name for d in self.destinations))
            return
        attempts = job.record["attempts"] + 1
        history = [*job.record["errors"], *errors][-10:]
        if not transient and attempts >= _PERMANENT_FAILURES_ALLOWED:
            log.error("job %s: giving up after %d attempts: %s", job.id, attempts, "; ".join(errors))
            self.spool.update(job, state="failed", attempts=attempts, errors=history)
            return
        wait = min(self.retry_s * 2 ** (attempts - 1), self.retry_max_s)
        log.warning("job %s: delivery failed (%s); attempt %d, next in %.0f s", job.id, "; ".join(errors),
                    attempts, wait)
        self.spool.update(job, attempts=attempts, errors=history, next_attempt=time.time() + wait)
