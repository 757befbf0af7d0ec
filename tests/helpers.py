"""Shared test helpers."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PRODUCTS = {torch.ops.aten.convolution.default: 1, torch.ops.aten.mm.default: 1,
             torch.ops.aten.addmm.default: 1, torch.ops.aten.bmm.default: 1,
             torch.ops.aten.baddbmm.default: 1,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: 2,
             torch.ops.aten._scaled_dot_product_efficient_attention.default: 2,
             torch.ops.aten._scaled_dot_product_flash_attention.default: 2}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += _PRODUCTS.get(func, 0)
        return func(*args, **(kwargs or {}))


def count_products(model, inputs) -> int:
    """Convolutions and matrix products (attention counted as its two products) that one
    forward pass of ``model`` runs, seen at the ATen level."""
    with _Count() as c:
        model(*inputs)
    return c.n


def write_cifar_npz(folder: Path, n_train: int, n_test: int) -> Path:
    """A CIFAR-10 stand-in in the npz layout of our data copy: random images and labels, seed 0."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name, n in (("train.npz", n_train), ("test.npz", n_test)):
        np.savez(folder / name, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 10, n).astype(np.int64))
    return folder


def _flat(out):
    if hasattr(out, "to_tuple"):  # model output classes: their fields in order
        out = out.to_tuple()
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return [out] if isinstance(out, torch.Tensor) else []


def _loss(out):
    return sum(t.float().sum() for t in _flat(out) if t.is_floating_point())


def check_zoo_model(make, inputs, detection: bool = False, max_error: float = 1e-2) -> None:
    """A library model prepared with default settings, against the unprepared one: bit-identical
    at "fp32" and within ``max_error`` relative L2 error at 16 bits (eval mode; detection models
    return boxes after NMS there, so they are compared in train mode only); in train mode every
    convolution and matrix product the original runs (ATen-level count) quantised, none kept
    FP32, and finite gradients on every parameter the original gives one to."""
    from muppet_fx import prepare

    torch.manual_seed(0)
    model, x = make(), inputs()
    if not detection:
        model.eval()
        pm = prepare(model)
        with torch.no_grad():
            ref = _flat(model(*x))
            pm.set_precision("fp32")
            got = _flat(pm(*x))
            assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, got))
            pm.set_precision(16)
            for a, b in zip(ref, _flat(pm(*x))):
                if a.is_floating_point():
                    assert (b.float() - a.float()).norm() <= max_error * a.float().norm() + 1e-6
                else:
                    assert torch.equal(a, b)

    model.train()
    ref_loss = _loss(model(*x))
    ref_loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = count_products(model, x)

    pm = prepare(model)
    out = pm(*x)
    assert sum(s.calls for s in pm._muppet_state.sites.values()) == expected
    assert not pm._muppet_state.fp32_layers
    loss = _loss(out)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        if n in with_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n

    # prepared in train mode, evaluated: the eval-mode graph is traced on first use
    model.eval()
    pm.eval()
    pm.set_precision(16)
    with torch.no_grad():
        args = x[:1] if detection else x  # detection models take no targets in eval mode
        ref, got = model(*args), pm(*args)
    if detection:  # boxes after NMS: the same fields, finite
        assert [sorted(d) for d in got] == [sorted(d) for d in ref]
        assert all(torch.isfinite(d["boxes"]).all() for d in got)
    else:
        for a, b in zip(_flat(ref), _flat(got), strict=True):
            assert (b.float() - a.float()).norm() <= max_error * a.float().norm() + 1e-6


def load_script(path: Path, name: str):
    """A benchmark script imported as a module. The scripts put their own folders first on
    ``sys.path`` (``benchmarks/`` holds a ``kernels.py`` that would shadow the PyPI package
    ``transformers`` imports), so the path is restored after."""
    saved = sys.path[:]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved
