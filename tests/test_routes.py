"""Kernel routes agree end to end (forward and backward, nearest rounding, same seeds).

Oracle: the ``emulate`` route. At 8 bits every FP32 partial sum of these small layers is an
integer multiple of the scale below 2**24 (K * 127**2 < 2**24 for K < 1040), so emulate is exact
and the integer routes must match it bit for bit. At 16 bits emulate rounds its FP32 sums; a
rounded sum can flip the next quantiser's rounding by one 16-bit step, so there the results
must agree to a relative L2 error of 1e-3 (one flipped step is 2**-15 relative).
"""
import os

import pytest
import torch
import torch.nn as nn

from muppet_fx import prepare
from muppet_fx.kernels import gemm_cpu


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 6, 1, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.dw(self.c2(x)))
        return self.fc(torch.relu(self.bn(self.pw(x))).flatten(1))


class Decoder(nn.Module):
    """Transposed convolutions: strided with output padding (the integer grad-input kernels run
    its forward), grouped and dilated (FP32 products of the mantissas), and 1-d."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.t1 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.t2 = nn.ConvTranspose2d(4, 4, (2, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2), groups=2,
                                     bias=False)
        self.t3 = nn.ConvTranspose1d(4, 2, 3, stride=2)

    def forward(self, x):
        x = self.t2(torch.relu(self.t1(torch.relu(self.c(x)))))
        return self.t3(x.flatten(2))


class Signal1d(nn.Module):
    """1-d layers: they run as 2-d ones of height 1 (a batch norm reading one, a strided and
    dilated one, a transposed one), except the grouped one."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, dilation=2, bias=False)
        self.g = nn.Conv1d(8, 8, 3, padding="same", groups=2)
        self.t = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)

    def forward(self, x):
        return self.t(self.g(torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))))


class Clip3d(nn.Module):
    """3-d layers (a batch norm reading one, a spatial 1x3x3 and a temporal 3x1x1 one): the
    integer routes run them per depth tap on the 2-d kernels (``muppet_fx.depth_taps``)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)
        self.c2 = nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.c3 = nn.Conv3d(8, 4, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))))


def _block():
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)


CASES = {"cnn": (SmallCNN, lambda: torch.randn(2, 3, 11, 11).contiguous(memory_format=torch.channels_last)),
         "decoder": (Decoder, lambda: torch.randn(2, 3, 9, 9)),
         "signal1d": (Signal1d, lambda: torch.randn(2, 3, 23)),
         "clip3d": (Clip3d, lambda: torch.randn(2, 3, 5, 7, 6)),
         "transformer": (_block, lambda: torch.randn(2, 5, 16))}


WITH_LINEAR = {"cnn", "transformer"}


def _run(make, x, backend, bits, exact=False):
    torch.manual_seed(0)
    model = make()
    pm = prepare(model, ladder=(bits, "fp32"), backend=backend, rounding="nearest",
                 grad_rounding="nearest", exact=exact)
    xi = x.clone().requires_grad_()
    out = pm(xi)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach(), xi.grad] + [p.grad for p in model.parameters()]


# The triton backend on these tests' CPU tensors: the interpreter. (On a GPU machine without it
# they compare against CPU batch norms, whose sums a GPU orders differently, so they skip there.)
HAS_TRITON_RUN = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("case", list(CASES))
def test_integer_routes_exact_at_8_bits(case, monkeypatch):
    """8 bits: aten and triton equal emulate bit for bit, the triton GEMMs quantising their
    outputs in the epilogue (every linear layer)."""
    make, inputs = CASES[case]
    torch.manual_seed(1)
    x = inputs()
    want = _run(make, x, "emulate", 8)
    fused = []
    if HAS_TRITON_RUN:
        from muppet_fx.kernels import gemm_triton

        real = gemm_triton.scaled_mm
        monkeypatch.setattr(gemm_triton, "scaled_mm", lambda *a, quantise_output=None, **k: (
            fused.append(quantise_output is not None), real(*a, quantise_output=quantise_output, **k))[1])
    for backend in ["aten"] + (["triton"] if HAS_TRITON_RUN else []):
        for g, w in zip(_run(make, x, backend, 8), want):
            assert torch.equal(g, w), backend
    assert not HAS_TRITON_RUN or any(fused) == (case in WITH_LINEAR)


@pytest.mark.parametrize("case", list(CASES))
def test_routes_at_16_bits(case, monkeypatch):
    """16 bits: the exact routes (aten and triton with exact=True) agree bit for bit; emulate
    and the default aten route (FP32 products above 14 bits) within 1e-3 relative L2 per tensor
    of them. The FP16 Triton route (mantissas rounded to FP16, the paper's mapping) is checked
    against its own twin, the same network with every FP16 kernel replaced by its float64
    reference on FP16-rounded operands, within the same 1e-3 per tensor. Against the exact route
    it differs by far more in this tiny network (about 10% on the first layer's gradients): the
    twin differs by exactly as much, so that is FP16 rounding of 16-bit mantissas, not the
    kernels."""
    make, inputs = CASES[case]
    torch.manual_seed(1)
    x = inputs()
    exact = _run(make, x, "aten", 16, exact=True)
    for backend in ("emulate", "aten"):
        for g, w in zip(_run(make, x, backend, 16), exact):
            assert (g - w).norm() <= 1e-3 * w.norm() + 1e-6
    if not HAS_TRITON_RUN:
        pytest.skip("the triton backend on CPU tensors needs TRITON_INTERPRET=1")
    for g, w in zip(_run(make, x, "triton", 16, exact=True), exact):
        assert torch.equal(g, w)
    calls = _count_fp16_calls(monkeypatch)
    fp16 = _run(make, x, "triton", 16)
    # three products per ungrouped 1-d or 2-d (transposed) convolution with an input gradient
    # (1-d ones run as 2-d ones of height 1)
    assert calls["conv"] == {"cnn": 3 * 3, "decoder": 3 * 3, "signal1d": 3 * 3}.get(case, 0)
    assert (calls["gemm"] > 0) == (case in WITH_LINEAR)
    _use_fp16_references(monkeypatch)
    for g, w in zip(fp16, _run(make, x, "triton", 16)):
        assert (g - w).norm() <= 1e-3 * w.norm() + 1e-6


@pytest.mark.parametrize("avx2", [False, True], ids=["fp32-products", "avx2-kernel"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpus_without_int8_dot_products_keep_products_off_int_mm(case, avx2, monkeypatch):
    """Where ``torch._int_mm`` is slow (no VNNI/AMX), no product reaches it. Without the AVX2
    kernel the default route computes in FP32 on the dequantised operands; with it, the
    8-bit products run there (exact integers). Both are bit-identical to emulate at 8 bits
    (exact on these layers, see the module notes). ``exact=True`` is bit-identical to the
    integer kernels: at 16 bits it sums the mantissas as floats, at 12 bits it takes the AVX2
    kernel's int16 products where it has it."""
    from muppet_fx.kernels import gemm_avx2

    if avx2 and not gemm_avx2.available():
        pytest.skip("the AVX2 int8 kernel does not build or run on this CPU")
    make, inputs = CASES[case]
    torch.manual_seed(1)
    x = inputs()
    monkeypatch.setattr(gemm_cpu, "fast_int8", lambda: True)  # the integer kernels, however slow here
    with_int8 = _run(make, x, "aten", 16, exact=True)
    exact12 = _run(make, x, "aten", 12, exact=True)
    monkeypatch.setattr(gemm_cpu, "fast_int8", lambda: False)
    emulated = _run(make, x, "emulate", 8)
    calls = []
    for name in ("int8_mm", "narrow_mm", "conv2d", "conv2d_grad_weight"):  # its GEMMs and convolutions
        kernel = getattr(gemm_avx2, name)
        monkeypatch.setattr(gemm_avx2, name, lambda *a, k=kernel, **kw: calls.append(1) or k(*a, **kw))
    monkeypatch.setattr(gemm_avx2, "available", lambda: avx2)

    def refuse(*args, **kwargs):
        raise AssertionError("torch._int_mm called on a CPU without int8 dot products")
    monkeypatch.setattr(torch, "_int_mm", refuse)
    for g, w in zip(_run(make, x, "aten", 8), emulated):
        assert torch.equal(g, w)
    # every case has a linear layer or an ungrouped convolution the kernel takes (3-d: per depth tap)
    assert bool(calls) == avx2
    calls.clear()
    for g, w in zip(_run(make, x, "aten", 16, exact=True), with_int8):
        assert torch.equal(g, w)
    assert not calls  # 13-16 bit products stay off the AVX2 kernel
    # exact=True at 12 bits: one int16 product on the AVX2 kernel, else exact float sums
    for g, w in zip(_run(make, x, "aten", 12, exact=True), exact12):
        assert torch.equal(g, w)
    assert bool(calls) == (avx2 and case != "clip3d")  # 3-d: exact float sums (the depth taps are int8)


def test_fast_int8_follows_the_cpu_flags():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert gemm_cpu.fast_int8() == any(f" {f}" in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@pytest.mark.parametrize("frozen", ["c1.weight", "pw.weight", "input"])
def test_fp32_product_convolutions_partial_gradients(frozen, monkeypatch):
    """12 bits on aten: convolutions run FP32 products on dequantised operands, both gradients
    from one ``convolution_backward``. With one weight frozen (or no input gradient) the others
    still agree with the exact route within 1e-3 relative L2, the frozen one gets none, and the
    one-call path did run."""
    from muppet_fx import routes
    from muppet_fx.kernels import gemm_avx2

    monkeypatch.setattr(gemm_avx2, "available", lambda: False)  # else 9-12 bits run on its integer kernel
    calls = []
    real = routes.conv_grads_on_values
    monkeypatch.setattr(routes, "conv_grads_on_values", lambda *a: (calls.append(a[-2:]), real(*a))[1])
    torch.manual_seed(1)
    x = CASES["cnn"][1]()

    def grads(**kw):
        torch.manual_seed(0)
        model = SmallCNN()
        if frozen != "input":
            model.get_parameter(frozen).requires_grad_(False)
        pm = prepare(model, ladder=(12, "fp32"), rounding="nearest", grad_rounding="nearest", **kw)
        xi = x.clone().requires_grad_(frozen != "input")
        out = pm(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [xi.grad] + [p.grad for p in model.parameters()]
    for g, w in zip(grads(), grads(exact=True)):
        assert (g is None) == (w is None)
        assert g is None or (g - w).norm() <= 1e-3 * w.norm() + 1e-6
    assert (False, True) in calls if frozen == "input" else (True, False) in calls


def _count_fp16_calls(monkeypatch):
    """Counts the FP16-mode kernel calls (int16 operands) of the triton route."""
    from muppet_fx.kernels import conv_triton, gemm_triton

    calls = {"conv": 0, "gemm": 0}

    def counted(module, name, kind):
        real = getattr(module, name)

        def wrapper(a, *args, **kwargs):
            calls[kind] += a.dtype == torch.int16 and not kwargs.get("exact", False)
            return real(a, *args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
    for name in ("conv2d_int", "conv2d_grad_input_int", "conv2d_grad_weight_int"):
        counted(conv_triton, name, "conv")
    counted(gemm_triton, "scaled_mm", "gemm")
    return calls


def _use_fp16_references(monkeypatch):
    """Swaps every FP16-mode kernel for its plain-torch reference (FP16-rounded operands,
    float64 sums); int8 and exact calls keep the kernels."""
    from muppet_fx.kernels import conv_triton, gemm_triton

    def swap(module, name, reference):
        real = getattr(module, name)

        def wrapper(a, *args, exact=False, **kwargs):
            if a.dtype == torch.int16 and not exact:
                out = reference(a, *args, **kwargs)  # (values, mantissas, exponent) where asked
                return (out[0].float(), *out[1:]) if isinstance(out, tuple) else out.float()
            return real(a, *args, exact=exact, **kwargs) if name == "scaled_mm" else real(a, *args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
    for name in ("conv2d_int", "conv2d_grad_input_int", "conv2d_grad_weight_int"):
        swap(conv_triton, name, getattr(conv_triton, name + "_reference"))
    swap(gemm_triton, "scaled_mm", _gemm_fp16_reference)


def _gemm_fp16_reference(a_m, a_s, b_m, b_s, bias=None, b_axis=None, quantise_output=None):
    from muppet_fx.kernels.gemm_triton import scaled_mm_reference
    from muppet_fx.kernels.quantise import quantise_triton

    y = scaled_mm_reference(a_m, a_s, b_m, b_s, bias, b_axis, fp16=True)
    if quantise_output is None:
        return y
    bits, rounding, seed = quantise_output
    return quantise_triton(y, bits, rounding, seed=seed, want_mantissa=False, want_values=True)[2]


@pytest.mark.parametrize("dtype,bound", [(torch.int8, 127), (torch.int16, 32767)])
@pytest.mark.parametrize("shape,dims,channels_last", [
    ((1024, 1024), [0], False), ((7, 33), [0], False), ((1, 1), [0], False),
    ((5, 3, 9, 7), [0, 2, 3], True), ((5, 3, 9, 7), [0, 2, 3], False),
    ((131073, 3), [0], False),  # longer than one int32-safe GEMM chunk
    ((70, 3, 40, 40), [0, 2, 3], True),  # C channel sums over several int32 blocks
    ((9, 5, 16, 17), [0, 2, 3], False),  # C channel sums along channel runs of 272 values
    ((2, 4, 3), [0, 1], False)])
def test_bias_gradient_sums_exactly(dtype, bound, shape, dims, channels_last):
    """Bias gradients (``sum_dequantised``; on the CPU the batch norm's C channel sums, or int8
    ones as a GEMM ``ones @ m``) equal the float64 sum of the mantissas, scaled: exact, extreme
    mantissas included."""
    from muppet_fx.routes import sum_dequantised

    m = torch.randint(-bound, bound + 1, shape, dtype=dtype)
    m.view(-1)[: m.numel() // 2] = bound  # same-sign runs: the sums reach their largest sizes
    if channels_last:
        m = m.contiguous(memory_format=torch.channels_last)
    s = torch.tensor(5, dtype=torch.int32)
    assert torch.equal(sum_dequantised(m, s, dims), (m.double().sum(dims) * 2.0**-5).float())


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bias_gradients_from_the_quantising_pass_equal_the_separate_sums(bits, monkeypatch):
    """Layers with a bias take its gradient from the pass that quantises the output gradient
    where the channels run fastest (linear rows, channels-last maps): the same values, bit for
    bit, as summing the mantissas afterwards."""
    import muppet_fx.ops as ops

    def grads():
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(64, 16, 4, 2, 1),
                            nn.Flatten(), nn.Linear(16 * 20 * 20, 33), nn.ReLU(), nn.Linear(33, 7))
        x = torch.randn(6, 3, 10, 10)
        pm = prepare(net, ladder=(bits, "fp32"))
        torch.manual_seed(2)
        pm(x).square().sum().backward()
        return [p.grad for p in net.parameters()]

    fused = []
    summed = ops.quantise_summed
    monkeypatch.setattr(ops, "quantise_summed", lambda *a: fused.append(summed(*a)) or fused[-1])
    got = grads()
    # in backward order; the transposed convolution's gradient comes from the flatten as a
    # contiguous map, put channels-last (its output's layout) before it is quantised
    assert [f is not None and f[3] is not None for f in fused] == [True, True, True, True]
    monkeypatch.setattr(ops, "quantise_summed", lambda *a: None)  # the separate sums
    assert all(torch.equal(a, b) for a, b in zip(got, grads()))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="forces the CUDA code path onto CPU tensors: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_code_path_end_to_end(case, monkeypatch):
    """The triton route as it runs on CUDA, forced for CPU tensors: the training ops' quantisers,
    dequantisations and saved batch-norm inputs on the Triton kernels too (exponents never read
    on the host). 8 bits, nearest: bit-equal to emulate with the CPU quantiser, forward and
    backward; 16 bits and stochastic rounding at 8: finite, the Triton quantiser having run.
    The batch norms run ATen's on both sides here: the C and the Triton kernels that read their
    mantissas sum in different orders (``tests/test_batch_norm_triton.py`` bounds each)."""
    from muppet_fx import numerics
    from muppet_fx.kernels import batch_norm_cpu, batch_norm_triton, quantise

    make, inputs = CASES[case]
    torch.manual_seed(1)
    x = inputs()
    monkeypatch.setattr(batch_norm_cpu, "_library", lambda: None)
    for name in ("batch_norm_forward", "batch_norm_backward"):
        monkeypatch.setattr(batch_norm_triton, name, lambda *a, **k: None)
    want = _run(make, x, "emulate", 8)
    calls = []
    real = numerics.quantise_triton
    monkeypatch.setattr(numerics, "quantise_triton", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", True)
    for g, w in zip(_run(make, x, "triton", 8), want):
        assert torch.equal(g, w)
    assert len(calls) >= 6
    torch.manual_seed(0)
    for bits, rounding in ((16, "nearest"), (8, "stochastic")):
        pm = prepare(make(), ladder=(bits, "fp32"), backend="triton", rounding=rounding, grad_rounding=rounding)
        xi = x.clone().requires_grad_()
        out = pm(xi)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(xi.grad).all()


def test_1d_convolutions_take_the_2d_kernels(monkeypatch):
    """Ungrouped 1-d convolutions reach the 2-d routes as maps of height 1 (the grouped one
    stays 1-d); the network's output leaves contiguous, as PyTorch's (a user's ``view`` works),
    and close to the FP32 model's."""
    from muppet_fx import routes

    seen = []
    real = routes.conv_forward
    monkeypatch.setattr(routes, "conv_forward", lambda route, x_m, *a, **k: (seen.append(x_m.dim()),
                                                                             real(route, x_m, *a, **k))[1])
    torch.manual_seed(0)
    model = Signal1d()
    pm = prepare(model, ladder=(8, "fp32"))
    x = torch.randn(3, 3, 40)
    y = pm(x)
    assert seen == [4, 4, 3]
    assert y.is_contiguous() and y.view(3, -1).shape == (3, 4 * 36)
    ref = model(x)
    assert ref.shape == y.shape and (y - ref).norm() <= 0.1 * ref.norm()


def test_3d_convolution_products_follow_the_route():
    """A 3-d convolution whose mantissa sums pass 2**24 (positive operands near the top of the
    8-bit range, 128 x 27 taps), where the integer depth taps decline (``depth_taps``): the
    default route computes FP32 products of the values, bit for bit as emulate does (ATen's
    float64 3-d convolution had taken 7x FP32's time); ``exact=True`` sums the mantissas exactly
    (float64) and scales once."""
    from muppet_fx import quantise

    torch.manual_seed(0)
    conv = nn.Conv3d(128, 8, 3, padding=1)
    with torch.no_grad():  # mantissas 96-127: 1.98 * 2**6 = 126.7
        conv.weight.uniform_(1.5, 1.98)
    x = torch.rand(2, 128, 3, 4, 4) * 0.48 + 1.5
    got = {}
    for backend, exact in (("emulate", False), ("aten", False), ("aten", True)):
        pm = prepare(conv, ladder=(8, "fp32"), backend=backend, rounding="nearest", exact=exact,
                     quantise_outputs=False)
        got[backend, exact] = pm(x).detach()
    assert torch.equal(got["aten", False], got["emulate", False])
    qx, qw = quantise(x, 8, "nearest"), quantise(conv.weight.detach(), 8, "nearest")
    sums = torch.nn.functional.conv3d(qx.mantissa.double(), qw.mantissa.double(), padding=1)
    assert sums.max() > 2**24
    want = (sums * 2.0 ** -(qx.exponent + qw.exponent) + conv.bias.detach().double().view(1, -1, 1, 1, 1)).float()
    assert torch.equal(got["aten", True], want)  # the float64 sums plus the bias, rounded once
    assert not torch.equal(got["aten", False], want)  # the FP32 sums did round somewhere


@pytest.mark.skipif(not (HAS_TRITON_RUN or torch.cuda.is_available()),
                    reason="triton kernels need CUDA or TRITON_INTERPRET=1")
def test_cuda_training_step_reads_nothing_back(monkeypatch):
    """What a CUDA graph needs of a whole training step on the triton route, stochastic
    rounding and ``MasterCopyOptimizer`` around a fused SGD included: no tensor value read back
    on the host after the first step. On a GPU as it runs there; without one forced for CPU
    tensors, where only the batch norm's C kernels (a branch CPU tensors alone take) may read
    their exponent. Every other read raises.
    Seeds come from the device: two steps from the same weights round differently."""
    import inspect

    from muppet_fx import MasterCopyOptimizer
    from muppet_fx.kernels import quantise

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    monkeypatch.setattr(quantise, "FORCE_TRITON_PATH", device == "cpu")
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    pm = prepare(model, ladder=(8, "fp32"), backend="triton")
    opt = MasterCopyOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True), pm)
    x = torch.randn(2, 3, 11, 11, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad()
        pm(x).square().sum().backward()
        opt.step()
    step()  # the first step: the optimiser's state is created, checked on the host
    reads = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist", "__int__", "__float__",
                                                             "__index__", "numpy")}
    cpu_only = {"_bn_forward", "_bn_backward"}  # `if s.device.type == "cpu"`: never on CUDA

    def guarded(name):
        def read(self, *a, **k):
            caller = inspect.currentframe().f_back.f_code.co_name
            if caller not in cpu_only:
                raise AssertionError(f"Tensor.{name} read a value back in {caller}")
            return reads[name](self, *a, **k)
        return read
    grads = []
    start = [p.detach().clone() for p in model.parameters()]
    with monkeypatch.context() as m:
        for name in reads:
            m.setattr(torch.Tensor, name, guarded(name))
        for _ in range(2):
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), start):
                    p.copy_(p0)
            opt.zero_grad()
            pm(x).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
    assert opt.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(*grads))  # fresh draws, same weights
