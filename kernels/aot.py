"""Ahead-of-time compilation of the Triton kernels to PTX (and CUBIN), with no GPU present.

Each kernel variant (a *tactic*: strategy, d_state, dtype) becomes an :class:`AotKernel` record holding
the launch contract a TensorRT AOT plugin needs:

- parameters in the order input pointers…, int32 scalars…, output pointers… (the kernels are written
  with exactly this order; tuple parameters are flattened in place);
- extra scalars int32 only: every float is a constexpr baked into the PTX, or lives in a tensor;
- no global or profile scratch (Triton ≥ 3.3 appends one pointer parameter for each; the launcher passes
  null for both, which is safe only when their sizes are zero);
- shared memory within the target's per-block limit (227 KB on sm_90);
- the grid as three expressions over the int32 parameters and ``batch``, block = 32·num_warps threads;
- PTX the target's driver can load: a :class:`KernelTarget` names the compute capability and the highest
  PTX ISA the deployment driver accepts (driver 580 / CUDA 13.0: 9.0), and the PTX ``.version`` is capped
  to it (Triton 3.8 emits 8.8 by default, 3.9 emits 9.4). For capability 9.0 Triton emits ``sm_90a`` code,
  which runs on compute capability 9.0 only.

Example::

    python -m kernels.aot --out build/aot --arch sm_90 --ptx-isa 9.0   # one .ptx per tactic + contracts.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import triton
    from triton.backends.compiler import GPUTarget
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kernels.aot needs Triton: pip install 'triton>=3.2' (or pip install -e '.[gpu]')") from exc

from kernels import anomaly_head, selective_scan
from kernels.target import (
    DEFAULT_TARGET,
    SM90_MAX_SHARED,
    KernelTarget,
    TargetError,
    cuda_to_ptx_isa,
    driver_ptx_isa,
    parse_arch,
    parse_ptx_isa,
    resolve_target,
    version_text,
)

__all__ = [
    "DEFAULT_TARGET",
    "SM90_MAX_SHARED",
    "AotKernel",
    "KernelTarget",
    "Param",
    "Tactic",
    "TargetError",
    "anomaly_head_tactics",
    "check_contract",
    "compile_all",
    "compile_tactic",
    "cuda_to_ptx_isa",
    "driver_ptx_isa",
    "eval_grid",
    "make_ast_source",
    "parse_arch",
    "parse_ptx_isa",
    "ptx_entry_params",
    "ptx_isa_of",
    "resolve_target",
    "ss2d_tactics",
]

_HIDDEN_MAX = 2  # global scratch + profile scratch pointers appended by Triton ≥ 3.3
_ROLES = ("input", "scalar", "output")
_OPTIONS = ("num_warps", "num_stages")


def ptx_isa_of(ptx: str) -> int:
    """The ``.version`` of a PTX text as major·10 + minor."""
    m = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, flags=re.MULTILINE)
    if m is None:
        raise ValueError("no .version directive in the PTX")
    return int(m.group(1)) * 10 + int(m.group(2))


@dataclass(frozen=True)
class Param:
    """One flattened kernel parameter: name, Triton type ('*fp16', '*fp32', 'i32') and role."""

    name: str
    type: str
    role: str


@dataclass(frozen=True)
class Tactic:
    """A kernel variant to compile: the Triton signature (tuples allowed), constexprs and launch grid."""

    name: str
    kernel: Any
    signature: dict[str, str | tuple[str, ...]]
    roles: dict[str, str]
    constexprs: dict[str, int | float | bool]
    options: dict[str, int]
    grid: tuple[str, str, str]

    def params(self) -> tuple[Param, ...]:
        """Runtime parameters in kernel order, tuples flattened as name[i]."""
        out = []
        for name, ty in self.signature.items():
            if isinstance(ty, tuple):
                out.extend(Param(f"{name}[{i}]", t, self.roles[name]) for i, t in enumerate(ty))
            else:
                out.append(Param(name, ty, self.roles[name]))
        return tuple(out)


@dataclass
class AotKernel:
    """The compiled tactic and its launch contract (see the module docstring)."""

    tactic: str
    name: str
    target: KernelTarget
    ptx: str
    cubin: bytes = field(repr=False)
    num_warps: int
    shared: int
    params: tuple[Param, ...]
    hidden_params: int
    grid: tuple[str, str, str]
    constexprs: dict[str, int | float | bool]
    global_scratch_size: int
    profile_scratch_size: int

    @property
    def block(self) -> tuple[int, int, int]:
        return (32 * self.num_warps, 1, 1)

    def contract(self) -> dict[str, Any]:
        """JSON-ready launch contract (everything but the PTX and CUBIN)."""
        rec = {k: v for k, v in asdict(self).items() if k not in ("ptx", "cubin", "target")}
        rec["params"] = [asdict(p) for p in self.params]
        rec["block"] = list(self.block)
        rec["target"] = {"arch": self.target.sm, "ptx_isa": version_text(self.ptx_isa),
                         "triton": triton.__version__}
        return rec

    @property
    def ptx_isa(self) -> int:
        return ptx_isa_of(self.ptx)


def _kernel(fn: Any) -> Any:
    """The JITFunction under any @triton.heuristics wrappers; refuses interpreter-decorated kernels."""
    while not isinstance(fn, triton.runtime.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(
            "AOT compilation needs compiler-backed kernels, but these were decorated for the interpreter: "
            "unset TRITON_INTERPRET before importing kernels.*"
        )
    return fn


def make_ast_source(fn: Any, signature: dict[str, Any], constexprs: dict[str, Any],
                    aligned: tuple[str, ...] = ()) -> Any:
    """ASTSource for ``fn`` across Triton versions.

    signature: runtime parameter -> type (a tuple of types for a tuple parameter); constexprs: name -> value;
    aligned: pointer parameters (or tuples of them) to mark 16-byte aligned. The full signature lists every
    parameter in order, constexprs typed 'constexpr'. Triton ≥ 3.3 (including 3.6 and 3.8) takes
    ``constexprs=`` and attributes keyed by parameter path; 3.2 took ``constants=`` and an AttrsDescriptor,
    which gets no alignment hints here.
    """
    fn = _kernel(fn)
    missing = [a for a in fn.arg_names if a not in signature and a not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or constexpr value for parameters {missing}")
    full = {a: "constexpr" if a in constexprs else signature[a] for a in fn.arg_names}
    accepted = inspect.signature(triton.compiler.ASTSource.__init__).parameters
    if "constexprs" in accepted:
        attrs: dict[tuple[int, ...], list[list[Any]]] = {}
        for name in aligned:
            i = fn.arg_names.index(name)
            ty = signature[name]
            paths = [(i, j) for j in range(len(ty))] if isinstance(ty, tuple) else [(i,)]
            attrs.update({p: [["tt.divisibility", 16]] for p in paths})
        return triton.compiler.ASTSource(fn, signature=full, constexprs=constexprs, attrs=attrs)
    if "constants" in accepted:
        return triton.compiler.ASTSource(fn, signature=full, constants=constexprs)
    raise RuntimeError(f"unsupported Triton {triton.__version__}: ASTSource takes neither constexprs nor constants")


def _tactic(name: str, kernel: Any, signature: dict[str, Any], roles: dict[str, str], cfg: dict[str, Any],
            grid: tuple[str, str, str]) -> Tactic:
    """Split a launch config into constexprs and compile options (num_warps, num_stages)."""
    options = {k: v for k, v in cfg.items() if k in _OPTIONS}
    constexprs = {k: v for k, v in cfg.items() if k not in _OPTIONS}
    return Tactic(name, kernel, signature, roles, constexprs, options, grid)


def ss2d_tactics(dtypes: tuple[str, ...] = ("fp16", "fp32"), d_states: tuple[int, ...] = (16, 1),
                 strategies: tuple[str, ...] = selective_scan.STRATEGIES) -> list[Tactic]:
    """Tactics of the fused SS2D scan: x, delta, B, C and out in ``dtype``; A, D, delta_bias fp32."""
    tactics = []
    for strategy in strategies:
        for n in d_states:
            for dt in dtypes:
                act = f"*{dt}"
                sig = {"x_ptr": act, "delta_ptr": act, "B_ptr": act, "C_ptr": act, "A_ptr": "*fp32",
                       "D_ptr": "*fp32", "bias_ptr": "*fp32", "dim": "i32", "height": "i32", "width": "i32",
                       "out_ptr": act}
                roles = {k: "input" for k in list(sig)[:7]} | {"dim": "scalar", "height": "scalar",
                                                               "width": "scalar", "out_ptr": "output"}
                cfg = {"N": n, **selective_scan.scan_config(strategy, n)}
                grid = (f"cdiv(dim, {cfg['BLOCK_D']})", "batch", "1")
                tactics.append(_tactic(f"ss2d_{strategy}_n{n}_{dt}", selective_scan._ss2d_kernel, sig, roles, cfg,
                                       grid))
    return tactics


def anomaly_head_tactics(dtypes: tuple[str, ...] = ("fp16", "fp32"), num_levels: int = 6,
                         sigma: float = 4.0) -> list[Tactic]:
    """Tactics of the two anomaly-head launches for ``num_levels`` (teacher, student) pairs.

    Launch 1 ``cosine``: feats (t0, s0, t1, s1, …) in ``dtype``, channels/heights/widths int32 per level,
    outputs the packed maps (batch, Σ H_l·W_l) fp32 (plugin workspace) and score (batch,) fp32.
    Launch 2 ``blur_max``: packed maps in, map (batch, height, width) fp32 and score out.
    """
    levels = range(num_levels)
    tiles = " + ".join(f"cdiv(heights[{i}] * widths[{i}], {anomaly_head.COSINE_CONFIG['BLOCK_P']})" for i in levels)
    ints = ("i32",) * num_levels
    tactics = []
    for dt in dtypes:
        sig = {"feats": (f"*{dt}",) * (2 * num_levels), "channels": ints, "heights": ints, "widths": ints,
               "cos_ptr": "*fp32", "score_ptr": "*fp32"}
        roles = {"feats": "input", "channels": "scalar", "heights": "scalar", "widths": "scalar",
                 "cos_ptr": "output", "score_ptr": "output"}
        cfg = {"NUM_LEVELS": num_levels, **anomaly_head.COSINE_CONFIG}
        tactics.append(_tactic(f"head_cosine_l{num_levels}_{dt}", anomaly_head._cosine_kernel, sig, roles, cfg,
                               (tiles, "batch", "1")))
    cfg = {"NUM_LEVELS": num_levels, **anomaly_head.blur_config(sigma)}
    sig = {"cos_ptr": "*fp32", "heights": ints, "widths": ints, "height": "i32", "width": "i32",
           "out_ptr": "*fp32", "score_ptr": "*fp32"}
    roles = {"cos_ptr": "input", "heights": "scalar", "widths": "scalar", "height": "scalar", "width": "scalar",
             "out_ptr": "output", "score_ptr": "output"}
    tile = cfg["TILE"]
    tactics.append(_tactic(f"head_blur_max_l{num_levels}_s{sigma:g}", anomaly_head._blur_max_kernel, sig, roles, cfg,
                           (f"cdiv(height, {tile}) * cdiv(width, {tile})", "batch", "1")))
    return tactics


def _compile(tactic: Tactic, target: KernelTarget, ptx_isa: int | None) -> Any:
    aligned = tuple(k for k, ty in tactic.signature.items()
                    if (ty[0] if isinstance(ty, tuple) else ty).startswith("*"))
    src = make_ast_source(tactic.kernel, tactic.signature, tactic.constexprs, aligned)
    options = dict(tactic.options, **({"ptx_version": ptx_isa} if ptx_isa is not None else {}))
    return triton.compile(src, target=GPUTarget("cuda", target.arch, 32), options=options)


def compile_tactic(tactic: Tactic, target: KernelTarget = DEFAULT_TARGET) -> AotKernel:
    """Compile one tactic for ``target`` (no GPU needed) and read back its launch contract.

    The PTX keeps Triton's own ISA when the target's driver accepts it; otherwise it is compiled again
    with Triton's ``ptx_version`` option set to the target's ISA (asking Triton for an ISA above what its
    bundled ptxas knows would fail the CUBIN step, so the cap only ever lowers it).
    """
    compiled = _compile(tactic, target, None)
    if ptx_isa_of(compiled.asm["ptx"]) > target.ptx_isa:
        compiled = _compile(tactic, target, target.ptx_isa)
    md = compiled.metadata
    params = tactic.params()
    ptx = compiled.asm["ptx"]
    return AotKernel(
        tactic=tactic.name, name=md.name, target=target, ptx=ptx,
        cubin=compiled.asm.get("cubin", b""), num_warps=md.num_warps, shared=md.shared, params=params,
        hidden_params=len(ptx_entry_params(ptx)) - len(params), grid=tactic.grid, constexprs=tactic.constexprs,
        global_scratch_size=getattr(md, "global_scratch_size", 0),
        profile_scratch_size=getattr(md, "profile_scratch_size", 0),
    )


def compile_all(target: KernelTarget = DEFAULT_TARGET) -> list[AotKernel]:
    """Every tactic of the SS2D scan and the anomaly head, compiled and checked against the contract."""
    kernels = [compile_tactic(t, target) for t in ss2d_tactics() + anomaly_head_tactics()]
    for k in kernels:
        problems = check_contract(k)
        if problems:
            raise RuntimeError(f"{k.tactic}: launch contract broken: {'; '.join(problems)}")
    return kernels


def ptx_entry_params(ptx: str) -> list[str]:
    """PTX types ('u64', 'u32', …) of the .entry parameters, in order."""
    m = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", ptx)
    if m is None:
        raise ValueError("no .entry in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def check_contract(kernel: AotKernel) -> list[str]:
    """Violations of the TensorRT AOT launch contract (empty when it holds)."""
    problems = []
    roles = [p.role for p in kernel.params]
    if roles != sorted(roles, key=_ROLES.index):
        problems.append(f"parameters must be inputs, then int32 scalars, then outputs; got roles {roles}")
    for p in kernel.params:
        pointer = p.type.startswith("*")
        if pointer != (p.role != "scalar"):
            problems.append(f"{p.name}: role {p.role} needs a {'scalar' if pointer else 'pointer'}, got {p.type}")
        if not pointer and p.type != "i32":
            problems.append(f"{p.name}: scalars must be i32, got {p.type}")
    ptx_types = ptx_entry_params(kernel.ptx)
    if not 0 <= kernel.hidden_params <= _HIDDEN_MAX:
        problems.append(f"PTX has {len(ptx_types)} parameters for {len(kernel.params)} declared")
    else:
        for p, ty in zip(kernel.params, ptx_types):
            want = ("u64",) if p.type.startswith("*") else ("u32", "s32", "b32")
            if ty not in want:
                problems.append(f"{p.name}: PTX parameter type .{ty}, expected one of {want}")
        if any(ty != "u64" for ty in ptx_types[len(kernel.params):]):
            problems.append(f"hidden PTX parameters must be scratch pointers, got {ptx_types[len(kernel.params):]}")
    if kernel.global_scratch_size or kernel.profile_scratch_size:
        problems.append(f"scratch needed (global {kernel.global_scratch_size} B, profile "
                        f"{kernel.profile_scratch_size} B): the plugin cannot provide it")
    t = kernel.target
    if kernel.shared > t.max_shared:
        problems.append(f"shared memory {kernel.shared} B exceeds {t.sm}'s {t.max_shared} B per block")
    isa = ptx_isa_of(kernel.ptx)
    if isa > t.ptx_isa:
        problems.append(f"PTX .version {version_text(isa)} is newer than the target driver accepts "
                        f"({t.ptx_isa_text})")
    found = re.search(r"^\s*\.target\s+(\w+)", kernel.ptx, flags=re.MULTILINE)
    if found is None or found.group(1) != t.sm:
        problems.append(f"PTX .target {found.group(1) if found else None}, expected {t.sm}")
    return problems


def eval_grid(grid: tuple[str, str, str], **sizes: int | tuple[int, ...]) -> tuple[int, int, int]:
    """Evaluate a contract grid for concrete sizes, e.g. eval_grid(k.grid, dim=192, batch=8)."""
    scope = {"cdiv": lambda a, b: -(-a // b), **sizes}
    return tuple(int(eval(expr, {"__builtins__": {}}, scope)) for expr in grid)  # our own expressions


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Compile the Triton kernels to PTX (no GPU needed).")
    ap.add_argument("--out", type=Path, default=Path("build/aot"), help="directory for <tactic>.ptx and contracts.json")
    ap.add_argument("--arch", help="compute capability, e.g. sm_90 (default: the visible GPU, else sm_90)")
    ap.add_argument("--ptx-isa", help="highest PTX ISA of the target driver, e.g. 9.0 (default: this driver's, "
                                      "else 9.0)")
    args = ap.parse_args(argv)
    target = resolve_target(args.arch, args.ptx_isa)
    args.out.mkdir(parents=True, exist_ok=True)
    kernels = compile_all(target)
    for k in kernels:
        (args.out / f"{k.tactic}.ptx").write_text(k.ptx)
    (args.out / "contracts.json").write_text(json.dumps([k.contract() for k in kernels], indent=1) + "\n")
    width = max(len(k.tactic) for k in kernels)
    print(f"target {target.describe()}, Triton {triton.__version__}")
    for k in kernels:
        print(f"{k.tactic:<{width}}  {k.name}  warps={k.num_warps}  shared={k.shared}  params={len(k.params)}"
              f"+{k.hidden_params}  PTX {version_text(k.ptx_isa)}  grid=({', '.join(k.grid)})")


if __name__ == "__main__":
    main()
