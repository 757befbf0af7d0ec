"""Shared test helpers."""
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
