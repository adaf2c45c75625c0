"""Run a Triton Inference Server on a PDD model repository.

Two ways:

* **Locally, without Docker**: the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles
  (Triton 2.51, Python backend only, so it serves the ``python`` flavour). :class:`TritonServer` starts
  and stops it; :func:`serve` does so for ``pdd serve`` and blocks until Ctrl-C.
* **In production**: NVIDIA's container, ``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``, for every flavour;
  :func:`docker_command` prints the ``docker run`` line (``--gpus all`` for TensorRT, whose version in the
  container must equal the one that built the engine).

The bundled server's Python models run in a stub process that embeds the interpreter found first on
``PATH``. That environment needs ``numpy<2`` (the 2.51 backend returns empty outputs with numpy 2,
silently), ONNX Runtime, Pillow and pydicom, and for the plugin ONNX form onnx and onnxruntime-extensions
(no torch: the form's custom nodes run torch-free ops), so :func:`python_env` creates a small virtual
environment once, from PyPI, with the interpreter running this code, and caches it under
``~/.cache/pdd/triton-env``
(``$XDG_CACHE_HOME`` respected; ``PDD_TRITON_ENV`` names a ready-made one instead). The stub must also
load the same ``libpython`` as that interpreter (``LD_LIBRARY_PATH`` gets its ``LIBDIR``) and sit in the
Python backend's folder, which :func:`backend_directory` assembles in the cache from the wheel's files.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from export.metadata import read_engine_metadata
from export.triton_config import ENGINE, check_repository, parse_config, repository_flavour
from export.watchdog import Watchdog, has_exited

__all__ = [
    "BACKEND_REQUIREMENTS",
    "NGC_IMAGE",
    "NGC_TAG",
    "ServerError",
    "TritonInstall",
    "TritonServer",
    "backend_directory",
    "cache_dir",
    "docker_command",
    "find_tritonserver",
    "python_env",
    "serve",
    "stop_group",
]

# What the Python-backend models import; numpy<2 because the bundled 2.51 backend needs numpy 1.x. onnx and
# onnxruntime-extensions: the plugin-form engine moves its graph's custom nodes into the Python ops' domain.
BACKEND_REQUIREMENTS = ("numpy<2", "onnxruntime", "onnx", "onnxruntime-extensions", "pillow", "pydicom")
NGC_IMAGE = "nvcr.io/nvidia/tritonserver"
# The NGC release of Triton 2.51, the server bundled with nvidia-pytriton 0.7.0 that the tests run.
NGC_TAG = "24.10"
PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
# Seconds Triton waits for in-flight requests when asked to stop.
_EXIT_TIMEOUT_S = 10
# Servers this process started and has not stopped yet, by process id (= their process group id).
_LIVE: dict[int, TritonServer] = {}
# Signals whose default action would end this process and leave its servers behind.
_CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_cleanup_installed = False


class ServerError(RuntimeError):
    """The server could not be found, set up or started; the message says what to do."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pdd`` or ``~/.cache/pdd``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdd"


@dataclass(frozen=True)
class TritonInstall:
    """The files of the ``tritonserver`` bundled with nvidia-pytriton."""

    binary: Path
    libs: Path          # the wheel's shared libraries (CUDA runtime, …), needed by the server and the stub
    python_backend: Path
    stubs: Path         # one triton_python_backend_stub per Python version: stubs/<X.Y>/
    version: str        # nvidia-pytriton's version


def find_tritonserver() -> TritonInstall:
    """Locate the bundled server without importing pytriton (whose own numpy pin we do not need)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"the tritonserver binary comes with nvidia-pytriton: `pip install --no-deps "
                          f"{PYTRITON_REQUIREMENT}` (--no-deps: it pins numpy<2, which this environment does not "
                          "need; the server's Python models get their own environment)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    from importlib.metadata import version

    install = TritonInstall(root / "bin" / "tritonserver", root.parent.parent / "nvidia_pytriton.libs",
                            root / "backends" / "python", root / "python_backend_stubs",
                            version("nvidia-pytriton"))
    for path in (install.binary, install.libs, install.python_backend / "libtriton_python.so", install.stubs):
        if not path.exists():
            raise ServerError(f"{path} is missing from the nvidia-pytriton installation; reinstall it "
                              f"(`pip install --no-deps --force-reinstall {PYTRITON_REQUIREMENT}`)")
    return install


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so parallel test sessions build a cached folder once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _python_version(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def backend_directory(install: TritonInstall, python_version: str) -> Path:
    """A ``--backend-directory`` whose ``python/`` holds the bundled backend and the stub for ``python_version``."""
    stub = install.stubs / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in install.stubs.iterdir())
        raise ServerError(f"nvidia-pytriton {install.version} has no Python-backend stub for Python "
                          f"{python_version} (has {have}); use one of those Python versions")
    folder = cache_dir() / "triton-backends" / f"pytriton-{install.version}-py{python_version}"
    with _locked(folder.parent / f".{folder.name}.lock"):
        if not (folder / "python" / "triton_python_backend_stub").is_file():
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
            shutil.copytree(install.python_backend, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder


def python_env(requirements: Sequence[str] = BACKEND_REQUIREMENTS, timeout_s: float = 900) -> Path:
    """The Python environment for the server's Python models: ``$PDD_TRITON_ENV``, else a cached venv.

    ``$PDD_TRITON_ENV`` must be a venv of the same Python version as the interpreter running this code.
    The venv is made with the interpreter running this code (its libpython is the one the stub loads) and
    ``requirements`` from PyPI, then checked by importing numpy (< 2), onnxruntime, onnx, onnxruntime_extensions,
    PIL and pydicom. It is keyed by Python version and requirements, and rebuilt if a previous attempt did not
    finish.
    """
    given = os.environ.get("PDD_TRITON_ENV")
    if given:
        env = Path(given)
        if not (env / "bin" / "python3").exists():
            raise ServerError(f"PDD_TRITON_ENV={given} has no bin/python3; point it at a virtual environment")
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if _python_version(env / "bin" / "python3") != here:
            raise ServerError(f"PDD_TRITON_ENV={given} runs another Python than this one ({here}); the stub loads "
                              f"this interpreter's libpython, so make the venv with {sys.executable}")
        return env
    base = Path(getattr(sys, "_base_executable", sys.executable))
    key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:10]
    env = cache_dir() / "triton-env" / f"py{sys.version_info[0]}.{sys.version_info[1]}-{key}"
    done = env / ".pdd-complete"
    with _locked(env.parent / f".{env.name}.lock"):
        if done.is_file():
            return env
        shutil.rmtree(env, ignore_errors=True)
        steps = [[str(base), "-m", "venv", str(env)],
                 [str(env / "bin" / "python3"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  *requirements],
                 [str(env / "bin" / "python3"), "-c",
                  "import numpy, onnxruntime, onnx, onnxruntime_extensions, PIL, pydicom; "
                  "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__"]]
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise ServerError(f"setting up the server's Python environment timed out: {shlex.join(cmd)}") from None
            if proc.returncode != 0:
                raise ServerError(f"setting up the server's Python environment in {env} failed at "
                                  f"`{shlex.join(cmd)}`:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n"
                                  "It needs PyPI once; offline, set PDD_TRITON_ENV to a venv with "
                                  f"{' '.join(requirements)}")
        done.touch()
    return env


def _help_text(binary: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, env=env)
    return proc.stdout + proc.stderr


def stop_group(proc: subprocess.Popen, timeout_s: float) -> int:
    """Stop a server that leads its own process group, and everything in that group; its exit status.

    SIGTERM first (Triton drains in-flight requests and stops its Python-backend stubs), then, once the
    server has exited or ``timeout_s`` has passed, SIGKILL to the whole group: a stub the server did not
    stop, or a server that did not stop in time. The server is reaped only after that, so its group id
    cannot have been given to another process in between.
    """
    if not has_exited(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while not has_exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=timeout_s)


def _stop_live_servers() -> None:
    for server in list(_LIVE.values()):
        try:
            server.stop()
        except Exception as exc:  # stop the others all the same
            print(f"could not stop tritonserver (pid {server.pid}): {exc}", file=sys.stderr)


def _stop_servers_and_die(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP handler: stop this process's servers, then end as the signal's default action would."""
    _stop_live_servers()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_cleanup() -> None:
    """Once per process: stop live servers at interpreter exit, and on SIGTERM/SIGHUP when nothing else
    handles them (a handler the application installed is left alone). SIGINT needs nothing: its
    KeyboardInterrupt unwinds through ``stop()`` in ``finally`` blocks, and at exit through the atexit hook.
    """
    global _cleanup_installed
    if _cleanup_installed:
        return
    atexit.register(_stop_live_servers)
    if threading.current_thread() is threading.main_thread():
        for signum in _CLEANUP_SIGNALS:
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, _stop_servers_and_die)
    _cleanup_installed = True


class TritonServer:
    """The bundled ``tritonserver`` on a model repository, as a context manager.

    repo: a repository from :func:`export.triton_repo.build_triton_repo` (python flavour); ports: HTTP,
    gRPC and Prometheus metrics; host: the address all three listen on (loopback by default); log: a
    file for the server's output (None: this process's stdout/stderr).

    The server runs in a process group of its own with its Python-backend stubs; :meth:`stop` ends the
    whole group. It is also stopped when this process exits, on failure, Ctrl-C (SIGINT), SIGTERM or
    SIGHUP: :meth:`start` installs an atexit hook and, unless the application handles them itself,
    SIGTERM/SIGHUP handlers that stop every server first, then let the signal end the process.
    """

    def __init__(self, repo: str | os.PathLike, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, host: str = "127.0.0.1", log: str | os.PathLike | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.repo = Path(repo).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.log_path = Path(log) if log is not None else None
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None
        # The Python backend's /dev/shm regions get this prefix, so a killed server's leftovers can be removed.
        self._shm_prefix = f"pdd_triton_{uuid.uuid4().hex[:12]}_"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that start the server (sets up the cached folders first)."""
        flavour = repository_flavour(self.repo)
        if flavour != "python":
            raise ServerError(f"{self.repo} serves the {flavour} flavour; the bundled server has only the Python "
                              f"backend. Run NVIDIA's container instead:\n  {docker_command(self.repo)}")
        check_repository(self.repo)
        install = find_tritonserver()
        if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise ServerError(f"{sys.executable} is built without a shared libpython, which the Python-backend "
                              "stub loads; use a Python built with --enable-shared (pyenv, python.org, distros)")
        env_dir = python_env()
        backends = backend_directory(install, _python_version(env_dir / "bin" / "python3"))
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(install.libs),
                                                             env.get("LD_LIBRARY_PATH")) if p)
        # The stub embeds the first python3 on PATH, with its site-packages.
        env["PATH"] = os.pathsep.join((str(env_dir / "bin"), env.get("PATH", "")))
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        cmd = [str(install.binary), f"--model-repository={self.repo}", f"--backend-directory={backends}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
               f"--exit-timeout-secs={_EXIT_TIMEOUT_S}"]
        # Servers from 26.x refuse client shared memory unless asked; 2.51 does not know the flag.
        if "--allow-client-shm" in _help_text(install.binary, env):
            cmd.append("--allow-client-shm=true")
        return cmd + self.extra_args, env

    def start(self, timeout_s: float = 180) -> TritonServer:
        """Start the server and wait (at most ``timeout_s``) until every model is ready."""
        cmd, env = self.command()
        _install_cleanup()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")
        # A session (and process group) of its own: the terminal's Ctrl-C reaches this process only, which
        # then stops the server, and stopping the group also stops the server's Python-backend stubs.
        self.process = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
                                        if self._log_file else None, start_new_session=True)
        _LIVE[self.process.pid] = self
        try:
            self._wait_ready(timeout_s)
        except BaseException:  # not ready, or interrupted while waiting: leave nothing running
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if has_exited(self.pid):
                code = self.stop()
                raise ServerError(f"tritonserver exited with code {code} while starting:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group id (None when not running)."""
        return None if self.process is None else self.process.pid

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the server's log file ('' when it logs to the terminal)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_bytes()[-chars:].decode("utf-8", errors="replace")

    def stop(self, timeout_s: float = 2 * _EXIT_TIMEOUT_S) -> int | None:
        """Stop the server and its process group (SIGTERM, then SIGKILL after ``timeout_s``); its exit status.

        Safe to call again, also from the signal handler while an earlier call is under way.
        """
        proc = self.process
        code = None
        if proc is not None:
            code = stop_group(proc, timeout_s)
            # A server that had to be killed leaves its stubs' shared memory behind.
            for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                leftover.unlink(missing_ok=True)
            self.process = None
            _LIVE.pop(proc.pid, None)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def wait(self) -> int:
        """Block until the server exits, then stop what is left of its group; the server's exit status."""
        if self.process is None:
            raise ServerError("the server is not running; call start() first")
        os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
        return self.stop()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def docker_command(repo: str | os.PathLike, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                   tag: str | None = None) -> str:
    """The ``docker run`` line serving ``repo`` with NVIDIA's container, for the repository's flavour.

    TensorRT: ``--gpus all``, and the tag must be the release whose TensorRT built the engine (left as
    ``<yy.mm>`` unless given). The Python-backend models need Pillow and pydicom (and, for the python flavour,
    the rest of :data:`BACKEND_REQUIREMENTS`) with numpy<2, installed at start here, and the plugin form's
    engine a C compiler (gcc, installed when the image has none); ``deploy/Dockerfile`` bakes them into an image.
    """
    repo = Path(repo).resolve()
    flavour = repository_flavour(repo)
    wanted = BACKEND_REQUIREMENTS if flavour == "python" else ("numpy<2", "pillow", "pydicom")
    packages = " ".join(f'"{r}"' if "<" in r else r for r in wanted)
    gpus = "--gpus all " if flavour == "tensorrt" else ""
    image = f"{NGC_IMAGE}:{tag or ('<yy.mm>' if flavour == 'tensorrt' else NGC_TAG)}-py3"
    inner = f"pip install -q {packages} && exec tritonserver --model-repository=/models"
    if flavour == "python" and _onnx_form(repo) == "plugin":
        inner = ("{ command -v cc >/dev/null || { apt-get update -qq && apt-get install -y -qq "
                 "--no-install-recommends gcc libc6-dev; }; } && " + inner)
    return (f"docker run --rm {gpus}--shm-size=1g --ipc=host -p {http_port}:8000 -p {grpc_port}:8001 "
            f"-p {metrics_port}:8002 -v {shlex.quote(str(repo))}:/models {image} bash -c {shlex.quote(inner)}")


def _onnx_form(repo: Path) -> str | None:
    """The engine config's ``onnx_form`` parameter (None where it has none)."""
    cfg = parse_config(repo / ENGINE / "config.pbtxt")
    return cfg.parameters["onnx_form"].string_value if "onnx_form" in cfg.parameters else None


def _tensorrt_note(repo: Path) -> str:
    meta = repo / ENGINE / "1" / "engine.json"
    if not meta.is_file():
        return "the container's TensorRT must be the version that built the engine"
    trt = read_engine_metadata(meta).tensorrt_version
    return (f"the engine was built with TensorRT {trt}: pick the <yy.mm> release whose TensorRT is {trt} "
            "(NVIDIA's frameworks support matrix); any other refuses the engine")


def serve(repo: str | os.PathLike, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          host: str = "127.0.0.1", restart: bool = True) -> int:
    """Serve ``repo`` with the bundled server until Ctrl-C; return the exit status (0 after Ctrl-C).

    Prints the NGC container's ``docker run`` line first. A repository of the TensorRT or ONNX Runtime
    flavour needs that container (the bundled server has only the Python backend): returns 2.
    ``restart``: a :class:`export.watchdog.Watchdog` restarts the server when it or a Python-backend stub
    dies (Triton does not restart a killed stub); without, the server's exit ends this call.
    """
    repo = Path(repo)
    flavour = repository_flavour(repo)
    docker = docker_command(repo, http_port, grpc_port, metrics_port)
    print(f"In production, serve {repo} ({flavour} flavour) with NVIDIA's container:\n  {docker}", flush=True)
    if flavour == "tensorrt":
        print(f"  Note: {_tensorrt_note(repo.resolve())}.", flush=True)
    if flavour != "python":
        print(f"pdd serve: the bundled server has only the Python backend and cannot serve the {flavour} flavour; "
              "run the container above", file=sys.stderr)
        return 2
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host)
    server.start()
    print(f"Serving model 'pdd': HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}. "
          "Ctrl-C stops.", flush=True)
    try:
        if not restart:
            return server.wait()
        Watchdog(server, on_restart=lambda r: print(f"pdd serve: {r.reason}; restarted the server in "
                                                    f"{r.seconds:.1f} s", flush=True)).run()
        return 0
    except KeyboardInterrupt:
        print("\nstopping the server…", flush=True)
        return 0
    finally:
        server.stop()
