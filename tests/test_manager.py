"""Precision manager, master-copy optimiser, LR rule, checkpoints and the policy plot."""
import copy
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from muppet_fx import (CyclicPolicy, GradientDiversityPolicy, MasterCopyOptimizer, PrecisionLR,
                       PrecisionManager, ScheduledPolicy, load_checkpoint, plot_policy, prepare,
                       save_checkpoint)

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def _setup(policy, seed=0, lr=0.05):
    torch.manual_seed(seed)
    model = small_cnn()
    pm = prepare(model, ladder=(8, 12, "fp32"))
    manager = PrecisionManager(pm, policy)
    opt = MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=lr, momentum=0.9), pm, manager)
    sched = PrecisionLR(opt, manager, gamma=0.1, step_epochs=2)
    return model, pm, manager, opt, sched


def _data(n=64):
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _epoch(pm, opt, manager, sched, x, y, epoch, batch=16):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    for i in range(0, len(x), batch):
        idx = order[i:i + batch]
        opt.zero_grad()
        F.cross_entropy(pm(x[idx]), y[idx]).backward()
        opt.step()
    manager.end_epoch()
    sched.step()


def test_schedule_switches_and_lr_rule():
    """Levels follow the schedule; LR is constant in fixed point and decays /10 every 2 FP32 epochs."""
    model, pm, manager, opt, sched = _setup(ScheduledPolicy({2: 12, 3: "fp32"}))
    seen = []
    manager.on_switch(lambda old, new, epoch: seen.append((old, new, epoch)))
    x, y = _data()
    lrs, levels = [], []
    for e in range(8):
        levels.append(manager.level)
        _epoch(pm, opt, manager, sched, x, y, e)
        lrs.append(opt.param_groups[0]["lr"])
    assert levels == [8, 8, 12, "fp32", "fp32", "fp32", "fp32", "fp32"]
    assert seen == [(8, 12, 1), (12, "fp32", 2)] and manager.fp32_start == 3
    # lrs[e] is the rate for epoch e + 1; FP32 runs from epoch 3: 3-4 at 0.05, 5-6 at 0.005, ...
    want = [0.05, 0.05, 0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005]
    assert lrs == pytest.approx(want)
    assert pm.precision == "fp32"


def test_non_finite_gradient_skips_step():
    """A NaN gradient: no update, master weights bit-identical, the step counted."""
    model, pm, manager, opt, _ = _setup(ScheduledPolicy({0: 8}))
    x, y = _data(16)
    F.cross_entropy(pm(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("inf")  # a diverging activation reaches the gradients
    opt.zero_grad()
    F.cross_entropy(pm(x_bad), y).backward()
    opt.step()
    assert opt.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_finiteness_check_finds_every_non_finite_and_keeps_values():
    """The fused check: NaN or inf in any gradient of any floating type is found; finite
    gradients keep every bit (signed zeros, subnormals)."""
    from muppet_fx.optim import _all_finite
    grads = [torch.tensor([-0.0, 1e-45, -3e38]), torch.randn(3, 5, dtype=torch.float64),
             torch.randn(7).bfloat16(), torch.randn(2, 2)]
    bits = [g.view(torch.int16 if g.dtype == torch.bfloat16 else torch.int64 if g.dtype == torch.float64
                   else torch.int32).clone() for g in grads]
    assert _all_finite(grads) and _all_finite([])
    assert all(torch.equal(g.view(b.dtype), b) for g, b in zip(grads, bits))
    for i, bad in ((3, float("inf")), (1, float("nan")), (2, -float("inf"))):
        g = grads[i].flatten()
        old, g[-1] = g[-1].clone(), bad
        assert not _all_finite(grads), (i, bad)
        g[-1] = old


def test_applied_gradients_are_quantised():
    """At 8 bits every applied weight gradient lies on an 8-bit grid of its own exponent."""
    model, pm, manager, opt, _ = _setup(ScheduledPolicy({0: 8}), lr=0.0)
    x, y = _data(16)
    F.cross_entropy(pm(x), y).backward()
    opt.step()
    for name, g in manager.gradients().items():
        amax = float(g.abs().max())
        s = math.floor(math.log2(127 / amax))
        s = s + 1 if amax * 2 ** (s + 1) <= 127 else s
        m = g.double() * 2.0**s
        assert torch.equal(m, m.round()) and float(m.abs().max()) <= 127, name


def _run(epochs, policy_factory, stop_at=None, resume_from=None, tmp=None):
    model, pm, manager, opt, sched = _setup(policy_factory())
    x, y = _data()
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, model=pm, optimizer=opt, manager=manager, scheduler=sched)["epoch"]
    for e in range(start, epochs):
        _epoch(pm, opt, manager, sched, x, y, e)
        if stop_at is not None and e == stop_at:
            save_checkpoint(tmp, model=pm, optimizer=opt, manager=manager, scheduler=sched, extra={"epoch": e + 1})
    return [p.detach().clone() for p in model.parameters()], manager.history


def test_resume_is_bit_identical(tmp_path):
    """Interrupted after epoch 2 and resumed: parameters and history equal an uninterrupted run
    (5 epochs, switching 8 -> 12 -> fp32 in between, stochastic rounding throughout)."""
    factory = lambda: ScheduledPolicy({2: 12, 4: "fp32"})  # noqa: E731
    ckpt = tmp_path / "ckpt.pt"
    full, hist_full = _run(5, factory, stop_at=2, tmp=ckpt)
    resumed, hist_res = _run(5, factory, resume_from=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    assert hist_full == hist_res


def test_resume_with_gradient_diversity_state(tmp_path):
    """The diversity window survives a checkpoint: same decisions after resuming mid-window."""
    factory = lambda: GradientDiversityPolicy(resolution=1, gamma=0, beta=0.0, alpha=1.0)  # noqa: E731
    ckpt = tmp_path / "gd.pt"
    full, h1 = _run(5, factory, stop_at=1, tmp=ckpt)
    resumed, h2 = _run(5, factory, resume_from=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed)) and h1 == h2


def test_bad_checkpoints_leave_state_untouched(tmp_path):
    model, pm, manager, opt, sched = _setup(ScheduledPolicy({2: 12}))
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=pm, optimizer=opt, manager=manager, scheduler=sched)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:100])
    other = prepare(nn.Linear(3, 3), ladder=(8, 12, "fp32"))
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(corrupt, model=pm)
    with pytest.raises(ValueError, match="does not match this model"):
        load_checkpoint(path, model=other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in snapshot.items())
    m2, pm2, man2, opt2, _ = _setup(GradientDiversityPolicy())
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ValueError, match="policy"):
        load_checkpoint(path, model=pm2, optimizer=opt2, manager=man2)
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in before.items()) and man2.epoch == 0
    (tmp_path / "x.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read|not a muppet_fx"):
        load_checkpoint(tmp_path / "x.pt", model=pm)


def test_cyclic_policy_sets_bits_without_retrace():
    torch.manual_seed(0)
    model = small_cnn()
    pm = prepare(model, ladder=(8, "fp32"))
    code = pm._muppet_code
    manager = PrecisionManager(pm, CyclicPolicy(b_min=3, b_max=8, bwd_bits=8, total_iterations=8, num_cycles=2))
    opt = MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=0.01), pm, manager)
    x, y = _data(16)
    bits = []
    for _ in range(8):
        bits.append(pm._muppet_state.fwd_bits)
        opt.zero_grad()
        F.cross_entropy(pm(x), y).backward()
        opt.step()
    # period 4: phases 0, .25, .5, .75 -> 3, 3.73, 5.5, 7.27
    assert bits == [3, 4, 6, 7, 3, 4, 6, 7] and pm._muppet_state.bwd_bits == 8
    assert pm._muppet_code is code  # the same generated graph served every word length


def test_history_log_and_plot(tmp_path):
    model, pm, manager, opt, sched = _setup(GradientDiversityPolicy(resolution=1, gamma=0, beta=0.0))
    manager.log_path = tmp_path / "h.csv"
    x, y = _data()
    for e in range(4):
        _epoch(pm, opt, manager, sched, x, y, e)
    text = (tmp_path / "h.csv").read_text().splitlines()
    assert len(text) == 5 and "diversity" in text[0] and "level" in text[0]
    png = plot_policy(manager.history, tmp_path / "policy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="log_path"):
        PrecisionManager(pm, log_path=tmp_path / "h.txt")


@pytest.mark.skipif(not (CIFAR / "train.npz").exists(), reason=f"CIFAR-10 copy not found at {CIFAR}")
def test_gradient_diversity_climbs_on_real_data():
    """A small CNN on 512 real CIFAR-10 images: the gradient-diversity policy switches precision
    by itself within 10 epochs, and the loss goes down. With the paper's defaults the threshold
    (2.5 at epoch 0) decays below the measured p (1.0-1.4) only after about 14 epochs, so the
    threshold decays faster here (lam 0.5), with resolution 2 and gamma 1; measured: switch to
    12 bits at epoch 7."""
    with np.load(CIFAR / "train.npz") as d:
        x = torch.tensor(d["images"][:512]).permute(0, 3, 1, 2).float().div(255)
        y = torch.tensor(d["labels"][:512])
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    torch.manual_seed(0)
    model = small_cnn()
    pm = prepare(model)
    manager = PrecisionManager(pm, GradientDiversityPolicy(resolution=2, gamma=1, lam=0.5))
    opt = MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=0.05, momentum=0.9), pm, manager)
    losses = []
    for epoch in range(10):
        total = 0.0
        for i in range(0, 512, 64):
            opt.zero_grad()
            loss = F.cross_entropy(pm(x[i:i + 64]), y[i:i + 64])
            loss.backward()
            opt.step()
            total += float(loss.detach())
        losses.append(total / 8)
        manager.end_epoch()
    assert any(r["switched"] for r in manager.history), manager.history
    assert manager.level != 8
    assert losses[-1] < losses[0]


def test_policy_sees_the_last_step_whatever_the_zero_grad_position():
    """``optimizer.step(); optimizer.zero_grad()`` (either ``set_to_none``) clears ``.grad``
    before ``end_epoch``: the policy is fed the gradients the last step applied, as with
    ``zero_grad`` before ``backward``, so its diversities are the same to the last bit."""
    def diversities(style):
        torch.manual_seed(0)
        pm = prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5)))
        manager = PrecisionManager(pm, GradientDiversityPolicy())
        opt = MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=0.05, momentum=0.9), pm, manager)
        for epoch in range(5):
            for it in range(3):
                g = torch.Generator().manual_seed(epoch * 10 + it)
                x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
                if style == "before":
                    opt.zero_grad()
                F.cross_entropy(pm(x), y).backward()
                opt.step()
                if style != "before":
                    opt.zero_grad(set_to_none=style == "after, to none")
            manager.end_epoch()
        return [r.get("diversity") for r in manager.history]

    ref = diversities("before")
    assert sum(d is not None for d in ref) == 2  # a window of three epochs, then one per epoch
    for style in ("after, to none", "after, zeroed"):
        assert diversities(style) == ref, style


def test_last_step_gradients_are_released_by_the_next_training_forward():
    """The policy's gradients of the last step are held past ``zero_grad(set_to_none=True)``
    only until the next training forward: never beside the next step's own. An evaluation
    forward (``eval()``/``no_grad``) keeps them for ``end_epoch``."""
    torch.manual_seed(0)
    pm = prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5)))
    manager = PrecisionManager(pm, GradientDiversityPolicy())
    opt = MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=0.05), pm, manager)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))

    def step():
        F.cross_entropy(pm(x), y).backward()
        opt.step()
        held = [weakref.ref(p.grad) for p in (pm[0].weight, pm[3].weight)]
        opt.zero_grad(set_to_none=True)
        return held

    held = step()
    assert all(r() is not None for r in held)  # the manager's references keep them alive
    pm.eval()
    pm(x)
    pm.train()
    with torch.no_grad():
        pm(x)
    assert all(r() is not None for r in held)
    out = pm(x)  # the next step begins
    assert all(r() is None for r in held)
    out.sum().backward()
    held = step()
    manager.end_epoch()  # fed the last step's gradients
    assert manager.policy.history[-1]["epoch"] == 0
    pm(x)
    with pytest.raises(ValueError, match="no training-mode forward between the epoch's last step"):
        manager.end_epoch()


def test_sparse_gradients_are_quantised_and_applied():
    """``nn.Embedding(sparse=True)``: its coalesced gradient's values are quantised like any
    other gradient (on the 8-bit grid of their own exponent, within one step of it) and the
    wrapped SGD applies them to the looked-up rows only."""
    from muppet_fx.kernels.quantise_cpu import host_exponent

    torch.manual_seed(0)
    emb, head = nn.Embedding(50, 16, sparse=True), nn.Linear(16, 5)
    pm = prepare(nn.ModuleDict({"emb": emb, "head": head}), ladder=(8, "fp32"))
    opt = MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=1.0), pm)
    idx, y = torch.randint(0, 25, (8, 6)), torch.arange(8) % 5
    F.cross_entropy(pm.head(pm.emb(idx).mean(1)), y).backward()
    g = emb.weight.grad.coalesce()
    before = emb.weight.detach().clone()
    opt.step()
    applied = before - emb.weight.detach()
    rows = g.indices()[0]
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(applied[untouched], torch.zeros_like(applied[untouched]))
    s = host_exponent(float(g.values().abs().max()), 8, 126)
    m = applied[rows] * 2.0**s  # w - lr * g in float32 leaves ~1e-7 relative of the grid value
    assert (m - m.round()).abs().max() < 1e-3 and m.round().abs().max() <= 127
    assert (applied[rows] - g.values()).abs().max() < 2.0**-s


def test_policy_sees_a_weight_replaced_after_prepare():
    """The pass tells each site its weight; a parameter assigned to the layer afterwards (here
    before the first step) is the one whose gradients the policy reads."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    pm = prepare(net)
    manager = PrecisionManager(pm, GradientDiversityPolicy())
    net[3].weight = nn.Parameter(torch.randn(3, 4 * 6 * 6))
    pm(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = manager.gradients()
    assert grads["3"] is net[3].weight.grad and grads["0"] is net[0].weight.grad


class Conv1D(nn.Module):
    """GPT-2's projection: ``addmm(bias, x, weight)`` with the weight stored input-major."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)


class Products(nn.Module):
    """A parameter as ``mat2`` of ``addmm``, as the first operand of ``matmul`` and as the
    second of ``einsum``."""

    def __init__(self):
        super().__init__()
        self.proj = Conv1D(6, 8)
        self.left = nn.Parameter(torch.randn(8, 5) * 0.1)
        self.right = nn.Parameter(torch.randn(8, 3) * 0.1)

    def forward(self, x):
        h = torch.matmul(self.left, self.proj(x)).relu()  # (8, 8)
        return torch.einsum("nd,de->ne", h, self.right)


def test_policy_sees_the_weights_of_every_product():
    """The weight of ``addmm(input, mat1, mat2)`` is ``mat2``; of ``matmul`` and ``einsum``,
    whichever operand is a parameter. The pass gives each site its weight, and the policy
    reads their gradients."""
    torch.manual_seed(0)
    net = Products()
    pm = prepare(net)
    weights = [s.weight for s in pm._muppet_state.sites.values()]
    want = [net.proj.weight, net.left, net.right]
    assert len(weights) == 3 and all(w is p for w, p in zip(weights, want))
    manager = PrecisionManager(pm, GradientDiversityPolicy())
    pm(torch.randn(5, 6)).sum().backward()
    grads = list(manager.gradients().values())
    assert len(grads) == 3 and all(g is p.grad for g, p in zip(grads, want))


def test_policy_sees_cross_attention_projections():
    """Cross-attention runs the packed projection as three row blocks (no parameter of their
    own): the query site reports the packed weight, so the policy reads its gradient."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    pm = prepare(layer)
    manager = PrecisionManager(pm, GradientDiversityPolicy())
    pm(torch.randn(2, 5, 16), torch.randn(2, 7, 16)).sum().backward()
    grads = manager.gradients()
    assert grads["multihead_attn.q_proj"] is layer.multihead_attn.in_proj_weight.grad
    assert grads["self_attn.in_proj"] is layer.self_attn.in_proj_weight.grad
    assert len(grads) == 6  # linear1, linear2, and two projections per attention block


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
                                  lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)])
def test_fused_optimiser_steps_without_host_reads(make, monkeypatch):
    """With a fused optimiser, steps after the first read nothing back to the host (so a CUDA
    graph can capture them): the NaN check goes to the optimiser's kernel as ``found_inf``. A
    NaN gradient leaves the weights and the optimiser state bit-identical and counts as skipped;
    a finite step equals the wrapped optimiser's own step on the quantised gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    pm = prepare(model, ladder=(8, "fp32"))
    opt = MasterCopyOptimizer(make(model.parameters()), pm)
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))

    def grads():
        opt.zero_grad()
        F.cross_entropy(pm(x), y).backward()
    grads()
    opt.step()  # the first step is checked on the host (the optimiser state is created)
    assert opt._skipped_on_device is None

    reads = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist", "__int__", "__float__")}

    def no_reads(name):  # the CPU quantiser's own integer seed draws (host tensors on any machine) may be read
        def read(self, *a, **k):
            if self.dtype.is_floating_point or self.dtype == torch.bool:
                raise AssertionError(f"Tensor.{name} read a {self.dtype} value back during a fused step")
            return reads[name](self, *a, **k)
        return read
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in model.parameters()]
    grads()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    with monkeypatch.context() as m:
        for name in reads:
            m.setattr(torch.Tensor, name, no_reads(name))
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(v, opt.state[p][k]) for s, p in zip(state, model.parameters()) for k, v in s.items())
    # a finite step: the same as the wrapped optimiser stepping on the gradients this one quantised
    grads()
    twin = copy.deepcopy(model)
    twin_opt = make(twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))  # its own state tensors
    torch.manual_seed(7)
    with monkeypatch.context() as m:
        for name in reads:
            m.setattr(torch.Tensor, name, no_reads(name))
        opt.step()
    torch.manual_seed(7)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()  # already quantised in place by opt.step()
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert opt.skipped_steps == 1 and opt.state_dict()["skipped_steps"] == 1
