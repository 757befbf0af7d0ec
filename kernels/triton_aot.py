"""Ahead-of-time compilation of this package's Triton kernels for NVIDIA GPUs, on any machine.

Triton ships its own ``ptxas``, so a kernel compiles to a cubin for a named architecture
without a GPU. That answers, before any GPU run, what the interpreter cannot: every autotuning
configuration compiles; the inner products lower to tensor-core MMA instructions of the
intended types (int8 x int8 -> int32 for the 8-bit levels, fp16 x fp16 -> fp32 for 9-16 bits);
and each configuration's shared memory and registers against the architecture's per-block
limits (the autotuner skips a configuration that does not fit at launch, so at least one must).
Speed and on-device numerics still need a GPU (``benchmarks/gpu_check.sh``).

    python -m muppet_fx.kernels.triton_aot [--arch sm_80 sm_89 sm_90] [--ones sm_90] [--json FILE]

Must run without ``TRITON_INTERPRET`` (interpreted kernels have no compiler behind them).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

__all__ = ["ARCHS", "Variant", "variants", "unit_variants", "compile_variant", "check_all", "jit_function",
           "launch_configs", "unspecialised"]

# Opt-in shared memory per block (bytes) and a GPU of each architecture.
ARCHS = {"sm_80": (80, 166912, "A100"), "sm_89": (89, 101376, "L4 / RTX 4090"),
         "sm_90": (90, 232448, "H100 / H200")}
MMA = {"int8": re.compile(r"mma\S*\.s32\.s8\.s8"), "fp16": re.compile(r"mma\S*\.f32\.f16\.f16")}


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel, its mode (the constexpr flags and pointer types a launcher
    passes), one autotuning configuration."""
    kernel: str
    mode: str
    config: str
    pointers: tuple  # (argument name, Triton type) for every pointer argument
    constexprs: tuple  # (name, value)
    unit: tuple  # integer arguments equal to 1 in the usual launch (Triton specialises them)
    num_warps: int
    num_stages: int
    mma: str | None  # "int8", "fp16" or None (no product)


def _kernels():
    from . import batch_norm_triton as bn
    from . import conv_triton, gemm_triton, quantise, quantise_many, relu_triton

    return {"scaled_mm": gemm_triton._scaled_mm_kernel, "conv": conv_triton._conv_kernel,
            "conv_grad_weight": conv_triton._conv_grad_weight_kernel, "sum_scale": conv_triton._sum_scale_kernel,
            "absmax": quantise._absmax_kernel, "quantise": quantise._quantise_kernel,
            "scale": quantise._scale_kernel, "bn_sums": bn._sums_kernel, "bn_stats": bn._stats_kernel,
            "bn_apply": bn._apply_kernel, "bn_grad_sums": bn._grad_sums_kernel, "bn_factors": bn._factors_kernel,
            "bn_grad_apply": bn._grad_apply_kernel, "relu_mask": relu_triton._relu_mask_kernel,
            "relu_mask_backward": relu_triton._mask_backward_kernel,
            "many_absmax": quantise_many._many_absmax_kernel, "many_quantise": quantise_many._many_quantise_kernel}


# float32 scalar arguments (every other non-pointer, non-constexpr argument is an integer)
FLOAT_ARGS = {"fmax", "eps_hi", "eps_lo", "mom_hi", "mom_lo"}


def _modes():
    """(kernel, mode, pointer types, constexpr flags, unit strides, MMA type) as the launchers
    call them."""
    def ops(t):
        return {"int8": "*i8", "fp16": "*i16"}[t]

    def acc(t):
        return {"int8": "*i32", "fp16": "*fp32"}[t]

    for t in ("int8", "fp16"):
        mm = {"a_ptr": ops(t), "b_ptr": ops(t), "c_ptr": "*fp32", "bias_ptr": "*fp32", "sa_ptr": "*i32",
              "sb_ptr": "*i32", "amax_ptr": "*i32"}
        flags = dict(HAS_BIAS=True, PER_COL=False, RAW_INT=False, USE_FP16=t == "fp16", WRITE_AMAX=True)
        # X W^T: row-major X, W read transposed, row-major output
        yield "scaled_mm", f"{t} bias+amax", mm, flags, ("stride_ak", "stride_bk", "stride_cn"), t
        for transposed in (False, True):  # channels-last operands: channel strides are 1
            for stride in (1, 2):  # compile-time constants (SH, SW)
                yield ("conv", f"{t} {'grad-input' if transposed else 'forward'}, stride {stride}",
                       {"a_ptr": ops(t), "w_ptr": ops(t), "c_ptr": "*fp32", "sa_ptr": "*i32", "sb_ptr": "*i32",
                        "bias_ptr": "*fp32", "amax_ptr": "*i32"},
                       dict(TRANSPOSED=transposed, USE_FP16=t == "fp16", SCALED=True, HAS_BIAS=not transposed,
                            WRITE_AMAX=not transposed, SH=stride, SW=stride),
                       ("s_ac", "s_wk", "s_cc"), t)  # grad-input takes its weight K-major too
        yield ("conv_grad_weight", t, {"g_ptr": ops(t), "x_ptr": ops(t), "c_ptr": acc(t)},
               dict(USE_FP16=t == "fp16", FP16_MMA=False, SH=1, SW=1), ("s_gc", "s_xc"), t)
        yield ("sum_scale", f"{acc(t)[1:]} partials", {"part_ptr": acc(t), "out_ptr": "*fp32", "sa_ptr": "*i32",
                                                       "sb_ptr": "*i32"},
               dict(INT_SUM=t == "int8", BLOCK=1024), ("s_ow",), None)
    # the 8-bit weight gradient on FP16 MMA (conv_triton.GRAD_WEIGHT_MMA = "fp16")
    yield ("conv_grad_weight", "fp16 MMA, int8 operands", {"g_ptr": "*i8", "x_ptr": "*i8", "c_ptr": "*i32"},
           dict(USE_FP16=False, FP16_MMA=True, SH=1, SW=1), ("s_gc", "s_xc"), "fp16")
    yield ("scaled_mm", "int8 raw int32", {**mm, "a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*i32"},
           dict(HAS_BIAS=False, PER_COL=False, RAW_INT=True, USE_FP16=False, WRITE_AMAX=False),
           ("stride_ak", "stride_bn", "stride_cn"), "int8")
    yield "absmax", "fp32", {"x_ptr": "*fp32", "slot_ptr": "*i32"}, dict(BLOCK=1024), (), None
    for m in ("i8", "i16"):  # routes.dequantise: mantissas times 2**-s (the weight gradient has its own kernel)
        yield ("scale", f"{m} -> fp32", {"acc_ptr": f"*{m}", "out_ptr": "*fp32", "sa_ptr": "*i32", "sb_ptr": "*i32"},
               dict(HAS_SB=False, BLOCK=1024), (), None)
    quantise_ptrs = {"x_ptr": "*fp32", "noise_ptr": "*fp32", "seed_ptr": "*i64", "slot_ptr": "*i32", "s_ptr": "*i32",
                     "q_ptr": "*fp32"}
    quantise_flags = dict(STOCHASTIC=True, NOISE_FROM_PTR=False, SEED_FROM_PTR=True, MARK_NONFINITE=True,
                          WRITE_M=True, WRITE_Q=True, BLOCK=1024)
    for m in ("i8", "i16"):
        yield "quantise", f"stochastic -> {m}", {**quantise_ptrs, "m_ptr": f"*{m}"}, quantise_flags, (), None
    # a layer output only its batch norm reads: the mantissas alone
    yield ("quantise", "stochastic -> i8, mantissas only", {**quantise_ptrs, "m_ptr": "*i8"},
           {**quantise_flags, "WRITE_Q": False}, (), None)
    # 2 bits: qmax = 1; one-element rows: L = 1 (integers Triton would specialise to constants)
    yield "quantise", "2-bit, 1-element rows", {**quantise_ptrs, "m_ptr": "*i8"}, quantise_flags, ("qmax", "L"), None
    many = {"flat_ptr": "*fp32", "table_ptr": "*i64", "slot_ptr": "*i32"}
    yield "many_absmax", "fp32", many, dict(BLOCK=1024), (), None
    yield ("many_quantise", "stochastic", {**many, "seed_ptr": "*i64"}, dict(STOCHASTIC=True, BLOCK=1024), (),
           None)
    yield from _batch_norm_modes()
    relu = {"a_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32", "mask_ptr": "*u8", "amax_ptr": "*i32"}
    yield "relu_mask", "sum", relu, dict(ADD=True, BLOCK=1024), (), None
    yield ("relu_mask_backward", "fp32", {"g_ptr": "*fp32", "mask_ptr": "*u8", "out_ptr": "*fp32"}, dict(BLOCK=1024),
           (), None)


def _batch_norm_modes():
    """``batch_norm_triton``'s kernels, with the tiles of a 64-channel map."""
    f32, tiles = "*fp32", dict(BLOCK_R=64, BLOCK_C=64)
    for m in ("i8", "i16"):
        yield "bn_sums", m, {"m_ptr": f"*{m}", "part_ptr": "*i64"}, dict(WIDE=m == "i16", **tiles), (), None
        yield ("bn_apply", f"{m}, ReLU", {"m_ptr": f"*{m}", "ab_ptr": f32, "y_ptr": f32, "mask_ptr": "*u8",
                                          "amax_ptr": "*i32"}, dict(RELU=True, **tiles), (), None)
    yield ("bn_stats", "affine, running", {"part_ptr": "*i64", "s_ptr": "*i32", "amax_ptr": "*i32", **{p: f32 for p in (
        "w_ptr", "b_ptr", "rm_ptr", "rv_ptr", "stats_ptr", "ab_ptr")}},
        dict(HAS_W=True, HAS_B=True, RUNNING=True, BLOCK_C=64), (), None)
    grads = {"g_ptr": f32, "m_ptr": "*i8", "mask_ptr": "*u8", "s_ptr": "*i32", "mean_ptr": f32}
    yield "bn_grad_sums", "i8, ReLU mask", {**grads, "part_ptr": "*fp64"}, dict(MASKED=True, **tiles), (), None
    yield ("bn_factors", "affine", {"part_ptr": "*fp64", "amax_ptr": "*i32", **{p: f32 for p in (
        "invstd_ptr", "w_ptr", "k_ptr", "gw_ptr", "gb_ptr")}},
           dict(HAS_W=True, BLOCK_C=64), (), None)
    yield ("bn_grad_apply", "i8, ReLU mask", {**grads, "k_ptr": f32, "gx_ptr": f32, "amax_ptr": "*i32"},
           dict(MASKED=True, **tiles), (), None)


def jit_function(kernel):
    """The ``JITFunction`` under a kernel's autotuner (and any other wrapper with ``.fn``)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def launch_configs(kernel, constexprs: dict) -> list:
    """The autotuning configurations a launch with these constexpr flags compiles: the kernel's
    own, after its ``early_config_prune`` as the autotuner applies it; ``[None]`` for a plain
    ``@triton.jit`` kernel (launch defaults)."""
    configs = getattr(kernel, "configs", None) or [None]
    prune = getattr(kernel, "early_config_prune", None)
    return list(prune(configs, {}, **constexprs)) if prune is not None else configs


def unspecialised(fn) -> set:
    """Names of the arguments a ``JITFunction`` marks ``do_not_specialize`` (by name or position)."""
    return {fn.arg_names[a] if isinstance(a, int) else a for a in (fn.do_not_specialize or ())}


def variants() -> list[Variant]:
    """Every (kernel, mode, autotuning configuration) the launchers can run."""
    kernels = _kernels()
    out = []
    for name, mode, pointers, flags, unit, mma in _modes():
        for c in launch_configs(kernels[name], flags):
            meta = dict(c.kwargs) if c is not None else {}
            label = ",".join(f"{v}" for v in meta.values()) or "default"
            warps, stages = (c.num_warps, c.num_stages) if c is not None else (4, 3)
            out.append(Variant(name, mode, f"{label} w{warps} s{stages}", tuple(pointers.items()),
                               tuple({**flags, **meta}.items()), unit, warps, stages, mma))
    return out


def unit_variants() -> list[Variant]:
    """Each kernel and mode (first configuration) once more for every integer argument Triton
    would specialise, with that argument equal to 1: a size or stride of 1 (a batch of one, a
    single channel, a 2-bit level's qmax) turns into a constant at launch, and code that
    treats it as a tensor fails to compile there, while the interpreter never specialises."""
    out, seen, kernels = [], set(), _kernels()
    for v in variants():
        if (v.kernel, v.mode) in seen:
            continue
        seen.add((v.kernel, v.mode))
        fn, fixed = jit_function(kernels[v.kernel]), {*dict(v.pointers), *dict(v.constexprs), *v.unit, *FLOAT_ARGS}
        out += [replace(v, mode=f"{v.mode}, {a} = 1", unit=(*v.unit, a))
                for a in fn.arg_names if a not in fixed and a not in unspecialised(fn)]
    return out


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _resources(cubin: bytes, ptx: str) -> dict:
    """Registers and static shared memory of the cubin (cuobjdump), spill stores of the PTX
    (ptxas --verbose, which tells spills apart from a plain stack frame)."""
    with tempfile.TemporaryDirectory() as d:
        cub, src = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cub, "wb") as f:
            f.write(cubin)
        with open(src, "w") as f:
            f.write(ptx)
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", cub], capture_output=True,
                               text=True).stdout
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        verbose = subprocess.run([_bin("ptxas"), f"-arch={target}", "--verbose", src, "-o", os.path.join(d, "o")],
                                 capture_output=True, text=True).stderr
    res = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|SHARED):(\d+)", usage)}
    res["spill"] = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", verbose))
    return res


def compile_variant(v: Variant, arch: str) -> dict:
    """Compile ``v`` for ``arch`` (a key of :data:`ARCHS`); a dict of what was found."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc, smem_limit, _ = ARCHS[arch]
    fn = jit_function(_kernels()[v.kernel])
    # As at launch: an integer argument equal to 1 becomes a constant, unless the kernel marks it
    # do_not_specialize (by name or position).
    plain = unspecialised(fn)
    pointers, constexprs = dict(v.pointers), {**dict(v.constexprs), **{a: 1 for a in v.unit if a not in plain}}
    sig = {a: pointers.get(a) or ("constexpr" if a in constexprs else "fp32" if a in FLOAT_ARGS else "i32")
           for a in fn.arg_names}
    # Also as at launch: torch's allocations are 16-byte aligned and most sizes and strides of the
    # networks' layers are multiples of 16, which Triton specialises on (vector loads); arguments
    # marked do_not_specialize get no such attribute.
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a] not in ("constexpr", "fp32") and a not in plain}
    row = {**asdict(v), "arch": arch}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    except Exception as e:  # noqa: BLE001 (reported, not hidden: the row says why)
        return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    res = _resources(k.asm["cubin"], k.asm["ptx"])
    shared = k.metadata.shared + res.get("shared", 0)
    found = sorted({m.group(0) for m in re.finditer(r"\S*mma\S*\.(?:s32|f32)\.\S+", k.asm["ptx"])})
    return {**row, "ok": True, "error": None, "shared": shared, "fits": shared <= smem_limit,
            "regs": res.get("reg"), "spill_bytes": res["spill"],
            "mma": found, "mma_ok": v.mma is None or any(MMA[v.mma].search(x) for x in found),
            # global-to-shared asynchronous copies: the loads the software pipeliner overlaps with the MMAs
            "async_copies": len(re.findall(r"\bcp\.async\.c[ag]\b", k.asm["ptx"]))}


def _one(args):
    return compile_variant(*args)


def check_all(archs=("sm_80", "sm_90"), workers: int = 2, ones_arch: str | None = None) -> list[dict]:
    """Compile every variant for every architecture, ``workers`` processes at a time; with
    ``ones_arch``, also every :func:`unit_variants` for that architecture."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton_aot compiles real kernels: unset TRITON_INTERPRET first")
    import inspect

    from triton.compiler import ASTSource

    if not {"constexprs", "attrs"} <= set(inspect.signature(ASTSource).parameters):
        raise RuntimeError("triton_aot needs the ASTSource(fn, signature, constexprs, attrs) of Triton 3.3 or later")
    unknown = [a for a in (*archs, *([ones_arch] if ones_arch else [])) if a not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; valid choices: {list(ARCHS)}")
    jobs = [(v, a) for a in archs for v in variants()] + [(v, ones_arch) for v in (unit_variants() if ones_arch else [])]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_one, jobs))


def main() -> None:
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_89", "sm_90"], choices=list(ARCHS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write every row to this file")
    p.add_argument("--ones", metavar="ARCH", choices=list(ARCHS),
                   help="also compile, for ARCH, each kernel with each specialised integer argument equal to 1")
    args = p.parse_args()
    rows = check_all(tuple(args.arch), args.workers, args.ones)
    print(tabulate([[r["arch"], r["kernel"], r["mode"], r["config"], "yes" if r["ok"] else r["error"],
                     r.get("shared"), "yes" if r.get("fits") else "no", r.get("regs"), r.get("spill_bytes"),
                     " ".join(x.split(".")[0] for x in r.get("mma", [])) or "-", r.get("async_copies")]
                    for r in rows],
                   headers=["arch", "kernel", "mode", "config (blocks, warps, stages)", "compiles",
                            "shared B", "fits", "regs", "spill B", "mma", "async copies"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
