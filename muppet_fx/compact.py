"""Activations saved for backward in the width they carry.

At a fixed-point level a quantised layer's output feature map lies on its ``b``-bit grid (SPEC
section 2), yet the batch norm after it keeps that map for backward as float32, four bytes per
value, and ReLU keeps its float32 output. Here:

- the batch norm that reads a quantised layer's output saves it as ``b``-bit mantissas and one
  exponent: the layer's output quantiser writes them in the pass that rounds the output and
  leaves them on the layer's site (``ops._leave_parts``), or, where it did not, the batch norm
  quantises its input again. Quantising grid values again with nearest rounding returns them
  exactly: the rounded values stay within ``(2**(b-1) - 1) * 2**-s`` of the layer's exponent
  ``s``, so the new exponent is ``s`` or finer, and a finer grid still holds every value.
  On the CPU both directions read the mantissas in C kernels (``kernels/batch_norm_cpu``):
  forward takes exact integer channel sums and writes ``y`` in one more pass (0.42 against
  ATen's 0.76 ms on 128x16x32x32), backward needs no dequantised copy (1.3-2.3x faster than
  dequantising and ATen's backward); on the Triton route (CUDA) Triton kernels do the same,
  reading the exponent on the device (``kernels/batch_norm_triton``); elsewhere the stock ops
  run on the identical input;
- ReLU saves a one-byte mask ``out != 0`` (what ``threshold_backward`` tests: ``out <= 0``
  gives 0, NaN passes the gradient) and backward is ``where(mask, grad, 0)``: one C pass each
  way on the CPU (``kernels/relu_cpu``), one Triton kernel on the Triton route
  (``kernels/relu_triton``).

Where the stock ops run, outputs and gradients are bit-identical to them. The C kernels differ
from ATen by float32 rounding: their statistics are exact where ATen's float32 sums are not,
and their gradients' errors against float64 are of the order of ATen's. ResNet blocks at 8
bits keep about 3 bytes per activation for backward instead of 8. Both run in training at
fixed-point levels, under ``torch.compile`` as opaque custom ops (bit-identical to eager);
without gradients, in eval mode or above 16 bits the stock ops run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from muppet_fx.custom_ops import transformed
from muppet_fx.kernels import batch_norm_triton, relu_triton
from muppet_fx.kernels.batch_norm_cpu import batch_norm_backward, batch_norm_forward
from muppet_fx.kernels.quantise import triton_path
from muppet_fx.kernels.quantise_cpu import forget_absmax
from muppet_fx.kernels.relu_cpu import add_relu_with_mask, relu_mask_backward, relu_with_mask
from muppet_fx.numerics import quantise_parts
from muppet_fx.routes import dequantise

__all__ = ["compact_batch_norm", "compact_relu", "compact_add_relu", "BATCH_NORMS"]

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _active(state, x: Tensor) -> bool:
    return (state.quantised and not state.suspended and state.config.compact_activations
            and torch.is_grad_enabled() and x.requires_grad
            and (torch.compiler.is_compiling() or not transformed(x)))


def _bn_forward(m, s, weight, bias, running_mean, running_var, momentum, eps, relu):
    """``(y, mean, invstd, mask)`` of the training-mode batch norm of ``m * 2**-s`` (then ReLU
    with ``relu``; ``mask`` is ``None`` without)."""
    out = None
    if triton_path(m):  # three launches reading the mantissas and the exponent on the device
        out = batch_norm_triton.batch_norm_forward(m, s, weight, bias, running_mean, running_var, momentum, eps, relu)
    elif s.numel() == 1 and s.device.type == "cpu":  # two C passes over the mantissas
        out = batch_norm_forward(m, -int(s), weight, bias, running_mean, running_var, momentum, eps, relu)
    if out is None:  # the layer's output itself may hold unquantised values (ops._fq_parts)
        out = torch.native_batch_norm(dequantise(m, s), weight, bias, running_mean, running_var, True, momentum,
                                      eps)
        if relu:
            y, mask = _relu_and_mask(out[0])
            out = (y, out[1], out[2], mask)
    return (*out[:3], out[3] if relu else None)


def _bn_backward(grad, m, s, weight, mean, invstd, mask, eps, need):
    """``(grad_input, grad_weight, grad_bias)`` of :func:`_bn_forward`, ``None`` where not ``need``-ed."""
    grads = None
    if triton_path(m):
        grads = batch_norm_triton.batch_norm_backward(grad, m, s, mean, invstd, weight, need, mask)
    elif s.numel() == 1 and s.device.type == "cpu":  # one C kernel reading the mantissas (and mask)
        grads = batch_norm_backward(grad, m, -int(s), mean, invstd, weight, need, mask)
    if grads is not None:
        return grads
    if mask is not None:
        grad = _relu_backward(grad, mask)
    return torch.ops.aten.native_batch_norm_backward(
        grad, dequantise(m, s), weight, None, None, mean, invstd, True, eps, list(need))


class _ValuesOf(torch.autograd.Function):
    """``values`` (a layer output's quantised values) forward, the gradient to ``x`` (that
    output, left unquantised) unchanged."""

    @staticmethod
    def forward(ctx, x, values):
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GridBatchNorm(torch.autograd.Function):
    """Training-mode batch norm whose input is saved as mantissas (see the module notes); with
    ``relu``, also the ReLU that is its only reader, saving that ReLU's byte mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, bits, parts, relu):
        m, s = parts if parts is not None else quantise_parts(x.detach(), bits, "nearest")
        y, mean, invstd, mask = _bn_forward(m, s, weight, bias, running_mean, running_var, momentum, eps, relu)
        ctx.save_for_backward(m, s, weight, mean, invstd, mask)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad):
        grads = _bn_backward(grad, *ctx.saved_tensors, ctx.eps, ctx.needs_input_grad[:3])
        return *grads, *(None,) * 7


# Under torch.compile the same two kernels run as opaque custom ops: Inductor's own batch-norm
# reductions over channels-last maps took twice eager's time (benchmarks/NOTES.md section 11).
# An op with an autograd formula must be functional, so the updated running statistics are
# outputs, copied into the buffers after.
@torch.library.custom_op("muppet_fx::grid_batch_norm", mutates_args=())
def _grid_batch_norm(x: Tensor, m: Tensor, s: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Tensor, running_var: Tensor, momentum: float, eps: float,
                     relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    running_mean, running_var = running_mean.clone(), running_var.clone()
    y, mean, invstd, mask = _bn_forward(m, s, weight, bias, running_mean, running_var, momentum, eps, relu)
    mask = mask if mask is not None else m.new_empty(0, dtype=torch.uint8)
    # mean and invstd share one storage; a recorded absmax leaves a compiled graph only as a
    # guess the next quantiser checks (forget_absmax)
    return forget_absmax(y, hint=True), mean.clone(), invstd.clone(), mask, running_mean, running_var


@_grid_batch_norm.register_fake
def _(x, m, s, weight, bias, running_mean, running_var, momentum, eps, relu):
    stat = x.new_empty(x.shape[1])
    mask = torch.empty_like(x, dtype=torch.uint8) if relu else x.new_empty(0, dtype=torch.uint8)
    return torch.empty_like(x), stat, torch.empty_like(stat), mask, torch.empty_like(running_mean), \
        torch.empty_like(running_var)


@torch.library.custom_op("muppet_fx::grid_batch_norm_backward", mutates_args=())
def _grid_batch_norm_backward(grad: Tensor, m: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor,
                              invstd: Tensor, mask: Tensor, eps: float, need_x: bool, need_w: bool,
                              need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _bn_backward(grad, m, s, weight, mean, invstd, mask if mask.numel() else None, eps,
                         (need_x, need_w, need_b))
    return tuple(forget_absmax(g, hint=True) if g is not None else grad.new_empty(0) for g in grads)


@_grid_batch_norm_backward.register_fake
def _(grad, m, s, weight, mean, invstd, mask, eps, need_x, need_w, need_b):
    return (torch.empty_like(grad) if need_x else grad.new_empty(0), mean.new_empty(mean.shape if need_w else 0),
            mean.new_empty(mean.shape if need_b else 0))


def _grid_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    x, m, s, weight, *_, eps, relu = inputs
    ctx.save_for_backward(m, s, weight, *output[1:4])
    ctx.eps = eps


def _grid_grad(ctx, gy, *_):
    if gy is None:
        return (None,) * 10
    need = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    gx, gw, gb = _grid_batch_norm_backward(gy, *ctx.saved_tensors, ctx.eps, *need)
    grads = [g if n else None for g, n in zip((gx, gw, gb), need)]
    return grads[0], None, None, grads[1], grads[2], *(None,) * 5


_grid_batch_norm.register_autograd(_grid_grad, setup_context=_grid_setup)


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor ``_BatchNorm.forward`` uses in training (and its counter step)."""
    if bn.num_batches_tracked is None:
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def compact_batch_norm(site, input: Tensor, bn: nn.Module, relu: bool = False) -> Tensor:
    """``bn(input)`` for the output of the quantised layer ``site``: in training at up to 16
    bits the input is kept for backward as mantissas (exact, see the module notes). ``relu``:
    ``F.relu(bn(input))``, the ReLU being the batch norm's only reader; on the CPU the batch
    norm's output pass applies it (one pass fewer each way, the same values and gradients)."""
    st = site.state
    bits = st.fwd_bits
    compiling = torch.compiler.is_compiling()
    parts = _take_parts(site, input)
    if (not _active(st, input) or not st.config.quantise_outputs or type(bn) not in BATCH_NORMS
            or not bn.training or not bn.track_running_stats or bits is None or bits > 16
            or input.dtype != torch.float32 or (compiling and parts is None)):
        if parts is not None and site.output_values_unread:  # the layer left input unquantised (ops._fq_parts)
            input = _ValuesOf.apply(input, dequantise(*parts))
        y = bn(input)
        return compact_relu(site, y) if relu else y
    bn._check_input_dim(input)
    args = (bn.weight, bn.bias, bn.running_mean, bn.running_var, _momentum(bn), bn.eps)
    if compiling:
        y, *_, running_mean, running_var = _grid_batch_norm(input, *parts, *args, relu)
        with torch.no_grad():
            bn.running_mean.copy_(running_mean)
            bn.running_var.copy_(running_var)
        return y
    return _GridBatchNorm.apply(input, *args, bits, parts, relu)


def _take_parts(site, input: Tensor):
    """``(mantissas, exponent)`` of ``input`` that its layer's output quantiser left on the site
    (``ops._leave_parts``), or ``None``: the batch norm then quantises its input again. The
    site lets go of them either way. Dequantising them gives ``input`` back bit for bit at every
    exponent (the quantiser's values are ``m * 2**-s`` as ``dequantise`` computes them, subnormal
    or not; a non-finite input's marker dequantises to non-finite values)."""
    parts, site.output_parts = getattr(site, "output_parts", None), None
    if parts is None or parts[0] is not input or parts[2].numel() != 1:
        return None
    return parts[1], parts[2]


def _relu_and_mask(x: Tensor) -> tuple[Tensor, Tensor]:
    fused = relu_triton.relu_with_mask(x) if triton_path(x) else relu_with_mask(x)  # one pass: C or Triton
    y, mask = fused if fused is not None else (torch.relu(x), None)
    return y, (mask if mask is not None else (y != 0).view(torch.uint8))


def _add_relu_and_mask(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    fused = relu_triton.add_relu_with_mask(a, b) if triton_path(a) else add_relu_with_mask(a, b)
    return fused if fused is not None else _relu_and_mask(a + b)


def _relu_backward(grad: Tensor, mask: Tensor) -> Tensor:
    gx = relu_triton.relu_mask_backward(grad, mask) if triton_path(grad) else relu_mask_backward(grad, mask)
    if gx is None and grad.device.type == "cpu" and mask.stride() != grad.stride() and mask.shape == grad.shape:
        gx = relu_mask_backward(grad.contiguous(memory_format=_order(mask)), mask)
    return gx if gx is not None else torch.where(mask.view(torch.bool), grad, 0.0)


class _MaskedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, mask = _relu_and_mask(x)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        return _relu_backward(grad, *ctx.saved_tensors)


class _MaskedAddReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        y, mask = _add_relu_and_mask(a, b)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = _relu_backward(grad, *ctx.saved_tensors)
        return g, g


# The ReLUs as opaque ops under torch.compile, like the batch norm: Inductor's kernels for the
# residual sums' ReLU backward over channels-last maps took 10-23 ms a call where this takes ~1.
@torch.library.custom_op("muppet_fx::masked_relu", mutates_args=())
def _masked_relu(a: Tensor, b: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    y, mask = _relu_and_mask(a) if b is None else _add_relu_and_mask(a, b)
    return forget_absmax(y, hint=True), mask


@_masked_relu.register_fake
def _(a, b):
    t = a if b is None else a + b
    return torch.empty_like(t), torch.empty_like(t, dtype=torch.uint8)


@torch.library.custom_op("muppet_fx::masked_relu_backward", mutates_args=())
def _masked_relu_backward(grad: Tensor, mask: Tensor) -> Tensor:
    g = _relu_backward(grad, mask)
    return g if g.stride() == mask.stride() else torch.empty_like(mask, dtype=g.dtype).copy_(g)


@_masked_relu_backward.register_fake
def _(grad, mask):
    return torch.empty_like(mask, dtype=grad.dtype)


def _masked_relu_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.two = inputs[1] is not None


def _masked_relu_grad(ctx, gy, _):
    g = None if gy is None else _masked_relu_backward(gy, *ctx.saved_tensors)
    return g, (g if ctx.two else None)


_masked_relu.register_autograd(_masked_relu_grad, setup_context=_masked_relu_setup)


def _order(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and not t.is_contiguous() else torch.contiguous_format


def compact_relu(holder, input: Tensor, inplace: bool = False) -> Tensor:
    """``F.relu(input)`` saving a byte mask for backward at fixed-point levels. ``inplace`` is
    accepted for the stock signature; the pass rewrites in-place calls only where nothing else
    reads their input, so a fresh output is the same program."""
    if not _active(holder.state, input) or input.dtype != torch.float32:
        return F.relu(input, inplace=inplace)
    return _masked_relu(input, None)[0] if torch.compiler.is_compiling() else _MaskedReLU.apply(input)


def compact_add_relu(holder, a: Tensor, b: Tensor) -> Tensor:
    """``F.relu(a + b)`` where the sum has no other reader (a residual block's end): one pass on
    the CPU, saving the ReLU's byte mask, the same values and gradients."""
    tensors = isinstance(a, Tensor) and isinstance(b, Tensor)
    if (not tensors or not (_active(holder.state, a) or _active(holder.state, b)) or a.dtype != torch.float32
            or b.dtype != torch.float32 or a.shape != b.shape):
        return compact_relu(holder, a + b)
    return _masked_relu(a, b)[0] if torch.compiler.is_compiling() else _MaskedAddReLU.apply(a, b)
