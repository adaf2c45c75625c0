"""The TensorRT plugins against NVIDIA's own ``tensorrt.plugin`` code (TensorRT 10.13 and 11.4), on CPU.

NVIDIA's plugin package comes unmodified from each release's bindings wheel; only TensorRT's compiled module
is replaced, by ``trt_contract/standin_tensorrt.py`` (see there). ``trt_contract/harness.py`` makes the calls
TensorRT's ONNX parser and builder make. For every plugin node of the lowered 64² network, in fp32 and fp16,
the tests check registration, creation from the node's attributes, output types and shapes at several
batches, the one type/format combination a strongly typed network allows, every tactic's launch parameters
and scalars, and the kernel's PTX: entry name, ISA, target, and its parameters in the order TensorRT passes
them (inputs, int32 scalars, outputs, then Triton's hidden scratch pointers).

The wheels are downloaded once by pip into ``~/.cache/pdd/tensorrt-bindings`` (or ``$PDD_TRT_WHEELS``);
without network the tier skips, unless ``PDD_TRT_WHEELS_REQUIRED=1`` (CI), where that is an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_export_onnx import exported, loaded
from trt_contract import harness

from export.custom_ops import DOMAIN, SS2D_OP
from export.onnx_export import to_fp16
from export.trt_plugins import HEAD_BLUR_OP, HEAD_COSINE_OP, lower_for_tensorrt, register_plugins

aot = pytest.importorskip("kernels.aot", reason="PTX generation needs Triton (pip install -e '.[gpu]')")
from kernels import anomaly_head, selective_scan  # noqa: E402

RELEASES = sorted(harness.WHEELS)
PRECISIONS = ("fp32", "fp16")
BATCHES = (1, 3, 32)
# The H200 machines' driver (580, CUDA 13.0) loads PTX ISA <= 9.0; 8.4 exercises the cap with any Triton.
TARGET = aot.KernelTarget(arch=90, ptx_isa=84)
TRT_TYPE = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module")
def networks(small_pdd: torch.nn.Module) -> dict[str, onnx.ModelProto]:
    lowered = lower_for_tensorrt(loaded(exported("plugin", small_pdd).path))
    return {"fp32": lowered, "fp16": to_fp16(lowered)}


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tensorrt-plugin")
    try:
        return {r: harness.install(r, root) for r in RELEASES}
    except harness.WheelsUnavailable as exc:
        if os.environ.get(harness.REQUIRED_ENV) == "1":
            pytest.fail(f"{harness.REQUIRED_ENV}=1 but {exc}")
        pytest.skip(f"TensorRT bindings wheels unavailable: {exc}")


@dataclass
class NodeResult:
    node: onnx.NodeProto
    in_types: list[int]
    in_shapes: list[tuple[int | str, ...]]
    out_types: list[int]
    out_shapes: list[tuple[int | str, ...]]
    record: harness.BuildRecord
    fields: list[tuple[str, str, list[float]]]


@pytest.fixture(scope="module")
def built(packages: dict[str, Path], networks: dict[str, onnx.ModelProto]) -> dict[tuple[str, str], list[NodeResult]]:
    """Every plugin node of both networks through each release's parser/builder calls."""
    out = {}
    for release, path in packages.items():
        for precision, net in networks.items():
            infos = harness.graph_types(net)
            results = []
            with harness.nvidia_plugin_package(path) as (trt, _):
                register_plugins(TARGET)
                for node in (n for n in net.graph.node if n.domain == DOMAIN):
                    in_types, in_shapes = [infos[i][0] for i in node.input], [infos[i][1] for i in node.input]
                    out_types, out_shapes = [infos[o][0] for o in node.output], [infos[o][1] for o in node.output]
                    creator = trt.get_plugin_registry().get_creator(node.op_type, "1", DOMAIN)
                    fields = [(f.name, f.type.name, f.data.tolist())
                              for f in harness.parser_fields(trt, creator, node)]
                    plugin = harness.parse_node(trt, node)
                    record = harness.build(trt, plugin, in_types, in_shapes, out_types)
                    results.append(NodeResult(node, in_types, in_shapes, out_types, out_shapes, record, fields))
            out[release, precision] = results
    return out


CASES = [(r, p) for r in RELEASES for p in PRECISIONS]


def _results(built: dict, case: tuple[str, str], op: str) -> list[NodeResult]:
    found = [r for r in built[case] if r.node.op_type == op]
    assert found, f"no {op} node in the {case[1]} network"
    return found


def _at(shape: tuple[int | str, ...], batch: int) -> tuple[int, ...]:
    return tuple(batch if isinstance(d, str) else d for d in shape)


def _ptx_params(ptx: str) -> tuple[str, list[str]]:
    m = re.search(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx)
    assert m is not None, "no .entry in the PTX"
    return m.group(1), re.findall(r"\.param\s+\.(\w+)", m.group(2))


def _check_ptx(launch: harness.Launch, inputs: int, scalars: int, outputs: int) -> None:
    name, types = _ptx_params(launch.ptx)
    assert name == launch.kernel_name
    assert aot.ptx_isa_of(launch.ptx) <= TARGET.ptx_isa
    assert re.search(r"^\s*\.target\s+sm_90a\b", launch.ptx, re.MULTILINE)
    declared = inputs + scalars + outputs
    assert declared <= len(types) <= declared + 2, f"{len(types)} PTX parameters for {declared} declared"
    assert types[:inputs] == ["u64"] * inputs
    assert all(t in ("u32", "s32", "b32") for t in types[inputs:inputs + scalars]), types[inputs:inputs + scalars]
    assert types[inputs + scalars:] == ["u64"] * (len(types) - inputs - scalars)  # outputs, then hidden scratch
    reqntid = re.search(r"\.(?:reqntid|maxntid)\s+(\d+)", launch.ptx)
    assert reqntid is not None and harness.value(launch.block[0], 1) == int(reqntid.group(1))
    assert [harness.value(b, 1) for b in launch.block[1:]] == [1, 1]


def _check_common(res: NodeResult) -> None:
    rec = res.record
    assert [t.name for t in rec.output_types] == [TRT_TYPE[t] for t in res.out_types]
    for b in BATCHES:
        assert rec.shapes_at(b) == [_at(s, b) for s in res.out_shapes]
    assert len(rec.matching) == 1, f"{len(rec.matching)} of {len(rec.combinations)} combinations match the network"


@pytest.mark.parametrize("case", CASES, ids=[f"trt{r}-{p}" for r, p in CASES])
def test_ss2d_scan_plugin(built: dict, case: tuple[str, str]) -> None:
    nodes = _results(built, case, SS2D_OP)
    assert len(nodes) == 15  # VMamba-T: 2 + 2 + 9 + 2 blocks
    for res in nodes:
        _check_common(res)
        assert res.fields == []
        rec = res.record
        assert rec.tactics == list(range(1, len(selective_scan.STRATEGIES) + 1))
        _, dim, height, width = res.in_shapes[0]
        d_state = res.in_shapes[4][1]
        assert res.in_types[4:] == [TensorProto.FLOAT] * 3  # A, D, delta_bias stay fp32
        ptx = set()
        for launch in rec.launches:
            block_d = selective_scan.scan_config(selective_scan.STRATEGIES[launch.tactic - 1], d_state)["BLOCK_D"]
            for b in BATCHES:
                assert [harness.value(g, b) for g in launch.grid] == [_cdiv(dim, block_d), b, 1]
                assert [harness.value(s, b) for s in launch.scalars] == [dim, height, width]
            _check_ptx(launch, inputs=7, scalars=3, outputs=1)
            ptx.add(launch.ptx)
        assert len(ptx) == len(rec.launches)  # one kernel per tactic


@pytest.mark.parametrize("case", CASES, ids=[f"trt{r}-{p}" for r, p in CASES])
def test_head_cosine_plugin(built: dict, case: tuple[str, str]) -> None:
    (res,) = _results(built, case, HEAD_COSINE_OP)
    _check_common(res)
    assert res.fields == [] and res.in_types == [TensorProto.FLOAT] * 12  # the head stays fp32
    rec = res.record
    assert rec.tactics == [1] and len(rec.launches) == 1
    teachers = res.in_shapes[0::2]
    sizes = [h * w for _, _, h, w in teachers]
    block_p = anomaly_head.COSINE_CONFIG["BLOCK_P"]
    launch = rec.launches[0]
    for b in BATCHES:
        assert rec.shapes_at(b) == [(b, sum(sizes)), (b,)]
        assert [harness.value(g, b) for g in launch.grid] == [sum(_cdiv(s, block_p) for s in sizes), b, 1]
        assert [harness.value(s, b) for s in launch.scalars] == (
            [c for _, c, _, _ in teachers] + [h for _, _, h, _ in teachers] + [w for _, _, _, w in teachers])
    _check_ptx(launch, inputs=12, scalars=18, outputs=2)


@pytest.mark.parametrize("case", CASES, ids=[f"trt{r}-{p}" for r, p in CASES])
def test_head_blur_plugin_is_created_from_the_parser_fields(built: dict, case: tuple[str, str]) -> None:
    (res,) = _results(built, case, HEAD_BLUR_OP)
    _check_common(res)
    attrs = {a.name: helper.get_attribute_value(a) for a in res.node.attribute}
    # Only the declared fields, in declaration order, as the parser converts them.
    assert res.fields == [("sigma", "FLOAT32", [pytest.approx(attrs["sigma"])]),
                          ("level_sizes", "INT32", list(attrs["level_sizes"])),
                          ("height", "INT32", [attrs["height"]]), ("width", "INT32", [attrs["width"]])]
    rec = res.record
    assert rec.tactics == [1] and len(rec.launches) == 1
    launch = rec.launches[0]
    tile = anomaly_head.blur_config(attrs["sigma"])["TILE"]
    levels = list(attrs["level_sizes"])
    for b in BATCHES:
        assert rec.shapes_at(b) == [(b, attrs["height"], attrs["width"]), (b,)]
        assert [harness.value(g, b) for g in launch.grid] == [
            _cdiv(attrs["height"], tile) * _cdiv(attrs["width"], tile), b, 1]
        assert [harness.value(s, b) for s in launch.scalars] == levels[0::2] + levels[1::2] + [
            attrs["height"], attrs["width"]]
    _check_ptx(launch, inputs=1, scalars=14, outputs=2)


@pytest.mark.parametrize("release", RELEASES)
def test_registration_declares_the_parser_fields(packages: dict[str, Path], release: str) -> None:
    with harness.nvidia_plugin_package(packages[release]) as (trt, trtp):
        assert register_plugins(TARGET) == [f"{DOMAIN}::{op}" for op in (SS2D_OP, HEAD_COSINE_OP, HEAD_BLUR_OP)]
        registry = trt.get_plugin_registry()
        declared = {op: [(f.name, f.type.name) for f in registry.get_creator(op, "1", DOMAIN).field_names]
                    for op in (SS2D_OP, HEAD_COSINE_OP, HEAD_BLUR_OP)}
        assert declared == {SS2D_OP: [], HEAD_COSINE_OP: [],
                            HEAD_BLUR_OP: [("sigma", "FLOAT32"), ("level_sizes", "INT32"), ("height", "INT32"),
                                           ("width", "INT32")]}
        assert all(getattr(trtp.op.pdd, op).aot_impl_func is not None for op in declared)


@pytest.mark.parametrize("release", RELEASES)
def test_register_plugins_again_after_a_failure_reports_the_real_error(
        packages: dict[str, Path], release: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with harness.nvidia_plugin_package(packages[release]) as (_, trtp):
        real = trtp.aot_impl

        def failing(plugin_id: str) -> Iterator:
            if plugin_id.endswith(HEAD_COSINE_OP):
                raise ValueError("injected failure at HeadCosine's aot_impl")
            return real(plugin_id)

        monkeypatch.setattr(trtp, "aot_impl", failing)
        with pytest.raises(ValueError, match="injected failure"):
            register_plugins(TARGET)
        with pytest.raises(ValueError, match="injected failure"):  # the same error, not "already has a definition"
            register_plugins(TARGET)
        monkeypatch.setattr(trtp, "aot_impl", real)
        register_plugins(TARGET)
        assert all(getattr(trtp.op.pdd, op).aot_impl_func is not None
                   for op in (SS2D_OP, HEAD_COSINE_OP, HEAD_BLUR_OP))
        register_plugins(TARGET)  # and once more when complete


def test_a_graph_built_for_the_other_precision_matches_no_combination(built: dict) -> None:
    """The filter is real: the fp16 scan's combination is not the fp32 one."""
    for release in RELEASES:
        fp32 = _results(built, (release, "fp32"), SS2D_OP)[0].record
        fp16 = _results(built, (release, "fp16"), SS2D_OP)[0].record
        names = [[[(t.name, f.name) for t, f in c] for c in r.combinations] for r in (fp32, fp16)]
        assert names[0] == names[1] and len(names[0]) == 2 and fp32.matching != fp16.matching
