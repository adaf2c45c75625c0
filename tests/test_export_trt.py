"""TensorRT path without TensorRT: plugin shape functions, launch parameters from the kernels' AOT records,
PTX generation, head lowering, the build script's dry run, and engine metadata checks.

Tests that need TensorRT itself (and a CUDA GPU) skip with the reason.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
import triton
from onnx import TensorProto
from test_export_onnx import exported, loaded

from export.build_trt import _network_flags, main, parse_batch
from export.custom_ops import DOMAIN, HEAD_OP, SS2D_OP
from export.metadata import (
    EngineMetadata,
    EngineMismatch,
    TensorSpec,
    check_engine_compatible,
    read_engine_metadata,
    write_metadata,
)
from export.onnx_export import to_fp16
from export.trt_plugins import (
    HEAD_BLUR_OP,
    HEAD_COSINE_OP,
    head_blur_kernel,
    head_blur_output_shapes,
    head_blur_sizes,
    head_cosine_kernel,
    head_cosine_output_shapes,
    head_cosine_sizes,
    launch_plan,
    lower_for_tensorrt,
    plugin_launch_records,
    ss2d_kernels,
    ss2d_output_shape,
    ss2d_sizes,
)

aot = pytest.importorskip("kernels.aot", reason="PTX generation needs Triton (pip install -e '.[gpu]')")

ROOT = Path(__file__).resolve().parent.parent
# PDD at 64²: WRN level 1 and its fusion target at 16², level 2 at 8², level 3 at 4²; prior and plain student.
TEACHERS = [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4)] * 2


@pytest.fixture(scope="module")
def lowered(small_pdd: torch.nn.Module) -> onnx.ModelProto:
    return lower_for_tensorrt(loaded(exported("plugin", small_pdd).path))


def test_shape_functions() -> None:
    assert ss2d_output_shape((2, 192, 16, 16)) == (2, 192, 16, 16)
    cos, seed = head_cosine_output_shapes(TEACHERS)
    assert cos == (2, 2 * (256 + 64 + 16)) and seed == (2,)
    assert head_blur_output_shapes(cos, 64, 64) == ((2, 64, 64), (2,))
    with pytest.raises(ValueError, match="rank"):
        ss2d_output_shape((2, 192, 256))


def test_ss2d_tactics_compile_to_ptx_with_the_aot_contract() -> None:
    for dtype in ("fp32", "fp16"):
        kernels = ss2d_kernels(dtype, 16)
        assert len(kernels) >= 2  # TensorRT times one tactic per scan strategy
        for k in kernels:
            assert aot.check_contract(k) == []
            assert f".entry {k.name}" in k.ptx and k.target == aot.DEFAULT_TARGET
            roles = [p.role for p in k.params]
            assert roles == ["input"] * 7 + ["scalar"] * 3 + ["output"]
            assert [p.type for p in k.params][:4] == [f"*{dtype}"] * 4


def test_launch_plan_follows_the_contract() -> None:
    x = (3, 384, 8, 8)
    for k in ss2d_kernels("fp32", 16):
        plan = launch_plan(k, ss2d_sizes(x))
        assert plan.grid == aot.eval_grid(k.grid, dim=384, batch=3)
        assert plan.grid[1] == 3 and plan.block == (32 * k.num_warps, 1, 1)
        assert plan.scalar_names == ("dim", "height", "width") and plan.scalars == (384, 8, 8)
        assert plan.shared_mem == k.shared
    cosine = launch_plan(head_cosine_kernel("fp32", 6), head_cosine_sizes(TEACHERS))
    assert cosine.scalars == (256, 512, 1024) * 2 + (16, 8, 4) * 2 + (16, 8, 4) * 2
    assert cosine.grid == (2 * (4 + 1 + 1), 2, 1)  # cdiv(H·W, 64) per level, batch
    blur = launch_plan(head_blur_kernel(6, 4.0), head_blur_sizes(2, [16, 16, 8, 8, 4, 4] * 2, 64, 64))
    assert blur.grid == (4, 2, 1) and blur.scalars[-2:] == (64, 64)
    with pytest.raises(ValueError, match="launch contract"):
        launch_plan(ss2d_kernels("fp32", 16)[0], {"batch": 1})


def test_sigma_is_baked_into_the_blur_ptx() -> None:
    assert head_blur_kernel(6, 4.0).ptx != head_blur_kernel(6, 2.0).ptx


def test_lowering_replaces_the_head_by_two_plugins(lowered: onnx.ModelProto) -> None:
    ops = [n.op_type for n in lowered.graph.node if n.domain == DOMAIN]
    assert HEAD_OP not in ops and ops.count(SS2D_OP) == 15
    assert ops.count(HEAD_COSINE_OP) == ops.count(HEAD_BLUR_OP) == 1
    blur = next(n for n in lowered.graph.node if n.op_type == HEAD_BLUR_OP)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in blur.attribute}
    assert attrs["level_sizes"] == [16, 16, 8, 8, 4, 4] * 2 and (attrs["height"], attrs["width"]) == (64, 64)
    assert attrs["sigma"] == pytest.approx(4.0) and attrs["aot"] == 1
    score = next(n for n in lowered.graph.node if n.output[0] == "pred_score")
    assert score.op_type == "ReduceMax" and score.input[0] == "anomaly_map" == blur.output[0]
    onnx.checker.check_model(lowered)


def test_launch_records_scale_with_the_batch(lowered: onnx.ModelProto) -> None:
    records = plugin_launch_records(lowered, batch=3)
    assert len(records) == 15 * len(ss2d_kernels("fp32", 16)) + 2
    assert {r["plugin"] for r in records} == {f"{DOMAIN}::{op}" for op in (SS2D_OP, HEAD_COSINE_OP, HEAD_BLUR_OP)}
    assert all(r["grid"][1] == 3 for r in records)
    first = records[0]
    assert first["scalars"] == {"dim": 192, "height": 16, "width": 16} and first["tactic_id"] == 1  # stage 1 at 64²


def test_fp16_network_keeps_the_head_fp32(lowered: onnx.ModelProto) -> None:
    fp16 = to_fp16(lowered)
    types = {v.name: v.type.tensor_type.elem_type for v in (*fp16.graph.value_info, *fp16.graph.input)}
    cosine = next(n for n in fp16.graph.node if n.op_type == HEAD_COSINE_OP)
    assert {types[i] for i in cosine.input} == {TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in fp16.graph.output} == {TensorProto.FLOAT}
    scan = next(n for n in fp16.graph.node if n.op_type == SS2D_OP)
    assert types[scan.input[0]] == TensorProto.FLOAT16


def test_dry_run_writes_the_build_plan(small_pdd: torch.nn.Module) -> None:
    out = Path(tempfile.mkdtemp(prefix="pdd-plan-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    onnx_path = exported("plugin", small_pdd).path
    assert main(["--onnx", str(onnx_path), "--precision", "fp16", "--batch", "1:2:4", "--out", str(out),
                 "--dry-run", "--arch", "sm_90", "--ptx-isa", "8.4"]) == 0
    plan = json.loads((out / "build-plan.json").read_text())
    assert plan["kernel_target"] == {"arch": "sm_90a", "driver_ptx_isa": "8.4", "ptx_isa": "8.4",
                                     "triton": triton.__version__}
    assert all(".version 8.4" in (out / p).read_text() for p in plan["ptx"])
    assert plan["precision"] == "fp16" and plan["profile"] == {"min": 1, "opt": 2, "max": 4}
    assert plan["input_shapes"]["max"] == [4, 3, 64, 64]
    assert plan["plugins"] == sorted(f"{DOMAIN}::{op}" for op in (SS2D_OP, HEAD_COSINE_OP, HEAD_BLUR_OP))
    assert all((out / p).is_file() for p in plan["ptx"]) and len(plan["ptx"]) == 4
    launches = json.loads((out / "plugins.json").read_text())
    assert launches["batch"] == 2 and all(r["grid"][1] == 2 for r in launches["launches"])
    assert (out / "network.onnx").is_file() and not (out / "engine.plan").exists()


def test_pdd_export_trt_is_the_same_builder(small_pdd: torch.nn.Module, tmp_path: Path) -> None:
    from pdd.cli import main as pdd_main

    onnx_path = exported("portable", small_pdd).path
    assert pdd_main(["export", "trt", "--onnx", str(onnx_path), "--precision", "fp32", "--batch", "1:2:4",
                     "--out", str(tmp_path), "--dry-run"]) == 0
    plan = json.loads((tmp_path / "build-plan.json").read_text())
    assert plan["form"] == "portable" and plan["plugins"] == [] and plan["ptx"] == []
    assert plan["kernel_target"]["ptx_isa"] is None and (tmp_path / "network.onnx").is_file()


def test_readme_commands_build_the_plugin_plan_from_a_config_and_a_checkpoint(small_pdd: torch.nn.Module,
                                                                               tmp_path: Path) -> None:
    """`python export/build_trt.py --config NAME --dry-run` and `pdd export trt --checkpoint CKPT --dry-run`, as
    the README writes them: the default plugin form exports with its own scan whatever the model's scan_impl."""
    from pdd.checkpoint import save_pdd
    from pdd.cli import main as pdd_main

    script = subprocess.run([sys.executable, "export/build_trt.py", "--config", "brain-synth", "--image-size", "64",
                             "--dry-run", "--out", str(tmp_path / "config")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert script.returncode == 0, script.stderr[-2000:]
    ckpt = tmp_path / "best.pt"
    save_pdd(small_pdd, ckpt)
    assert pdd_main(["export", "trt", "--checkpoint", str(ckpt), "--dry-run", "--out", str(tmp_path / "ckpt")]) == 0
    for out in ("config", "ckpt"):
        plan = json.loads((tmp_path / out / "build-plan.json").read_text())
        assert plan["form"] == "plugin" and plan["precision"] == "fp16", plan
        assert plan["input_shapes"]["opt"] == [8, 3, 64, 64] and len(plan["ptx"]) == 4
        assert json.loads((tmp_path / out / "onnx" / "model.json").read_text())["scan_impl"] == "plugin"


def test_a_baseline_config_is_refused_in_one_line(tmp_path: Path) -> None:
    script = subprocess.run([sys.executable, "export/build_trt.py", "--config", "rd4ad-brain-synth", "--dry-run",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert script.returncode == 2 and "Traceback" not in script.stderr
    assert script.stderr.strip().splitlines()[-1] == (
        "build_trt.py: error: rd4ad-brain-synth is a 'rd4ad' model, which has no export path (only PDD is "
        "exported); give a PDD checkpoint or config")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_real_build_without_a_gpu_is_refused_before_exporting(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                ) -> None:
    assert main(["--config", "brain-synth", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_batch_outside_the_exported_range_is_refused(small_pdd: torch.nn.Module, tmp_path: Path) -> None:
    onnx_path = exported("plugin", small_pdd).path
    with pytest.raises(ValueError, match=r"exported for batch 1\.\.4"):
        main(["--onnx", str(onnx_path), "--batch", "1:8:16", "--out", str(tmp_path), "--dry-run"])


def test_unknown_config_name_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    from pdd.config import ConfigError

    with pytest.raises(ConfigError, match=r"built-in: .*headct"):
        main(["--config", "no-such-config", "--out", str(tmp_path), "--dry-run"])


def test_help_runs_as_a_script_without_tensorrt() -> None:
    result = subprocess.run([sys.executable, "export/build_trt.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--onnx-form" in result.stdout and "--timing-cache" in result.stdout


def test_parse_batch() -> None:
    assert parse_batch("1:8:32") == (1, 8, 32) and parse_batch("4") == (4, 4, 4)
    for bad in ("0:1:2", "4:2:8", "1:2", "a:b:c"):
        with pytest.raises(Exception, match="MIN:OPT:MAX"):
            parse_batch(bad)


def test_network_flags_strongly_typed_with_explicit_batch_only_where_it_exists() -> None:
    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5))
    trt11 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    assert _network_flags(trt10) == (1 << 5) | 1
    assert _network_flags(trt11) == 1 << 1


def _engine_meta() -> EngineMetadata:
    spec = TensorSpec("images", "float32", ("batch", 3, 64, 64))
    return EngineMetadata(
        engine_file="engine.plan", engine_sha256="e" * 64, precision="fp16", onnx_form="plugin", onnx_sha256="a" * 64,
        kernels_sha256="k" * 64, plugins=[f"{DOMAIN}::{SS2D_OP}"], tensorrt_version="10.13.0.35",
        device_name="NVIDIA H200", compute_capability="9.0",
        profile={"images": {"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [4, 3, 64, 64]}},
        inputs=[spec], outputs=[TensorSpec("pred_score", "float32", ("batch",))], image_size=(64, 64),
        preprocess=False, normalisation={}, config={"image_size": 64}, cuda_arch="sm_90a", ptx_isa="9.0",
        triton_version="3.6.0")


def test_engine_metadata_round_trip_and_mismatch_refusal(tmp_path: Path) -> None:
    meta = _engine_meta()
    write_metadata(tmp_path / "engine.json", meta)
    loaded = read_engine_metadata(tmp_path)
    assert loaded == meta
    here = {"tensorrt_version": "10.13.0.35", "compute_capability": "9.0"}
    assert check_engine_compatible(loaded, **here, device_name="NVIDIA H200") == []
    assert "tuned on NVIDIA H200" in check_engine_compatible(loaded, **here, device_name="NVIDIA H100")[0]
    with pytest.raises(EngineMismatch, match=r"TensorRT 10\.13\.0\.35, this is TensorRT 11\.4\.0"):
        check_engine_compatible(loaded, tensorrt_version="11.4.0", compute_capability="9.0")
    with pytest.raises(EngineMismatch, match=r"compute capability 9\.0"):
        check_engine_compatible(loaded, tensorrt_version="10.13.0.35", compute_capability="8.0")
    with pytest.raises(EngineMismatch, match="ONNX sha256"):
        check_engine_compatible(loaded, **here, onnx_sha256="b" * 64)
    with pytest.raises(EngineMismatch, match="plugin kernels"):
        check_engine_compatible(loaded, **here, kernels_sha256="c" * 64)
    assert check_engine_compatible(loaded, **here, driver_ptx_isa=90) == []
    with pytest.raises(EngineMismatch, match=r"PTX ISA 9\.0 and this NVIDIA driver loads PTX up to 8\.8: update the "
                                             r"driver, or rebuild with --ptx-isa 8\.8"):
        check_engine_compatible(loaded, **here, driver_ptx_isa=88)
    with pytest.raises(EngineMismatch, match=r"sm_90a code\), this GPU has 10\.0"):
        check_engine_compatible(loaded, tensorrt_version="10.13.0.35", compute_capability="10.0")


def test_engine_metadata_written_before_the_kernel_target_fields_still_loads(tmp_path: Path) -> None:
    data = dataclasses.asdict(_engine_meta())
    for key in ("cuda_arch", "ptx_isa", "triton_version"):
        del data[key]
    (tmp_path / "engine.json").write_text(json.dumps(data))
    old = read_engine_metadata(tmp_path)
    assert old.ptx_isa is None and old.cuda_arch is None
    assert check_engine_compatible(old, tensorrt_version="10.13.0.35", compute_capability="9.0",
                                   driver_ptx_isa=80) == []


@pytest.mark.tensorrt
def test_plugins_register_with_the_installed_tensorrt() -> None:
    """The real TensorRT (compiled module included); test_trt_contract.py covers its Python part on CPU."""
    trtp = pytest.importorskip("tensorrt.plugin", reason="TensorRT is not installed (its wheels need NVIDIA's index)")
    from export.trt_plugins import register_plugins

    register_plugins()
    register_plugins()  # safe to repeat
    assert {SS2D_OP, HEAD_COSINE_OP, HEAD_BLUR_OP} <= set(dir(trtp.op.pdd))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_build_and_check_against_onnxruntime_and_torch(small_pdd: torch.nn.Module) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels need NVIDIA's index)")
    if not torch.cuda.is_available():
        pytest.skip("building a TensorRT engine needs a CUDA GPU")
    from export.build_trt import build_engine, check_engine, prepare
    from export.runtime import TensorRTRuntime

    out = Path(tempfile.mkdtemp(prefix="pdd-engine-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    plan = prepare(out, onnx=exported("plugin", small_pdd).path, precision="fp32", batch=(1, 2, 4))
    build_engine(plan, timing_cache=out / "timing.cache")
    assert (out / "timing.cache").is_file()
    assert check_engine(plan, small_pdd, images=4)
    with TensorRTRuntime(out) as rt:
        assert rt.predict(torch.zeros(2, 3, 64, 64).numpy())["anomaly_map"].shape == (2, 64, 64)
