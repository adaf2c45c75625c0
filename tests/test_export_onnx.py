"""ONNX export: graph structure of both forms, schemas, metadata, fp16 typing, CPU parity with PyTorch.

The full 64² PDD is exported once per form per session (:func:`exported`, shared with test_export_trt.py);
everything else works on single SS2D blocks.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from export.custom_ops import DOMAIN, HEAD_OP, ORT_DOMAIN, SS2D_OP, register_onnx_schemas, to_ort_domain
from export.metadata import atomic_write_bytes, read_onnx_metadata, sha256_file
from export.onnx_export import (
    STAGE_KEY,
    ExportablePDD,
    ExportReport,
    _fold,
    _tag_stages,
    export_onnx,
    op_counts,
    to_fp16,
)
from export.parity import compare_predictions, labelled_images, predict_all
from export.runtime import OnnxRuntime, TorchRuntime
from pdd.backbones.vmamba import SS2D
from pdd.ssm import ScanImplUnavailable

EXPORT_BATCH = (1, 4)


# One intra-op thread for the forward passes of this module (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def exported(form: str, model: torch.nn.Module) -> ExportReport:
    """The 64² PDD exported once per form and session (dynamic batch 1..4) into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"pdd-onnx-{form}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return export_onnx(model, folder, form=form, batch=EXPORT_BATCH)


@functools.cache
def loaded(path: Path) -> onnx.ModelProto:
    """An exported file parsed once per session (~460 MB); callers must not modify it."""
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def plugin_report(small_pdd: torch.nn.Module) -> ExportReport:
    return exported("plugin", small_pdd)


@pytest.fixture(scope="module")
def portable_report(small_pdd: torch.nn.Module) -> ExportReport:
    return exported("portable", small_pdd)


@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, np.ndarray]:
    return labelled_images(4, 64, seed=0)


@pytest.fixture(scope="module")
def reference(small_pdd: torch.nn.Module, labelled: tuple) -> dict[str, np.ndarray]:
    """PyTorch eager (eager scan) predictions of the labelled set, batches of 2."""
    return predict_all(TorchRuntime(small_pdd, "eager"), labelled[0], batch=2)


def _export_block(size: int, dim: int = 32, scan_impl: str = "graph-parallel") -> onnx.ModelProto:
    """One SS2D block (built with a portable scan) exported and folded like the full model."""
    import onnx_ir as ir

    torch.manual_seed(0)
    block = SS2D(dim, scan_impl=scan_impl).eval()
    with torch.no_grad():
        program = torch.onnx.export(block, (torch.randn(1, size, size, dim),), dynamo=True, optimize=False)
    _tag_stages(program.model)
    _fold(program.model)
    return ir.serde.serialize_model(program.model)


def test_schemas_registered() -> None:
    register_onnx_schemas()
    ss2d = onnx.defs.get_schema(SS2D_OP, 1, DOMAIN)
    assert [p.name for p in ss2d.inputs] == ["x", "delta", "B", "C", "A", "D", "delta_bias"]
    assert [p.type_str for p in ss2d.inputs][4:] == ["tensor(float)"] * 3  # A, D, δ bias stay fp32
    head = onnx.defs.get_schema(HEAD_OP, 1, DOMAIN)
    assert [p.name for p in head.outputs] == ["anomaly_map", "pred_score"]
    assert {"sigma", "plugin_namespace", "aot"} <= set(head.attributes)


def test_plugin_ss2d_equals_vmamba_ss2d() -> None:
    torch.manual_seed(0)
    block = SS2D(32).eval()
    plugin = SS2D(32, scan_impl="plugin").eval()
    plugin.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(plugin(x), block(x), rtol=0, atol=0)


def test_wrapper_shares_weights_and_leaves_the_model_unchanged(small_pdd: torch.nn.Module) -> None:
    impls = {m.scan_impl for m in small_pdd.modules() if isinstance(m, SS2D)}
    for form, scan_impl in (("portable", None), ("portable", "graph-parallel"), ("plugin", None)):
        wrapper = ExportablePDD(small_pdd, form, preprocess=True, scan_impl=scan_impl)
        ours = dict(wrapper.model.named_parameters())
        assert all(p is ours[n] for n, p in small_pdd.named_parameters())  # no weight copied
        built = {m.scan_impl for m in wrapper.model.modules() if isinstance(m, SS2D)}
        assert built == {scan_impl or ("plugin" if form == "plugin" else "graph-sequential")}
        assert all(type(m) is SS2D for m in wrapper.model.modules() if isinstance(m, SS2D))
    assert {m.scan_impl for m in small_pdd.modules() if isinstance(m, SS2D)} == impls
    uint8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (uint8.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(wrapper.normalise(uint8), expected)


def test_plugin_graph_has_one_node_per_scan_and_one_head(plugin_report: ExportReport) -> None:
    model = loaded(plugin_report.path)
    onnx.checker.check_model(model)
    scans = [n for n in model.graph.node if n.op_type == SS2D_OP]
    heads = [n for n in model.graph.node if n.op_type == HEAD_OP]
    assert len(scans) == 15 and len(heads) == 1  # VMamba-T v0: depths 2, 2, 9, 2
    for node in (*scans, *heads):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == DOMAIN
        assert attrs["plugin_namespace"] == DOMAIN.encode() and attrs["aot"] == 1
    assert all(len(n.input) == 7 for n in scans)
    head_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in heads[0].attribute}
    assert len(heads[0].input) == 12 and head_attrs["sigma"] == pytest.approx(4.0)
    assert "CumSum" not in plugin_report.ops  # the scan lives in the custom nodes only
    assert plugin_report.ops[f"{DOMAIN}::{SS2D_OP}"] == 15
    assert plugin_report.nodes < 1000
    assert {o.domain for o in model.opset_import} >= {"", DOMAIN}
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # the batch stays dynamic through the custom nodes


def test_portable_graph_is_standard_ops_with_dynamic_batch(portable_report: ExportReport) -> None:
    model = loaded(portable_report.path)
    assert read_onnx_metadata(portable_report.path).scan_impl == "graph-sequential"  # the default
    assert {n.domain for n in model.graph.node} == {""}
    assert not {"Loop", "Scan", "If"} & set(portable_report.ops)
    # Sequential scans (the default): one CumSum (of δ) per SS2D block; in-chunk sums are MatMuls.
    assert portable_report.ops["CumSum"] == 15
    assert 1000 < portable_report.nodes < 6000
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    (images,) = model.graph.input
    assert images.name == "images" and dims(images)[1:] == [3, 64, 64] and isinstance(dims(images)[0], str)
    outputs = {o.name: dims(o) for o in model.graph.output}
    assert outputs["pred_score"][1:] == [] and outputs["anomaly_map"][1:] == [64, 64]
    assert not any(p.key.startswith("pkg.torch") for n in model.graph.node for p in n.metadata_props)


def test_portable_node_count_does_not_grow_per_scan_step() -> None:
    small, large = _export_block(8), _export_block(16)  # L = 64 and 256
    grown = len(large.graph.node) - len(small.graph.node)
    # Unrolling costs ~21 nodes per step (192 more steps here); the chunked scan adds a few nodes per
    # doubling of the chunk count (a log-depth scan across chunks).
    assert 0 <= grown <= 30, (len(small.graph.node), len(large.graph.node))
    assert op_counts(large)["CumSum"] == op_counts(small)["CumSum"] == 2


def test_sequential_graph_grows_per_chunk_not_per_step() -> None:
    small, large = (_export_block(size, scan_impl="graph-sequential") for size in (8, 16))  # 4, 16 chunks of 16
    grown = len(large.graph.node) - len(small.graph.node)
    assert 12 * 5 <= grown <= 12 * 16, (len(small.graph.node), len(large.graph.node))  # 5..16 nodes per chunk
    assert {n.domain for n in large.graph.node} == {""} and not {"Loop", "Scan", "If"} & set(op_counts(large))


@pytest.mark.parametrize("scan_impl", ["graph-sequential", "graph-parallel"])
def test_both_scan_graphs_run_in_onnxruntime_like_pytorch(scan_impl: str) -> None:
    torch.manual_seed(0)
    block = SS2D(32).eval()
    graph_block = SS2D(32, scan_impl=scan_impl).eval()
    graph_block.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 12, 32)  # non-square: L = 192, 12 chunks of 16
    with torch.no_grad():
        expect = block(x).numpy()
        program = torch.onnx.export(graph_block, (x,), dynamo=True, optimize=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)


def test_metadata_beside_the_onnx(plugin_report: ExportReport) -> None:
    meta = read_onnx_metadata(plugin_report.path)
    assert plugin_report.metadata_path == plugin_report.path.with_suffix(".json")
    assert meta.sha256 == sha256_file(plugin_report.path) == plugin_report.sha256
    assert meta.size_bytes == plugin_report.path.stat().st_size
    assert (meta.form, meta.batch, meta.image_size, meta.preprocess) == ("plugin", EXPORT_BATCH, (64, 64), False)
    assert meta.scan_impl == "plugin"
    assert meta.custom_ops == [f"{DOMAIN}::{HEAD_OP}", f"{DOMAIN}::{SS2D_OP}"]
    assert meta.normalisation["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta.config["image_size"] == 64 and meta.calibration is None  # a fresh model has none
    assert {"torch", "onnx", "pdd"} <= set(meta.versions)
    assert [s.name for s in meta.outputs] == ["pred_score", "anomaly_map"]
    assert not list(plugin_report.path.parent.glob(".*.tmp"))


def test_metadata_written_before_scan_impl_still_reads(plugin_report: ExportReport, tmp_path: Path) -> None:
    import json

    data = json.loads(plugin_report.metadata_path.read_text())
    del data["scan_impl"]
    data["scan_graph"] = "parallel"  # files of earlier versions name the portable scan graph
    (tmp_path / "model.json").write_text(json.dumps(data))
    meta = read_onnx_metadata(tmp_path / "model.json")
    assert (meta.scan_impl, meta.scan_graph) == ("graph-parallel", "parallel")


def test_export_rejects_bad_arguments(small_pdd: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="form"):
        export_onnx(small_pdd, tmp_path, form="tensorrt")
    with pytest.raises(ValueError, match="portable ONNX form is built with scan_impl 'graph-sequential' or"):
        export_onnx(small_pdd, tmp_path, form="portable", scan_impl="eager")
    with pytest.raises(ValueError, match="plugin ONNX form is built with scan_impl 'plugin'"):
        export_onnx(small_pdd, tmp_path, form="plugin", scan_impl="graph-parallel")
    with pytest.warns(DeprecationWarning, match="scan_graph"), pytest.raises(ValueError, match="contradicts"):
        export_onnx(small_pdd, tmp_path, scan_graph="parallel", scan_impl="graph-sequential")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="batch"):
        export_onnx(small_pdd, tmp_path, batch=(0, 4))
    with pytest.raises(ValueError, match="multiple of 32"):
        export_onnx(small_pdd, tmp_path, image_size=48)


def test_atomic_write_permissions_and_no_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fp16_block_keeps_the_scan_fp32_and_stays_close() -> None:
    fp32 = _export_block(8)
    fp16 = to_fp16(fp32)
    onnx.shape_inference.infer_shapes(fp16, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in fp16.graph.value_info}
    for node in fp16.graph.node:
        stage = next((p.value for p in node.metadata_props if p.key == STAGE_KEY), None)
        if node.op_type in ("Conv", "MatMul") and stage is None:
            assert types[node.output[0]] == TensorProto.FLOAT16, node.name
        if stage == "scan" and node.op_type in ("CumSum", "Exp"):
            assert types[node.output[0]] == TensorProto.FLOAT, node.name
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = torch.randn(1, 8, 8, 32).numpy()
    name = fp32.graph.input[0].name
    ref = ort.InferenceSession(fp32.SerializeToString()).run(None, {name: x})[0]
    half = ort.InferenceSession(fp16.SerializeToString()).run(None, {name: x})[0]
    assert np.abs(ref - half).max() < 5e-3 * np.abs(ref).max()


def test_fp16_plugin_graph_casts_into_the_head_only(plugin_report: ExportReport) -> None:
    fp16 = to_fp16(loaded(plugin_report.path))
    types = {v.name: v.type.tensor_type.elem_type for v in (*fp16.graph.value_info, *fp16.graph.input)}
    types.update({t.name: t.data_type for t in fp16.graph.initializer})
    scan = next(n for n in fp16.graph.node if n.op_type == SS2D_OP)
    assert [types[i] for i in scan.input] == [TensorProto.FLOAT16] * 4 + [TensorProto.FLOAT] * 3
    head = next(n for n in fp16.graph.node if n.op_type == HEAD_OP)
    assert all(types[i] == TensorProto.FLOAT for i in head.input)
    floats = [t.data_type for t in fp16.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats.count(TensorProto.FLOAT16) > 0.8 * len(floats)  # weights halved; the scan's A, D, bias stay fp32


def test_to_ort_domain_moves_nodes_and_keeps_readable_attributes(plugin_report: ExportReport) -> None:
    moved = to_ort_domain(loaded(plugin_report.path), "eager")
    custom = [n for n in moved.graph.node if n.domain == ORT_DOMAIN]
    assert len(custom) == 16 and not any(n.domain == DOMAIN for n in moved.graph.node)
    head = next(n for n in custom if n.op_type == HEAD_OP)
    assert [a.name for a in head.attribute] == ["sigma"]
    scans = [n for n in custom if n.op_type == SS2D_OP]
    assert all({a.name: a.s for a in n.attribute} == {"scan_impl": b"eager"} for n in scans)
    with pytest.raises(ScanImplUnavailable, match="mamba_ssm"):
        to_ort_domain(loaded(plugin_report.path), "mamba_ssm")
    assert ORT_DOMAIN in {o.domain for o in moved.opset_import} and DOMAIN not in {o.domain for o in moved.opset_import}


def test_plugin_form_in_onnxruntime_runs_the_compiled_cpu_scan(small_pdd: torch.nn.Module, labelled: tuple,
                                                               reference: dict[str, np.ndarray],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph TensorRT gets is also served on CPU by the compiled kernel (maps within 1e-5 of the range),
    through the torch-free op the served python flavour runs."""
    cpu_lib = pytest.importorskip("kernels.cpu_lib")
    try:
        cpu_lib.load()
    except cpu_lib.CpuKernelUnavailable as exc:
        pytest.skip(f"no CPU kernel here: {exc}")
    calls = []
    candidate = OnnxRuntime(exported("plugin", small_pdd).path, threads=1, scan_impl="cpu_kernel")
    kernel = cpu_lib.ss2d_scan_numpy
    monkeypatch.setattr(cpu_lib, "ss2d_scan_numpy", lambda *a: calls.append(1) or kernel(*a))
    images, labels = labelled
    parity = compare_predictions(reference, predict_all(candidate, images, batch=2), labels, "torch:eager",
                                 "onnxruntime:cpu:plugin+cpu_kernel")
    assert len(calls) == 15 * -(-len(images) // 2)  # every SS2D node of every batch ran the kernel
    assert parity.map_relative_error < 1e-5 and parity.rank_identical, str(parity)


def test_other_python_ops_keep_the_librarys_own_return_path() -> None:
    """register_ort_ops hands its ops' outputs to ONNX Runtime as arrays through its own hook; another Python
    op of the same process still runs, through onnxruntime-extensions' own return path."""
    ext = pytest.importorskip("onnxruntime_extensions")
    from kernels.ort_ops import configure_session, register_ort_ops

    library = register_ort_ops()

    @ext.onnx_op(op_type="PddTestNegate", inputs=[ext.PyCustomOpDef.dt_float], outputs=[ext.PyCustomOpDef.dt_float])
    def _negate(x):
        return -x

    node = onnx.helper.make_node("PddTestNegate", ["x"], ["y"], domain=ORT_DOMAIN)
    graph = onnx.helper.make_graph([node], "negate",
                                   [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid(ORT_DOMAIN, 1)])
    options = ort.SessionOptions()
    configure_session(options, library)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], -x)


@pytest.mark.parametrize("form", ["portable", "plugin"])
def test_onnxruntime_parity_with_pytorch(form: str, small_pdd: torch.nn.Module, labelled: tuple,
                                         reference: dict[str, np.ndarray]) -> None:
    images, labels = labelled
    candidate = OnnxRuntime(exported(form, small_pdd).path, threads=1, name=f"onnxruntime:cpu:{form}",
                            scan_impl="eager")
    parity = compare_predictions(reference, predict_all(candidate, images, batch=2), labels, "torch:eager",
                                 candidate.name)
    assert parity.ok(), str(parity)
    assert parity.map_relative_error < 1e-4 and parity.rank_identical
    assert round(parity.auroc_reference, 3) == round(parity.auroc_candidate, 3)
    if form == "portable":  # other sizes of the dynamic batch give the same numbers
        for batch in (1, 3):
            out = candidate.predict(images[:batch])
            assert out["pred_score"].shape == (batch,) and out["anomaly_map"].shape == (batch, 64, 64)
            np.testing.assert_allclose(out["pred_score"], reference["pred_score"][:batch], rtol=1e-5, atol=1e-6)


def test_cli_scan_impl_chooses_the_portable_scan(tmp_path: Path) -> None:
    """`pdd export onnx --scan-impl graph-parallel` builds the portable graph with that scan (the metadata says
    so); the deprecated --scan-graph spelling names the same choice."""
    from pdd.cli import main

    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--config", "brain-synth", "--image-size", "64", "--batch", "1:2",
                 "--scan-impl", "graph-parallel", "--out", str(out)]) == 0
    assert read_onnx_metadata(out / "model.onnx").scan_impl == "graph-parallel"
