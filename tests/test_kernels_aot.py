"""AOT compilation of the Triton kernels to sm_90 PTX on CPU, and the TensorRT plugin launch contract.

Compiles every tactic once per session (a few tens of seconds cold, cached by Triton afterwards).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are decorated for the interpreter in this process; AOT needs TRITON_INTERPRET unset",
                allow_module_level=True)

import triton

from kernels import anomaly_head, aot, selective_scan

TACTICS = {t.name: t for t in aot.ss2d_tactics() + aot.anomaly_head_tactics()}
KERNEL_NAMES = {"ss2d_stepwise": "_ss2d_kernel", "ss2d_blockwise": "_ss2d_kernel", "head_cosine": "_cosine_kernel",
                "head_blur": "_blur_max_kernel"}


@pytest.fixture(scope="module")
def compiled() -> dict[str, aot.AotKernel]:
    return {name: aot.compile_tactic(t) for name, t in TACTICS.items()}


def test_tactics_cover_strategies_dtypes_and_both_launches() -> None:
    names = set(TACTICS)
    for strategy in selective_scan.STRATEGIES:
        for n in (16, 1):
            assert {f"ss2d_{strategy}_n{n}_fp16", f"ss2d_{strategy}_n{n}_fp32"} <= names
    assert {"head_cosine_l6_fp16", "head_cosine_l6_fp32", "head_blur_max_l6_s4"} <= names


@pytest.mark.parametrize("tactic", list(TACTICS))
def test_contract_holds(compiled: dict[str, aot.AotKernel], tactic: str) -> None:
    k = compiled[tactic]
    assert aot.check_contract(k) == []
    assert k.global_scratch_size == 0 and k.profile_scratch_size == 0
    assert 0 <= k.shared <= aot.SM90_MAX_SHARED
    assert k.target == aot.DEFAULT_TARGET and ".target sm_90a" in k.ptx and k.cubin
    assert k.ptx_isa <= aot.DEFAULT_TARGET.ptx_isa
    assert k.name == KERNEL_NAMES[tactic.split("_")[0] + "_" + tactic.split("_")[1]]
    assert k.block == (32 * k.num_warps, 1, 1) and k.num_warps == TACTICS[tactic].options["num_warps"]
    # Order read back from the PTX entry: pointers (u64) for inputs, u32 for scalars, u64 for outputs,
    # then only the hidden scratch pointers.
    ptx_types = aot.ptx_entry_params(k.ptx)
    expected = ["u64" if p.type.startswith("*") else "u32" for p in k.params]
    assert ptx_types[: len(k.params)] == expected
    assert ptx_types[len(k.params):] == ["u64"] * k.hidden_params
    roles = [p.role for p in k.params]
    assert roles == sorted(roles, key=("input", "scalar", "output").index)
    assert all(p.type == "i32" for p in k.params if p.role == "scalar")


def test_ss2d_parameter_order(compiled: dict[str, aot.AotKernel]) -> None:
    k = compiled["ss2d_blockwise_n16_fp16"]
    assert [p.name for p in k.params] == ["x_ptr", "delta_ptr", "B_ptr", "C_ptr", "A_ptr", "D_ptr", "bias_ptr",
                                          "dim", "height", "width", "out_ptr"]
    assert [p.type for p in k.params][:4] == ["*fp16"] * 4 and k.params[-1].type == "*fp16"
    assert [p.type for p in k.params][4:7] == ["*fp32"] * 3


def test_head_parameter_order(compiled: dict[str, aot.AotKernel]) -> None:
    cos = [p.name for p in compiled["head_cosine_l6_fp16"].params]
    assert cos[:12] == [f"feats[{i}]" for i in range(12)]
    assert cos[12:30] == [f"{n}[{i}]" for n in ("channels", "heights", "widths") for i in range(6)]
    assert cos[30:] == ["cos_ptr", "score_ptr"]
    blur = [p.name for p in compiled["head_blur_max_l6_s4"].params]
    assert blur == ["cos_ptr", *[f"{n}[{i}]" for n in ("heights", "widths") for i in range(6)], "height", "width",
                    "out_ptr", "score_ptr"]


@pytest.mark.parametrize(("batch", "dim", "n"), [(1, 192, 16), (8, 1536, 16), (64, 200, 1)])
def test_ss2d_grid_matches_the_wrapper(batch: int, dim: int, n: int) -> None:
    for strategy in selective_scan.STRATEGIES:
        tactic = TACTICS[f"ss2d_{strategy}_n{n}_fp32"]
        block = selective_scan.scan_config(strategy, n)["BLOCK_D"]
        assert tactic.constexprs["BLOCK_D"] == block
        assert aot.eval_grid(tactic.grid, dim=dim, batch=batch, height=64, width=64) == (triton.cdiv(dim, block),
                                                                                          batch, 1)


def test_head_grids_match_the_wrapper() -> None:
    heights, widths = (64, 32, 16, 64, 32, 16), (64, 32, 16, 64, 32, 16)
    sizes: dict[str, Any] = {"heights": heights, "widths": widths, "height": 256, "width": 200, "batch": 8}
    cos = aot.eval_grid(TACTICS["head_cosine_l6_fp16"].grid, **sizes)
    block_p = anomaly_head.COSINE_CONFIG["BLOCK_P"]
    assert cos == (sum(triton.cdiv(h * w, block_p) for h, w in zip(heights, widths)), 8, 1)
    tile = anomaly_head.blur_config(4.0)["TILE"]
    assert aot.eval_grid(TACTICS["head_blur_max_l6_s4"].grid, **sizes) == (8 * triton.cdiv(200, tile), 8, 1)


def test_check_contract_reports_violations(compiled: dict[str, aot.AotKernel]) -> None:
    good = compiled["ss2d_stepwise_n1_fp32"]
    params = list(good.params)
    swapped = dataclasses.replace(good, params=(params[-1], *params[:-1]))
    assert any("inputs, then int32 scalars, then outputs" in p for p in aot.check_contract(swapped))
    floaty = dataclasses.replace(good, params=(*params[:7], aot.Param("dim", "fp32", "scalar"), *params[8:]))
    assert any("scalars must be i32" in p for p in aot.check_contract(floaty))
    scratch = dataclasses.replace(good, global_scratch_size=64)
    assert any("scratch" in p for p in aot.check_contract(scratch))
    big = dataclasses.replace(good, shared=aot.SM90_MAX_SHARED + 1)
    assert any("shared memory" in p for p in aot.check_contract(big))
    short = dataclasses.replace(good, params=tuple(params[:-1]), hidden_params=good.hidden_params + 1)
    assert aot.check_contract(short)
    newer = dataclasses.replace(good, ptx=re.sub(r"\.version \d+\.\d+", ".version 9.4", good.ptx))
    assert any("PTX .version 9.4 is newer than the target driver accepts (9.0)" in p
               for p in aot.check_contract(newer))
    other = dataclasses.replace(good, target=aot.KernelTarget(80, 90))
    assert any("expected sm_80" in p for p in aot.check_contract(other))


def test_ptx_isa_is_capped_to_the_target_driver() -> None:
    tactic = TACTICS["ss2d_blockwise_n1_fp32"]
    free = aot.compile_tactic(tactic, aot.KernelTarget(90, 99))  # no cap below Triton's own ISA
    capped = aot.compile_tactic(tactic, aot.KernelTarget(90, 84))
    assert capped.ptx_isa == 84 and re.search(r"^\.version 8\.4$", capped.ptx, re.MULTILINE)
    assert free.ptx_isa >= 84 and aot.check_contract(capped) == []
    assert aot.ptx_entry_params(capped.ptx) == aot.ptx_entry_params(free.ptx)
    assert capped.contract()["target"] == {"arch": "sm_90a", "ptx_isa": "8.4", "triton": triton.__version__}


def test_target_parsing_and_the_cuda_to_ptx_table() -> None:
    assert [aot.parse_arch(a) for a in ("sm_90a", "sm_90", "90", "9.0", 89, "sm_120")] == [90, 90, 90, 90, 89, 120]
    assert [aot.parse_ptx_isa(v) for v in ("9.0", "90", "8.8", 84)] == [90, 90, 88, 84]
    for bad in ("hopper", "sm_9", "9"):
        with pytest.raises(aot.TargetError, match="--arch"):
            aot.parse_arch(bad)
    with pytest.raises(aot.TargetError, match="--ptx-isa"):
        aot.parse_ptx_isa("nine")
    # NVIDIA's PTX ISA release notes: the ISA each CUDA release introduced.
    table = {(11, 8): 78, (12, 0): 80, (12, 4): 84, (12, 5): 85, (12, 6): 85, (12, 8): 87, (12, 9): 88,
             (13, 0): 90, (13, 1): 91}
    assert {cv: aot.cuda_to_ptx_isa(*cv) for cv in table} == table
    assert aot.KernelTarget(90, 90).sm == "sm_90a" and aot.KernelTarget(80, 90).sm == "sm_80"
    assert aot.KernelTarget(90, 88).describe() == "sm_90a, PTX ISA <= 8.8"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU defaults of a CPU dry run")
def test_resolve_target_without_a_gpu_uses_the_deployment_default() -> None:
    assert aot.resolve_target() == aot.DEFAULT_TARGET
    assert aot.resolve_target("sm_89", "8.4") == aot.KernelTarget(89, 84)
    with pytest.raises(aot.TargetError, match="no CUDA GPU"):
        aot.resolve_target(require_gpu=True)


def test_ptx_entry_params_parses_the_signature() -> None:
    ptx = """.visible .entry k(
        .param .u64 .ptr .global .align 1 k_param_0,
        .param .u32 k_param_1,
        .param .u64 .ptr .global .align 1 k_param_2
    )
    { ret; }"""
    assert aot.ptx_entry_params(ptx) == ["u64", "u32", "u64"]
    with pytest.raises(ValueError, match=r"no \.entry"):
        aot.ptx_entry_params("// empty")


class _FakeSource:
    """Records how make_ast_source called ASTSource."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def test_make_ast_source_speaks_both_signature_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    tactic = TACTICS["ss2d_blockwise_n16_fp16"]
    kernel = tactic.kernel

    class New(_FakeSource):  # Triton ≥ 3.3, as 3.6 and 3.8
        def __init__(self, fn: Any, signature: Any, constexprs: Any = None, attrs: Any = None) -> None:
            super().__init__(signature=signature, constexprs=constexprs, attrs=attrs)

    class Old(_FakeSource):  # Triton 3.2
        def __init__(self, fn: Any, signature: Any, constants: Any = None, attrs: Any = None) -> None:
            super().__init__(signature=signature, constants=constants, attrs=attrs)

    monkeypatch.setattr(triton.compiler, "ASTSource", New)
    src = aot.make_ast_source(kernel, tactic.signature, tactic.constexprs, aligned=("x_ptr", "out_ptr"))
    assert list(src.kwargs["signature"]) == kernel.arg_names
    assert src.kwargs["signature"]["BLOCK_D"] == "constexpr" and src.kwargs["signature"]["dim"] == "i32"
    assert src.kwargs["constexprs"] == tactic.constexprs
    assert src.kwargs["attrs"] == {(0,): [["tt.divisibility", 16]], (10,): [["tt.divisibility", 16]]}
    monkeypatch.setattr(triton.compiler, "ASTSource", Old)
    src = aot.make_ast_source(kernel, tactic.signature, tactic.constexprs)
    assert list(src.kwargs["signature"]) == kernel.arg_names and src.kwargs["constants"] == tactic.constexprs

    tuples = TACTICS["head_cosine_l6_fp16"]
    monkeypatch.setattr(triton.compiler, "ASTSource", New)
    src = aot.make_ast_source(tuples.kernel, tuples.signature, tuples.constexprs, aligned=("feats",))
    assert set(src.kwargs["attrs"]) == {(0, j) for j in range(12)}
    with pytest.raises(ValueError, match="no type or constexpr value"):
        aot.make_ast_source(kernel, {"x_ptr": "*fp16"}, {})


def test_cli_writes_ptx_and_contracts(tmp_path: Path, compiled: dict[str, aot.AotKernel]) -> None:
    aot.main(["--out", str(tmp_path), "--arch", "sm_90", "--ptx-isa", "9.0"])  # all in Triton's cache by now
    contracts = json.loads((tmp_path / "contracts.json").read_text())
    assert {c["tactic"] for c in contracts} == set(TACTICS)
    for c in contracts:
        assert (tmp_path / f"{c['tactic']}.ptx").read_text() == compiled[c["tactic"]].ptx
        assert c["global_scratch_size"] == 0 and c["profile_scratch_size"] == 0
        assert [p["role"] for p in c["params"]][-1] == "output"
