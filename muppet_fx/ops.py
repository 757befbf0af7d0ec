"""Quantised products as ``torch.library`` custom ops with autograd (SPEC section 2).

Forward, for a product ``op(x, w)`` at ``b`` bits: quantise both operands (each with its own
exponent, Eq. 4's ``SC_act`` and ``SC_weights``), compute the product on the grid, add the bias
in FP32, quantise the output. Backward: quantise the incoming gradient (stochastic rounding),
then both gradient products from the operands saved in forward, which are kept as integer
mantissas plus exponents, not as FP32 copies.

The ``emulate`` route computes the products in FP32 on the dequantised operands (the paper's
set-up). Every op has a fake implementation, so ``torch.compile`` sees through them.

The ``quant_*`` wrappers at the bottom are what the rewritten graphs call: they read the word
lengths from the layer's :class:`~muppet_fx.state.Site` when they run, and call the ops through
:func:`muppet_fx.custom_ops.call` (eagerly, the ops' bodies without the dispatcher).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from muppet_fx.kernels.quantise import is_dense, mantissa_dtype, scale_pow2, triton_path
from muppet_fx.kernels.quantise_cpu import carry_absmax, quantise_cpu
from muppet_fx import routes
from muppet_fx.custom_ops import call, custom_op, register_autograd
from muppet_fx.numerics import fake_quantise_inplace, quantise_parts, quantise_summed, quantise_values

__all__ = ["quant_linear", "quant_conv", "quant_conv_transpose", "quant_conv_transpose_module", "quant_matmul",
           "quant_addmm", "quant_einsum", "quant_output", "einsum_grad_equations"]


def _empty(like: Tensor) -> Tensor:  # stands for "no gradient" (custom ops cannot return None)
    return like.new_empty(0, dtype=torch.float32)


def _deq(m: Tensor, s: Tensor, axis: int | None = None) -> Tensor:
    return scale_pow2(m.float(), -s, axis)


def _fq(x: Tensor, bits: int, rounding: str) -> Tensor:
    """Fake-quantise an FP32 tensor this module just computed (overwritten where possible)."""
    return fake_quantise_inplace(x.float(), bits, rounding)


def _fq_parts(y: Tensor, bits: int, rounding: str, quantised, parts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The layer output ``y`` fake-quantised (unless the route ``quantised`` it already: True,
    or the ``(mantissas, exponent)`` its pass wrote) and, with ``parts``, its mantissas and
    exponent for the compact batch norm that reads it (``compact_batch_norm``), written by the
    same CPU pass; empty tensors without ``parts``. ``parts == 2``: that batch norm is the
    output's only reader, so the CPU pass writes the mantissas alone and ``y`` keeps its
    unquantised values (``ops._wants_output_parts``)."""
    y = y.float()
    if isinstance(quantised, tuple):  # the route's requantisation wrote the mantissas too
        return y, *quantised
    if not parts:
        return (y if quantised else _fq(y, bits, rounding)), *_no_parts(y)
    if not quantised and y.device.type == "cpu" and not triton_path(y):
        values = parts != 2
        m, e, v, bad = quantise_cpu(y, bits, rounding, want_mantissa=True, want_values=values,
                                    out=y if values else None)
        if bad is False:
            return (v if values else y), m, e
        y = v if values else _fq(y, bits, rounding)  # NaN/inf: the reference route, values included
    elif not quantised:
        y = _fq(y, bits, rounding)
    return y, *quantise_parts(y, bits, "nearest")  # grid values quantise to themselves


def _no_parts(like: Tensor) -> tuple[Tensor, Tensor]:
    return like.new_empty(0, dtype=torch.int8), like.new_empty(0, dtype=torch.int32)


def _fake_out_parts(y: Tensor, bits: int, parts: int) -> tuple[Tensor, Tensor]:
    return _fake_parts(y, bits, keep_layout=True) if parts else _no_parts(y)


def _fake_parts(t: Tensor, bits: int, axis: int | None = None, keep_layout: bool = False):
    """Fake mantissas and exponent; ``keep_layout``: the quantiser keeps a dense input's memory
    order (channels-last activations stay channels-last)."""
    s_shape = () if axis is None else (t.shape[axis],)
    m = torch.empty_like(t, dtype=mantissa_dtype(bits)) if keep_layout and is_dense(t) else \
        t.new_empty(t.shape, dtype=mantissa_dtype(bits))
    return m, t.new_empty(s_shape, dtype=torch.int32)


def _quantise_operand(x: Tensor, bits: int, rounding: str, values: bool, axis: int | None = None,
                      mantissa: bool = True):
    """``(m, s, v)``: the mantissas and exponent, and with ``values`` (the layer's products run
    in FP32, ``routes.on_values``) also the dequantised values from the same pass (``v`` is
    ``None`` where that pass did not run, and without ``values``; ``m`` is ``None`` when
    ``mantissa`` is False and the values came from that pass)."""
    if values:
        return quantise_values(x, bits, rounding, axis, mantissa=mantissa)
    return (*quantise_parts(x, bits, rounding, axis), None)


def _quantise_gradient(g: Tensor, bits: int, rounding: str, values: bool, need_b: bool, keep: int):
    """``(g_m, g_s, g_v, gb)``: the output gradient quantised as :func:`_quantise_operand` (the
    mantissas only where the products or the bias need them) and, with ``need_b``, the bias
    gradient, its sums over every dimension but ``keep`` gathered by the same CPU pass where
    it applies (one pass over the gradient fewer)."""
    dims = [d for d in range(g.dim()) if d != keep]
    got = quantise_summed(g, bits, rounding, keep, values) if need_b else None
    if got is None:
        g_m, g_s, g_v = _quantise_operand(g, bits, rounding, values, mantissa=need_b)
        return g_m, g_s, g_v, (routes.sum_dequantised(g_m, g_s, dims) if need_b else None)
    g_m, g_s, g_v, sums = got
    if sums is None:  # NaN/inf took the reference route: the sums carry them into the bias gradient
        return g_m, g_s, g_v, (g_v.sum(dims) if g_v is not None else routes.sum_dequantised(g_m, g_s, dims))
    return g_m, g_s, g_v, routes.scale_sums(sums, g_s)


def _conv_layout(y: Tensor) -> Tensor:
    """Convolution outputs and input gradients leave the ops channels-last (what the integer
    routes write, and what keeps the elementwise layers between convolutions on one layout),
    so the real and the fake implementations agree on strides. 3-d maps stay contiguous: with
    them channels-last, a video network's steps took 1.03x (8 bits) to 1.1x (12-16 bits) as long."""
    return y.contiguous(memory_format=torch.channels_last) if y.dim() == 4 else y.contiguous()


def _strides_of(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with exactly ``ref``'s strides (DDP's gradient buckets compare them literally,
    size-1 dimensions included)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _fake_grads(g: Tensor, *wanted: tuple[bool, tuple]) -> tuple[Tensor, ...]:
    """Fake backward outputs: float32 of ``shape`` where needed, empty where not."""
    return tuple(g.new_empty(shape if need else (0,), dtype=torch.float32) for need, shape in wanted)


def _own(*ts: Tensor) -> tuple[Tensor, ...]:
    """Op outputs must not be views (an in-place op on a view would bypass the custom
    backward): reshaped results are returned as plain aliases of their storage."""
    return tuple(t.detach() if t._is_view() else t for t in ts)


def _input_grads(need, grads, dtypes) -> list[Tensor | None]:
    """Autograd's view of a backward op's outputs: None where no gradient was asked for, else
    the gradient in its input's dtype."""
    return [t.to(d) if n else None for n, t, d in zip(need, grads, dtypes)]


def _register_layer_autograd(op, backward_op, geometry: int, grad_layout) -> None:
    """Autograd for a layer op taking ``(x, w, b, *geometry, bits, bwd_bits, rounding,
    grad_rounding, w_axis, quant_out, route)`` and returning ``(y, x_m, x_s, w_m, w_s)``: the
    saved mantissas and exponents go to ``backward_op(g, x_m, x_s, w_m, w_s, *geometry, bwd_bits,
    grad_rounding, w_axis, need_x, need_w, need_b, route)``. The output gradient is first put in
    ``grad_layout``, the layout the forward wrote: stochastic draws follow memory order, so the
    gradient's quantisation then does not depend on the layout the layers after it hand back
    (a reentrant checkpoint hands a contiguous one)."""
    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # see _matmul_setup
        x, w, b = inputs[:3]
        _, bwd_bits, _, grad_rounding, w_axis, _, route = inputs[3 + geometry:10 + geometry]
        ctx.save_for_backward(*output[1:5])  # not the output's mantissas (the batch norm keeps those)
        ctx.args = (*inputs[3:3 + geometry], bwd_bits, grad_rounding, w_axis)
        ctx.route, ctx.n_inputs = route, len(inputs)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)

    def grad(ctx, gy, *_):
        if gy is None:
            return (None,) * ctx.n_inputs
        need = ctx.needs_input_grad[:3]
        gy = grad_layout(gy)
        gx, gw, gb = call(backward_op, gy, *ctx.saved_tensors, *ctx.args, *need, ctx.route)
        return (*_input_grads(need, (gx, gw, gb), ctx.dtypes),) + (None,) * (ctx.n_inputs - 3)

    register_autograd(op, grad, setup)


# ---------------------------------------------------------------------------------- linear
@custom_op("muppet_fx::linear")
def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], bits: int, bwd_bits: int, rounding: str,
            grad_rounding: str, w_axis: Optional[int], quant_out: bool, route: str, out_parts: int = 0
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    route = routes.for_level(route, bits)
    x2 = x.reshape(-1, x.shape[-1])
    values = routes.on_values(route, bits, conv=False, x=x2, w=w)
    x_m, x_s, x_v = _quantise_operand(x2.float(), bits, rounding, values)
    w_m, w_s, w_v = _quantise_operand(w.float(), bits, rounding, values, w_axis)
    y, done = routes.linear_forward(route, x_m, x_s, w_m, w_s, w_axis, b, (bits, rounding) if quant_out else None,
                                    x_v=x_v, w_v=w_v)
    y = carry_absmax(y, y.reshape(*x.shape[:-1], w.shape[0]))  # the GEMM's gathered absmax, for _fq_parts
    y, y_m, y_s = _fq_parts(y, bits, rounding, done, out_parts) if quant_out else (y, *_no_parts(y))
    return _own(y, x_m.reshape(x.shape), x_s, w_m, w_s, y_m, y_s)


@_linear.register_fake
def _(x, w, b, bits, bwd_bits, rounding, grad_rounding, w_axis, quant_out, route, out_parts=0):
    y = x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.float32)
    return (y, *_fake_parts(x, bits), *_fake_parts(w, bits, w_axis), *_fake_out_parts(y, bits, quant_out and out_parts))


@custom_op("muppet_fx::linear_backward")
def _linear_backward(g: Tensor, x_m: Tensor, x_s: Tensor, w_m: Tensor, w_s: Tensor, bits: int,
                     rounding: str, w_axis: Optional[int], need_x: bool, need_w: bool,
                     need_b: bool, route: str) -> tuple[Tensor, Tensor, Tensor]:
    route = routes.for_level(route, bits)
    g2, x2 = g.reshape(-1, g.shape[-1]).float(), x_m.reshape(-1, x_m.shape[-1])
    # FP32 products take the values; the mantissas only where the bias gradient sums them
    values = routes.on_values(route, bits, conv=False, x=x2, w=w_m)
    g_m, g_s, g_v, gb = _quantise_gradient(g2, bits, rounding, values, need_b, keep=1)
    if g_v is not None:
        gx, gw = routes.linear_grads_on_values(g_v, x2, x_s, w_m, w_s, w_axis, need_x, need_w)
    else:
        gx = routes.linear_grad_input(route, g_m, g_s, w_m, w_s, w_axis) if need_x else None
        gw = routes.linear_grad_weight(route, g_m, g_s, x2, x_s) if need_w else None
    gx = gx.reshape(x_m.shape) if need_x else _empty(g)
    gw = gw if need_w else _empty(g)
    return _own(gx, gw, gb if need_b else _empty(g))


@_linear_backward.register_fake
def _(g, x_m, x_s, w_m, w_s, bits, rounding, w_axis, need_x, need_w, need_b, route):
    return _fake_grads(g, (need_x, x_m.shape), (need_w, w_m.shape), (need_b, w_m.shape[:1]))


_register_layer_autograd(_linear, _linear_backward, geometry=0, grad_layout=Tensor.contiguous)


# ------------------------------------------------------------------------------ convolution
@custom_op("muppet_fx::conv")
def _conv(x: Tensor, w: Tensor, b: Optional[Tensor], stride: list[int], padding: list[int],
          dilation: list[int], groups: int, bits: int, bwd_bits: int, rounding: str,
          grad_rounding: str, w_axis: Optional[int], quant_out: bool, route: str, out_parts: int = 0
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    route = routes.for_level(route, bits)
    values = routes.on_values(route, bits, conv=True, x=x)
    x_m, x_s, x_v = _quantise_operand(x.float(), bits, rounding, values)
    w_m, w_s, w_v = _quantise_operand(w.float(), bits, rounding, values, w_axis)
    y, done = routes.conv_forward(route, x_m, x_s, w_m, w_s, w_axis, b, stride, padding, dilation,
                                  groups, (bits, rounding, out_parts) if quant_out else None, x_v=x_v, w_v=w_v)
    y = _conv_layout(y)
    y, y_m, y_s = _fq_parts(y, bits, rounding, done, out_parts) if quant_out else (y, *_no_parts(y))
    return _own(y, x_m, x_s, w_m, w_s, y_m, y_s)


@_conv.register_fake
def _(x, w, b, stride, padding, dilation, groups, bits, bwd_bits, rounding, grad_rounding,
      w_axis, quant_out, route, out_parts=0):
    spatial = routes.conv_out_size(x, w, stride, padding, dilation)
    y = _conv_layout(x.new_empty((x.shape[0], w.shape[0], *spatial), dtype=torch.float32))
    return (y, *_fake_parts(x, bits, keep_layout=True), *_fake_parts(w, bits, w_axis),
            *_fake_out_parts(y, bits, quant_out and out_parts))


def _conv_grads(g, w_m, gx, gw, gb, need_x: bool, need_w: bool, need_b: bool):
    """A (transposed) convolution's backward outputs: grad-input channels-last, grad-weight
    strided like the weight, the bias gradient (:func:`_quantise_gradient`)."""
    gx = _conv_layout(gx) if need_x else _empty(g)
    gw = _strides_of(gw, w_m) if need_w else _empty(g)
    return _own(gx, gw, gb if need_b else _empty(g))


@custom_op("muppet_fx::conv_backward")
def _conv_backward(g: Tensor, x_m: Tensor, x_s: Tensor, w_m: Tensor, w_s: Tensor,
                   stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   bits: int, rounding: str, w_axis: Optional[int], need_x: bool, need_w: bool,
                   need_b: bool, route: str) -> tuple[Tensor, Tensor, Tensor]:
    route = routes.for_level(route, bits)
    conv = (stride, padding, dilation, groups)
    # FP32 products take the values; the mantissas only where the bias gradient sums them
    g_m, g_s, g_v, gb = _quantise_gradient(g.float(), bits, rounding,
                                           routes.on_values(route, bits, conv=True, x=x_m), need_b, keep=1)
    if g_v is not None:
        gx, gw = routes.conv_grads_on_values(g_v, x_m, x_s, w_m, w_s, w_axis, *conv, need_x, need_w)
    else:
        gx = routes.conv_grad_input(route, g_m, g_s, w_m, w_s, w_axis, x_m.shape, *conv) if need_x else None
        gw = routes.conv_grad_weight(route, g_m, g_s, x_m, x_s, w_m.shape, *conv) if need_w else None
    return _conv_grads(g, w_m, gx, gw, gb, need_x, need_w, need_b)


@_conv_backward.register_fake
def _(g, x_m, x_s, w_m, w_s, stride, padding, dilation, groups, bits, rounding, w_axis,
      need_x, need_w, need_b, route):
    gx, gw, gb = _fake_grads(g, (need_x, x_m.shape), (need_w, w_m.shape), (need_b, w_m.shape[:1]))
    return (_conv_layout(gx) if need_x else gx), gw, gb


_register_layer_autograd(_conv, _conv_backward, geometry=4, grad_layout=_conv_layout)


# -------------------------------------------------------------------- transposed convolution
# ``conv_transpose(x, w)`` is the input gradient of ``conv(u, w)`` at ``dL/dz = x``, so the
# products are the convolution's with the roles exchanged: forward = grad-input, grad-input =
# forward convolution of the gradient, grad-weight = grad-weight with ``x`` as the output gradient.
def _transpose_out_size(x: Tensor, w: Tensor, stride, padding, output_padding, dilation) -> list[int]:
    return [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, k, s, p, op, d in
            zip(x.shape[2:], w.shape[2:], stride, padding, output_padding, dilation)]


@custom_op("muppet_fx::conv_transpose")
def _conv_transpose(x: Tensor, w: Tensor, b: Optional[Tensor], stride: list[int], padding: list[int],
                    output_padding: list[int], dilation: list[int], groups: int, bits: int, bwd_bits: int,
                    rounding: str, grad_rounding: str, w_axis: Optional[int], quant_out: bool, route: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    route = routes.for_level(route, bits)
    values = routes.on_values(route, bits, conv=True, x=x)  # 9-14 bits on the AMX tiles for 64+ channels
    x_m, x_s, x_v = _quantise_operand(x.float(), bits, rounding, values)
    w_m, w_s, w_v = _quantise_operand(w.float(), bits, rounding, values, w_axis)
    if x_v is not None:  # FP32 products on the values
        y = torch.convolution(x_v, w_v, b, stride, padding, dilation, True, output_padding, groups)
    else:
        shape = [x.shape[0], w.shape[1] * groups, *_transpose_out_size(x, w, stride, padding, output_padding, dilation)]
        y = routes.conv_grad_input(route, x_m, x_s, w_m, w_s, w_axis, shape, stride, padding, dilation, groups)
        y = y if b is None else y + routes._along1(b, y)
    y = _conv_layout(y)
    return _own(_fq(y, bits, rounding) if quant_out else y, x_m, x_s, w_m, w_s)


@_conv_transpose.register_fake
def _(x, w, b, stride, padding, output_padding, dilation, groups, bits, bwd_bits, rounding,
      grad_rounding, w_axis, quant_out, route):
    spatial = _transpose_out_size(x, w, stride, padding, output_padding, dilation)
    y = _conv_layout(x.new_empty((x.shape[0], w.shape[1] * groups, *spatial), dtype=torch.float32))
    return (y, *_fake_parts(x, bits, keep_layout=True), *_fake_parts(w, bits, w_axis))


@custom_op("muppet_fx::conv_transpose_backward")
def _conv_transpose_backward(g: Tensor, x_m: Tensor, x_s: Tensor, w_m: Tensor, w_s: Tensor,
                             stride: list[int], padding: list[int], output_padding: list[int],
                             dilation: list[int], groups: int, bits: int, rounding: str,
                             w_axis: Optional[int], need_x: bool, need_w: bool, need_b: bool,
                             route: str) -> tuple[Tensor, Tensor, Tensor]:
    route = routes.for_level(route, bits)
    conv = (stride, padding, dilation, groups)
    g_m, g_s, g_v, gb = _quantise_gradient(g.float(), bits, rounding,
                                           routes.on_values(route, bits, conv=True, x=x_m), need_b, keep=1)
    if g_v is not None:
        gx, gw = routes.conv_grads_on_values(g_v, x_m, x_s, w_m, w_s, w_axis, *conv, need_x, need_w,
                                             output_padding=output_padding)
    else:
        gx = routes.conv_forward(route, g_m, g_s, w_m, w_s, w_axis, None, *conv)[0] if need_x else None
        gw = routes.conv_grad_weight(route, x_m, x_s, g_m, g_s, w_m.shape, *conv) if need_w else None
    return _conv_grads(g, w_m, gx, gw, gb, need_x, need_w, need_b)


@_conv_transpose_backward.register_fake
def _(g, x_m, x_s, w_m, w_s, stride, padding, output_padding, dilation, groups, bits, rounding, w_axis,
      need_x, need_w, need_b, route):
    gx, gw, gb = _fake_grads(g, (need_x, x_m.shape), (need_w, w_m.shape), (need_b, (w_m.shape[1] * groups,)))
    return (_conv_layout(gx) if need_x else gx), gw, gb


_register_layer_autograd(_conv_transpose, _conv_transpose_backward, geometry=5, grad_layout=_conv_layout)


# ----------------------------------------------------------------------------------- matmul
def _matmul_grads(g: Tensor, a: Tensor, b: Tensor, need_a: bool, need_b: bool):
    """Gradients of ``torch.matmul(a, b)`` for any operand ranks (1-d promotion, broadcasting)."""
    A = a.unsqueeze(0) if a.dim() == 1 else a
    B = b.unsqueeze(-1) if b.dim() == 1 else b
    G = g.unsqueeze(-1) if b.dim() == 1 else g
    G = G.unsqueeze(-2) if a.dim() == 1 else G
    ga, gb = _empty(g), _empty(g)
    if need_a:
        ga = (G @ B.transpose(-1, -2)).sum_to_size(A.shape).reshape(a.shape)
    if need_b:
        gb = (A.transpose(-1, -2) @ G).sum_to_size(B.shape).reshape(b.shape)
    return _own(ga, gb)


@custom_op("muppet_fx::matmul")
def _matmul(a: Tensor, b: Tensor, bits: int, bwd_bits: int, rounding: str, grad_rounding: str,
            quant_out: bool, route: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    route = routes.for_level(route, bits)
    a_m, a_s = quantise_parts(a.float(), bits, rounding)
    b_m, b_s = quantise_parts(b.float(), bits, rounding)
    y = routes.matmul_forward(route, a_m, a_s, b_m, b_s)
    if quant_out:
        y = _fq(y, bits, rounding)
    return _own(y, a_m, a_s, b_m, b_s)


@_matmul.register_fake
def _(a, b, bits, bwd_bits, rounding, grad_rounding, quant_out, route):
    y = torch.matmul(a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32))
    return (y, *_fake_parts(a, bits), *_fake_parts(b, bits))


@custom_op("muppet_fx::matmul_backward")
def _matmul_backward(g: Tensor, a_m: Tensor, a_s: Tensor, b_m: Tensor, b_s: Tensor, bits: int,
                     rounding: str, need_a: bool, need_b: bool, route: str) -> tuple[Tensor, Tensor]:
    route = routes.for_level(route, bits)
    g_m, g_s = quantise_parts(g.float(), bits, rounding)
    if route != "emulate" and a_m.dim() == 2 and b_m.dim() == 2:  # the two products, integer
        ga = routes.matmul_forward(route, g_m, g_s, b_m.t(), b_s) if need_a else _empty(g)
        gb = routes.matmul_forward(route, a_m.t(), a_s, g_m, g_s) if need_b else _empty(g)
        return _own(ga, gb)
    ga = gb = None
    if route != "emulate" and a_m.dim() >= 2 and b_m.dim() >= 2:  # batched: integer where the tiles take it,
        if need_a:  # summed over the dimensions an operand was broadcast along
            ga = routes.matmul_batched_int(route, g_m, g_s, b_m.transpose(-1, -2), b_s)
            ga = None if ga is None else ga.sum_to_size(a_m.shape)
        if need_b:
            gb = routes.matmul_batched_int(route, a_m.transpose(-1, -2), a_s, g_m, g_s)
            gb = None if gb is None else gb.sum_to_size(b_m.shape)
    left_a, left_b = need_a and ga is None, need_b and gb is None  # FP32 products of the values
    if left_a or left_b:
        fa, fb = _matmul_grads(_deq(g_m, g_s), _deq(a_m, a_s), _deq(b_m, b_s), left_a, left_b)
        ga, gb = (fa if left_a else ga), (fb if left_b else gb)
    return _own(ga if need_a else _empty(g), gb if need_b else _empty(g))


@_matmul_backward.register_fake
def _(g, a_m, a_s, b_m, b_s, bits, rounding, need_a, need_b, route):
    return _fake_grads(g, (need_a, a_m.shape), (need_b, b_m.shape))


def _matmul_setup(ctx, inputs, output):
    # The mantissa outputs never receive gradients: without this, autograd would allocate and
    # zero a tensor of each one's shape on every backward (4 ms a step on ResNet-20 at 8 bits).
    ctx.set_materialize_grads(False)
    a, b, bits, bwd_bits, rounding, grad_rounding, _, route = inputs
    ctx.save_for_backward(*output[1:])
    ctx.args = (bwd_bits, grad_rounding)
    ctx.dtypes, ctx.route = (a.dtype, b.dtype), route


def _matmul_grad(ctx, gy, *_):
    if gy is None:
        return (None,) * 8
    need = ctx.needs_input_grad[:2]
    ga, gb = call(_matmul_backward, gy.contiguous(), *ctx.saved_tensors, *ctx.args, *need, ctx.route)
    grads = _input_grads(need, (ga, gb), ctx.dtypes)
    return (*grads,) + (None,) * 6


register_autograd(_matmul, _matmul_grad, _matmul_setup)


# ----------------------------------------------------------------------------------- einsum
def einsum_grad_equations(equation: str) -> tuple[str, str] | None:
    """``(grad_a, grad_b)`` equations for a two-operand einsum, or None where the simple rule
    (every index of an operand found in the other operand or the output, no repeats, no
    ellipsis) does not give the gradient."""
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq or eq.count(",") != 1:
        return None
    inputs, out = eq.split("->")
    a, b = inputs.split(",")
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    if any(i not in b + out for i in a) or any(i not in a + out for i in b):
        return None
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


@custom_op("muppet_fx::einsum")
def _einsum(equation: str, a: Tensor, b: Tensor, bits: int, bwd_bits: int, rounding: str,
            grad_rounding: str, quant_out: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    a_m, a_s = quantise_parts(a.float(), bits, rounding)
    b_m, b_s = quantise_parts(b.float(), bits, rounding)
    y = torch.einsum(equation, _deq(a_m, a_s), _deq(b_m, b_s))
    if quant_out:
        y = _fq(y, bits, rounding)
    return _own(y, a_m, a_s, b_m, b_s)


@_einsum.register_fake
def _(equation, a, b, bits, bwd_bits, rounding, grad_rounding, quant_out):
    y = torch.einsum(equation, a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32))
    return (y, *_fake_parts(a, bits), *_fake_parts(b, bits))


@custom_op("muppet_fx::einsum_backward")
def _einsum_backward(equation: str, g: Tensor, a_m: Tensor, a_s: Tensor, b_m: Tensor, b_s: Tensor,
                     bits: int, rounding: str, need_a: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    eq_a, eq_b = einsum_grad_equations(equation)
    gq = _fq(g.to(torch.float32, copy=True), bits, rounding)
    ga = torch.einsum(eq_a, gq, _deq(b_m, b_s)) if need_a else _empty(g)
    gb = torch.einsum(eq_b, _deq(a_m, a_s), gq) if need_b else _empty(g)
    return _own(ga, gb)


@_einsum_backward.register_fake
def _(equation, g, a_m, a_s, b_m, b_s, bits, rounding, need_a, need_b):
    return _fake_grads(g, (need_a, a_m.shape), (need_b, b_m.shape))


def _einsum_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # see _matmul_setup
    equation, a, b, bits, bwd_bits, rounding, grad_rounding, _ = inputs
    ctx.save_for_backward(*output[1:])
    ctx.args = (bwd_bits, grad_rounding)
    ctx.equation, ctx.dtypes = equation, (a.dtype, b.dtype)


def _einsum_grad(ctx, gy, *_):
    if gy is None:
        return (None,) * 8
    need = ctx.needs_input_grad[1:3]
    ga, gb = call(_einsum_backward, ctx.equation, gy.contiguous(), *ctx.saved_tensors, *ctx.args, *need)
    grads = _input_grads(need, (ga, gb), ctx.dtypes)
    return (None, *grads, None, None, None, None, None)


register_autograd(_einsum, _einsum_grad, _einsum_setup)


# ------------------------------------------------------------------- output quantisation
@custom_op("muppet_fx::quantise_output")
def _quantise_output(y: Tensor, bits: int, rounding: str) -> Tensor:
    return _fq(y.to(torch.float32, copy=True), bits, rounding).to(y.dtype)


@_quantise_output.register_fake
def _(y, bits, rounding):
    return torch.empty_like(y)


# Straight-through: the next layer's backward quantises the gradient (SPEC section 2).
register_autograd(_quantise_output, lambda ctx, g: (g, None, None), lambda ctx, inputs, output: None)


# --------------------------------------------------------------- wrappers the graphs call
def _result(y: Tensor, like: Tensor) -> Tensor:
    return y if not like.is_floating_point() or y.dtype == like.dtype else y.to(like.dtype)


def _check_dtype(site, x: Tensor, weight: Tensor) -> None:
    """PyTorch's layers refuse an input of another type than their weight (unless autocast
    casts both); so do these, rather than run at the fixed-point levels and raise at "fp32"."""
    if x.dtype != weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"layer {site.name!r}: input of type {x.dtype} for a weight of type {weight.dtype}, "
                        f"which the layer refuses at 'fp32' too; convert the input (x.to({weight.dtype}))")


def _check_channels(site, x: Tensor, channels: int, n: int) -> None:
    """PyTorch's own checks of a convolution's input, naming the layer."""
    if x.dim() not in (n + 1, n + 2):
        raise ValueError(f"layer {site.name!r}: a {n}-d convolution takes inputs of {n + 1} (unbatched) "
                         f"or {n + 2} dimensions, got shape {tuple(x.shape)}")
    if x.shape[-n - 1] != channels:
        raise ValueError(f"layer {site.name!r}: input of shape {tuple(x.shape)} has {x.shape[-n - 1]} "
                         f"channels where the layer takes {channels}")


def quant_linear(site, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` at the site's current word length."""
    st = site.state
    if not st.quantised or st.suspended:
        return F.linear(input, weight, bias)
    if weight.dim() == 2 and (input.dim() == 0 or input.shape[-1] != weight.shape[1]):
        raise ValueError(f"layer {site.name!r}: input of shape {tuple(input.shape)} does not have the "
                         f"{weight.shape[1]} features its weight {tuple(weight.shape)} takes")
    _check_dtype(site, input, weight)
    c = st.config
    parts = _wants_output_parts(site, input, weight)
    y, _, x_s, _, w_s, y_m, y_s = call(_linear, input, weight, bias, st.fwd_bits, st.bwd_bits, c.rounding,
                                       c.grad_rounding, site.weight_axis, c.quantise_outputs,
                                       st.route_for(input.device), parts)
    site.record(x_s, w_s)
    _remember_weight(site, weight)
    return _leave_parts(site, _result(y, input), y_m, y_s, parts)


def _wants_output_parts(site, input: Tensor, weight: Tensor) -> int:
    """Whether the compact batch norm reading this layer's output will keep it as mantissas
    (the conditions of ``compact._active``, known here), so the output quantiser hands them over:
    0 (no), 1 (yes), 2 (yes, and the batch norm is the output's only reader: no values needed)."""
    st = site.state
    c = st.config
    wanted = (site.feeds_batch_norm and c.compact_activations and c.quantise_outputs and st.fwd_bits <= 16
              and torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
    return 0 if not wanted else 2 if site.output_values_unread else 1


def _leave_parts(site, y: Tensor, y_m: Tensor, y_s: Tensor, parts: int) -> Tensor:
    site.output_parts = (y, y_m, y_s) if parts and y_m.numel() else None
    return y


def _remember_weight(site, *operands: Tensor) -> None:
    """The parameter the site multiplies (the first of ``operands`` that is one), for the
    policy's gradients: the pass sets it, and a parameter assigned to the layer since (a
    replaced weight, ``load_state_dict(assign=True)``) takes its place at the next call."""
    for t in operands:
        if isinstance(t, torch.nn.Parameter):
            if site.weight is not t:
                site.weight = t
            return


def _per_dim(v, n: int) -> list[int]:
    """A convolution argument given as an int or a sequence, as one value per spatial dim."""
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _conv_padding(padding, weight: Tensor, dilation: list[int], input: Tensor):
    """Integer padding for ``padding`` ints or 'valid'/'same'; asymmetric 'same' pads ``input``."""
    n = weight.dim() - 2
    if padding == "valid":
        return [0] * n, input
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if all(t % 2 == 0 for t in total):
            return [t // 2 for t in total], input
        pads = []
        for t in reversed(total):
            pads += [t // 2, t - t // 2]
        return [0] * n, F.pad(input, pads)
    return _per_dim(padding, n), input


def _height_one(n: int, groups: int) -> bool:
    """Whether a 1-d (transposed) convolution runs as a 2-d one of height 1: the same integer
    sums, on the 2-d kernels (a 1-d network's int8 step went from 0.55x to 2.4x FP32's speed on
    the CPU), on every route, so that they all lay the outputs out alike. Grouped ones, which no
    integer kernel takes, keep the 1-d op on the values (ATen's 2-d depthwise backward took 4x
    as long)."""
    return n == 1 and groups == 1


def _unflat(y: Tensor, for_batch_norm: bool) -> Tensor:
    """A height-one 2-d result back as 1-d: contiguous, as PyTorch's 1-d ops return it (ATen's
    batch norm took 10-30x longer on the channels-last order, which has no 3-d memory format),
    except for the compact batch norm that reads it next, which walks that order itself."""
    return y.squeeze(2) if for_batch_norm else y.squeeze(2).contiguous()


def quant_conv(site, input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
               padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``F.conv1d/2d/3d`` at the site's current word length."""
    st = site.state
    n = weight.dim() - 2
    if not st.quantised or st.suspended:
        return (F.conv1d, F.conv2d, F.conv3d)[n - 1](input, weight, bias, stride, padding, dilation, groups)
    _check_channels(site, input, weight.shape[1] * groups, n)
    _check_dtype(site, input, weight)
    stride, dilation = _per_dim(stride, n), _per_dim(dilation, n)
    padding, x = _conv_padding(padding, weight, dilation, input)
    unbatched = x.dim() == n + 1
    x = x.unsqueeze(0) if unbatched else x
    c = st.config
    route = st.route_for(x.device)
    parts = _wants_output_parts(site, x, weight)
    flat = _height_one(n, groups)
    if flat:
        x, w = x.unsqueeze(2), weight.unsqueeze(2)
        stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
    y, _, x_s, _, w_s, y_m, y_s = call(_conv, x, w if flat else weight, bias, stride, padding, dilation, groups,
                                       st.fwd_bits, st.bwd_bits, c.rounding, c.grad_rounding, site.weight_axis,
                                       c.quantise_outputs, route, parts)
    if flat:
        y, y_m = _unflat(y, parts), (_unflat(y_m, parts) if y_m.dim() == 4 else y_m)
    site.record(x_s, w_s)
    _remember_weight(site, weight)
    return _leave_parts(site, _result(y.squeeze(0) if unbatched else y, input), y_m, y_s, parts)


def quant_conv_transpose(site, input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                         padding=0, output_padding=0, groups: int = 1, dilation=1) -> Tensor:
    """``F.conv_transpose1d/2d/3d`` at the site's current word length."""
    st = site.state
    n = weight.dim() - 2
    if not st.quantised or st.suspended:
        return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1](
            input, weight, bias, stride, padding, output_padding, groups, dilation)
    _check_channels(site, input, weight.shape[0], n)
    _check_dtype(site, input, weight)
    unbatched = input.dim() == n + 1
    x = input.unsqueeze(0) if unbatched else input
    c = st.config
    route = st.route_for(x.device)
    geometry = [_per_dim(v, n) for v in (stride, padding, output_padding, dilation)]
    flat = _height_one(n, groups)
    if flat:
        x, w = x.unsqueeze(2), weight.unsqueeze(2)
        geometry = [[lead, *v] for lead, v in zip((1, 0, 0, 1), geometry)]
    y, _, x_s, _, w_s = call(_conv_transpose, x, w if flat else weight, bias, *geometry, groups, st.fwd_bits,
                             st.bwd_bits, c.rounding, c.grad_rounding, site.weight_axis,
                             c.quantise_outputs, route)
    y = _unflat(y, False) if flat else y
    site.record(x_s, w_s)
    _remember_weight(site, weight)
    return _result(y.squeeze(0) if unbatched else y, input)


def quant_conv_transpose_module(site, module: torch.nn.Module, input: Tensor, output_size=None) -> Tensor:
    """``nn.ConvTranspose1d/2d/3d.forward``, ``output_size`` included."""
    n = module.weight.dim() - 2
    output_padding = module._output_padding(input, output_size, module.stride, module.padding,
                                            module.kernel_size, n, module.dilation)
    return quant_conv_transpose(site, input, module.weight, module.bias, module.stride, module.padding,
                                output_padding, module.groups, module.dilation)


def quant_matmul(site, input: Tensor, other: Tensor) -> Tensor:
    """``torch.matmul`` (and ``mm``, ``bmm``, ``@``) at the site's current word length."""
    st = site.state
    if not st.quantised or st.suspended:
        return torch.matmul(input, other)
    c = st.config
    y, _, a_s, _, b_s = call(_matmul, input, other, st.fwd_bits, st.bwd_bits, c.rounding,
                             c.grad_rounding, c.quantise_outputs, st.route_for(input.device))
    site.record(a_s, b_s)
    _remember_weight(site, other, input)
    return _result(y, input)


def quant_addmm(site, input: Tensor, mat1: Tensor, mat2: Tensor, *, beta=1, alpha=1) -> Tensor:
    """``torch.addmm``/``baddbmm``: quantised product, FP32 scale and add, quantised output."""
    st = site.state
    fn = torch.addmm if mat1.dim() == 2 else torch.baddbmm
    if not st.quantised or st.suspended:
        return fn(input, mat1, mat2, beta=beta, alpha=alpha)
    c = st.config
    y, _, a_s, _, b_s = call(_matmul, mat1, mat2, st.fwd_bits, st.bwd_bits, c.rounding,
                             c.grad_rounding, False, st.route_for(mat1.device))
    site.record(a_s, b_s)
    _remember_weight(site, mat2, mat1)
    y = (y if alpha == 1 else alpha * y) + (input if beta == 1 else beta * input)
    return _result(quant_output(site, y), mat1)


def quant_einsum(site, equation: str, *operands) -> Tensor:
    """``torch.einsum`` of two operands at the site's current word length. Equations whose
    gradient the simple rule does not cover run FP32 and are listed as such."""
    ops = tuple(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
    st = site.state
    if not st.quantised or st.suspended:
        return torch.einsum(equation, *ops)
    if len(ops) != 2 or einsum_grad_equations(equation) is None:
        st.keep_fp32(site.name, "einsum", f"equation {equation!r} with {len(ops)} operands is not routed")
        return torch.einsum(equation, *ops)
    c = st.config
    y, _, a_s, _, b_s = call(_einsum, equation, ops[0], ops[1], st.fwd_bits, st.bwd_bits, c.rounding,
                             c.grad_rounding, c.quantise_outputs)
    site.record(a_s, b_s)
    _remember_weight(site, ops[1], ops[0])
    return _result(y, ops[0])


def quant_output(site, y: Tensor) -> Tensor:
    st = site.state
    if not st.quantised or st.suspended or not st.config.quantise_outputs:
        return y
    return call(_quantise_output, y, st.fwd_bits, st.config.rounding)
