"""The closed-loop load generator (export.client.run_load) and the server's environment checks, without a
server; split from test_serving.py, so they run where no Triton server is installed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from export.client import InferenceError, run_load


class _FakeClient:
    """Answers after ``delay`` seconds; refuses every request whose image holds the value 13."""

    def __init__(self, delay: float) -> None:
        self.delay, self.closed, self.calls = delay, False, 0

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        time.sleep(self.delay)
        if (images == 13).any():
            raise InferenceError("refused")
        return {"pred_score": np.array([float(images.mean())], np.float32)}

    def close(self) -> None:
        self.closed = True


def test_run_load_counts_errors_and_keeps_outputs():
    images = [np.full((4, 4, 1), v, np.uint8) for v in (1, 2, 13)]
    clients = []

    def factory() -> _FakeClient:
        clients.append(_FakeClient(0.001))
        return clients[-1]

    started = []
    stats = run_load(factory, images, concurrency=2, requests=3, warmup=1, keep_outputs=True,
                     on_start=lambda: started.append(sum(c.calls for c in clients)))
    # on_start ran once, after the two warm-up requests and before any timed one.
    assert started == [2]
    # Worker w sends images (3w + i) % 3: each worker meets the refused image once.
    assert (stats["requests"], stats["completed"], stats["errors"]) == (6, 4, 2)
    assert stats["error_messages"] == ["refused", "refused"] and not stats["timed_out"]
    assert sorted(i for i, _ in stats["outputs"]) == [0, 0, 1, 1]
    assert all(out["pred_score"][0] == images[i].mean() for i, out in stats["outputs"])
    assert 0 < stats["p50_latency_us"] <= stats["p90_latency_us"] <= stats["p99_latency_us"]
    assert stats["throughput_infer_per_sec"] > 0 and all(c.closed for c in clients)


def test_run_load_stops_issuing_at_the_time_limit():
    t0 = time.monotonic()
    stats = run_load(lambda: _FakeClient(0.2), [np.zeros((4, 4, 1), np.uint8)], concurrency=2, requests=1000,
                     warmup=0, timeout_s=0.5)
    assert time.monotonic() - t0 < 5 and stats["timed_out"] and stats["errors"] == 0
    assert 2 <= stats["completed"] <= 12


def test_backend_environment_override_is_checked(tmp_path, monkeypatch):
    from export.serve import ServerError, python_env

    monkeypatch.setenv("PDD_TRITON_ENV", str(tmp_path))
    with pytest.raises(ServerError, match="has no bin/python3"):
        python_env()
