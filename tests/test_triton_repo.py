"""Triton model repository generation (the Python-backend models: test_triton_backends.py; the Kubernetes
manifests: test_deploy.py).

No server here (see test_serving.py): repositories are built from small stand-in artifacts (a tiny ONNX and
a fake TensorRT engine with real metadata files), every config.pbtxt is parsed into Triton's ModelConfig
protobuf, and the preprocess/postprocess/engine model files run against a minimal stand-in of
``triton_python_backend_utils``.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from google.protobuf import text_format
from triton_fakes import ROOT, TEMPLATES, calibration, make_engine_dir, make_onnx_dir
from tritonclient.grpc import model_config_pb2 as mc

from export.metadata import read_onnx_metadata
from export.serve import docker_command
from export.triton_config import DEFAULT_ONNX_FORM
from export.triton_repo import (
    MAX_SIDE,
    MODEL_NAMES,
    RepositoryError,
    build_triton_repo,
    check_repository,
    parse_config,
    repository_flavour,
    store_calibration,
)
from kernels.ort_ops import BUNDLE
from pdd.calibration import Calibration
from pdd.data import readers
from pdd.data.readers import IMAGENET_MEAN, IMAGENET_STD, DecodeBudget


@pytest.fixture()
def engine_dir(tmp_path: Path) -> Path:
    return make_engine_dir(tmp_path / "engine")


def _configs(repo: Path) -> dict[str, mc.ModelConfig]:
    return {name: text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
            for name in MODEL_NAMES}


# --- generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["python", "onnxruntime", "tensorrt"])
def test_every_flavour_parses_and_is_wired(tmp_path, onnx_dir, engine_dir, flavour):
    src = engine_dir if flavour == "tensorrt" else onnx_dir
    repo = build_triton_repo(tmp_path / "repo", flavour=flavour, engine_dir=src, max_batch_size=8)
    configs = check_repository(repo)
    assert set(configs) == set(MODEL_NAMES) and repository_flavour(repo) == flavour
    parsed = _configs(repo)
    for name, cfg in parsed.items():
        assert cfg == configs[name] and cfg.max_batch_size == 8

    ens = parsed["pdd"]
    assert ens.platform == "ensemble"
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in ens.input] == [
        ("images", "TYPE_UINT8", [-1, -1, -1], True), ("images_encoded", "TYPE_STRING", [1], True),
        ("dicom_window", "TYPE_FP32", [2], True)]
    assert {o.name: list(o.dims) for o in ens.output} == {
        "pred_score": [1], "anomaly_map": [64, 64], "normalised_score": [1], "pred_label": [1],
        "pred_mask": [64, 64]}
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocess", "pdd_engine", "postprocess"]

    eng = parsed["pdd_engine"]
    assert [(i.name, list(i.dims)) for i in eng.input] == [("images", [3, 64, 64])]
    assert list(eng.dynamic_batching.preferred_batch_size) == [4, 8]
    assert eng.dynamic_batching.max_queue_delay_microseconds == 500
    warmup = [(1, [3, 64, 64], True)] + ([] if flavour == "python" else [(8, [3, 64, 64], True)])
    assert [(w.batch_size, list(w.inputs["images"].dims), w.inputs["images"].zero_data)
            for w in eng.model_warmup] == warmup
    kind = mc.ModelInstanceGroup.Kind.Name(eng.instance_group[0].kind)
    score = next(o for o in eng.output if o.name == "pred_score")
    version = repo / "pdd_engine" / "1"
    if flavour == "tensorrt":
        assert eng.platform == "tensorrt_plan" and eng.optimization.cuda.graphs and kind == "KIND_GPU"
        assert (version / "model.plan").read_bytes() == (engine_dir / "engine.plan").read_bytes()
        assert (version / "engine.json").is_file()
        assert "TensorRT 10.13.0" in (repo / "pdd_engine" / "config.pbtxt").read_text()
    else:
        assert (version / "model.onnx").read_bytes() == (onnx_dir / "model.onnx").read_bytes()
        assert not eng.optimization.cuda.graphs
    if flavour == "onnxruntime":
        assert eng.backend == "onnxruntime" and kind == "KIND_AUTO"
    if flavour == "python":
        assert eng.backend == "python" and kind == "KIND_CPU" and not score.HasField("reshape")
        assert (version / "model.py").read_text() == (TEMPLATES / "ort_engine.py").read_text()
        assert eng.parameters["input_name"].string_value == "images"
        # A portable ONNX is served as it is: no kernels to bundle.
        assert eng.parameters["onnx_form"].string_value == "portable" and not (version / "kernels").exists()
        # CPU: one image per ONNX Runtime call, no arena (bounded memory).
        assert eng.parameters["run_batch"].string_value == "1"
        assert eng.parameters["cpu_mem_arena"].string_value == "0"
    else:
        # The network's (B,) score is exposed as (B, 1).
        assert score.HasField("reshape") and list(score.reshape.shape) == []

    pre = parsed["preprocess"]
    assert pre.backend == "python" and pre.parameters["max_side"].string_value == str(MAX_SIDE)
    assert [float(v) for v in pre.parameters["mean"].string_value.split(",")] == list(IMAGENET_MEAN)
    assert [float(v) for v in pre.parameters["std"].string_value.split(",")] == list(IMAGENET_STD)
    assert pre.parameters["image_size"].string_value == "64"
    assert (repo / "preprocess" / "1" / "model.py").read_text() == (TEMPLATES / "preprocess.py").read_text()
    for name in readers.BUNDLE:
        assert (repo / "preprocess" / "1" / "readers" / name).read_text() == (ROOT / "pdd/data" / name).read_text()
    budget = DecodeBudget()
    for key in ("max_pixels", "max_voxels", "max_frames", "max_bytes", "max_seconds"):
        assert pre.parameters[key].string_value == str(getattr(budget, key))
    assert [i.name for i in pre.input] == [i.name for i in ens.input]
    post = parsed["postprocess"]
    record = post.parameters["calibration"].string_value
    if flavour == "tensorrt":
        assert Calibration.from_dict(json.loads(record)) == Calibration.manual(0.25)
    else:
        assert record == ""
    assert post.parameters["image_threshold"].string_value == post.parameters["pixel_threshold"].string_value == ""
    assert [(o.name, mc.DataType.Name(o.data_type)) for o in post.output] == [
        ("normalised_score", "TYPE_FP32"), ("pred_label", "TYPE_BOOL"), ("pred_mask", "TYPE_BOOL")]
    assert (repo / "postprocess" / "1" / "pdd_calibration.py").read_text() == (
        ROOT / "pdd" / "calibration.py").read_text()


def test_python_flavour_serves_the_plugin_form_with_the_bundled_kernels(tmp_path):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=make_onnx_dir(tmp_path / "onnx", form="plugin"))
    check_repository(repo)
    eng = _configs(repo)["pdd_engine"]
    assert eng.backend == "python" and eng.parameters["onnx_form"].string_value == "plugin"
    header = (repo / "pdd_engine" / "config.pbtxt").read_text().splitlines()[0]
    assert "plugin ONNX with custom ops pdd::AnomalyHead, pdd::SS2DScan" in header
    bundle = repo / "pdd_engine" / "1" / "kernels"
    # The torch-free modules and the kernel's C source, as they are in the project; nothing else.
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == sorted(BUNDLE)
    for name in BUNDLE:
        assert (bundle / name).read_bytes() == (ROOT / "kernels" / name).read_bytes(), name
    (bundle / "cpu" / "scan.c").unlink()
    with pytest.raises(RepositoryError, match=r"lacks \['cpu/scan.c'\]"):
        check_repository(repo)


@pytest.mark.parametrize("flavour, form", [("python", "plugin"), ("onnxruntime", "portable"),
                                           ("python", "portable")])
def test_the_form_exported_from_a_model(tmp_path, monkeypatch, flavour, form):
    """From a model: the python flavour exports the plugin form unless told, onnxruntime the portable one."""
    import export.triton_repo as triton_repo

    asked = []

    def fake_export(model, path, form, batch, image_size):
        asked.append(form)
        return types.SimpleNamespace(path=make_onnx_dir(path, form=form) / "model.onnx")

    monkeypatch.setattr(triton_repo, "export_onnx", fake_export)
    explicit = {"onnx_form": form} if form != DEFAULT_ONNX_FORM[flavour] else {}
    repo = build_triton_repo(tmp_path / "repo", flavour=flavour, model=object(), **explicit)
    assert asked == [form]
    if flavour == "python":
        assert _configs(repo)["pdd_engine"].parameters["onnx_form"].string_value == form
        assert (repo / "pdd_engine" / "1" / "kernels").is_dir() == (form == "plugin")


def test_calibration_from_metadata_overrides_and_none(tmp_path):
    cal = calibration()
    with_cal = make_onnx_dir(tmp_path / "cal", calibration=cal)
    post = _configs(build_triton_repo(tmp_path / "a", engine_dir=with_cal))["postprocess"]
    assert Calibration.from_dict(json.loads(post.parameters["calibration"].string_value)) == cal
    repo = build_triton_repo(tmp_path / "b", engine_dir=with_cal, threshold=1.5, pixel_threshold=0.75)
    post = _configs(repo)["postprocess"]
    assert (float(post.parameters["image_threshold"].string_value),
            float(post.parameters["pixel_threshold"].string_value)) == (1.5, 0.75)
    assert "image_threshold 1.5 replaces the calibrated one" in (repo / "postprocess" / "config.pbtxt").read_text()
    repo = build_triton_repo(tmp_path / "c", engine_dir=make_onnx_dir(tmp_path / "none"))
    assert _configs(repo)["postprocess"].parameters["calibration"].string_value == ""
    assert "nothing is flagged" in (repo / "postprocess" / "config.pbtxt").read_text()


def test_store_calibration_updates_a_repository_without_re_export(tmp_path):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=make_onnx_dir(tmp_path / "o"), pixel_threshold=0.5)
    onnx_before = (repo / "pdd_engine" / "1" / "model.onnx").read_bytes()
    cal = calibration()
    assert store_calibration(repo, cal) == repo / "postprocess" / "config.pbtxt"
    check_repository(repo)
    post = _configs(repo)["postprocess"]
    assert Calibration.from_dict(json.loads(post.parameters["calibration"].string_value)) == cal
    assert post.parameters["pixel_threshold"].string_value == "0.5"  # a hand-set override is kept
    assert read_onnx_metadata(repo / "pdd_engine" / "1" / "model.json").calibration == cal
    assert (repo / "pdd_engine" / "1" / "model.onnx").read_bytes() == onnx_before
    # An ONNX export's metadata alone.
    onnx_dir = make_onnx_dir(tmp_path / "plain")
    assert store_calibration(onnx_dir / "model.onnx", cal) == onnx_dir / "model.json"
    assert read_onnx_metadata(onnx_dir / "model.onnx").calibration == cal


def test_metadata_with_a_bare_anomaly_threshold_still_loads(tmp_path):
    folder = make_onnx_dir(tmp_path / "old")
    data = json.loads((folder / "model.json").read_text())
    del data["calibration"]
    data["anomaly_threshold"] = 0.75  # how metadata recorded a threshold before calibration records
    (folder / "model.json").write_text(json.dumps(data))
    assert read_onnx_metadata(folder / "model.json").calibration == Calibration.manual(
        0.75, f"anomaly_threshold of {folder / 'model.json'}")
    post = _configs(build_triton_repo(tmp_path / "r", engine_dir=folder))["postprocess"]
    assert json.loads(post.parameters["calibration"].string_value)["image"]["threshold"] == 0.75


def test_fp16_engine_gets_fp16_preprocess_output(tmp_path):
    repo = build_triton_repo(tmp_path / "r", flavour="tensorrt",
                             engine_dir=make_engine_dir(tmp_path / "e", dtype="float16"))
    cfg = _configs(repo)
    assert cfg["preprocess"].output[0].data_type == mc.TYPE_FP16
    assert cfg["preprocess"].parameters["output_dtype"].string_value == "float16"
    assert cfg["pdd_engine"].input[0].data_type == mc.TYPE_FP16


def test_options_and_rebuild_keep_other_files(tmp_path, onnx_dir):
    out = tmp_path / "repo"
    build_triton_repo(out, flavour="onnxruntime", engine_dir=onnx_dir, max_batch_size=1, instance_kind="gpu",
                      instance_count=2, queue_delay_us=0)
    (out / "README.md").write_text("kept")
    (out / "pdd_engine" / "1" / "stale.txt").write_text("dropped")
    build_triton_repo(out, flavour="onnxruntime", engine_dir=onnx_dir, max_batch_size=1, instance_kind="gpu",
                      instance_count=2, queue_delay_us=0)
    eng = _configs(out)["pdd_engine"]
    assert (eng.instance_group[0].kind, eng.instance_group[0].count) == (mc.ModelInstanceGroup.KIND_GPU, 2)
    assert list(eng.dynamic_batching.preferred_batch_size) == []
    assert [w.batch_size for w in eng.model_warmup] == [1]
    assert (out / "README.md").read_text() == "kept" and not (out / "pdd_engine" / "1" / "stale.txt").exists()
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize("case, message", [
    ("unknown flavour", "unknown flavour"),
    ("both sources", "exactly one of model"),
    ("neither source", "exactly one of model"),
    ("tensorrt from onnx", "prebuilt engine"),
    ("batch over profile", "batches up to 4"),
    ("batch over onnx range", "batches up to 2"),
    ("profile without batch 1", "profile starts at batch 2"),
    ("preprocess in graph", "without --preprocess"),
    ("plugin form in the onnxruntime backend", "ONNX Runtime backend cannot run"),
    ("plugin form asked of the onnxruntime backend", "ONNX Runtime backend cannot run"),
    ("form other than asked", "not the portable form asked for"),
    ("form for tensorrt", "onnx_form must be one of"),
    ("size mismatch", "exported at 64"),
    ("no engine", "no TensorRT engine"),
    ("zero batch", "max_batch_size must be"),
    ("bad instance kind", "instance_kind"),
])
def test_refusals_name_the_problem(tmp_path, onnx_dir, case, message):
    out = tmp_path / "repo"
    calls = {
        "unknown flavour": lambda: build_triton_repo(out, flavour="openvino", engine_dir=onnx_dir),
        "both sources": lambda: build_triton_repo(out, model=object(), engine_dir=onnx_dir),
        "neither source": lambda: build_triton_repo(out),
        "tensorrt from onnx": lambda: build_triton_repo(out, flavour="tensorrt", model=object()),
        "batch over profile": lambda: build_triton_repo(
            out, flavour="tensorrt", engine_dir=make_engine_dir(tmp_path / "e", max_batch=4), max_batch_size=8),
        "profile without batch 1": lambda: build_triton_repo(
            out, flavour="tensorrt", engine_dir=make_engine_dir(tmp_path / "e2", min_batch=2), max_batch_size=8),
        "batch over onnx range": lambda: build_triton_repo(
            out, engine_dir=make_onnx_dir(tmp_path / "o", batch=(1, 2)), max_batch_size=4),
        "preprocess in graph": lambda: build_triton_repo(
            out, engine_dir=make_onnx_dir(tmp_path / "p", preprocess=True)),
        "plugin form in the onnxruntime backend": lambda: build_triton_repo(
            out, flavour="onnxruntime", engine_dir=make_onnx_dir(tmp_path / "q", form="plugin")),
        "plugin form asked of the onnxruntime backend": lambda: build_triton_repo(
            out, flavour="onnxruntime", model=object(), onnx_form="plugin"),
        "form other than asked": lambda: build_triton_repo(
            out, engine_dir=make_onnx_dir(tmp_path / "r", form="plugin"), onnx_form="portable"),
        "form for tensorrt": lambda: build_triton_repo(out, flavour="tensorrt", engine_dir=tmp_path,
                                                       onnx_form="plugin"),
        "size mismatch": lambda: build_triton_repo(out, engine_dir=onnx_dir, image_size=128),
        "no engine": lambda: build_triton_repo(out, flavour="tensorrt", engine_dir=tmp_path),
        "zero batch": lambda: build_triton_repo(out, engine_dir=onnx_dir, max_batch_size=0),
        "bad instance kind": lambda: build_triton_repo(out, engine_dir=onnx_dir, instance_kind="tpu"),
    }
    with pytest.raises(RepositoryError, match=message):
        calls[case]()
    assert not list(out.glob("*/config.pbtxt"))


def test_check_repository_catches_broken_wiring(tmp_path, onnx_dir):
    repo = build_triton_repo(tmp_path / "repo", engine_dir=onnx_dir)
    ensemble = repo / "pdd" / "config.pbtxt"
    original = ensemble.read_text()
    produced = 'key: "normalised"\n      value: "normalised"'
    assert produced in original
    ensemble.write_text(original.replace(produced, 'key: "normalised"\n      value: "normalized"'))
    with pytest.raises(RepositoryError, match="'normalised', which no ensemble input or earlier step provides"):
        check_repository(repo)
    ensemble.write_text(original.replace('key: "pred_label"', 'key: "label"'))
    with pytest.raises(RepositoryError, match="has no output 'label'"):
        check_repository(repo)
    ensemble.write_text(original.replace("max_batch_size: 8", "max_batch_size: eight"))
    with pytest.raises(RepositoryError, match="not a valid Triton model config"):
        parse_config(ensemble)
    ensemble.write_text(original)
    (repo / "pdd_engine" / "1" / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match=r"model\.onnx is missing"):
        check_repository(repo)
    assert set(check_repository(repo, require_weights=False)) == set(MODEL_NAMES)


def test_committed_example_matches_the_generator(tmp_path):
    """triton_repo/ (committed without weights) is what the generator writes for the brain-synth config."""
    committed = ROOT / "triton_repo"
    configs = check_repository(committed, require_weights=False)
    assert repository_flavour(committed) == "python"
    size = int(configs["preprocess"].parameters["image_size"].string_value)
    # The python flavour's default form, as `pdd export triton-repo` writes it from a checkpoint.
    form = DEFAULT_ONNX_FORM["python"]
    fresh = build_triton_repo(tmp_path / "fresh", engine_dir=make_onnx_dir(tmp_path / "onnx", size=size, form=form))
    for name in MODEL_NAMES:
        assert parse_config(fresh / name / "config.pbtxt") == configs[name], name
        for copied in (fresh / name / "1").rglob("*"):
            if copied.is_file() and copied.suffix in (".py", ".c"):
                linked = committed / name / "1" / copied.relative_to(fresh / name / "1")
                assert linked.read_text() == copied.read_text(), copied
    assert not list(committed.rglob("*.onnx")) and not list(committed.rglob("*.plan"))


def test_docker_command_per_flavour(tmp_path, onnx_dir, engine_dir):
    python = docker_command(build_triton_repo(tmp_path / "py", engine_dir=onnx_dir))
    assert "nvcr.io/nvidia/tritonserver:24.10-py3" in python and "--gpus" not in python
    assert "onnxruntime" in python and "numpy<2" in python and "-p 8000:8000 -p 8001:8001 -p 8002:8002" in python
    ort = docker_command(build_triton_repo(tmp_path / "ort", flavour="onnxruntime", engine_dir=onnx_dir),
                         http_port=9000)
    assert "pip install -q" in ort and "onnxruntime" not in ort.split("pip install")[1].split("&&")[0]
    assert "-p 9000:8000" in ort
    assert "onnxruntime-extensions" in python and "apt-get" not in python  # the portable form compiles nothing
    plugin = docker_command(build_triton_repo(tmp_path / "plugin", engine_dir=make_onnx_dir(tmp_path / "p",
                                                                                            form="plugin")))
    assert "command -v cc >/dev/null || { apt-get update" in plugin and "gcc libc6-dev" in plugin
    assert "onnxruntime-extensions" in plugin and "onnx " in plugin
    trt = docker_command(build_triton_repo(tmp_path / "trt", flavour="tensorrt", engine_dir=engine_dir))
    assert "--gpus all" in trt and "tritonserver:<yy.mm>-py3" in trt
    assert "tritonserver:25.01-py3" in docker_command(tmp_path / "trt", tag="25.01")


def test_the_export_command_writes_the_decode_budget(tmp_path, onnx_dir):
    """`pdd export triton-repo --max-pixels ...`: the server's preprocess decodes files under that budget."""
    from pdd.cli import main

    out = tmp_path / "repo"
    assert main(["export", "triton-repo", "--engine", str(onnx_dir), "--out", str(out), "--max-pixels", "1000000",
                 "--max-seconds", "5"]) == 0
    params = parse_config(out / "preprocess" / "config.pbtxt").parameters
    assert params["max_pixels"].string_value == "1000000" and params["max_seconds"].string_value == "5.0"
    assert params["max_frames"].string_value == str(DecodeBudget().max_frames)
