"""Shared test helpers."""
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
