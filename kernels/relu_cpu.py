"""ReLU with a byte mask for backward, one C pass each way (``relu_cpu.c``).

``torch.where(mask, grad, 0)`` on a bool mask ran 7x slower than ``threshold_backward`` on these
CPUs (4.3 vs 0.6 ms on a 128x16x32x32 activation), which made saving a mask instead of the float32
output cost a fifth of a ResNet-20 step. Returns ``None`` where the kernel does not apply (no C
compiler, not float32 on the CPU, different memory orders); callers then use torch ops.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .cbuild import bound_library
from .quantise import is_dense
from .quantise_cpu import remember_absmax

__all__ = ["relu_with_mask", "add_relu_with_mask", "relu_mask_backward"]

_P = ctypes.c_void_p
_SIGNATURES = {"relu_mask": (ctypes.c_uint32, [_P, ctypes.c_int64, _P, _P, ctypes.c_int]),
               "add_relu_mask": (ctypes.c_uint32, [_P, _P, ctypes.c_int64, _P, _P, ctypes.c_int]),
               "relu_mask_backward": (None, [_P, _P, ctypes.c_int64, _P, ctypes.c_int])}


@functools.cache  # a Path and a dict lookup per call cost 7 us, as much as a small kernel
def _library():
    return bound_library(Path(__file__).with_name("relu_cpu.c"), _SIGNATURES)


def relu_with_mask(x: torch.Tensor):
    """``(relu(x), relu(x) != 0 as uint8)``, laid out like ``x``; ``None`` where not applicable."""
    lib = _library()
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or not is_dense(x):
        return None
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.uint8)
    top = lib.relu_mask(x.data_ptr(), x.numel(), y.data_ptr(), mask.data_ptr(), torch.get_num_threads())
    remember_absmax(y, top)  # the next layer's quantiser reads y
    return y, mask


def add_relu_with_mask(a: torch.Tensor, b: torch.Tensor):
    """``(relu(a + b), mask)`` as :func:`relu_with_mask` of ``a + b``, in one pass, for two dense
    float32 CPU tensors of one shape and memory order; ``None`` where not applicable."""
    lib = _library()
    if (lib is None or a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != torch.float32
            or b.dtype != torch.float32 or a.shape != b.shape or a.stride() != b.stride() or not is_dense(a)):
        return None
    y = torch.empty_like(a)
    mask = torch.empty_like(a, dtype=torch.uint8)
    top = lib.add_relu_mask(a.data_ptr(), b.data_ptr(), a.numel(), y.data_ptr(), mask.data_ptr(),
                            torch.get_num_threads())
    remember_absmax(y, top)
    return y, mask


def relu_mask_backward(grad: torch.Tensor, mask: torch.Tensor):
    """``where(mask, grad, 0)`` for a float32 ``grad`` in ``mask``'s memory order; ``None`` where
    not applicable."""
    lib = _library()
    if (lib is None or grad.device.type != "cpu" or grad.dtype != torch.float32 or mask.dtype != torch.uint8
            or grad.shape != mask.shape or grad.stride() != mask.stride() or not is_dense(grad)):
        return None
    out = torch.empty_like(grad)
    lib.relu_mask_backward(grad.data_ptr(), mask.data_ptr(), grad.numel(), out.data_ptr(), torch.get_num_threads())
    return out
