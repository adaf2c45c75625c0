"""A real Triton Inference Server (the one bundled with nvidia-pytriton) serving the python flavour.

One module-scoped server on free loopback ports, on a repository exported from the small 64² PDD in the
flavour's default ONNX form, the plugin form: its custom nodes run the compiled CPU scan kernel and the numpy
head inside the server's torch-free Python environment (the portable form's engine: test_triton_backends.py).
Outputs are compared with the PyTorch model; bad requests must get clear errors while the server keeps
serving; a bounded concurrent load must finish without errors and match single requests. The server's
log is printed when a test fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from triton_fakes import make_onnx_dir

from benchmarks.common import free_ports
from export.client import InferenceError, PDDClient, predict_server_files, run_load
from export.triton_repo import MAX_SIDE, build_triton_repo, parse_config
from pdd.calibration import Calibration, apply_calibration, fit_operating_point
from pdd.data.readers import to_model_input

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

SIZE = 64
ROOT = Path(__file__).resolve().parents[1]


def _images() -> np.ndarray:
    """Two 64² uint8 RGB images: smooth blobs on a dark background, one with a bright square."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = 0.4 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.08)
    second = base.copy()
    second[20:30, 34:44] = 1.0
    return np.stack([np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2) for img in (base, second)])


def _torch_reference(model, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch outputs for uint8 (H, W, C) images, preprocessed exactly like `pdd predict`."""
    x = torch.stack([to_model_input(i.astype(np.float32) / 255, SIZE) for i in images])
    with torch.inference_mode():
        out = model(x)
    return {"pred_score": out.pred_score.numpy(), "anomaly_map": out.anomaly_map.numpy()}


def _grey() -> np.ndarray:
    """A 96x80 one-channel uint8 image: the server resizes it to 64² and replicates the channel."""
    return (np.random.default_rng(0).random((96, 80, 1)) * 120 + 40).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(small_pdd):
    """(images, outputs for images, calibration, outputs for the grey image), one PyTorch forward for all."""
    images, grey = _images(), _grey()
    both = _torch_reference(small_pdd, [*images, grey])
    ref = {k: v[:2] for k, v in both.items()}
    # F1-optimal on the two images, the higher-scored one called anomalous: the image threshold lies halfway
    # between their scores, so one is flagged and the other is not. Pixels: 5 % of the first image's.
    labels = (ref["pred_score"] == ref["pred_score"].max()).astype(int)
    calibration = Calibration(fit_operating_point(ref["pred_score"], labels),
                              fit_operating_point(ref["anomaly_map"][labels == 0], target=0.05))
    return images, ref, calibration, {k: v[2:] for k, v in both.items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, small_pdd, reference):
    pytest.importorskip("pytriton", reason="needs the bundled server: pip install --no-deps nvidia-pytriton==0.7.0")
    small_pdd.calibration = reference[2]  # the export carries the model's calibration
    try:
        repo = build_triton_repo(tmp_path_factory.mktemp("serving") / "repo", flavour="python", model=small_pdd,
                                 max_batch_size=4)
    finally:
        small_pdd.calibration = None
    assert parse_config(repo / "pdd_engine" / "config.pbtxt").parameters["onnx_form"].string_value == "plugin"
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    from export.serve import TritonServer

    http, grpc, metrics = free_ports(3)
    srv = TritonServer(repo, http, grpc, metrics, log=tmp_path_factory.mktemp("server-log") / "tritonserver.log")
    srv.start(timeout_s=300)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        print(f"\n--- tritonserver log (tail) ---\n{srv.log_tail()}", file=sys.stderr)


def _tolerance(ref_map: np.ndarray) -> float:
    return 1e-4 * float(ref_map.max() - ref_map.min())


def _assert_matches(out: dict[str, np.ndarray], ref: dict[str, np.ndarray], calibration: Calibration) -> None:
    """Scores and maps as PyTorch's; decisions and normalised scores as pdd.calibration makes them locally."""
    tol = _tolerance(ref["anomaly_map"])
    np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], atol=tol, rtol=0)
    np.testing.assert_allclose(out["pred_score"], ref["pred_score"], atol=tol, rtol=0)
    local = apply_calibration(calibration, out["pred_score"], out["anomaly_map"])
    for key in ("normalised_score", "pred_label", "pred_mask"):
        np.testing.assert_array_equal(out[key], local[key], err_msg=key)


# --- parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol, shm", [("http", False), ("grpc", False), ("http", True), ("grpc", True)])
def test_outputs_match_pytorch(server, reference, protocol, shm):
    images, ref, cal, _ = reference
    url = server.http_url if protocol == "http" else server.grpc_url
    with PDDClient(url, protocol=protocol, shm=shm) as client:
        assert client.health() == {"live": True, "ready": True, "model_ready": True}
        out = client.predict(images)
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "pred_score": ((2,), np.float32), "anomaly_map": ((2, SIZE, SIZE), np.float32),
            "normalised_score": ((2,), np.float32), "pred_label": ((2,), np.bool_),
            "pred_mask": ((2, SIZE, SIZE), np.bool_)}
        _assert_matches(out, ref, cal)
        assert out["pred_label"].tolist() == (ref["pred_score"] > cal.image.threshold).tolist()
        assert sorted(out["pred_label"].tolist()) == [False, True]
        assert ((out["normalised_score"] > 0.5) == out["pred_label"]).all()
        assert out["pred_mask"][0].any() and not out["pred_mask"].all()
        if shm:
            # A second, smaller request reuses the client's shared-memory regions.
            _assert_matches(client.predict(images[1]), {k: v[1:] for k, v in ref.items()}, cal)
        assert client.calibration() == cal and client.threshold() == cal.image.threshold
        # Thresholds replaced for one request only (request parameters reach the postprocess step).
        low = float(ref["pred_score"].min()) - 1.0
        out = client.predict(images, image_threshold=low, pixel_threshold=1e9)
        assert out["pred_label"].all() and not out["pred_mask"].any()
        _assert_matches(client.predict(images), ref, cal)


def test_resized_grey_and_encoded_inputs(server, reference):
    _, _, cal, ref = reference
    grey = _grey()
    with PDDClient(server.grpc_url, protocol="grpc") as client:
        _assert_matches(client.predict(grey[None]), ref, cal)
        png = io.BytesIO()
        Image.fromarray(grey[..., 0]).save(png, format="PNG")
        jpeg = io.BytesIO()
        Image.fromarray(np.repeat(grey, 3, axis=2)).save(jpeg, format="JPEG", quality=95)
        out = client.predict([png.getvalue(), jpeg.getvalue()])
    _assert_matches({k: v[:1] for k, v in out.items()}, ref, cal)
    # JPEG is lossy: only close.
    assert abs(out["pred_score"][1] - ref["pred_score"][0]) < 0.05 * float(np.ptp(ref["anomaly_map"]))


# --- bad requests -------------------------------------------------------------------------------------


def _raw_infer(url: str, name: str, array: np.ndarray, datatype: str, model: str = "pdd") -> str:
    """Send one raw request; the error message it gets (fails if it succeeds)."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(url, network_timeout=60)
    try:
        inp = th.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        client.infer(model, [inp])
    except InferenceServerException as exc:
        return exc.message()
    finally:
        client.close()
    pytest.fail(f"{model} accepted a bad {name} {array.shape} {datatype}")


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, reference):
    images, ref, cal, _ = reference
    url = server.http_url
    cases = [
        ("images", images.astype(np.float32), "FP32", "pdd", "data-type is 'FP32'"),
        ("images", images[..., :1].repeat(4, axis=3), "UINT8", "pdd", "1 (grey) or 3 (RGB) channels"),
        ("images", images[:, :, :, 0], "UINT8", "pdd", "unexpected shape"),
        ("images", np.zeros((0, SIZE, SIZE, 3), np.uint8), "UINT8", "pdd", "images"),
        ("images", np.zeros((1, MAX_SIDE + 1, 4, 3), np.uint8), "UINT8", "pdd", f"largest side accepted is {MAX_SIDE}"),
        ("images_encoded", np.array([[b"%PDF-1.4 not an image"]], np.object_), "BYTES", "pdd",
         "cannot read image 'images_encoded'[0]: unrecognised image format"),
        ("images", np.full((1, 3, SIZE, SIZE), np.nan, np.float32), "FP32", "pdd_engine", "NaN or infinite"),
    ]
    for name, array, datatype, model, phrase in cases:
        message = _raw_infer(url, name, array, datatype, model)
        assert phrase in message, (phrase, message)
        # Each bad request is followed by a good one, which must succeed.
        with PDDClient(url) as client:
            _assert_matches(client.predict(images[:1]), {k: v[:1] for k, v in ref.items()}, cal)
    with PDDClient(server.grpc_url, protocol="grpc") as client:
        with pytest.raises(InferenceError, match="corrupt or truncated image data"):
            client.predict([b"\x89PNG\r\n\x1a\n truncated"])
        with pytest.raises(ValueError, match="uint8"):
            client.predict(images.astype(np.float32))
        with pytest.raises(ValueError, match="B >= 1"):
            client.predict(np.zeros((0, SIZE, SIZE, 3), np.uint8))
        assert client.health()["model_ready"]


# --- load -----------------------------------------------------------------------------------------------


def test_concurrent_load_has_no_errors_and_matches_single_requests(server, reference):
    images = reference[0]
    payloads = [images[0], images[1]]
    with PDDClient(server.http_url) as client:
        single = [client.predict(p) for p in payloads]
    kinds = [(server.http_url, "http", False), (server.grpc_url, "grpc", False),
             (server.http_url, "http", True), (server.grpc_url, "grpc", True)]
    made = []

    def factory() -> PDDClient:
        url, protocol, shm = kinds[len(made) % len(kinds)]
        made.append(protocol)
        return PDDClient(url, protocol=protocol, shm=shm)

    stats = run_load(factory, payloads, concurrency=4, requests=5, warmup=0, timeout_s=240, keep_outputs=True)
    assert stats["errors"] == 0, stats["error_messages"]
    assert stats["completed"] == 20 and not stats["timed_out"]
    assert stats["throughput_infer_per_sec"] > 0 and stats["p50_latency_us"] <= stats["p99_latency_us"]
    # Dynamic batching may group requests; ONNX Runtime's sums then differ in the last bits only.
    tol = 1e-5 * float(np.ptp(single[0]["anomaly_map"]))
    for index, out in stats["outputs"]:
        np.testing.assert_allclose(out["anomaly_map"], single[index]["anomaly_map"], atol=tol, rtol=0)
        np.testing.assert_allclose(out["pred_score"], single[index]["pred_score"], atol=tol, rtol=0)
        np.testing.assert_array_equal(out["pred_label"], single[index]["pred_label"])


# --- files, metrics, the CLI ----------------------------------------------------------------------------


def test_predict_server_files_writes_results_and_heatmaps(server, reference, tmp_path):
    images, ref, cal, _ = reference
    folder = tmp_path / "scans"
    folder.mkdir()
    # The second image is grey (three equal channels): saved as a one-channel PNG it scores the same.
    Image.fromarray(images[0]).save(folder / "a.png")
    Image.fromarray(images[1][..., 0]).save(folder / "b.png")
    out = tmp_path / "out"
    summary = predict_server_files([folder], server.grpc_url, protocol="grpc", shm=True, out_dir=out)
    assert summary["scored"] == 2 and summary["threshold"] == cal.image.threshold
    assert json.loads((out / "results.json").read_text()) == summary
    tol = _tolerance(ref["anomaly_map"])
    for k, (rec, path) in enumerate(zip(summary["results"], sorted(folder.iterdir()))):
        assert rec["input"] == str(path) and (out / rec["heatmap"]).is_file()
        assert abs(rec["score"] - float(ref["pred_score"][k])) <= tol
        assert rec["anomalous"] == bool(ref["pred_score"][k] > cal.image.threshold)
        assert (rec["normalised_score"] > 0.5) == rec["anomalous"]
    assert Image.open(out / summary["results"][0]["heatmap"]).size == (SIZE, SIZE)


def _ct_series(folder: Path, write_dicom) -> list[Path]:
    """Two DICOM files: 16-bit CT with slope/intercept and its own window, and MONOCHROME1 without a window."""
    folder.mkdir()
    yy, xx = np.mgrid[0:90, 0:76]
    stored = (1000 + 900 * np.exp(-((yy - 45) ** 2 + (xx - 38) ** 2) / 600.0)).astype(np.uint16)
    stored[30:44, 40:52] = 3000
    return [write_dicom(folder / "ct.dcm", stored, slope=0.5, intercept=-512.0, centre=[40.0], width=[400.0]),
            write_dicom(folder / "x-ray.dcm", stored[::-1], photometric="MONOCHROME1", slope=2.0, intercept=-100.0)]


def test_dicom_through_the_server_matches_local_predict(server, small_pdd, reference, tmp_path, write_dicom):
    """DICOM bytes decoded by the server give `pdd predict`'s local scores, maps and calibrated decisions
    (normalised score, label, mask); bad files fail the same way."""
    from pdd.data.readers import ImageReadError, read_image
    from pdd.predict import predict_files

    files = _ct_series(tmp_path / "dicom", write_dicom)
    for window in (None, (80.0, 600.0)):
        small_pdd.calibration = reference[2]  # the calibration the served export carries
        try:
            local = predict_files(small_pdd, files, batch_size=2, dicom_window=window)
        finally:
            small_pdd.calibration = None
        served = predict_server_files(files, server.grpc_url, protocol="grpc", batch_size=2, dicom_window=window)
        with torch.inference_mode():
            ref = small_pdd(torch.stack([to_model_input(read_image(f, dicom_window=window), SIZE) for f in files]))
        with PDDClient(server.http_url) as client:
            out = client.predict([f.read_bytes() for f in files], dicom_window=window)
        tol = _tolerance(ref.anomaly_map.numpy())
        np.testing.assert_allclose(out["anomaly_map"], ref.anomaly_map.numpy(), atol=tol, rtol=0)
        names = [r["input"] for r in served["results"]]
        assert names == [r["input"] for r in local["results"]] == list(map(str, files))
        np.testing.assert_allclose([r["score"] for r in served["results"]], [r["score"] for r in local["results"]],
                                   atol=tol, rtol=0)
        for there, here in zip(served["results"], local["results"], strict=True):
            assert there["anomalous"] == here["anomalous"]
            assert 0.0 <= there["normalised_score"] <= 1.0
            assert there["normalised_score"] == pytest.approx(here["normalised_score"], abs=1e-3)
        # Masks: pixels within the map tolerance of the pixel threshold may flip; at most 0.5 % of the image.
        flagged = out["pred_mask"].reshape(len(files), -1).sum(1)
        assert np.abs(flagged - [r["anomalous_pixels"] for r in local["results"]]).max() <= 0.005 * SIZE * SIZE
    # A damaged file between two good ones: the server's refusal names the file as `pdd predict` does locally.
    bad = tmp_path / "dicom" / "cut.dcm"
    bad.write_bytes(files[0].read_bytes()[:-4000])
    with pytest.raises(ImageReadError) as here:
        predict_files(small_pdd, [*files, bad])
    with pytest.raises(ImageReadError) as there:
        predict_server_files([bad, *files], server.http_url, batch_size=3)
    assert str(there.value) == str(here.value) and str(bad) in str(there.value)
    served = predict_server_files([files[0], bad, files[1]], server.http_url, batch_size=3, skip_bad=True)
    assert served["skipped"] == [{"path": str(bad), "reason": here.value.reason}]
    assert [r["input"] for r in served["results"]] == list(map(str, files))


def test_nifti_slices_through_the_server(server, small_pdd, tmp_path):
    """NIfTI: sliced by the client along --nifti-axis with the local reader, sent as 8-bit pixels."""
    import nibabel as nib

    from pdd.predict import predict_files

    zz, yy, xx = np.mgrid[0:3, 0:40, 0:48]
    volume = (np.exp(-((yy - 20.0) ** 2 + (xx - 24.0) ** 2) / 200.0) * (1 + zz) * 100).astype(np.float32)
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(volume, (1, 2, 0)), np.eye(4)), path)
    local = predict_files(small_pdd, [path], nifti_axis=2, batch_size=4)
    served = predict_server_files([path], server.http_url, nifti_axis=2, batch_size=4)
    assert [r["input"] for r in served["results"]] == [r["input"] for r in local["results"]] == [
        f"{path}#slice{k}" for k in range(3)]
    # The slices travel as uint8: the scores agree to the 8-bit rounding of the slice.
    np.testing.assert_allclose([r["score"] for r in served["results"]], [r["score"] for r in local["results"]],
                               rtol=1e-2)


def test_metrics_expose_the_autoscaling_inputs(server, reference):
    with PDDClient(server.http_url) as client:
        client.predict(reference[0][:1])
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for name in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert any(line.startswith(name + "{") and 'model="pdd_engine"' in line for line in text.splitlines()), name


def test_serve_prints_docker_line_and_stops_on_ctrl_c(repo, monkeypatch, capsys):
    """`pdd serve`'s control flow; the server it starts is the one the fixture above runs for real."""
    from export import serve as serve_module

    events = []

    class Interrupted(serve_module.TritonServer):
        def start(self, timeout_s: float = 180) -> serve_module.TritonServer:
            events.append(("start", self.http_port, self.grpc_port, self.metrics_port, self.host))
            return self

        def wait(self) -> int:
            raise KeyboardInterrupt

        def stop(self, timeout_s: float = 30) -> None:
            events.append("stop")

    monkeypatch.setattr(serve_module, "TritonServer", Interrupted)
    assert serve_module.serve(repo, 9000, 9001, 9002, restart=False) == 0
    assert events[0] == ("start", 9000, 9001, 9002, "127.0.0.1") and "stop" in events
    out = capsys.readouterr().out
    assert "docker run --rm --shm-size=1g --ipc=host -p 9000:8000 -p 9001:8001 -p 9002:8002" in out
    assert "nvcr.io/nvidia/tritonserver:24.10-py3" in out and "Serving model 'pdd'" in out


def _processes() -> dict[int, tuple[str, int, int]]:
    """Live (not zombie) processes: pid -> (command name, parent pid, process group id), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        # A zombie has stopped running; only its parent's wait() removes it.
        if state != "Z":
            found[int(entry.name)] = (name, int(ppid), int(pgrp))
    return found


@contextlib.contextmanager
def _child(cmd: list[str], log_path: Path) -> Iterator[tuple[subprocess.Popen, set[int]]]:
    """A process started from the repository root, and the set of server-group pids the test records; on exit
    (after a failure above) neither the process nor anything in that set outlives the test."""
    group: set[int] = set()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc, group
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_sigterm_to_pdd_serve_leaves_no_server_process(repo, tmp_path):
    """`pdd serve` killed by SIGTERM stops tritonserver and its Python-backend stubs (the server's group)."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "pdd.cli", "serve", "--repo", str(repo), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    with _child(cmd, tmp_path / "serve.log") as (proc, group):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        processes = _processes()
        [server] = [pid for pid, (name, ppid, _) in processes.items() if ppid == proc.pid and name == "tritonserver"]
        # The server leads its own group; its stubs (one per Python model instance) are in it.
        group.update(pid for pid, (_, _, pgrp) in processes.items() if pgrp == server)
        stubs = [pid for pid in group if processes[pid][0].startswith("triton_python")]
        assert server in group and len(stubs) >= 3, {pid: processes[pid] for pid in group}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        left = {pid: info for pid, info in _processes().items() if pid in group or info[2] == server}
        assert not left, f"still running after SIGTERM: {left}"


def test_sigterm_to_a_serving_benchmark_leaves_no_server_process(repo, tmp_path):
    """A benchmark killed by SIGTERM mid-run stops the server it started, stubs included."""
    cmd = [sys.executable, "benchmarks/serve_bench.py", "--repo", str(repo), "--image-size", str(SIZE),
           "--images", "2", "--concurrency", "1", "--transports", "http", "--requests", "100000",
           "--out", str(tmp_path / "bench")]
    with _child(cmd, tmp_path / "bench.log") as (proc, group):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # until the server and its 3 stubs run
            processes = _processes()
            servers = [pid for pid, (name, ppid, _) in processes.items()
                       if ppid == proc.pid and name == "tritonserver"]
            group.clear()
            group.update(pid for pid, (_, _, pgrp) in processes.items() if servers and pgrp == servers[0])
            if sum(processes[pid][0].startswith("triton_python") for pid in group) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None and group, (tmp_path / "bench.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) != 0  # interrupted, not finished
        left = {pid: info for pid, info in _processes().items() if pid in group}
        assert not left, f"still running after SIGTERM: {left}"


def test_serve_refuses_flavours_the_bundled_server_lacks(tmp_path, capsys):
    from export.serve import ServerError, TritonServer, serve

    ort = build_triton_repo(tmp_path / "ort", flavour="onnxruntime", engine_dir=make_onnx_dir(tmp_path / "onnx"),
                            max_batch_size=4)
    assert serve(ort, *free_ports(3)) == 2
    captured = capsys.readouterr()
    assert "docker run" in captured.out and "only the Python backend" in captured.err
    with pytest.raises(ServerError, match="only the Python"):
        TritonServer(ort).start()
