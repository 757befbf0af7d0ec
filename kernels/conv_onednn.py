"""Exact int8 convolution on the CPU through oneDNN's quantised convolution (``onednn.qconv2d``).

oneDNN convolves uint8 activations with int8 weights in int32 (its VNNI kernels take
unsigned x signed bytes natively) without an im2col buffer in memory. Signed mantissas
``m`` become ``m + 128`` with zero point 128 (one XOR of the sign bit); oneDNN subtracts the
zero point's contribution in int32, so the accumulator is the exact integer convolution of the
mantissas as long as ``255 * 128 * K < 2**31`` for the reduction length
``K = C_in * kh * kw`` (true below K = 65,793; every torchvision model stays far below).
The accumulator is converted to float32 once and scaled by ``2**e`` (both scales are powers
of two, so the scaling itself is exact): the same values as :func:`gemm_cpu.conv_forward`
followed by the float32 conversion.

That holds only where oneDNN's int8 kernels accumulate byte pairs exactly (VNNI and AMX).
On CPUs without them (AVX2 only: AMD Zen 1-3, Intel before Cascade Lake) its kernels sum two
uint8 x int8 products in a saturating 16-bit lane (``vpmaddubsw``), and the result was off by
up to 2.4e5 on a 512-channel layer (AMD EPYC, AVX2). :func:`available` therefore runs one
small convolution of extreme mantissas against the exact result, once per process, and
declines the route where they differ.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["available", "supports", "pays_off", "conv2d"]

_MAX_K = (2**31 - 1) // (255 * 128)
# Every call packs the weight for oneDNN (about 4 ns per weight element on 2 cores: 10 ms for
# 512x512x3x3), whatever the batch, while the convolution's work grows with its output rows
# N * OH * OW. At few rows im2col + ``torch._int_mm`` (no packing) is faster: on ResNet-18's
# 4x4 maps at batch 128 (2048 rows, 512 channels) forward 15.5 vs 22 ms and grad-input 15.5
# vs 24.6 ms. At 8192 rows it depends on the channels: ResNet-18's 8-bit training step gained
# 2.5% more from im2col at its 256-channel 8x8 layers, ResNet-20's lost 6% at its 64-channel
# ones. Timing each shape alone (tried) picked wrongly there, so the rule stays a bound.
MIN_ROWS = 4096


@functools.cache
def available() -> bool:
    """Whether this build has oneDNN's quantised convolution and it is exact on this CPU."""
    has_op = torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn") \
        and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    return has_op and _exact_here()


def _exact_here() -> bool:
    """One convolution whose byte pairs overflow a 16-bit sum (255 * 127 * 2 as unsigned
    activations), compared with the exact integers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (1, 64, 5, 5), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (16, 64, 3, 3), dtype=torch.int8, generator=g)
    x[:, :32], w[:8] = 127, -128  # the extreme pairs
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).float()
    try:
        return torch.equal(conv2d(x, w, 0, 1, 1, 1), exact)
    except RuntimeError:  # an op that exists but refuses this CPU
        return False


def supports(x_m: torch.Tensor, w_m: torch.Tensor, groups: int, e) -> bool:
    """int8 2-d convolutions without groups, a scale ``2**e`` far from float32's limits."""
    return (x_m.dtype == torch.int8 and w_m.dtype == torch.int8 and x_m.dim() == 4
            and x_m.device.type == "cpu" and groups == 1 and isinstance(e, int) and -120 <= e <= 120
            and w_m[0].numel() <= _MAX_K and available())


def pays_off(rows: int) -> bool:
    """Whether a convolution with ``rows`` output positions (``N * OH * OW``) should take
    oneDNN rather than im2col + ``torch._int_mm`` (see ``MIN_ROWS``)."""
    return rows > MIN_ROWS


def conv2d(x_m: torch.Tensor, w_m: torch.Tensor, e: int, stride, padding, dilation) -> torch.Tensor:
    """float32 ``conv2d(x_m, w_m) * 2**e``, channels-last, from int8 mantissas."""
    stride, padding, dilation = (list(v) if isinstance(v, (list, tuple)) else [v, v]
                                 for v in (stride, padding, dilation))
    xu = torch.bitwise_xor(x_m.contiguous(memory_format=torch.channels_last).view(torch.uint8), 128)
    x_scale = 2.0 ** (e // 2)
    w_scale = torch.full((w_m.shape[0],), 2.0 ** (e - e // 2), dtype=torch.float32)
    w_zero = torch.zeros(w_m.shape[0], dtype=torch.int32)
    packed = torch.ops.onednn.qconv_prepack(w_m.contiguous(), w_scale, x_scale, 128, stride, padding,
                                            dilation, 1, list(xu.shape))
    return torch.ops.onednn.qconv2d_pointwise(xu, x_scale, 128, packed, w_scale, w_zero, None, stride,
                                              padding, dilation, 1, 1.0, 0, torch.float32, "none", [], "")
