"""Keep a served repository answering: restart tritonserver when it, or one of its Python-backend stubs, dies.

Triton 2.51 (the server bundled with nvidia-pytriton) does not recover from a Python-backend stub killed
under it: every later request to that model fails with ``Stub process '<model>_0_0' is not healthy``, and
the stub is not started again (``benchmarks/serve_faults.py`` measures it, results in
``benchmarks/results/serve-faults.md``). :class:`Watchdog` checks, every ``interval_s``, that the server
process runs and that each model still has as many live stubs as it had once the server was ready; if not,
it stops the whole server (its process group) and starts it again on the same ports. ``pdd serve`` runs
one (``--no-restart`` turns it off).

Stubs are found in ``/proc``: the processes of the server's process group whose program is
``triton_python_backend_stub``, whose first argument is the model file ``<repo>/<model>/<version>/model.py``.

Example::

    >>> server = TritonServer("triton_repo").start()            # doctest: +SKIP
    >>> Watchdog(server).run()                                  # until Ctrl-C  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.serve import TritonServer

__all__ = ["Restart", "Watchdog", "backend_stubs", "has_exited"]

_STUB = b"triton_python_backend_stub"


def has_exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it: an unreaped child keeps its process group id taken."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def backend_stubs(group: int) -> dict[int, str]:
    """The live Python-backend stubs in process group ``group``: pid -> model name."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if argv[0].endswith(_STUB) and len(argv) > 1 and int(pgrp) == group and state != "Z":
            found[int(entry.name)] = Path(argv[1].decode(errors="replace")).parent.parent.name
    return found


@dataclass(frozen=True)
class Restart:
    """One restart: why, when the fault was seen (``time.monotonic``), and how long the restart took."""

    reason: str
    detected_at: float
    seconds: float


class Watchdog:
    """Watches a started :class:`~export.serve.TritonServer` and restarts it when it or a stub has died
    (anything with its ``pid``, ``start(timeout_s=)`` and ``stop()``).

    ``on_restart`` is called with each :class:`Restart` (``pdd serve`` prints it); ``restarts`` lists them.
    """

    def __init__(self, server: TritonServer, interval_s: float = 1.0, start_timeout_s: float = 300.0,
                 drain_s: float = 2.0, on_restart: Callable[[Restart], None] | None = None) -> None:
        if server.pid is None:
            raise ValueError("start the server before watching it")
        self.server, self.interval_s, self.start_timeout_s = server, interval_s, start_timeout_s
        # How long a broken server may drain before its group is killed: asked to stop, Triton waits its full
        # exit timeout for the model whose stub is gone (10 s), which only delays the restart.
        self.drain_s = drain_s
        self.on_restart = on_restart
        self.restarts: list[Restart] = []
        self._expected = self._stubs()

    def _stubs(self) -> Counter:
        return Counter(backend_stubs(self.server.pid).values())

    def fault(self) -> str | None:
        """What is wrong with the server now (None: nothing)."""
        if has_exited(self.server.pid):
            return f"tritonserver (pid {self.server.pid}) exited"
        missing = self._expected - self._stubs()
        if missing:
            return "the Python-backend stub of " + ", ".join(sorted(missing)) + " died"
        return None

    def restart(self, reason: str) -> Restart:
        """Stop the server and its group, start it again (waiting until it is ready); the record of it."""
        detected = time.monotonic()
        self.server.stop(timeout_s=self.drain_s)
        self.server.start(timeout_s=self.start_timeout_s)
        self._expected = self._stubs()
        record = Restart(reason, detected, time.monotonic() - detected)
        self.restarts.append(record)
        if self.on_restart is not None:
            self.on_restart(record)
        return record

    def run(self, stop: threading.Event | None = None) -> None:
        """Check every ``interval_s`` and restart on a fault, until ``stop`` is set (or forever)."""
        stop = stop or threading.Event()
        while not stop.wait(self.interval_s):
            reason = self.fault()
            if reason is not None:
                self.restart(reason)
