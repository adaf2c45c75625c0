"""Client of the served PDD ensemble (``pdd``): HTTP or gRPC, optionally through system shared memory.

Example::

    >>> from export.client import PDDClient
    >>> with PDDClient("127.0.0.1:8000") as client:                  # doctest: +SKIP
    ...     out = client.predict(images)                             # uint8 (B, H, W, 3) or (B, H, W, 1)
    ...     out["pred_score"].shape, out["anomaly_map"].shape         # (B,), (B, S, S)

:func:`predict_server_files` is ``pdd predict --server``: files in, scores, heatmaps and
``results.json`` out. :func:`run_load` is a bounded closed-loop load generator reporting the fields
``perf_analyzer`` users know (throughput in infer/s, p50/p90/p95/p99 latency in µs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from pdd.calibration import Calibration
from pdd.data.readers import ImageReadError
from pdd.predict import BatchPrediction, Item, predict_with

__all__ = ["OUTPUTS", "InferenceError", "PDDClient", "ServerPredictor", "predict_server_files", "run_load"]

# Ensemble outputs, with the dtype each arrives in and whether Triton's trailing (B, 1) is squeezed to (B,).
OUTPUTS = {"pred_score": (np.float32, True), "anomaly_map": (np.float32, False),
           "normalised_score": (np.float32, True), "pred_label": (np.bool_, True), "pred_mask": (np.bool_, False)}
# How the server's preprocess reports a file it cannot decode (the reader's ImageReadError, named by index).
_UNREADABLE = re.compile(r"cannot read image 'images_encoded'\[(\d+)\]: (.+)", re.DOTALL)

log = logging.getLogger(__name__)


class InferenceError(RuntimeError):
    """The server refused or failed a request; the message is the server's."""


class _Region:
    """One system shared-memory region registered with the server (grown by re-creating it)."""

    def __init__(self, client: Any, name: str, byte_size: int) -> None:
        import tritonclient.utils.shared_memory as shm

        self.client, self.name, self.byte_size = client, name, byte_size
        self.handle = shm.create_shared_memory_region(name, f"/{name}", byte_size)
        client.register_system_shared_memory(name, f"/{name}", byte_size)

    def release(self, wait_s: float = 5.0) -> None:
        """Unregister from the server, then unlink; waits (at most ``wait_s``) while the server holds it."""
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    self.client.unregister_system_shared_memory(self.name)
                    return
                except InferenceServerException as exc:
                    # An ensemble releases a request's regions a moment after its response has been sent.
                    if "in use" not in (exc.message() or "") or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            shm.destroy_shared_memory_region(self.handle)


class PDDClient:
    """Sends images to the ``pdd`` ensemble and returns numpy outputs.

    url: ``host:port`` of the server's HTTP (default 8000) or gRPC (8001) endpoint; protocol: "http" or
    "grpc"; shm: pass inputs and outputs through system shared memory (client and server on one host).
    One client per thread: the underlying Triton clients are not thread-safe.
    """

    def __init__(self, url: str, protocol: str = "http", model_name: str = "pdd", shm: bool = False,
                 timeout_s: float = 120.0) -> None:
        if protocol == "http":
            import tritonclient.http as triton
            self.client = triton.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        elif protocol == "grpc":
            import tritonclient.grpc as triton
            self.client = triton.InferenceServerClient(url)
        else:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self._triton = triton
        self.url, self.protocol, self.model_name, self.shm = url, protocol, model_name, shm
        self.timeout_s = timeout_s
        self._regions: dict[str, _Region] = {}
        self._prefix = f"pdd_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._config: dict[str, Any] | None = None

    # --- model facts ---------------------------------------------------------------------------------

    def model_config(self, model_name: str | None = None) -> dict[str, Any]:
        """The served config of ``model_name`` (default: the ensemble) as JSON-like dict."""
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                cfg = self.client.get_model_config(model_name or self.model_name, as_json=True)["config"]
            else:
                cfg = self.client.get_model_config(model_name or self.model_name)
        except InferenceServerException as exc:
            raise InferenceError(f"{self.url}: cannot read the config of {model_name or self.model_name!r}: "
                                 f"{exc.message()}") from None
        except Exception as exc:  # refused, reset, closed or timed out: the transport's own types
            raise InferenceError(f"{self.url} ({self.protocol}): cannot reach the server ({type(exc).__name__}: "
                                 f"{exc})") from None
        return cfg

    def _ensemble(self) -> dict[str, Any]:
        if self._config is None:
            self._config = self.model_config()
        return self._config

    def _output_dims(self) -> dict[str, tuple[int, ...]]:
        # gRPC's JSON spells int64 dims as strings.
        return {o["name"]: tuple(int(d) for d in o["dims"]) for o in self._ensemble()["output"]}

    def max_batch_size(self) -> int:
        """The ensemble's ``max_batch_size``."""
        return int(self._ensemble().get("max_batch_size", 1))

    def calibration(self) -> Calibration | None:
        """The served calibration (the postprocess model's ``calibration`` parameter), None if it has none."""
        params = self.model_config("postprocess").get("parameters", {})
        record = params.get("calibration", {}).get("string_value", "")
        return Calibration.from_dict(json.loads(record), f"{self.url} postprocess calibration") if record else None

    def threshold(self) -> float | None:
        """The image threshold the server applies (its config override, else the calibration's); None: none."""
        params = self.model_config("postprocess").get("parameters", {})
        override = params.get("image_threshold", {}).get("string_value", "")
        if override:
            return float(override)
        calibration = self.calibration()
        return None if calibration is None else calibration.image.threshold

    def health(self) -> dict[str, bool]:
        """``live``, ``ready`` (server) and ``model_ready`` (the ensemble); False where unreachable."""
        from tritonclient.utils import InferenceServerException

        out = {}
        for key, call in (("live", self.client.is_server_live), ("ready", self.client.is_server_ready),
                          ("model_ready", lambda: self.client.is_model_ready(self.model_name))):
            try:
                out[key] = bool(call())
            except (InferenceServerException, ConnectionError, OSError):
                out[key] = False
        return out

    # --- inference -----------------------------------------------------------------------------------

    def _region(self, role: str, byte_size: int) -> _Region:
        region = self._regions.get(role)
        if region is None or region.byte_size < byte_size:
            if region is not None:
                region.release()
            region = _Region(self.client, f"{self._prefix}_{role}", byte_size)
            self._regions[role] = region
        return region

    def _input(self, images: np.ndarray | Sequence[bytes]) -> tuple[Any, int]:
        """The request input (pixels or encoded bytes) and its batch size; local checks name the problem."""
        from tritonclient.utils import serialize_byte_tensor

        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise ValueError(f"images must be uint8 pixels, got {images.dtype}; scale [0, 1] floats by 255")
            if images.ndim == 3:
                images = images[None]
            if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3):
                raise ValueError(f"images must be (B, H, W, 1|3) uint8 with B >= 1, got shape {images.shape}")
            data, name, dtype = np.ascontiguousarray(images), "images", "UINT8"
        else:
            items = list(images)
            if not items or not all(isinstance(b, (bytes, bytearray)) for b in items):
                raise ValueError("images must be a uint8 array or a non-empty list of encoded image files (bytes)")
            data, name, dtype = np.array([bytes(b) for b in items], dtype=np.object_).reshape(-1, 1), \
                "images_encoded", "BYTES"
        inp = self._triton.InferInput(name, list(data.shape), dtype)
        if not self.shm:
            inp.set_data_from_numpy(data)
            return inp, data.shape[0]
        import tritonclient.utils.shared_memory as shm

        payload = serialize_byte_tensor(data) if dtype == "BYTES" else data
        size = len(payload.item()) if dtype == "BYTES" else payload.nbytes
        region = self._region("input", size)
        shm.set_shared_memory_region(region.handle, [payload])
        inp.set_shared_memory(region.name, size)
        return inp, data.shape[0]

    def predict(self, images: np.ndarray | Sequence[bytes], dicom_window: Sequence[float] | None = None, *,
                image_threshold: float | None = None, pixel_threshold: float | None = None) -> dict[str, np.ndarray]:
        """Score a batch: uint8 (B, H, W, 1|3) / (H, W, 1|3) pixels, or a list of files' bytes (PNG, JPEG, BMP,
        TIFF, DICOM); ``dicom_window`` (centre, width) overrides the DICOM files' own window.

        Returns ``pred_score`` float32 (B,), ``anomaly_map`` float32 (B, S, S), ``normalised_score`` float32
        (B,) in [0, 1] (NaN when the server has no calibration), ``pred_label`` bool (B,), ``pred_mask`` bool
        (B, S, S). ``image_threshold`` / ``pixel_threshold`` (raw) replace the served thresholds for this
        request only. Raises :class:`InferenceError` with the server's message on a refusal.
        """
        from tritonclient.utils import InferenceServerException

        inp, batch = self._input(images)
        inputs = [inp]
        if dicom_window is not None:
            window = np.asarray(dicom_window, dtype=np.float32)
            if isinstance(images, np.ndarray) or window.shape != (2,):
                raise ValueError(f"dicom_window is (centre, width), for files' bytes only; got {dicom_window!r} "
                                 f"with {'pixels' if isinstance(images, np.ndarray) else 'file bytes'}")
            windows = self._triton.InferInput("dicom_window", [batch, 2], "FP32")
            windows.set_data_from_numpy(np.tile(window, (batch, 1)))
            inputs.append(windows)
        outputs, layout = [], []
        if self.shm:
            import tritonclient.utils.shared_memory as shm

            dims = self._output_dims()
            offset = 0
            for name, (dtype, _) in OUTPUTS.items():
                shape = (batch, *dims[name])
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                layout.append((name, dtype, shape, offset, nbytes))
                offset += nbytes
            region = self._region("output", offset)
            for name, _, _, start, nbytes in layout:
                out = self._triton.InferRequestedOutput(name)
                out.set_shared_memory(region.name, nbytes, offset=start)
                outputs.append(out)
        else:
            outputs = [self._triton.InferRequestedOutput(name) for name in OUTPUTS]
        # Request parameters reach the postprocess step: Triton forwards an ensemble's to every step.
        params = {k: float(v) for k, v in (("image_threshold", image_threshold),
                                           ("pixel_threshold", pixel_threshold)) if v is not None}
        extra: dict[str, Any] = {"parameters": params} if params else {}
        try:
            if self.protocol == "grpc":
                result = self.client.infer(self.model_name, inputs, outputs=outputs, client_timeout=self.timeout_s,
                                           **extra)
            else:
                result = self.client.infer(self.model_name, inputs, outputs=outputs, **extra)
        except InferenceServerException as exc:
            raise InferenceError(f"{self.url} ({self.protocol}): request failed: {exc.message()}") from None
        except Exception as exc:  # the transport's own types (OSError, geventhttpclient's HTTPConnectionClosed, ...)
            raise InferenceError(f"{self.url} ({self.protocol}): request failed, no answer from the server "
                                 f"({type(exc).__name__}: {exc})") from None
        arrays = {}
        if self.shm:
            for name, dtype, shape, start, _ in layout:
                # Copy out: the region is reused by the next request.
                arrays[name] = np.array(shm.get_contents_as_numpy(region.handle, dtype, shape, offset=start))
        else:
            arrays = {name: result.as_numpy(name) for name in OUTPUTS}
        return {name: (arrays[name].reshape(batch) if squeeze else arrays[name])
                for name, (_, squeeze) in OUTPUTS.items()}

    def close(self) -> None:
        """Unregister and free shared memory, close the connection."""
        regions, self._regions = list(self._regions.values()), {}
        failures = []
        for region in regions:
            try:
                region.release()
            except Exception as exc:  # free the other regions and the connection first
                failures.append(f"{region.name}: {exc}")
        self.client.close()
        if failures:
            raise InferenceError(f"{self.url}: could not release shared memory: {'; '.join(failures)}")

    def __enter__(self) -> PDDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- files in, results out ------------------------------------------------------------------------------


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] (H, W) or (H, W, 3) -> uint8 (H, W, 1|3), rounded."""
    img = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return img[..., None] if img.ndim == 2 else img


class ServerPredictor:
    """The served ensemble as a :class:`pdd.predict.Predictor`: ``pdd predict --server``.

    Image and DICOM files go to the server as they are on disk, undecoded (``dicom_window`` with them when
    given): its preprocess decodes them with ``pdd/data/readers.py`` under its own decode budget, as
    ``pdd predict`` does locally. NIfTI slices (and DICOM files without a preamble) are read here by the same
    readers and sent as uint8 pixels, batched while consecutive images share a size. A file the server
    refuses or cannot decode raises :class:`pdd.data.ImageReadError` naming it, as locally. Decisions are
    reported when the server has a threshold.
    """

    reads_files = True

    def __init__(self, client: PDDClient, dicom_window: Sequence[float] | None = None) -> None:
        self.client = client
        self.window = (float(dicom_window[0]), float(dicom_window[1])) if dicom_window else None
        self.threshold = client.threshold()
        self.max_batch_size = max(1, client.max_batch_size())

    def batch_key(self, item: Item) -> Hashable:
        # One request holds files' bytes or pixels of one size, not both.
        return "bytes" if item.data is not None else item.image.shape

    def predict(self, items: Sequence[Item]) -> BatchPrediction:
        try:
            if items[0].data is None:
                out = self.client.predict(np.stack([_to_uint8(it.image) for it in items]))
            else:
                out = self.client.predict([it.data for it in items], dicom_window=self.window)
        except InferenceError as exc:
            found = _UNREADABLE.search(str(exc))
            if found is None or items[0].data is None:
                raise
            raise ImageReadError(items[int(found.group(1))].name, found.group(2).strip()) from None
        decided = self.threshold is not None
        return BatchPrediction(out["pred_score"], out["anomaly_map"], out["normalised_score"] if decided else None,
                               out["pred_label"] if decided else None)

    def describe(self) -> dict[str, Any]:
        client = self.client
        return {"server": client.url, "protocol": client.protocol, "shared_memory": client.shm,
                "model": client.model_name, "threshold": self.threshold}


def predict_server_files(inputs: Sequence[str | os.PathLike], url: str, protocol: str = "http", shm: bool = False,
                         out_dir: str | os.PathLike | None = None, model_name: str = "pdd", *, batch_size: int = 8,
                         nifti_axis: int = 2, dicom_window: Sequence[float] | None = None,
                         skip_bad: bool = False) -> dict[str, Any]:
    """Score files, folders, DICOM and NIfTI (per slice) on a server; the same loop and summary as ``pdd predict``
    (:func:`pdd.predict.predict_with` over a :class:`ServerPredictor`). With ``out_dir``: ``heatmaps/*.png`` and
    ``results.json``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with PDDClient(url, protocol=protocol, model_name=model_name, shm=shm) as client:
        return predict_with(ServerPredictor(client, dicom_window), inputs, out_dir, batch_size=batch_size,
                            nifti_axis=nifti_axis, dicom_window=dicom_window, skip_bad=skip_bad)


# --- load generator -------------------------------------------------------------------------------------


def _percentile_us(latencies_s: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s) * 1e6, q)) if latencies_s else math.nan


class _Load:
    """The shared state of one :func:`run_load`: counts, latencies and errors, guarded by one lock."""

    def __init__(self, client_factory: Callable[[], PDDClient], images: Sequence[Any], concurrency: int,
                 requests: int, warmup: int, timeout_s: float, keep_outputs: bool,
                 on_start: Callable[[], None] | None) -> None:
        self.factory, self.images, self.requests, self.warmup = client_factory, images, requests, warmup
        self.timeout_s, self.keep_outputs = timeout_s, keep_outputs
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.outputs: list[tuple[int, dict[str, np.ndarray]]] = []
        self.issued = self.inferences = 0
        self.ready = threading.Barrier(concurrency + 1, action=on_start)
        self.deadline = math.inf

    def start_together(self) -> None:
        # A worker stuck in set-up must not hold the others (or the caller) beyond the time limit.
        with contextlib.suppress(threading.BrokenBarrierError):
            self.ready.wait(timeout=self.timeout_s)

    def _error(self, text: str, issued: bool = False) -> None:
        with self.lock:
            self.issued += issued
            self.errors.append(text)

    def worker(self, w: int) -> None:
        """Worker ``w``: its own client, the warm-up, then its timed requests until done or the deadline."""
        client = None
        try:
            client = self.factory()
            for k in range(self.warmup):
                client.predict(self.images[k % len(self.images)])
        except Exception as exc:  # reported in the stats, not raised from a thread
            self._error(f"worker {w} set-up: {exc}")
        finally:
            self.start_together()
        try:
            if client is not None:
                self._requests(w, client)
        finally:
            if client is not None:
                try:
                    client.close()
                except InferenceError as exc:
                    self._error(f"worker {w} close: {exc}")

    def _requests(self, w: int, client: PDDClient) -> None:
        for i in range(self.requests):
            if time.monotonic() >= self.deadline:
                break
            index = (w * self.requests + i) % len(self.images)
            t0 = time.perf_counter()
            try:
                pred = client.predict(self.images[index])
            except Exception as exc:  # counted as an error response
                self._error(str(exc), issued=True)
                continue
            dt = time.perf_counter() - t0
            with self.lock:
                self.issued += 1
                self.inferences += _batch_size(self.images[index])
                self.latencies.append(dt)
                if self.keep_outputs:
                    self.outputs.append((index, pred))


def _batch_size(payload: Any) -> int:
    if isinstance(payload, np.ndarray):
        return 1 if payload.ndim == 3 else int(payload.shape[0])
    return len(payload)


def run_load(client_factory: Callable[[], PDDClient], images: Sequence[np.ndarray | Sequence[bytes]],
             concurrency: int, requests: int, *, warmup: int = 1, timeout_s: float = 300.0,
             keep_outputs: bool = False, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` workers, each with its own client, send ``requests`` requests each.

    Worker w's request i carries ``images[(w * requests + i) % len(images)]`` (anything
    :meth:`PDDClient.predict` takes; a uint8 (H, W, C) image is a batch of 1). Each worker first sends
    ``warmup`` untimed requests; ``on_start`` (e.g. a snapshot of the server's statistics) runs once after
    every warm-up and before any timed request. No request starts after ``timeout_s``.

    Returns ``throughput_infer_per_sec`` (images answered / wall time), ``avg/p50/p90/p95/p99_latency_us``,
    counts (``requests``, ``completed``, ``errors``), the first ``error_messages``, ``timed_out``, and with
    ``keep_outputs`` an ``outputs`` list of ``(image index, predict() dict)`` per completed request.
    """
    if concurrency < 1 or requests < 1 or not images:
        raise ValueError(f"run_load needs concurrency >= 1, requests >= 1 and images, got {concurrency}, "
                         f"{requests}, {len(images)} images")
    load = _Load(client_factory, images, concurrency, requests, warmup, timeout_s, keep_outputs, on_start)
    threads = [threading.Thread(target=load.worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    load.start_together()
    start = time.perf_counter()
    load.deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(timeout=max(0.0, load.deadline - time.monotonic()) + 60.0)
    wall = time.perf_counter() - start
    latencies = load.latencies
    stats: dict[str, Any] = {
        "concurrency": concurrency, "requests": load.issued, "completed": len(latencies),
        "errors": len(load.errors), "error_messages": load.errors[:5], "wall_s": wall,
        "throughput_infer_per_sec": load.inferences / wall if wall > 0 else math.nan,
        "avg_latency_us": float(np.mean(latencies) * 1e6) if latencies else math.nan,
        **{f"p{q}_latency_us": _percentile_us(latencies, q) for q in (50, 90, 95, 99)},
        "timed_out": load.issued < concurrency * requests or any(t.is_alive() for t in threads),
    }
    if keep_outputs:
        stats["outputs"] = load.outputs
    return stats
