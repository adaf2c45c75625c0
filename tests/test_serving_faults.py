"""Hostile requests and faults against a real Triton Inference Server (the bundled one), python flavour.

Files whose headers promise huge images, requests for unknown models, empty and mismatched tensors,
clients that hang up mid-request: each gets a clear error and the server answers the next request as
before. A Python-backend stub killed with SIGKILL: Triton fails that model's requests until the server
restarts, which the watchdog of `pdd serve` does. benchmarks/serve_faults.py measures the same faults.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks import hostile_files as bombs
from benchmarks.common import free_ports
from export.client import InferenceError, PDDClient
from export.triton_repo import build_triton_repo
from export.watchdog import Watchdog, backend_stubs

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_pdd):
    pytest.importorskip("pytriton", reason="needs the bundled server: pip install --no-deps nvidia-pytriton==0.7.0")
    from export.serve import TritonServer

    repo = build_triton_repo(tmp_path_factory.mktemp("faults") / "repo", flavour="python", model=small_pdd,
                             max_batch_size=4)
    srv = TritonServer(repo, *free_ports(3), log=tmp_path_factory.mktemp("faults-log") / "tritonserver.log")
    srv.start(timeout_s=300)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "server" in request.fixturenames:
        print(f"\n--- tritonserver log (tail) ---\n{request.getfixturevalue('server').log_tail()}", file=sys.stderr)


def _image() -> np.ndarray:
    return (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def answer(server) -> dict[str, np.ndarray]:
    """The server's answer for _image() before any fault: what every later answer must equal."""
    with PDDClient(server.http_url) as client:
        return client.predict(_image())


def _answers_as_before(server, answer) -> None:
    with PDDClient(server.http_url) as client:
        out = client.predict(_image())
    tol = 1e-5 * float(np.ptp(answer["anomaly_map"]))
    np.testing.assert_allclose(out["anomaly_map"], answer["anomaly_map"], atol=tol, rtol=0)
    np.testing.assert_allclose(out["pred_score"], answer["pred_score"], atol=tol, rtol=0)


def test_bombs_through_the_server_are_refused_in_one_line_and_it_keeps_serving(server, answer, tmp_path, capfd):
    """`pdd predict --server` on files whose headers promise huge images: sent undecoded, refused by the
    server's decode budget with one line naming the file (exit status 2, no traceback), counted by
    --skip-bad; the next request is answered as before."""
    from pdd.cli import main

    good = tmp_path / "good.png"
    Image.fromarray(_image()).save(good)
    files = [bombs.png(tmp_path / "big.png", 12000, 12000), bombs.dicom_deflated(tmp_path / "big.dcm", 30000, 30000),
             bombs.tiff(tmp_path / "big.tif", 12000, 12000), bombs.dicom_frames(tmp_path / "frames.dcm", 100_000)]
    limits = ["max_pixels = 33,554,432"] * 3 + ["max_frames = 4,096"]
    for path, limit in zip(files, limits, strict=True):
        assert main(["predict", "--server", server.http_url, str(path)]) == 2
        err = capfd.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert err.startswith(f"pdd predict: error: cannot read image {path}: its header claims") and limit in err
    assert main(["predict", "--server", server.grpc_url, "--protocol", "grpc", "--skip-bad", str(good),
                 *map(str, files)]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert summary["scored"] == 1 and [s["path"] for s in summary["skipped"]] == list(map(str, files))
    _answers_as_before(server, answer)


def _post(server, model: str, body: dict) -> tuple[int, str]:
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        conn.close()


def test_unknown_models_empty_and_mismatched_tensors_get_clear_errors(server, answer):
    def images(shape: list[int], data: list) -> dict:
        return {"inputs": [{"name": "images", "shape": shape, "datatype": "UINT8", "data": data}]}

    cases = [
        ("nope", {"inputs": []}, 404, "unknown model: 'nope'"),
        ("pdd", images([1, 0, 8, 3], []), 400, "'images' has an empty image (shape (1, 0, 8, 3))"),
        ("pdd", images([0, 8, 8, 3], []), 400, "input byte size mismatch for input 'images'"),
        ("pdd", {"inputs": [{"name": "images_encoded", "shape": [0, 1], "datatype": "BYTES", "data": []}]}, 400,
         "expected 1 string elements for inference input 'images_encoded'"),
        # 10^9 elements claimed, one sent: refused before anything of that size is allocated.
        ("pdd", images([1, 31623, 31623, 1], [0]), 500, "Shape does not match true shape"),
    ]
    for model, body, status, phrase in cases:
        got = _post(server, model, body)
        assert got[0] == status and phrase in got[1], got
        _answers_as_before(server, answer)


def test_clients_that_hang_up_mid_request_leave_the_server_serving(server, answer):
    image = _image()
    body = json.dumps({"inputs": [{"name": "images", "shape": [1, *image.shape], "datatype": "UINT8",
                                   "data": image.reshape(-1).tolist()}]}).encode()
    head = "POST /v2/models/pdd/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    for sent in (head.encode() + b"Content-Length: 1000000\r\n\r\n" + body[:1000],  # mid-body
                 head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body):  # before the answer
        with socket.create_connection((server.host, server.http_port)) as sock:
            sock.sendall(sent)
    _answers_as_before(server, answer)


def test_a_killed_stub_fails_its_model_until_the_watchdog_restarts_the_server(server, answer):
    """SIGKILL to the engine's stub mid-load: requests fail ("not healthy"; Triton still calls the model
    ready and never restarts the stub), the watchdog sees the stub gone and restarts the server, and the
    answers are right again. Runs last: it restarts the module's server."""
    watchdog = Watchdog(server, interval_s=0.5)
    stop = threading.Event()
    results: list[tuple[float, str]] = []

    def load() -> None:
        while not stop.is_set():
            try:
                with PDDClient(server.http_url, timeout_s=60) as client:
                    out = client.predict(_image())
                ok = np.allclose(out["anomaly_map"], answer["anomaly_map"], rtol=0,
                                 atol=1e-5 * float(np.ptp(answer["anomaly_map"])))
                results.append((time.monotonic(), "right" if ok else "WRONG"))
            except InferenceError as exc:
                results.append((time.monotonic(), str(exc)))
                time.sleep(0.2)

    threads = [threading.Thread(target=watchdog.run, args=(stop,)), threading.Thread(target=load)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        [engine] = [pid for pid, model in backend_stubs(server.pid).items() if model == "pdd_engine"]
        killed = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        deadline = killed + 300
        while time.monotonic() < deadline and not any(t > killed and r == "right" and watchdog.restarts
                                                       for t, r in results):
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert [r.reason for r in watchdog.restarts] == ["the Python-backend stub of pdd_engine died"]
    assert "WRONG" not in [r for _, r in results]
    assert any(t > killed and r == "right" for t, r in results), results[-5:]
    # Requests between the kill and the restart fail with an error that says why.
    failed = [r for t, r in results if t > killed and r != "right"]
    assert all("not healthy" in r or "cannot reach" in r or "no answer" in r or "unavailable" in r.lower()
               for r in failed), failed[:3]
    _answers_as_before(server, answer)
