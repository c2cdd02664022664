"""Compile every Triton kernel ahead of time for NVIDIA GPUs, without a GPU, and report what
the hardware would run: registers, spilled bytes, shared memory and tensor-core
instructions per kernel.

    python -m sparselora.ops.triton.compile_report              # sm_80 and sm_90, a table
    python -m sparselora.ops.triton.compile_report --json out.json

Triton's own compiler lowers each kernel to PTX and a cubin; Triton's bundled ``ptxas -v``
reports registers and spills. Needs Triton, not a GPU, and must run without
``TRITON_INTERPRET=1`` (the interpreter replaces the kernels by Python functions).
"""

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["KernelReport", "SHARED_LIMIT", "cases", "compile_case", "report", "main"]

# the most shared memory one block may use (bytes): A100 (sm_80) and H100/H200 (sm_90)
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class KernelReport:
    name: str  # kernel and configuration
    arch: int  # 80 or 90
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes per block
    tensor_core: bool  # mma / wgmma instructions in the PTX
    needs_tensor_core: bool  # a GEMM whose operands are fp16/bf16


def cases() -> list[tuple[str, object, dict, dict, bool, int]]:
    """(name, kernel, signature, constexprs, needs tensor cores, warps) for every kernel in its hot configurations."""
    from . import histogram, rows, select, weight

    # sizes as a launch passes them: each dimension and stride below 2^31 (numels may pass it)
    size = {"rows": "i32", "cols": "i32", "r": "i32"}
    strides = {"stride_ar": "i32", "stride_ac": "i32", "stride_br": "i32", "stride_bc": "i32", "scaling": "fp32"}
    out = []
    for dtype, native in (("bf16", True), ("fp16", True), ("fp32", False)):
        for r_block in ((16, 64) if native else (16,)):
            sig = {"w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                   "keep_ptr": "*u8", "norms_ptr": "*fp32", **size, **strides}
            # the effective weight of training, and (rank slice 16) the merge with its report's norms
            for norms in ((False, True) if r_block == 16 and dtype != "fp16" else (False,)):
                const = {"HAS_W": True, "HAS_MASK": True, "STORE": True, "NORMS": norms, "NATIVE_DOT": native,
                         "R_BLOCK": r_block, "BLOCK_M": weight.GPU_TILE, "BLOCK_N": weight.GPU_TILE}
                name = f"lora_weight {dtype} r_block={r_block}" + (" + norms" if norms else "")
                out.append((name, weight._lora_weight_kernel, {**sig, **{k: "constexpr" for k in const}}, const,
                            native))
    for in_place in (True, False):
        const = {"IN_PLACE": in_place, "BLOCK": weight.MASK_BLOCK}
        out.append((f"mask {'in place' if in_place else 'copy'} bf16", weight._mask_kernel,
                    {"src_ptr": "*bf16", "dst_ptr": "*bf16", "keep_ptr": "*u8", "n": "i64",
                     **{k: "constexpr" for k in const}}, const, False))
    for dtype in ("fp32", "bf16"):
        table = {"first_ptr": f"*{dtype}", "offsets_ptr": "*i64", "numels_ptr": "*i64"}
        const = {"ABSOLUTE": True, "BLOCK": histogram.BLOCK}
        out.append((f"histogram {dtype}", histogram._histogram_kernel,
                    {**table, "counts_ptr": "*i64", "high": "i32", **{k: "constexpr" for k in const}}, const, False))
        out.append((f"write mask {dtype}", select._write_mask_kernel,
                    {**table, "first_keep_ptr": "*u8", "keep_offsets_ptr": "*i64", "ties_ptr": "*i32", "blocks": "i32",
                     "cut_flipped": "i32", "cut": "i32", **{k: "constexpr" for k in const}}, const, False))
    const = {"BLOCK": histogram.BLOCK}
    out.append(("settle ties", select._settle_ties_kernel,
                {"numels_ptr": "*i64", "first_keep_ptr": "*u8", "keep_offsets_ptr": "*i64", "ties_ptr": "*i32",
                 "ties_before_ptr": "*i64",
                 "blocks": "i32", "ties_left": "i64", **{k: "constexpr" for k in const}}, const, False))
    for m_pad in (4, 8, 16):
        const = {"M_PAD": m_pad, "ABSOLUTE": True, "BLOCK": rows.nm_block(m_pad)}
        out.append((f"N:M m={m_pad} fp32", rows._nm_kernel,
                    {"x_ptr": "*fp32", "keep_ptr": "*u8", "bad_ptr": "*i64", "runs": "i64", "m": "i32",
                     "prune": "i32", **{k: "constexpr" for k in const}}, const, False))
    for prior in (False, True):
        const = {"ABSOLUTE": True, "HAS_PRIOR": prior, "BLOCK": rows.ROW_BLOCK}
        out.append((f"row top-k fp32{' prior' if prior else ''}", rows._row_kernel,
                    {"x_ptr": "*fp32", "prior_ptr": "*u8", "keep_ptr": "*u8", "bad_ptr": "*i64", "cols": "i64",
                     "k": "i32", **{k: "constexpr" for k in const}}, const, False))
    warps = {weight._lora_weight_kernel: weight.WARPS}  # as each kernel is launched; Triton's default is 4
    return [(*case, warps.get(case[1], 4)) for case in out]


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from the first bundled ptxas that takes this PTX."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    tools = sorted(bin_dir.glob("ptxas*"), key=lambda p: p.name != "ptxas-blackwell")
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        errors = []
        for tool in tools:
            run = subprocess.run([str(tool), "-v", "--gpu-name", gpu, str(src), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                text = run.stderr + run.stdout
                regs = re.search(r"Used (\d+) registers", text)
                spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))
            errors.append(f"{tool.name}: {run.stderr.strip()[:200]}")
    raise RuntimeError("no bundled ptxas accepted the PTX: " + "; ".join(errors))


def _source(ast_source, kernel, signature: dict, constexprs: dict):
    """The kernel as Triton's compiler takes it: by argument name with the constexprs in the
    signature (Triton >= 3.2), or by argument index without them (Triton 3.0 and 3.1)."""
    if "constexprs" in inspect.signature(ast_source.__init__).parameters:
        return ast_source(kernel, signature, constexprs=constexprs)
    index = kernel.arg_names.index
    return ast_source(kernel, {index(k): v for k, v in signature.items() if v != "constexpr"},
                      constants={index(k): v for k, v in constexprs.items()})


def compile_case(name: str, kernel, signature: dict, constexprs: dict, needs_tc: bool, warps: int,
                 arch: int) -> KernelReport:
    """Compile one kernel configuration for ``sm_<arch>`` and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(_source(ASTSource, kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    regs, stores, loads = _ptxas_usage(ptx, arch)
    tensor_core = bool(re.search(r"\b(wgmma|mma)\.", ptx))
    return KernelReport(name, arch, regs, stores, loads, int(compiled.metadata.shared), tensor_core, needs_tc)


def report(archs=(80, 90)) -> list[KernelReport]:
    """Every kernel configuration compiled for every architecture in ``archs``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python functions")
    return [compile_case(*case, arch) for arch in archs for case in cases()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability: 80 (A100) or 90 (H100/H200); default both")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    reports = report(tuple(args.arch or sorted(SHARED_LIMIT)))
    print(f"{'kernel':<28} {'sm':>3} {'regs':>5} {'spills':>7} {'shared':>8} tensor cores")
    for r in reports:
        cores = "yes" if r.tensor_core else ("MISSING" if r.needs_tensor_core else "-")
        print(f"{r.name:<28} {r.arch:>3} {r.registers:>5} {r.spill_stores + r.spill_loads:>6}B {r.shared:>7}B {cores}")
    if args.json:
        from ...io.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps([asdict(r) for r in reports], indent=2) + "\n").encode())
    bad = [r for r in reports if r.spill_stores or r.shared > SHARED_LIMIT[r.arch] or (r.needs_tensor_core and not r.tensor_core)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
