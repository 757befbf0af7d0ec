"""Low-precision kernels against FP32 and BF16, measured side by side in one run.

    python benchmarks/kernels.py [--threads 2] [--reps 5] [--batch 128] [--quick]

Table 1 (GEMMs): the im2col GEMM shapes of ResNet-18 (CIFAR stem, batch 128) for each distinct
convolution, forward (``cols @ W^T``), grad-input (``G @ W``, as its stride-1 convolution) and
grad-weight (``G^T @ cols``), plus 4096^3: FP32 ``torch.matmul``, BF16 ``torch.matmul``,
``torch._int_mm`` and our exact scaled integer GEMM (``scaled_int_matmul``: float32 output,
scale applied) at 8 bits (one int8 GEMM), 14 bits (Karatsuba, three) and 16 bits (four).
Table 2 (layers, forward + backward, everything included: quantisers, GEMMs, epilogues):
``nn.Linear`` at M=N=K in {1024, 2048}, a 3x3 convolution 64->64 on 128x64x32x32 and a 4x4
stride-2 transposed convolution 64->64 upsampling 128x64x16x16 to 32x32, FP32
against the prepared layer at 8, 12, 14 and 16 bits (``aten`` route) and under BF16 autocast.
Table 3 (CPUs with AMX or AVX-512 VNNI): each 8-bit convolution product alone, FP32 and BF16
against oneDNN's int8 convolution, im2col + ``torch._int_mm`` and our kernels (the AMX ones, or
without AMX the VNNI ones; forward and weight gradient).
On CUDA (``--device cuda``) two tables measure the GPU targets instead: the Triton INT8 GEMM
against ``torch._int_mm``, BF16 and FP16 ``torch.matmul`` at 4096^3 and the ResNet-18 GEMM shapes,
and the implicit-GEMM INT8 convolution (forward, grad-input, grad-weight) against cuDNN BF16.
On CPUs without int8 dot products (``gemm_cpu.fast_int8()`` false, AVX2 only) ``torch._int_mm``
is 30-50x slower than FP32 and the routes never call it: table 2 runs, then table 4, our AVX2
kernel (``kernels/gemm_avx2``) on table 1's int8 GEMM shapes (operands laid out as the routes
pass them) and on each 8-bit convolution product of ResNet-20 and ResNet-18, its implicit GEMM
against FP32 ``F.conv2d`` (forward) and ``convolution_backward`` (weight gradient). BF16 has no
hardware there (table 2 has it per layer), so table 4 leaves it out.
Interleaved repetitions, medians; ratios are FP32 time / route time (higher is faster).
``--allocator reuse`` (the default) calls ``muppet_fx.reuse_cpu_memory()`` first, which every
case shares; ``--allocator default`` keeps glibc's defaults.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
from common import device_ms, interleaved  # noqa: E402

from muppet_fx import prepare, reuse_cpu_memory  # noqa: E402
from muppet_fx.kernels import amx_cpu, conv_onednn, gemm_avx2, gemm_cpu, vnni_cpu  # noqa: E402
from muppet_fx.kernels.scaled_mm_cpu import scaled_int_matmul  # noqa: E402

# (C_in, C_out, spatial, kernel, stride) of ResNet-18's distinct convolutions, CIFAR stem
RESNET18_CONVS = [(3, 64, 32, 3, 1), (64, 64, 32, 3, 1), (64, 128, 32, 3, 2), (128, 128, 16, 3, 1),
                  (64, 128, 32, 1, 2), (128, 256, 16, 3, 2), (256, 256, 8, 3, 1), (256, 512, 8, 3, 2),
                  (512, 512, 4, 3, 1)]


def gemm_shapes(batch):
    for cin, cout, hw, k, s in RESNET18_CONVS:
        out = hw // s
        M, K = batch * out * out, cin * k * k
        name = f"{cin}->{cout} {k}x{k}/{s} @{hw}"
        yield f"{name} fwd", M, K, cout
        yield f"{name} dX", batch * hw * hw, cout * k * k, cin
        yield f"{name} dW", cout, M, K
    yield "4096^3", 4096, 4096, 4096


def table_gemm(args):
    rows = []
    shapes = list(gemm_shapes(args.batch))
    if args.quick:
        shapes = shapes[1:4] + shapes[-1:]
    for name, M, K, N in shapes:
        a8 = torch.randint(-127, 128, (M, K), dtype=torch.int8)
        b8 = torch.randint(-127, 128, (K, N), dtype=torch.int8)
        a14 = torch.randint(-8191, 8192, (M, K), dtype=torch.int16)
        b14 = torch.randint(-8191, 8192, (K, N), dtype=torch.int16)
        a16 = torch.randint(-32767, 32768, (M, K), dtype=torch.int16)
        b16 = torch.randint(-32767, 32768, (K, N), dtype=torch.int16)
        af, bf = a8.float(), b8.float()
        ab, bb = af.bfloat16(), bf.bfloat16()
        cases = {"fp32": lambda: af @ bf, "bf16": lambda: ab @ bb, "_int_mm": lambda: torch._int_mm(a8, b8),
                 "ours 8b": lambda: scaled_int_matmul(a8, b8, -10),
                 "ours 14b": lambda: scaled_int_matmul(a14, b14, -10),
                 "ours 16b": lambda: scaled_int_matmul(a16, b16, -10)}
        med = interleaved(cases, args.reps)
        base = med["fp32"]
        rows.append([name, M, K, N, base * 1e3] + [base / med[k] for k in list(cases)[1:]])
    print(f"\nGEMM, CPU threads={args.threads}, torch {torch.__version__}: FP32 ms and speed-up over FP32")
    print(tabulate(rows, headers=["product", "M", "K", "N", "fp32 ms", "bf16", "_int_mm", "ours 8b", "ours 14b",
                                  "ours 16b"],
                   floatfmt=".2f"))


def _step(module, x):
    y = module(x)
    y.backward(torch.ones_like(y))


def _autocast_step(module, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.float().backward(torch.ones_like(y, dtype=torch.float32))


def table_layers(args):
    rows = []
    layers = [(f"linear {n}^3", nn.Linear(n, n), (n, n)) for n in (1024, 2048)]
    layers.append(("conv3x3 64->64, 128x64x32x32", nn.Conv2d(64, 64, 3, padding=1, bias=False),
                   (args.batch, 64, 32, 32)))
    layers.append(("convT4x4/2 64->64, 128x64x16x16", nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1, bias=False),
                   (args.batch, 64, 16, 16)))  # a decoder's upsampling to 32x32
    for name, layer, shape in layers:
        x = torch.randn(shape, requires_grad=True)
        cases = {"fp32": lambda: _step(layer, x), "bf16 autocast": lambda: _autocast_step(layer, x)}
        for bits in (8, 12, 14, 16):
            pm = prepare(layer, ladder=(bits, "fp32"))
            cases[f"{bits}b"] = (lambda pm=pm: _step(pm, x))
        med = interleaved(cases, args.reps)
        base = med["fp32"]
        rows.append([name, base * 1e3] + [base / med[k] for k in list(cases)[1:]])
    print(f"\nLayer forward+backward, CPU threads={args.threads}, allocator {args.allocator}: "
          "FP32 ms and speed-up over FP32")
    print(tabulate(rows, headers=["layer", "fp32 ms", "bf16 autocast", "8b", "12b", "14b", "16b"],
                   floatfmt=".2f"))


def table_cuda_gemm(args):
    from muppet_fx.kernels import gemm_triton
    from muppet_fx.kernels.quantise import quantise_triton

    rows = []
    shapes = list(gemm_shapes(args.batch))
    for name, M, K, N in (shapes[-1:] + shapes[:-1] if not args.quick else shapes[-1:]):
        a8 = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        b8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda").t()  # X W^T layout
        ab, bb = a8.bfloat16(), b8.bfloat16()
        ah, bh = a8.half(), b8.half()
        s0 = torch.tensor(0, dtype=torch.int32, device="cuda")
        cases = {"bf16": lambda: ab @ bb, "fp16": lambda: ah @ bh,
                 "_int_mm": lambda: torch._int_mm(a8, b8.contiguous()),
                 "triton int8": lambda: gemm_triton.int_mm(a8, b8),
                 "int8+q separate": lambda: quantise_triton(gemm_triton.scaled_mm(a8, s0, b8, s0), 8, "stochastic",
                                                            want_mantissa=False, want_values=True),
                 "int8+q fused": lambda: gemm_triton.scaled_mm(a8, s0, b8, s0, quantise_output=(8, "stochastic", 0))}
        if M <= 16 or K % 8 or N % 8:  # torch._int_mm's CUDA shape rules: no column for it
            del cases["_int_mm"]
        med = interleaved(cases, args.reps, warmup=3, sync=torch.cuda.synchronize)
        dev = device_ms({k: cases[k] for k in ("bf16", "triton int8")}, args.reps)
        med.setdefault("_int_mm", float("nan"))
        tops = {k: 2 * M * N * K / v / 1e12 for k, v in med.items()}
        rows.append([name, M, K, N] + [tops[k] for k in ("bf16", "fp16", "_int_mm", "triton int8")]
                    + [med["_int_mm"] / med["triton int8"], med["bf16"] / med["triton int8"],
                       dev["bf16"] / dev["triton int8"], med["int8+q separate"] / med["int8+q fused"]])
    print(f"\nGEMM, {torch.cuda.get_device_name()}, torch {torch.__version__}: TFLOP/s (TOP/s for int8); "
          "targets: triton/_int_mm >= 0.8, triton/bf16 >= 1.6 at 4096^3")
    print(tabulate(rows, headers=["product", "M", "K", "N", "bf16", "fp16", "_int_mm", "triton int8",
                                  "triton / _int_mm", "triton / bf16", "triton / bf16, graph",
                                  "output quantiser fused speed-up"],
                   floatfmt=".2f"))


def table_cuda_conv(args):
    from muppet_fx.kernels import conv_triton

    rows = []
    for cin, cout, hw, k, s in (RESNET18_CONVS[1:4] if args.quick else RESNET18_CONVS):
        cl = torch.channels_last
        x8 = torch.randint(-127, 128, (args.batch, cin, hw, hw), dtype=torch.int8, device="cuda")
        x8 = x8.contiguous(memory_format=cl)
        w8 = torch.randint(-127, 128, (cout, cin, k, k), dtype=torch.int8, device="cuda").contiguous(memory_format=cl)
        xb, wb = x8.bfloat16(), w8.bfloat16()
        pad = k // 2
        g8 = conv_triton.conv2d_int(x8, w8, s, pad).clamp(-127, 127).to(torch.int8)
        gb = g8.bfloat16()
        cases = {"bf16 fwd": lambda: torch.nn.functional.conv2d(xb, wb, None, s, pad),
                 "int8 fwd": lambda: conv_triton.conv2d_int(x8, w8, s, pad),
                 "bf16 dX": lambda: torch.ops.aten.convolution_backward(
                     gb, xb, wb, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, [True, False, False]),
                 "int8 dX": lambda: conv_triton.conv2d_grad_input_int(g8, w8, x8.shape, s, pad),
                 "bf16 dW": lambda: torch.ops.aten.convolution_backward(
                     gb, xb, wb, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, [False, True, False]),
                 "int8 dW": lambda: conv_triton.conv2d_grad_weight_int(g8, x8, w8.shape, s, pad),
                 # the int8 mantissas on FP16 MMA: operand loads the pipeliner overlaps (triton_aot)
                 "int8 dW, fp16 MMA": lambda: conv_triton.conv2d_grad_weight_int(g8, x8, w8.shape, s, pad,
                                                                                mma="fp16")}
        med = interleaved(cases, args.reps, warmup=3, sync=torch.cuda.synchronize)
        dev = device_ms(cases, args.reps)
        row = [f"{cin}->{cout} {k}x{k}/{s} @{hw}"]
        for op in ("fwd", "dX", "dW"):
            row += [dev[f"bf16 {op}"] * 1e3, dev[f"bf16 {op}"] / dev[f"int8 {op}"], med[f"bf16 {op}"] / med[f"int8 {op}"]]
        rows.append(row + [dev["bf16 dW"] / dev["int8 dW, fp16 MMA"], med["bf16 dW"] / med["int8 dW, fp16 MMA"]])
    print(f"\nImplicit-GEMM INT8 convolution vs cuDNN BF16, {torch.cuda.get_device_name()}, batch {args.batch}, "
          "channels-last (ratio > 1: ours faster). 'graph': GPU time per call, 20 calls replayed as a CUDA "
          "graph; 'call': one call timed with its launch, as a step that is not captured sees it")
    print(tabulate(rows, headers=["conv", "bf16 fwd us", "int8 fwd graph", "call", "bf16 dX us", "int8 dX graph",
                                  "call", "bf16 dW us", "int8 dW graph", "call", "dW fp16 MMA graph", "call"],
                   floatfmt=".2f"))


def table_cpu_conv(args):
    """ResNet-18's convolutions (plus ResNet-20's 16- and 32-channel ones) at 8 bits, each product
    alone: FP32 and BF16 ``aten.convolution_backward`` / ``F.conv2d`` against oneDNN's int8
    convolution (forward), im2col + ``torch._int_mm`` and our kernels, on AMX CPUs the tile
    kernels (``kernels/amx_cpu``), on AVX-512 VNNI CPUs without AMX the ``vpdpbusd`` ones
    (``kernels/vnni_cpu``); exact integer outputs (the VNNI forward scaled to float32, as
    oneDNN's), no quantisers."""
    if amx_cpu.available():
        name, forward, grad_weight = "amx", lambda x, w, geo: amx_cpu.conv_forward(x, w, *geo), amx_cpu.conv_grad_weight
    elif vnni_cpu.available():
        name, forward, grad_weight = "vnni", lambda x, w, geo: vnni_cpu.conv2d(x, w, 0, *geo), vnni_cpu.conv_grad_weight
    else:
        print("\nConvolution kernels: this CPU has neither AMX int8 tiles nor AVX-512 VNNI (table skipped)")
        return
    convs = [(16, 16, 32, 3, 1), (32, 32, 16, 3, 1)] + RESNET18_CONVS[1:]
    rows = []
    for cin, cout, hw, k, s in (convs[:3] if args.quick else convs):
        x = torch.randint(-127, 128, (args.batch, cin, hw, hw), dtype=torch.int8).contiguous(
            memory_format=torch.channels_last)
        w = torch.randint(-127, 128, (cout, cin, k, k), dtype=torch.int8)
        geo = ([s, s], [k // 2] * 2, [1, 1])
        g = torch.randint(-127, 128, (args.batch, cout, *gemm_cpu.conv_forward(x[:1], w, *geo).shape[2:]),
                          dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        xf, wf, gf = x.float(), w.float(), g.float()
        xb, wb, gb = x.bfloat16(), w.bfloat16(), g.bfloat16()
        cases = {
            "fp32 fwd": lambda: F.conv2d(xf, wf, None, *geo),
            "bf16 fwd": lambda: F.conv2d(xb, wb, None, *geo),
            "onednn fwd": lambda: conv_onednn.conv2d(x, w, 0, *geo),
            "im2col fwd": lambda: gemm_cpu.conv_forward(x, w, *geo, amx=False),
            f"{name} fwd": lambda: forward(x, w, geo),
            "fp32 dW": lambda: torch.ops.aten.convolution_backward(gf, xf, wf, None, *geo, False, [0, 0], 1,
                                                                   [False, True, False]),
            "bf16 dW": lambda: torch.ops.aten.convolution_backward(gb, xb, wb, None, *geo, False, [0, 0], 1,
                                                                   [False, True, False]),
            "im2col dW": lambda: gemm_cpu.int_matmul(g.permute(0, 2, 3, 1).reshape(-1, cout).t(),
                                                     gemm_cpu.im2col(x, (k, k), *geo)),
            f"{name} dW": lambda: grad_weight(g, x, tuple(w.shape), *geo),
        }
        if forward(x, w, geo) is None:
            del cases[f"{name} fwd"]
        t = interleaved(cases, args.reps)
        ratio = lambda base, case: f"{t[base] / t[case]:.2f}" if case in t else "-"  # noqa: E731
        rows.append([f"{cin}->{cout} {k}x{k}/{s} @{hw}", f"{t['fp32 fwd'] * 1e3:.2f}", ratio("fp32 fwd", "bf16 fwd"),
                     ratio("fp32 fwd", "onednn fwd"), ratio("fp32 fwd", "im2col fwd"), ratio("fp32 fwd", f"{name} fwd"),
                     f"{t['fp32 dW'] * 1e3:.2f}", ratio("fp32 dW", "bf16 dW"), ratio("fp32 dW", "im2col dW"),
                     ratio("fp32 dW", f"{name} dW")])
    print(f"\n{name.upper()} convolution kernels, CPU threads={args.threads}, batch {args.batch}: "
          "FP32 ms and speed-up over FP32")
    print(tabulate(rows, headers=["conv", "fp32 fwd ms", "bf16", "onednn", "im2col", name, "fp32 dW ms", "bf16",
                                  "im2col", name], tablefmt="simple"))


def table_avx2(args):
    """Table 4: the AVX2 int8 kernel (exact int32 outputs, no quantisers or scaling) against FP32."""
    rows = []
    shapes = list(gemm_shapes(args.batch))
    for name, M, K, N in (shapes[1:4] + shapes[-1:] if args.quick else shapes):
        if K > gemm_avx2.MAX_K:
            continue  # the routes cut such reductions in parts; the kernel takes each part
        a8 = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        b8 = torch.randint(-128, 128, (K, N), dtype=torch.int8)
        if name.endswith("dW"):  # G^T: the transposed channels-last gradient
            a8 = a8.t().contiguous().t()
        else:  # W^T: the transposed weight
            b8 = b8.t().contiguous().t()
        af, bf = a8.float(), b8.float()
        t = interleaved({"fp32": lambda: af @ bf, "avx2": lambda: gemm_avx2.int8_mm(a8, b8)}, args.reps)
        rows.append([name, M, K, N, t["fp32"] * 1e3, t["fp32"] / t["avx2"]])
    print(f"\nAVX2 int8 GEMM, CPU threads={args.threads}: FP32 ms and speed-up over FP32")
    print(tabulate(rows, headers=["product", "M", "K", "N", "fp32 ms", "avx2 int8"], floatfmt=".2f"))
    rows = []
    convs = [(16, 16, 32, 3, 1), (32, 32, 16, 3, 1), (64, 64, 8, 3, 1)] + RESNET18_CONVS
    for cin, cout, hw, k, s in (convs[:3] if args.quick else convs):
        x = torch.randint(-128, 128, (args.batch, cin, hw, hw), dtype=torch.int8).contiguous(
            memory_format=torch.channels_last)
        w = torch.randint(-128, 128, (cout, cin, k, k), dtype=torch.int8)
        geo = ([s, s], [k // 2] * 2, [1, 1])
        out = gemm_cpu._out_size(hw, k, s, k // 2, 1)
        g = torch.randint(-128, 128, (args.batch, cout, out, out), dtype=torch.int8).contiguous(
            memory_format=torch.channels_last)
        xf, wf, gf = x.float(), w.float(), g.float()
        t = interleaved({
            "fp32 fwd": lambda: F.conv2d(xf, wf, None, *geo),
            "avx2 fwd": lambda: gemm_avx2.conv2d(x, w, *geo),
            "fp32 dW": lambda: torch.ops.aten.convolution_backward(gf, xf, wf, None, *geo, False, [0, 0], 1,
                                                                   [False, True, False]),
            "avx2 dW": lambda: gemm_avx2.conv2d_grad_weight(g, x, tuple(w.shape), *geo),
        }, args.reps)
        rows.append([f"{cin}->{cout} {k}x{k}/{s} @{hw}", t["fp32 fwd"] * 1e3, t["fp32 fwd"] / t["avx2 fwd"],
                     t["fp32 dW"] * 1e3, t["fp32 dW"] / t["avx2 dW"]])
    print(f"\nAVX2 implicit-GEMM int8 convolution, CPU threads={args.threads}, batch {args.batch}: "
          "FP32 ms and speed-up over FP32")
    print(tabulate(rows, headers=["conv", "fp32 fwd ms", "avx2 fwd", "fp32 dW ms", "avx2 dW"], floatfmt=".2f"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="a few GEMM shapes only")
    p.add_argument("--allocator", choices=("reuse", "default"), default="reuse")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
        table_cuda_gemm(args)
        table_cuda_conv(args)
        return
    torch.set_num_threads(args.threads)
    if args.allocator == "reuse":
        reuse_cpu_memory()
    table_layers(args)
    if not gemm_cpu.fast_int8():  # torch._int_mm: 1166 ms at 1024^3 against FP32's 23 (AVX2 only)
        print("\nThis CPU has no int8 dot-product instructions (VNNI, AMX): the torch._int_mm tables are "
              "skipped (it runs 30-50x slower than FP32 here; the routes never call it).")
        if gemm_avx2.available():
            table_avx2(args)
        return
    table_cpu_conv(args)
    table_gemm(args)


if __name__ == "__main__":
    main()
