"""ReLU with a byte mask for backward on the Triton route (CUDA): :mod:`relu_cpu`'s contract.

One pass each way: ``relu(x)`` or ``relu(a + b)`` (a residual block's end) with the mask
``relu(.) != 0``, and ``where(mask, grad, 0)``; on the GPU torch ops take three passes for the
forward (the sum, the ReLU, the comparison) and read the float32 output back for the mask. The
forward also reduces max |y| into a slot ``y`` carries (``quantise.remember_amax_slot``): the
next layer's quantiser skips its reduction pass. Values and gradients are torch's, bit for
bit (NaN and -0.0 pass the ReLU as ``torch.relu`` lets them). Returns ``None`` where the
kernels do not apply (not float32, memory orders that differ or are not dense); callers then
use torch ops.
"""
from __future__ import annotations

import torch

from .quantise import HAS_TRITON, is_dense, remember_amax_slot, triton_path

__all__ = ["relu_with_mask", "add_relu_with_mask", "relu_mask_backward"]

BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quantise import reduce_amax

    @triton.jit
    def _relu_mask_kernel(a_ptr, b_ptr, y_ptr, mask_ptr, amax_ptr, n, ADD: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(a_ptr + offs, mask=inside, other=0.0)
        if ADD:
            x = x + tl.load(b_ptr + offs, mask=inside, other=0.0)
        y = tl.where(x < 0.0, 0.0, x)
        tl.store(y_ptr + offs, y, mask=inside)
        tl.store(mask_ptr + offs, (y != 0.0).to(tl.uint8), mask=inside)
        reduce_amax(y[None, :], inside[None, :], amax_ptr)

    @triton.jit
    def _mask_backward_kernel(g_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        keep = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
        tl.store(out_ptr + offs, tl.where(keep, tl.load(g_ptr + offs, mask=inside, other=0.0), 0.0), mask=inside)


def _applies(*ts: torch.Tensor) -> bool:
    """Float32 tensors on the Triton route, dense, of one shape, memory order and device."""
    a = ts[0]
    return (HAS_TRITON and triton_path(a) and is_dense(a) and all(
        t.dtype == torch.float32 and t.device == a.device and t.shape == a.shape and t.stride() == a.stride()
        for t in ts))


def _forward(a: torch.Tensor, b: torch.Tensor | None):
    y = torch.empty_like(a)
    mask = torch.empty_like(a, dtype=torch.uint8)
    amax = torch.zeros((1, 2), dtype=torch.int32, device=a.device)
    n = a.numel()
    if n:
        _relu_mask_kernel[(triton.cdiv(n, BLOCK),)](a, a if b is None else b, y, mask, amax, n, ADD=b is not None,
                                                    BLOCK=BLOCK)
    return remember_amax_slot(y, amax), mask


def relu_with_mask(x: torch.Tensor):
    """``(relu(x), relu(x) != 0 as uint8)``, laid out like ``x``; ``None`` where not applicable."""
    return _forward(x, None) if _applies(x) else None


def add_relu_with_mask(a: torch.Tensor, b: torch.Tensor):
    """``(relu(a + b), mask)`` in one pass, for float32 tensors of one shape and memory order;
    ``None`` where not applicable."""
    return _forward(a, b) if _applies(a, b) else None


def relu_mask_backward(grad: torch.Tensor, mask: torch.Tensor):
    """``where(mask, grad, 0)`` for a float32 ``grad`` in ``mask``'s memory order; ``None``
    where not applicable."""
    if not (_applies(grad) and mask.dtype == torch.uint8 and mask.device == grad.device
            and mask.shape == grad.shape and mask.stride() == grad.stride()):
        return None
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _mask_backward_kernel[(triton.cdiv(n, BLOCK),)](grad, mask, out, n, BLOCK=BLOCK)
    return out
