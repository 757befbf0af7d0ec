"""Idioms of users' models and training code that the fixed-point levels must take as the
model itself does: ``.view`` after a convolution, empty batches, whole-model pickling, nested
preparation, other dtypes, autocast, fully masked attention rows, optimiser closures, activation checkpointing,
TorchScript and ``torch.func``.

Oracles: the same model written with the equivalent call (``reshape`` for ``view``), the
unprepared model, or PyTorch's own behaviour (finite outputs, clear errors)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from muppet_fx import prepare

NEAREST = dict(rounding="nearest", grad_rounding="nearest")


class LeNet(nn.Module):
    def __init__(self, flatten="view", branch=False):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 16, 5), nn.Linear(16 * 4 * 4, 10)
        self.flatten, self.branch = flatten, branch

    def forward(self, x):
        if self.branch and x.sum() > 1e9:  # data-dependent: its own code runs, intercepted
            x = x * 0
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.view(x.size(0), -1) if self.flatten == "view" else x.reshape(x.size(0), -1))


def _run(net, x, bits):
    pm = prepare(net, ladder=(bits, "fp32"), **NEAREST)
    xi = x.clone().requires_grad_()
    out = pm(xi)
    out.square().sum().backward()
    return out, xi.grad, [p.grad.clone() for p in net.parameters()]


def test_view_after_a_convolution_flattens_as_reshape_does():
    """At the fixed-point levels convolutions return channels-last maps; a LeNet-style
    ``x.view(n, -1)`` raised there. Traced and intercepted code both give reshape's result."""
    x = torch.randn(3, 1, 28, 28)
    for branch in (False, True):
        for bits in (8, 16):
            torch.manual_seed(0)
            got = _run(LeNet("view", branch), x, bits)
            torch.manual_seed(0)
            want = _run(LeNet("reshape", branch), x, bits)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
    y = torch.randn(4, 6)  # a dtype view is left as it is
    assert prepare(_DtypeView())(y).dtype == torch.int32


class _DtypeView(nn.Module):
    def forward(self, y):
        return y.view(torch.int32)


def test_empty_batches_run_at_every_level():
    """A batch of 0 samples (a filtered or last shard): empty outputs and zero weight gradients,
    as the model itself gives (8-bit convolutions had raised on reshaping)."""
    cases = [(nn.Conv2d(3, 8, 3, padding=1), (0, 3, 8, 8)), (nn.ConvTranspose2d(3, 4, 3), (0, 3, 5, 5)),
             (nn.Conv1d(3, 4, 3), (0, 3, 9)), (nn.Linear(3, 4), (0, 3))]
    for layer, shape in cases:
        x = torch.randn(shape)
        want = layer(x)
        want.sum().backward()
        want_grad = layer.weight.grad.clone()
        pm = prepare(layer, ladder=(8, 16, "fp32"))
        for level in (8, 16):
            layer.zero_grad()
            pm.set_precision(level)
            y = pm(x)
            y.sum().backward()
            assert y.shape == want.shape and torch.equal(layer.weight.grad, want_grad)


def test_prepared_models_pickle_whole_and_deepcopy():
    """``torch.save(pm)`` / ``pickle`` (the prepared classes are made per model class) load a
    model that computes the same, at every level, in both modes; ``deepcopy`` likewise."""
    import copy
    import io

    torch.manual_seed(0)
    pm = prepare(LeNet(), ladder=(8, 16, "fp32"), **NEAREST)
    x = torch.randn(2, 1, 28, 28)
    pm(x)
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(pm)):
        assert type(other) is type(pm) and other.precision == 8
        for level in (8, 16, "fp32"):
            for train in (True, False):
                pm.train(train)
                other.train(train)
                pm.set_precision(level)
                other.set_precision(level)
                assert torch.equal(other(x), pm(x))


def test_errors_name_the_problem():
    import numpy as np
    import pytest

    inner = prepare(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="submodule '0' is already prepared"):
        prepare(nn.Sequential(inner, nn.ReLU()))
    with pytest.raises(ValueError, match="does not climb"):
        prepare(nn.Linear(4, 4), ladder=(16, 8, "fp32"))
    pm = prepare(nn.Linear(4, 4), ladder=(np.int64(8), 16, "fp32"))  # NumPy ints are ints
    assert pm.ladder == (8, 16, "fp32") and type(pm.ladder[0]) is int
    pm.set_precision(torch.tensor(16))
    assert pm.precision == 16 and type(pm.precision) is int
    for bad in (8.0, True, torch.tensor(8.0), "fp64"):
        with pytest.raises(ValueError, match="not in the ladder"):
            pm.set_precision(bad)
    assert pm.precision == 16
    pm.set_precision(8)
    with pytest.raises(ValueError, match=r"layer 'Linear': input of shape \(2, 5\) does not have the 4 features"):
        pm(torch.randn(2, 5))
    conv = prepare(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="layer '0': input of shape .* has 5 channels where the layer takes 3"):
        conv(torch.randn(1, 5, 8, 8))
    for x in (torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.ones(1, 3, 8, 8, dtype=torch.int64)):
        with pytest.raises(TypeError, match=f"layer '0': input of type {x.dtype} for a weight of type torch.float32"):
            conv(x)  # as the convolution itself refuses it at "fp32", at the end of the ladder
    with pytest.raises(TypeError, match="layer 'Linear': input of type torch.float64"):
        pm(torch.randn(2, 4, dtype=torch.float64))
    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
                prepare(nn.Linear(4, 4), backend="triton")(torch.randn(2, 4))


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))


def test_models_in_other_float_types_run_up_the_ladder():
    """float64, float16 and bfloat16 models (12-16 bit products had mixed float32 values with
    the model's bias): the products compute in float32 from the fixed-point operands and
    return the model's type; gradients arrive in the parameters' type. The oracle: the same
    model in float32 (16-bit floats convert exactly; the products of the float64 copy see
    the same mantissas, so stay within float32 rounding of it)."""
    x32 = torch.randn(2, 3, 8, 8).to(torch.bfloat16).float()  # representable in every type
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        ref_net, net = _small_net(), _small_net().to(dtype)
        if dtype != torch.float64:  # the same parameter values in both
            ref_net.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
        ref = prepare(ref_net, ladder=(8, 12, 16, "fp32"), **NEAREST)
        pm = prepare(net, ladder=(8, 12, 16, "fp32"), **NEAREST)
        for level in (8, 12, 16):
            ref.set_precision(level)
            pm.set_precision(level)
            out = pm(x32.to(dtype))
            out.float().sum().backward()
            assert out.dtype == dtype and all(p.grad.dtype == dtype for p in net.parameters())
            want = ref(x32)
            tol = 1e-5 if dtype == torch.float64 else 1e-2
            assert torch.allclose(out.float(), want, rtol=tol, atol=tol), (dtype, level)
            net.zero_grad()


def test_fixed_point_levels_keep_their_precision_under_autocast():
    """Under ``torch.autocast`` a level's products run at its word length (the FP32 routes of
    the 9-16 bit levels had been cast down to bfloat16): the same outputs as without it."""
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    pm = prepare(net, ladder=(8, 12, 16, "fp32"), **NEAREST)
    x = torch.randn(16, 64)
    for level in (8, 12, 16):
        pm.set_precision(level)
        plain = pm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = pm(x)
        assert torch.equal(cast, plain)


def test_fully_masked_attention_rows_attend_to_nothing():
    """A sample whose keys are all padding: zero attention output for it, as PyTorch's
    scaled_dot_product_attention gives, and finite values and gradients for the others (one
    NaN row used to turn the whole batch NaN through the shared exponent)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    pm = prepare(mha, ladder=(8, 16, "fp32"))
    x = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    want = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    for level in (8, 16):
        pm.set_precision(level)
        out = pm(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        out.square().sum().backward()
        assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in mha.parameters())
        assert torch.allclose(out[1], want[1], atol=0.05)  # the output projection's bias alone
        assert torch.allclose(out[0], want[0], atol=0.05 if level == 8 else 1e-3)
        mha.zero_grad()
    q = torch.randn(1, 2, 4, 8)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0] = False

    class Sdpa(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, q, mask):
            return F.scaled_dot_product_attention(self.proj(q), q, q, attn_mask=mask)

    s = Sdpa()
    ps = prepare(s, ladder=(16, "fp32"))
    got, ref = ps(q, keep), s(q, keep)
    assert torch.equal(got[..., 0, :], torch.zeros_like(got[..., 0, :])) and torch.allclose(got, ref, atol=1e-3)


def test_optimiser_closures_and_hooks():
    """L-BFGS, whose step needs the closure, gets one that quantises each gradient it
    evaluates; the torch.optim hook API works on the wrapper (hooks run on the wrapped
    optimiser's steps)."""
    import muppet_fx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    pm = prepare(net, ladder=(8, "fp32"))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    opt = muppet_fx.MasterCopyOptimizer(torch.optim.LBFGS(pm.parameters(), lr=0.5, max_iter=4), pm)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    grads_on_grid = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(pm(x), y)
        loss.backward()
        return loss

    original = muppet_fx.MasterCopyOptimizer._quantise

    def spy(self, grads):
        original(self, grads)
        from muppet_fx import quantise
        grads_on_grid.append(all(torch.equal(quantise(g, 8, "nearest").dequantise(), g) for g in grads))

    muppet_fx.MasterCopyOptimizer._quantise = spy
    try:
        first = closure().item()
        for _ in range(3):
            opt.step(closure)
    finally:
        muppet_fx.MasterCopyOptimizer._quantise = original
    assert F.cross_entropy(pm(x), y).item() < first
    assert seen == ["pre", "post"] * 3 and len(grads_on_grid) > 3 and all(grads_on_grid)
    pre.remove()
    post.remove()
    opt.step(closure)
    assert len(seen) == 6


class _CachesOnFirstUse(nn.Module):
    """Stores a value derived from its input on first use, as torchvision's MultiScaleRoIAlign
    stores its scales (a trace used to leave its proxy there for the next trace to pick up)."""

    def __init__(self):
        super().__init__()
        self.lin, self.width = nn.Linear(6, 6), None

    def forward(self, x):
        if self.width is None:
            self.width = x.shape[-1]
        y = self.lin(x) * self.width
        return nn.functional.dropout(y, 0.5, self.training)


def test_traces_leave_no_proxies_on_modules():
    import torch.fx as fx

    net = _CachesOnFirstUse()
    pm = prepare(net, ladder=(16, "fp32"), **NEAREST)
    assert not isinstance(net.width, fx.Proxy) and not isinstance(pm.width, fx.Proxy)
    x = torch.randn(4, 6)
    net.eval()
    pm.eval()  # a second trace, of the eval-mode graph
    want = net(x)
    assert torch.allclose(pm(x), want, rtol=0, atol=1e-2 * want.abs().max().item())


def test_forward_hooks_run_at_every_level():
    """Hooks on layers and blocks (feature extraction, pruning's weight mask), registered
    before or after preparing: the graph calls hooked submodules as modules, quantised."""
    import pytest
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()),
                        nn.Conv2d(8, 4, 3))
    seen = []
    net[0].register_forward_hook(lambda m, a, o: seen.append(("conv", o.shape)))
    prune.l1_unstructured(net[3], "weight", amount=0.5)  # weight = weight_orig * mask, in a pre-hook
    pm = prepare(net, ladder=(8, 16, "fp32"), **NEAREST)
    x = torch.randn(2, 3, 10, 10)
    pm[2].register_forward_hook(lambda m, a, o: seen.append(("block", o.shape)))  # after preparing
    for level in ("fp32", 16, 8):
        seen.clear()
        pm.set_precision(level)
        out = pm(x)
        assert seen == [("conv", (2, 8, 8, 8)), ("block", (2, 8, 6, 6))], level
        out.sum().backward()
        mask = pm[3].weight_mask
        assert torch.equal(pm[3].weight_orig.grad * (1 - mask), torch.zeros_like(mask))  # pruned: no gradient
        assert pm[3].weight_orig.grad.abs().sum() > 0
        pm.zero_grad()
    pm.set_precision(16)
    with torch.no_grad():
        net[3].weight_orig.mul_(2)  # the pre-hook recomputes the pruned weight at every call
        want = net(x)
        assert torch.allclose(pm(x), want, atol=1e-2 * want.abs().max().item())
    xi = x.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="second derivative .* 'fp32' level"):
        torch.autograd.grad(pm(xi).sum(), xi, create_graph=True)  # had given a constant penalty


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.c(x))) + x


class _CheckpointedNet(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.stem, self.b1, self.b2, self.fc = nn.Conv2d(3, 8, 3, padding=1), _Block(), _Block(), nn.Linear(8, 10)
        self.mode = mode

    def forward(self, x):
        x = self.stem(x)
        if self.mode == "sequential":
            x = checkpoint_sequential(nn.Sequential(self.b1, self.b2), 2, x, use_reentrant=False)
        elif self.mode in ("reentrant", "non-reentrant"):
            x = checkpoint(self.b1, x, use_reentrant=self.mode == "reentrant")
            x = checkpoint(self.b2, x, use_reentrant=self.mode == "reentrant")
        else:
            x = self.b2(self.b1(x))
        return self.fc(x.mean((2, 3)))


def test_activation_checkpointing_recomputes_the_same_quantised_forward():
    """``torch.utils.checkpoint`` reruns a block's forward in backward (a trace through it would
    store the activations after all), restoring the RNG state: with stochastic rounding (seeds
    drawn from torch's generator) the recomputed forward draws the same bits, so gradients
    equal those of the model without checkpointing bit for bit. The reentrant variant hands the
    stem a contiguous gradient where the graph's is channels-last; the convolution takes its
    gradient in its output's layout, so the draws, which follow memory order, are the same."""
    x = torch.randn(4, 3, 12, 12)

    def grads(mode, bits):
        torch.manual_seed(1)
        net = _CheckpointedNet(mode)
        pm = prepare(net, ladder=(bits, "fp32"))
        torch.manual_seed(2)
        out = pm(x)
        out.square().sum().backward()
        calls = [pm._muppet_state.sites[f"b{i}.c"].calls for i in (1, 2)]
        return out.detach(), [p.grad for p in net.parameters()], calls

    for bits in (8, 12):
        for mode in ("non-reentrant", "reentrant", "sequential"):
            ref_out, ref_grads, calls = grads("none", bits)
            assert calls == [1, 1]
            out, got, calls = grads(mode, bits)
            # forward, then the recomputation in backward (checkpoint_sequential runs its last
            # segment plainly)
            assert calls == ([2, 1] if mode == "sequential" else [2, 2]), mode
            assert torch.equal(out, ref_out), (mode, bits)
            assert all(torch.equal(a, b) for a, b in zip(got, ref_grads)), (mode, bits)


def test_jit_and_func_transforms_work_at_fp32_and_say_why_not_below():
    """TorchScript and ``torch.func``'s differentiating transforms cannot run the quantised
    ops; they raise ``NotImplementedError`` naming the alternative, and work at ``"fp32"``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pm, x = prepare(net), torch.randn(5, 8)
    params = {k: v.detach() for k, v in pm.named_parameters()}
    loss = lambda p: torch.func.functional_call(pm, p, (x,)).square().sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="torch.jit.script cannot compile the prepared Sequential"):
        torch.jit.script(pm)
    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record .* 8-bit level"):
        torch.jit.trace(pm, x)
    with pytest.raises(NotImplementedError, match="through the quantised op 'linear'"):
        torch.func.grad(loss)(params)
    assert torch.func.vmap(pm)(x.unsqueeze(1)).shape == (5, 1, 4)  # forward-only transforms run

    pm.set_precision("fp32")
    assert torch.equal(torch.jit.trace(pm, x)(x), net(x))
    g = torch.func.grad(loss)(params)
    net.zero_grad()
    net(x).square().sum().backward()
    assert all(torch.equal(g[k], v.grad) for k, v in net.named_parameters())


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class _WithFunction(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.f, self.head, self.function = nn.Linear(8, 8), nn.Linear(8, 3), function

    def forward(self, x):
        return self.head(self.function.apply(torch.tanh(self.f(x))))


def _relative_errors(make, x, bits=16, **kwargs):
    """(output, gradient of the first parameter) relative errors of the prepared model at
    ``bits`` (nearest rounding) against the unprepared one."""
    torch.manual_seed(0)
    ref = make()
    torch.manual_seed(0)
    net = make()
    pm = prepare(net, ladder=(bits, "fp32"), **NEAREST, **kwargs)
    out, want = pm(x), ref(x)
    out.square().sum().backward()
    want.square().sum().backward()
    g, h = next(net.parameters()).grad, next(ref.parameters()).grad
    return float((out - want).norm() / want.norm()), float((g - h).norm() / h.norm())


def test_custom_autograd_functions_keep_their_backward():
    """A graph would record a custom ``autograd.Function``'s forward ops and lose its backward
    (a gradient reversal layer's gradients came out negated, a straight-through estimator's
    zero): the module calling it runs its own code, the Function applied as written."""
    x = torch.randn(4, 8)
    for function in (_GradReverse, _RoundStraightThrough):
        out_err, grad_err = _relative_errors(lambda: _WithFunction(function), x)
        assert out_err < 1e-3 and grad_err < 1e-3, function.__name__


class _InPlaceBeforeNorm(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.c, self.bn, self.fc, self.op = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5), op

    def forward(self, x):
        h = self.c(x)
        if self.op == "clamp_":
            h.clamp_(-0.2, 0.2)
        elif self.op == "abs_":
            h.abs_()
        elif self.op == "mul_":
            h.mul_(3.0)
        elif self.op == "setitem":
            h[h > 0.1] = 0.1
        elif self.op == "view":  # a write through a view of the channels-last map
            h.view(h.shape[0], -1).mul_(0.5)
        return self.fc(F.relu(self.bn(h)).mean((2, 3)))


def test_in_place_writes_reach_the_batch_norm():
    """The compact batch norm reads the mantissas the convolution's quantiser wrote; a write
    to the convolution's output in between (``clamp_``, ``h[mask] = v``, through a ``view``)
    was lost (relative errors 0.1-0.9 at 16 bits). Written outputs now reach the stock batch
    norm, and a view written in place aliases a contiguous copy that later nodes read."""
    x = torch.randn(8, 3, 10, 10)

    def run(op, compact):
        torch.manual_seed(0)
        net = _InPlaceBeforeNorm(op)
        out = prepare(net, ladder=(16, "fp32"), compact_activations=compact, **NEAREST)(x)
        out.square().sum().backward()
        return out, [p.grad for p in net.parameters()]

    for op in ("clamp_", "abs_", "mul_", "setitem", "view"):
        out_err, _ = _relative_errors(lambda: _InPlaceBeforeNorm(op), x)
        assert out_err < 1e-3, op
        (out, grads), (stock, stock_grads) = run(op, True), run(op, False)  # the stock batch norm
        assert torch.equal(out, stock) and all(torch.equal(a, b) for a, b in zip(grads, stock_grads)), op


class _Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 5)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(16))
        self.step, self.log, self.cache = 0, [], {}

    def forward(self, x):
        self.calls += 1
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        self.step += 1
        self.log.append(self.step)
        self.cache["last"] = self.step
        self.feat = self.l(x - self.ema)
        return self.feat * (2.0 if self.step > 2 else 1.0)


def test_forward_state_changes_happen_on_every_call():
    """A trace runs ``self.calls += 1`` and ``self.ema.mul_(m)`` on real buffers once, at
    prepare time, and records nothing; Python attributes (``self.step += 1``, ``self.feat =
    h``, a list or dict filled in place) likewise. Such modules run their own code, and prepare
    leaves the model as it was."""
    torch.manual_seed(0)
    net = _Stateful()
    pm = prepare(net, ladder=(8, "fp32"), **NEAREST)
    assert int(net.calls) == 0 and net.step == 0 and not hasattr(net, "feat") and not net.ema.any()
    assert net.log == [] and net.cache == {}
    torch.manual_seed(0)
    ref = _Stateful()
    for i in range(4):
        x = torch.randn(8, 16)
        out, want = pm(x), ref(x)
        assert int(pm.calls) == int(ref.calls) == i + 1 and pm.step == ref.step == i + 1
        assert pm.log == ref.log and pm.cache == ref.cache
        assert torch.equal(pm.ema, ref.ema)
        assert torch.equal(pm.feat * (2.0 if i >= 2 else 1.0), out)  # this call's feature
        assert float((out - want).norm() / want.norm()) < 0.05


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.aux = nn.Linear(8, 4), nn.Linear(8, 4)
        self.temperature, self.use_aux = 1.0, False

    def forward(self, x):
        out = self.fc(x) / self.temperature
        return out + self.aux(x) if self.use_aux else out


def test_scalar_attributes_changed_after_prepare_take_effect():
    """A graph keeps the Python scalars its trace read (``self.temperature``, a branch on
    ``self.use_aux``, torchvision's ``StochasticDepth.p``) as constants: set after ``prepare``
    they were ignored at the fixed-point levels (relative error 3.0). They key the graphs now,
    as the training flags do."""
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)
    net = _Tempered()
    pm, x = prepare(net, ladder=(16, "fp32"), **NEAREST), torch.randn(2, 8)
    for temperature, aux in ((1.0, False), (4.0, False), (4.0, True)):
        pm.temperature = net.temperature = temperature
        pm.use_aux = net.use_aux = aux
        want = net(x)
        assert float((pm(x) - want).norm() / want.norm()) < 1e-3, (temperature, aux)

    drop = nn.Sequential(nn.Linear(8, 8), StochasticDepth(0.0, "row"))
    pm = prepare(drop, ladder=(16, "fp32"))
    drop[1].p = 1.0  # every row dropped
    assert not pm(torch.randn(6, 8)).any()


class _LowRankLinear(nn.Linear):  # an adapter: nn.Linear's weight plus a low-rank path
    def __init__(self, n_in, n_out, rank=2):
        super().__init__(n_in, n_out)
        self.A, self.B = nn.Parameter(torch.randn(rank, n_in) * 0.1), nn.Parameter(torch.randn(n_out, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.A.t() @ self.B.t()


class _StandardisedConv(nn.Conv2d):  # weight standardisation (timm's StdConv2d, BiT)
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _Small(nn.Module):
    def __init__(self, conv=nn.Conv2d, linear=nn.Linear):
        super().__init__()
        self.c1, self.c2, self.fc = conv(3, 8, 3, padding=1), conv(8, 8, 3, padding=1), linear(8 * 36, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.fc(x.flatten(1))


def test_layer_subclasses_with_their_own_forward_run_it():
    """A subclass of ``nn.Linear``/``nn.Conv2d`` that overrides ``forward`` was quantised as the
    stock layer, its own computation dropped (relative error 0.95 for a low-rank adapter). Its
    code is traced now, its products quantised."""
    x = torch.randn(4, 3, 12, 12)
    for conv, linear in ((_StandardisedConv, nn.Linear), (nn.Conv2d, _LowRankLinear)):
        out_err, grad_err = _relative_errors(lambda: _Small(conv, linear), x)
        assert out_err < 1e-3 and grad_err < 1e-2, (conv.__name__, linear.__name__)


def test_submodules_replaced_after_prepare_take_effect():
    """Replacing a layer of the prepared model (a new head, an ``Identity``, an adapter) is
    seen at the next call: the model it was prepared from gets the same module, and the
    graph key, which holds the modules' children, asks for a new graph."""
    x = torch.randn(4, 3, 12, 12)
    edits = {"fc": lambda: nn.Sequential(nn.Linear(288, 16), nn.ReLU(), nn.Linear(16, 5)),
             "c2": nn.Identity, "fc ": lambda: _LowRankLinear(288, 5)}
    for name, make in edits.items():
        torch.manual_seed(0)
        net = _Small()
        pm = prepare(net, ladder=(16, "fp32"), **NEAREST)
        pm(x)
        torch.manual_seed(1)
        setattr(pm, name.strip(), make())
        assert getattr(net, name.strip()) is getattr(pm, name.strip())
        out, want = pm(x), net(x)  # net: the edited model at FP32
        assert float((out - want).norm() / want.norm()) < 1e-3, name


def test_prepare_leaves_parametrizations_as_they_were():
    """Reading a spectral-normalised layer's weight while preparing ran one power iteration on
    the user's model (``_u`` changed; the ``"fp32"`` level then differed by 3.4e-5 from a
    copy taken before). Buffers written while preparing are restored."""
    import copy

    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    net = _Small()
    parametrizations.spectral_norm(net.c2)
    ref = copy.deepcopy(net)
    pm = prepare(net, ladder=(16, "fp32"))
    assert torch.equal(net.c2.parametrizations.weight[0]._u, ref.c2.parametrizations.weight[0]._u)
    x = torch.randn(4, 3, 12, 12)
    pm.set_precision("fp32")
    assert torch.equal(pm(x), ref(x))
    pm.set_precision(16)
    for _ in range(2):
        pm(x), ref(x)
    assert torch.equal(net.c2.parametrizations.weight[0]._u, ref.c2.parametrizations.weight[0]._u)


class _NormAct(nn.BatchNorm2d):  # timm's BatchNormAct2d: a batch norm with children, traced through
    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


def test_buffers_updated_in_place_are_graph_values():
    """Buffers read in ``forward`` are traced as graph values, so in-place updates such as a
    batch norm counting ``num_batches_tracked`` repeat on every call in the graph (the module
    is not left to run its own code), as in the model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), _NormAct(8), nn.Flatten(), nn.Linear(8 * 36, 4))
    pm = prepare(net, ladder=(8, "fp32"))
    assert int(net[1].num_batches_tracked) == 0
    for i in range(3):
        pm(torch.randn(2, 3, 8, 8))
        assert int(net[1].num_batches_tracked) == i + 1
    assert not pm._muppet_state.opaque
