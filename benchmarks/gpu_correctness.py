"""Full-size correctness of the Triton kernels on a CUDA GPU, against exact references.

    python benchmarks/gpu_correctness.py [--batch 128] [--quick]
    TRITON_INTERPRET=1 python benchmarks/gpu_correctness.py --device cpu --tiny   # smoke test

The interpreter tests (``tests/``) check the kernels on small odd shapes on the CPU; this runs
them compiled, at the sizes training uses: every ResNet-18 (CIFAR stem) GEMM and convolution,
forward, grad-input and grad-weight, and 4096^3. Oracles:
- int8 products: exact, equal to float64 products of the mantissas (every sum stays below 2**53);
- scaled outputs: within 2**-22 of |product| + |bias| per element (one float32 rounding of the
  sum and one of the scaled product, either of which an FMA may merge);
- FP16 mode at 12 bits (exact operands): within ``K * 2**-24 * (|a| @ |b|)`` of the float64
  product (float32 accumulation), plus one rounding;
- the GEMM epilogue's output quantisation: bit-equal to the separate quantiser on the same seed;
- the convolution epilogue's dequantisation (subnormal scales included): bit-equal to torch's;
- the batch norm from mantissas: within float32 rounding bounds of float64 (forward and
  backward, ReLU fused);
- the quantiser: nearest rounding bit-equal to the torch reference, stochastic rounding
  unbiased within 6 standard errors over 16M draws, and fresh draws at each replay of a
  captured quantisation (its seed drawn on the device).
Every check prints PASS or FAIL with its numbers; the exit status is the number of failures.
"""
import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import capture  # noqa: E402
from kernels import RESNET18_CONVS, gemm_shapes  # noqa: E402

from muppet_fx.kernels import conv_triton, gemm_cpu, gemm_triton  # noqa: E402
from muppet_fx.kernels.quantise import quantise_reference, quantise_triton  # noqa: E402

FAILURES = []
DEVICE = "cuda"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check(name):
    def wrap(fn):
        def run(*args):
            t0 = time.perf_counter()
            try:
                detail = fn(*args)
                ok = True
            except AssertionError as e:
                ok, detail = False, str(e)
            except Exception:  # noqa: BLE001 (a crash is a failure of this check, not of the run)
                ok, detail = False, traceback.format_exc(limit=3).strip().splitlines()[-1]
            _sync()
            print(f"{'PASS' if ok else 'FAIL'} {name} {' '.join(map(str, args))}: {detail} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            if not ok:
                FAILURES.append(name)
        return run
    return wrap


def _ints(shape, bound, dtype):
    return torch.randint(-bound, bound + 1, shape, dtype=dtype, device=DEVICE)


def _exact(got, ref, what):
    diff = (got.double() - ref).abs().max().item()
    assert diff == 0, f"{what}: max |difference| {diff:g} (must be 0)"
    return f"exact, max |sum| {ref.abs().max().item():.3g}"


@check("int8 GEMM")
def gemm_int8(name, M, K, N):
    a = _ints((M, K), 127, torch.int8)
    b = _ints((N, K), 127, torch.int8).t()  # weight read transposed, as X W^T
    got = gemm_cpu.int_matmul(a, b, mm=gemm_triton.int_mm)  # chunked where K exceeds int32's bound
    return _exact(got, a.double() @ b.double(), "int8 GEMM")


@check("scaled int8 GEMM + bias")
def gemm_scaled(M, K, N):
    a, b = _ints((M, K), 127, torch.int8), _ints((K, N), 127, torch.int8)
    s_a, s_b = torch.tensor(9, device=DEVICE), torch.tensor(12, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    y = gemm_triton.scaled_mm(a, s_a, b, s_b, bias)
    p = (a.double() @ b.double()) * 2.0**-21
    err = ((y.double() - (p + bias.double())).abs() / (p.abs() + bias.double().abs() + 1e-30)).max().item()
    assert err <= 2**-22, f"relative error {err:.3g} above 2**-22"
    return f"max relative error {err:.2g} (bound {2**-22:.2g})"


@check("FP16 GEMM, 12-bit mantissas")
def gemm_fp16(M, K, N):
    a, b = _ints((M, K), 2047, torch.int16), _ints((K, N), 2047, torch.int16)
    s0 = torch.tensor(0, device=DEVICE)
    y = gemm_triton.scaled_mm(a, s0, b, s0).double()
    exact = a.double() @ b.double()
    bound = K * 2.0**-24 * (a.double().abs() @ b.double().abs()) + 2.0**-23 * exact.abs()
    ratio = ((y - exact).abs() / bound.clamp_min(1e-30)).max().item()
    assert ratio <= 1, f"error {ratio:.3g}x the float32-accumulation bound"
    return f"max error {ratio:.2g}x the bound"


@check("GEMM epilogue output quantisation")
def gemm_quantised_output(M, K, N):
    a, b = _ints((M, K), 127, torch.int8), _ints((K, N), 127, torch.int8)
    s = torch.tensor(10, device=DEVICE)
    fused = gemm_triton.scaled_mm(a, s, b, s, quantise_output=(8, "stochastic", 1234))
    plain = gemm_triton.scaled_mm(a, s, b, s)
    separate = quantise_triton(plain, 8, "stochastic", seed=1234, want_mantissa=False, want_values=True)[2]
    assert torch.equal(fused, separate), f"{(fused != separate).sum().item()} elements differ"
    return f"bit-equal, {fused.unique().numel()} distinct grid values"


def _conv_operands(cin, cout, hw, k, batch, bound, dtype):
    cl = torch.channels_last
    x = _ints((batch, cin, hw, hw), bound, dtype).contiguous(memory_format=cl)
    w = _ints((cout, cin, k, k), bound, dtype).contiguous(memory_format=cl)
    return x, w


@check("int8 implicit-GEMM convolution")
def conv_int8(cin, cout, hw, k, s, batch):
    x, w = _conv_operands(cin, cout, hw, k, batch, 127, torch.int8)
    p = k // 2
    y = conv_triton.conv2d_int(x, w, s, p)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, s, p)
    out = [_exact(y, ref, "forward")]
    exps = (torch.tensor(9, dtype=torch.int32, device=DEVICE), torch.tensor(140, dtype=torch.int32, device=DEVICE))
    scaled = conv_triton.conv2d_int(x, w, s, p, scale=exps)  # the epilogue the routes use
    want = conv_triton._epilogue_reference(ref.long(), exps, None)
    assert torch.equal(scaled, want), f"scaled epilogue: {(scaled != want).sum().item()} elements differ"
    g = _ints(tuple(ref.shape), 127, torch.int8).contiguous(memory_format=torch.channels_last)
    gx = conv_triton.conv2d_grad_input_int(g, w, x.shape, s, p)
    gd, xd, wd = g.double(), x.double(), w.double()
    ref_gx, ref_gw, _ = torch.ops.aten.convolution_backward(gd, xd, wd, None, [s, s], [p, p], [1, 1], False,
                                                            [0, 0], 1, [True, True, False])
    out.append(_exact(gx, ref_gx, "grad-input"))
    gw = conv_triton.conv2d_grad_weight_int(g, x, w.shape, s, p, mma="int8")
    out.append(_exact(gw, ref_gw, "grad-weight"))
    gw = conv_triton.conv2d_grad_weight_int(g, x, w.shape, s, p, mma="fp16")
    out.append(_exact(gw, ref_gw, "grad-weight on FP16 MMA"))
    # the routes' form: split over pixels to fill the GPU, partials summed, scaled and laid out
    # as the parameter in one launch (pixel_split, _sum_scale_kernel)
    want_gw = conv_triton._epilogue_reference(ref_gw.long(), exps, None)
    for mma in conv_triton.GRAD_WEIGHT_MMA_CHOICES:
        gw_scaled = conv_triton.conv2d_grad_weight_int(g, x, w.shape, s, p, scale=exps, mma=mma)
        assert gw_scaled.is_contiguous() and torch.equal(gw_scaled, want_gw), \
            f"scaled grad-weight ({mma} MMA): {(gw_scaled != want_gw).sum().item()} elements differ"
    return "; ".join(out) + "; scaled epilogues bit-equal"


@check("FP16 implicit-GEMM convolution, 12-bit mantissas")
def conv_fp16(cin, cout, hw, k, s, batch):
    x, w = _conv_operands(cin, cout, hw, k, batch, 2047, torch.int16)
    p = k // 2
    y = conv_triton.conv2d_int(x, w, s, p).double()
    exact = torch.nn.functional.conv2d(x.double(), w.double(), None, s, p)
    mag = torch.nn.functional.conv2d(x.double().abs(), w.double().abs(), None, s, p)
    bound = cin * k * k * 2.0**-24 * mag + 2.0**-23 * exact.abs()
    ratio = ((y - exact).abs() / bound.clamp_min(1e-30)).max().item()
    assert ratio <= 1, f"error {ratio:.3g}x the float32-accumulation bound"
    return f"max error {ratio:.2g}x the bound"


@check("quantiser")
def quantiser(n):
    x = torch.randn(n, device=DEVICE) * 3.7
    m_ref, s_ref, _ = quantise_reference(x, 8, "nearest")
    m, s, _, _ = quantise_triton(x, 8, "nearest")
    assert int(s) == int(s_ref) and torch.equal(m.float(), m_ref), "nearest rounding differs from the reference"
    m_st, s_st, _, _ = quantise_triton(x, 8, "stochastic", seed=7)
    v = x.double() * 2.0 ** int(s_st)
    frac = v - v.floor()
    bias = (m_st.double() - v).mean().item()
    se = (frac * (1 - frac)).mean().sqrt().item() / n**0.5
    assert abs(bias) < 6 * se, f"stochastic rounding bias {bias:.3g}, 6 standard errors {6 * se:.3g}"
    assert ((m_st.double() - v).abs() < 1).all(), "a stochastic rounding error reached one ulp"
    return f"nearest bit-equal; stochastic mean error {bias:.2g} (6 SE {6 * se:.2g})"


@check("batch norm from mantissas")
def batch_norm(C, hw, batch):
    """``batch_norm_triton`` on a channels-last int8 map (ReLU fused) against float64 on the
    dequantised input: ``y`` within eight float32 roundings of its terms, every gradient within
    eight roundings of a float32 reduction's error (``sqrt(R)`` times the largest term)."""
    from muppet_fx.kernels import batch_norm_triton

    eps32 = torch.finfo(torch.float32).eps
    m = _ints((batch, C, hw, hw), 127, torch.int8).contiguous(memory_format=torch.channels_last)
    s = torch.tensor(7, dtype=torch.int32, device=DEVICE)
    w, b = torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE)
    y, mean, invstd, mask = batch_norm_triton.batch_norm_forward(m, s, w, b, None, None, 0.1, 1e-5, relu=True)
    g = torch.randn_like(y)
    gx, gw, gb = batch_norm_triton.batch_norm_backward(g, m, s, mean, invstd, w, (True, True, True), relu_mask=mask)
    x = m.double() * 2.0**-7
    dims, view = [0, 2, 3], [1, -1, 1, 1]
    mean64, var64 = x.mean(dims), x.var(dims, unbiased=False)
    alpha = (var64 + 1e-5).rsqrt() * w.double()
    y64 = (x * alpha.view(view) + (b.double() - mean64 * alpha).view(view)).clamp_min(0)
    bound = 8 * eps32 * ((x * alpha.view(view)).abs() + (mean64 * alpha).abs().view(view) + b.double().abs().view(view)
                         + y64.abs())
    worst = ((y.double() - y64).abs() / bound).max().item()
    assert worst <= 1, f"y off by {worst:.2f} of its bound"
    gm = torch.where(y64 > 0, g.double(), 0.0)
    refs = torch.ops.aten.native_batch_norm_backward(gm, x, w.double(), None, None, mean.double(), invstd.double(),
                                                     True, 1e-5, [True, True, True])
    R = x.numel() // C
    xhat = (x - mean.double().view(view)) * invstd.double().view(view)
    terms = (gm.abs().max(), (gm * xhat).abs().max(), gm.abs().max())
    ratios = []
    for name, got, ref, term in zip(("input", "weight", "bias"), (gx, gw, gb), refs, terms):
        bound = 8 * eps32 * (R**0.5 * term + ref.abs().max())
        ratios.append(((got.double() - ref).abs().max() / bound).item())
        assert ratios[-1] <= 1, f"{name} gradient off by {ratios[-1]:.2f} of its bound"
    return f"y at {worst:.2g} of its bound, gradients at {max(ratios):.2g}"


@check("stochastic rounding replayed in a CUDA graph")
def graphed_rounding(n):
    """The training seeds are drawn on the device by torch's generator: each replay of a
    captured quantisation must round with fresh draws, each set unbiased (off the GPU, two
    eager calls stand in for the replays)."""
    from muppet_fx.numerics import _triton_seed

    x = torch.randn(n, device=DEVICE) * 3.7

    def rounded():
        return quantise_triton(x, 8, "stochastic", seed=_triton_seed(None, None, "stochastic", x.device))[0]
    if DEVICE == "cuda":
        graph, out = capture(rounded)  # compiled outside the capture
        draws = []
        for _ in range(2):
            graph.replay()
            draws.append(out.clone())
    else:
        draws = [rounded(), rounded()]
    assert not torch.equal(*draws), "two replays rounded with the same draws"
    v = x.double() * 2.0 ** int(quantise_triton(x, 8, "nearest")[1])
    frac = v - v.floor()
    se = (frac * (1 - frac)).mean().sqrt().item() / n**0.5
    bias = [(m.double() - v).mean().item() for m in draws]
    assert all(abs(b) < 6 * se for b in bias), f"stochastic rounding bias {bias}, 6 standard errors {6 * se:.3g}"
    differ = (draws[0] != draws[1]).double().mean().item()
    return f"replays differ in {differ:.1%} of values; mean errors {bias[0]:.2g}, {bias[1]:.2g} (6 SE {6 * se:.2g})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="three GEMM shapes and two convolutions")
    p.add_argument("--tiny", action="store_true", help="small odd shapes (for --device cpu under the interpreter)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: only with TRITON_INTERPRET=1, to check this script itself")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_correctness.py needs a CUDA device; none is visible to torch")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (interpreter)'}, "
          f"torch {torch.__version__}", flush=True)
    shapes = list(gemm_shapes(args.batch))
    convs = RESNET18_CONVS
    products = [(4096, 4096, 4096), (1000, 333, 129), (1, 4096, 7)]
    if args.quick:
        shapes, convs = shapes[3:6] + shapes[-1:], RESNET18_CONVS[1:3]
    if args.tiny:
        shapes = [("tiny", 33, 129, 7), ("tiny dW", 7, 300, 33)]
        convs, products = [(3, 8, 9, 3, 1), (8, 16, 7, 3, 2), (8, 8, 5, 1, 2)], [(33, 65, 17), (1, 40, 7)]
    for name, M, K, N in shapes:
        gemm_int8(name, M, K, N)
    for M, K, N in products:
        gemm_scaled(M, K, N)
        gemm_fp16(M, K, N)
        gemm_quantised_output(M, K, N)
    for cin, cout, hw, k, s in convs:
        conv_int8(cin, cout, hw, k, s, args.batch)
        conv_fp16(cin, cout, hw, k, s, args.batch)
    for cin, cout, hw, k, stride in convs:  # each convolution's output map
        batch_norm(cout, -(-hw // stride), args.batch)
    quantiser(4096 if args.tiny else 1 << 24)
    graphed_rounding(4096 if args.tiny else 1 << 24)
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all passed", flush=True)
    sys.exit(len(FAILURES))


if __name__ == "__main__":
    main()
