"""Public quantiser: ``quantise``, ``fake_quantise`` and ``QTensor`` (SPEC section 1).

Three implementations sit behind one function, chosen by ``backend``:
``"reference"`` (plain torch, the oracle), ``"triton"`` (fused kernels; CUDA, or the CPU under
``TRITON_INTERPRET=1``) and ``"cpu"`` (the fast CPU path). ``"auto"`` picks Triton for CUDA
tensors and the fast path for CPU tensors.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from muppet_fx.kernels.quantise import (
    HAS_TRITON,
    MAX_BITS,
    NONFINITE_EXPONENT,
    dequantise_reference,
    is_dense,
    mantissa_dtype,
    quantise_reference,
    quantise_triton,
    recorded_amax_slot,
    triton_path,
)
from muppet_fx.kernels.quantise_cpu import quantise_cpu, quantise_many_in_place
from muppet_fx.kernels.quantise_many import quantise_many_triton

__all__ = ["QTensor", "quantise", "fake_quantise", "ROUNDINGS", "BACKENDS"]

ROUNDINGS = ("nearest", "stochastic")
BACKENDS = ("auto", "reference", "triton", "cpu")


@dataclass(frozen=True)
class QTensor:
    """A dynamic fixed-point tensor: ``value = mantissa * 2**-exponent``.

    ``exponent`` is an ``int`` for per-tensor quantisation and a 1-d int32 tensor (one entry per
    slice along ``axis``) for per-channel quantisation.
    """

    mantissa: torch.Tensor
    exponent: int | torch.Tensor
    bits: int
    dtype: torch.dtype = torch.float32
    axis: int | None = None

    def dequantise(self) -> torch.Tensor:
        s = torch.as_tensor(self.exponent, dtype=torch.int32, device=self.mantissa.device)
        return dequantise_reference(self.mantissa, s, self.dtype, self.axis)


def check_bits(bits, dtype: torch.dtype = torch.float32) -> int:
    """Validate a word length for inputs of ``dtype``; returns it as ``int``."""
    limit = MAX_BITS[dtype]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= limit:
        raise ValueError(f"bits={bits!r} is not a valid word length for {dtype} inputs: "
                         f"expected an int in [2, {limit}]")
    return bits


def check_rounding(rounding) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not supported; valid choices: {ROUNDINGS}")
    return rounding


def _check_input(x, bits, rounding, axis, backend, noise) -> str:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in MAX_BITS:
        raise TypeError(f"cannot quantise a {x.dtype} tensor; supported dtypes: "
                        f"{', '.join(map(str, MAX_BITS))}")
    check_bits(bits, x.dtype)
    check_rounding(rounding)
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)
                             or not -x.dim() <= axis < x.dim()):
        raise ValueError(f"axis={axis!r} is out of range for a {x.dim()}-d tensor "
                         f"(None for one exponent per tensor, or a dimension index)")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; valid choices: {BACKENDS}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    if backend == "auto":
        if x.device.type == "cuda" and HAS_TRITON:
            return "triton"
        return "cpu" if x.device.type == "cpu" else "reference"
    if backend == "triton" and x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                         f"triton is imported to run the kernels on the CPU; got device {x.device}")
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs a CPU tensor, got device {x.device}")
    return backend


def _triton_seed(seed, generator, rounding: str = "stochastic", device: torch.device | None = None):
    """The seed of the Triton kernels' draws: ``seed`` if given, else drawn from ``generator``,
    and only for stochastic rounding, as the CPU kernel draws, so that a nearest-rounding
    quantisation leaves torch's random stream where it was.

    Without a generator but with a ``device``, the seed is drawn there, by torch's generator of
    that device, into a one-element int64 tensor the kernel reads: no host round trip, and a
    CUDA graph that captured the draw draws again at each replay (a host integer would be
    frozen into the graph, every replay rounding with the same draws)."""
    if seed is not None:
        return seed if isinstance(seed, torch.Tensor) else int(seed)
    if rounding != "stochastic":
        return 0
    if generator is None and device is not None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return int(torch.randint(0, 2**31 - 1, (), generator=generator))


def _run(x, bits, rounding, axis, backend, generator, seed, noise, values: bool):
    """Returns ``(m, s, q)``: the integer mantissas (``values=False``) or the dequantised tensor
    (``values=True``), the other being ``None``, and the int32 exponent tensor ``s``."""
    want = dict(want_mantissa=not values, want_values=values)
    if backend == "triton":
        return quantise_triton(x, bits, rounding, axis=axis, noise=noise,
                               seed=_triton_seed(seed, generator, rounding, x.device), **want)[:3]
    if backend == "cpu":
        return quantise_cpu(x, bits, rounding, axis=axis, generator=generator, seed=seed,
                            noise=noise, **want)[:3]
    m, s, finite = quantise_reference(x, bits, rounding, axis=axis, generator=generator, noise=noise)
    if not values:
        return m, s, None
    return None, s, torch.where(finite, dequantise_reference(m, s, x.dtype, axis), x)


def _marked(s: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``s`` with ``NONFINITE_EXPONENT`` where the quantiser found NaN/inf (``bad``)."""
    return torch.where(bad, torch.full_like(s, NONFINITE_EXPONENT), s)


def quantise_parts(x: torch.Tensor, bits: int, rounding: str, axis: int | None = None):
    """Unchecked quantiser for training ops: ``(mantissa, exponent)`` with the default backend
    of ``x``'s device. A tensor (or slice) holding NaN/inf gets ``NONFINITE_EXPONENT``, whose
    dequantisation is non-finite, so a diverging run stays visible downstream."""
    if triton_path(x):  # the kernel marks non-finite rows itself
        slot = recorded_amax_slot(x) if axis is None else None  # reduced by the kernel that wrote x
        return quantise_triton(x, bits, rounding, axis=axis, seed=_triton_seed(None, None, rounding, x.device),
                               mark_nonfinite=True, amax_slot=slot)[:2]
    else:  # the C kernel on CPU tensors, the reference route elsewhere
        m, s, _, bad = quantise_cpu(x, bits, rounding, axis=axis)
    if bad is False:
        return m, s
    return m, _marked(s, bad)


def quantise_values(x: torch.Tensor, bits: int, rounding: str, axis: int | None = None,
                    mantissa: bool = True):
    """:func:`quantise_parts` plus the dequantised values ``m * 2**-s`` written by the same CPU
    pass, for products that run in FP32 on dequantised operands (one pass over the tensor
    fewer than quantising and dequantising). Returns ``(m, s, v)``; ``m`` is ``None`` when not
    asked for, ``v`` is ``None`` off the CPU kernel (then dequantise ``m``). NaN/inf entries
    pass through ``v`` unchanged, and ``s`` is ``NONFINITE_EXPONENT`` as in
    :func:`quantise_parts`."""
    if x.device.type != "cpu" or triton_path(x):
        return (*quantise_parts(x, bits, rounding, axis), None)
    m, s, v, bad = quantise_cpu(x, bits, rounding, axis=axis, want_mantissa=mantissa, want_values=True)
    if bad is not False:
        s = _marked(s, bad)
    return m, s, v


def quantise_summed(x: torch.Tensor, bits: int, rounding: str, keep: int, values: bool):
    """:func:`quantise_values` (``values``; no mantissas) or :func:`quantise_parts`, plus the
    exact sums of the mantissas over every dimension but ``keep`` (a bias gradient) from the
    same CPU pass, for a dense ``x`` whose dimension ``keep`` runs fastest in memory (a linear
    layer's gradient rows, a channels-last map's channels) and up to 16 bits: ``(m, s, v, sums)``. ``sums`` is
    ``None`` where NaN/inf took the reference route; ``None`` altogether where the pass does
    not apply."""
    if (x.device.type != "cpu" or triton_path(x) or x.dtype != torch.float32 or x.numel() == 0
            or not is_dense(x) or x.stride(keep) != 1 or x.shape[keep] == 1 or bits > 16):
        return None
    sums = torch.empty(x.shape[keep], dtype=torch.int64)
    m, s, v, bad = quantise_cpu(x, bits, rounding, want_mantissa=not values, want_values=values, sums=sums)
    if bad is not False:
        return m, _marked(s, bad), v, None
    return m, s, v, sums


def fake_quantise_inplace(y: torch.Tensor, bits: int, rounding: str, seed: int | None = None) -> torch.Tensor:
    """Unchecked ``fake_quantise`` for a float32 tensor a training op owns: overwritten in
    place on the CPU (one fused pass), NaN/inf passed through. ``seed`` fixes the stochastic
    draws (default: drawn from torch's generator)."""
    if y.device.type == "cpu" and not triton_path(y):
        return quantise_cpu(y, bits, rounding, seed=seed, want_mantissa=False, want_values=True, out=y)[2]
    if triton_path(y):
        return quantise_triton(y, bits, rounding, seed=_triton_seed(seed, None, rounding, y.device),
                               want_mantissa=False, want_values=True)[2]
    generator = None if seed is None else torch.Generator(device=y.device).manual_seed(seed)
    return _run(y, bits, rounding, None, "reference", generator, None, None, values=True)[2]


def fake_quantise_many_inplace(tensors: list, bits: int, rounding: str, seeds: list | None = None) -> None:
    """:func:`fake_quantise_inplace` of each tensor, written into it, batched: the CPU ones in
    one C call, the Triton route's in six launches per device. Tensor ``i`` gets what
    ``fake_quantise_inplace`` gives it with seed ``seeds[i]``. A seed of ``None`` is drawn as
    there: from torch's CPU generator, in order (one draw of n values is n draws of one), or
    on the tensor's device for the Triton route. Tensors neither batch takes (other dtypes, odd
    strides, NaN/inf on the CPU) go one by one."""
    seeds = list(seeds) if seeds is not None else [None] * len(tensors)
    stochastic = rounding == "stochastic"
    cpu = [i for i, t in enumerate(tensors) if t.device.type == "cpu" and not triton_path(t)]
    rest = sorted(set(range(len(tensors))) - set(cpu))
    if cpu:
        missing = [i for i in cpu if seeds[i] is None] if stochastic else []
        for i, seed in zip(missing, torch.randint(0, 2**62, (len(missing),)).tolist() if missing else []):
            seeds[i] = seed
        rest += [cpu[k] for k in quantise_many_in_place([tensors[i] for i in cpu], bits, rounding,
                                                         [seeds[i] for i in cpu])]
    by_device: dict = {}
    for i in rest:
        t = tensors[i]
        if HAS_TRITON and triton_path(t) and t.dtype == torch.float32 and t.numel() and is_dense(t):
            by_device.setdefault(t.device, []).append(i)
    done = set()
    for device, picked in by_device.items():
        given = [seeds[i] for i in picked]
        if not stochastic:
            drawn = torch.zeros(len(picked), dtype=torch.int64, device=device)  # unread: no draw
        elif all(seed is None for seed in given):
            drawn = torch.randint(0, 2**62, (len(picked),), dtype=torch.int64, device=device)
        elif None in given or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            continue  # one by one (host seeds would need a copy to the device, which a capture forbids)
        else:
            drawn = torch.tensor(given, dtype=torch.int64, device=device)
        if quantise_many_triton([tensors[i] for i in picked], bits, rounding, drawn):
            done.update(picked)
    for i in rest:
        if i not in done:
            q = fake_quantise_inplace(tensors[i], bits, rounding, seed=seeds[i])
            if q is not tensors[i]:
                tensors[i].copy_(q)


def quantise(x: torch.Tensor, bits: int, rounding: str = "stochastic", *,
             generator: torch.Generator | None = None, axis: int | None = None,
             backend: str = "auto", seed: int | None = None,
             noise: torch.Tensor | None = None) -> QTensor:
    """Quantise ``x`` to ``bits``-bit dynamic fixed point.

    Args:
        x: float32, bfloat16 or float16 tensor; every entry must be finite.
        bits: word length, 2..24 for float32 (11 for float16, 8 for bfloat16).
        rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (unbiased).
        generator: CPU ``torch.Generator`` for the stochastic draws (reproducible runs).
        axis: ``None`` for one exponent per tensor, or the dimension that gets one exponent
            per slice (``0`` = per output channel for weights).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpu"``.
        seed: seed of the triton and cpu backends' draws (a result depends on it alone, never
            on the thread count or launch grid; default: drawn from ``generator``).
        noise: explicit uniforms in ``[0, 1)`` for stochastic rounding, shape of ``x``.

    Returns:
        ``QTensor`` with int8/int16/int32 ``mantissa`` and the ``exponent``.

    Example:
        >>> q = quantise(torch.tensor([0.5, -1.0, 0.25]), 8, "nearest")
        >>> q.mantissa.tolist(), q.exponent
        ([32, -64, 16], 6)
    """
    backend = _check_input(x, bits, rounding, axis, backend, noise)
    if x.numel() and not all(map(math.isfinite, torch.aminmax(x.float() if x.dtype != torch.float32 else x))):
        bad = ~torch.isfinite(x)  # slow path only to name the offender
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"quantise got {int(bad.sum())} non-finite entries (first at index {idx}: "
                         f"{x[idx].item()}); use fake_quantise to pass NaN/inf through")
    axis = None if axis is None else axis % x.dim()
    m, s, _ = _run(x, bits, rounding, axis, backend, generator, seed, noise, values=False)
    exponent = int(s) if axis is None else s
    return QTensor(m.to(mantissa_dtype(bits)), exponent, bits, x.dtype, axis)


def fake_quantise(x: torch.Tensor, bits: int, rounding: str = "stochastic", *,
                  generator: torch.Generator | None = None, axis: int | None = None,
                  backend: str = "auto", seed: int | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """``quantise(x, ...).dequantise()`` in one step, with NaN/inf passed through unchanged.

    Same arguments as :func:`quantise`; returns a tensor of ``x``'s dtype and shape whose finite
    entries lie on the ``bits``-bit grid.

    Example:
        >>> fake_quantise(torch.tensor([0.3, 1.0]), 4, "nearest").tolist()
        [0.25, 1.0]
    """
    backend = _check_input(x, bits, rounding, axis, backend, noise)
    axis = None if axis is None else axis % x.dim()
    return _run(x, bits, rounding, axis, backend, generator, seed, noise, values=True)[2]

