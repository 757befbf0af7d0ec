"""Many tensors quantised in place in one go on the Triton route: an optimiser's gradients.

Quantising each gradient on its own costs a seed draw, a slot fill and two kernels per
parameter (about 250 launches for ResNet-18's 62), each with its Python and launch overhead.
Here the tensors are gathered into one flat buffer (their memory order, so each keeps the draw
indices it would get alone), two kernels reduce and quantise every tensor's blocks with its own
exponent and seed, and one multi-tensor copy writes them back: six launches whatever the count.
Each tensor gets bit for bit what :func:`quantise_triton` gives it with that seed.

The block table depends on the sizes only and is cached per device, for the last eight sets of
sizes. Built during a CUDA-graph capture it would need a host-to-device copy there, which a
capture forbids: the launcher then declines (returns ``False``) and the caller quantises per
tensor.
"""
from __future__ import annotations

import torch

from .quantise import _FMAX, HAS_TRITON, MAX_EXPONENT, is_dense

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quantise import _exponent_of, dequantised_values, reduce_into_slot, rounded_mantissas

__all__ = ["quantise_many_triton"]

BLOCK = 1024
_TABLES: dict = {}  # (device, sizes) -> block table, the most recent _KEPT of them
_KEPT = 8  # sizes that change from step to step (a sparse gradient's values) must not pile up

if HAS_TRITON:

    @triton.jit
    def _block(table_ptr, n_blocks, n_tensors, BLOCK: tl.constexpr):
        # this program's tensor t, the offsets of its block within t, their mask, and t's start
        # in the flat buffer (table: block -> tensor, block -> index in the tensor, then per
        # tensor its start and its length)
        b = tl.program_id(0)
        t = tl.load(table_ptr + b)
        offs = tl.load(table_ptr + n_blocks + b) * BLOCK + tl.arange(0, BLOCK)
        return t, offs, offs < tl.load(table_ptr + 2 * n_blocks + n_tensors + t), tl.load(table_ptr + 2 * n_blocks + t)

    @triton.jit
    def _many_absmax_kernel(flat_ptr, table_ptr, slot_ptr, n_blocks, n_tensors, BLOCK: tl.constexpr):
        t, offs, mask, start = _block(table_ptr, n_blocks, n_tensors, BLOCK)
        reduce_into_slot(tl.load(flat_ptr + start + offs, mask=mask, other=0.0), mask, slot_ptr + t * 2)

    # qmax is 1 at 2 bits: unspecialised, as in quantise._quantise_kernel
    @triton.jit(do_not_specialize=["qmax"])
    def _many_quantise_kernel(flat_ptr, table_ptr, slot_ptr, seed_ptr, n_blocks, n_tensors, fmax, qmax, log2_qmax,
                              max_exp, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
        # each tensor's exponent from its slot; draws tl.rand(seed[t], index within the tensor)
        t, offs, mask, start = _block(table_ptr, n_blocks, n_tensors, BLOCK)
        x = tl.load(flat_ptr + start + offs, mask=mask, other=0.0)
        s = _exponent_of(tl.load(slot_ptr + t * 2), qmax, log2_qmax, max_exp)
        u = 0.0
        if STOCHASTIC:
            u = tl.rand(tl.load(seed_ptr + t), offs.to(tl.int32))
        tl.store(flat_ptr + start + offs, dequantised_values(rounded_mantissas(x, s, u, STOCHASTIC), s, x, fmax),
                 mask=mask)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-d view of a dense tensor in its memory order (the order the per-tensor kernel walks
    a channels-last tensor in)."""
    return t.permute(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d))).reshape(-1)


def _table(sizes: tuple, device: torch.device) -> torch.Tensor | None:
    key = (device, sizes)
    table = _TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        blocks = [triton.cdiv(n, BLOCK) for n in sizes]
        owner = [t for t, k in enumerate(blocks) for _ in range(k)]
        index = [i for k in blocks for i in range(k)]
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        table = torch.tensor(owner + index + starts + list(sizes), dtype=torch.int64, device=device)
        while len(_TABLES) >= _KEPT:
            del _TABLES[next(iter(_TABLES))]  # the oldest
    else:
        del _TABLES[key]  # re-inserted below as the most recent
    _TABLES[key] = table
    return table


def quantise_many_triton(tensors: list, bits: int, rounding: str, seeds: torch.Tensor) -> bool:
    """Quantises dense float32 tensors on one device in place to ``bits`` (values only), tensor
    ``i`` with its own exponent and the draws ``tl.rand(seeds[i], index)``: what
    ``quantise_triton(t, bits, rounding, seed=seeds[i:i+1], want_mantissa=False,
    want_values=True, out=t)`` writes into each. ``seeds``: int64, one per tensor, on their
    device. Returns ``False``, having written nothing, where it cannot run (see the module)."""
    if not HAS_TRITON:
        raise NotImplementedError("quantise_many_triton needs the triton package, which is not installed")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    bad = [i for i, t in enumerate(tensors) if t.dtype != torch.float32 or not is_dense(t) or not t.numel()
           or t.device != seeds.device]
    if bad:
        t = tensors[bad[0]]
        raise ValueError(f"tensor {bad[0]} ({t.dtype}, shape {tuple(t.shape)}, on {t.device}) is not a dense, "
                         f"non-empty float32 tensor on the seeds' device {seeds.device}")
    if seeds.dtype != torch.int64 or seeds.shape != (len(tensors),):
        raise ValueError(f"seeds must be int64 of shape ({len(tensors)},); got {seeds.dtype} {tuple(seeds.shape)}")
    if not tensors:
        return True
    flats = [_memory_order(t) for t in tensors]
    if any(f.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for f, t in zip(flats, tensors)):
        return False  # no view in memory order (odd strides): written back nowhere
    sizes = tuple(f.numel() for f in flats)
    table = _table(sizes, seeds.device)
    if table is None:
        return False
    flat = torch.cat(flats)
    n_blocks, n_tensors = (table.numel() - 2 * len(sizes)) // 2, len(sizes)
    slot = torch.zeros((n_tensors, 2), dtype=torch.int32, device=flat.device)
    _many_absmax_kernel[(n_blocks,)](flat, table, slot, n_blocks, n_tensors, BLOCK=BLOCK)
    _many_quantise_kernel[(n_blocks,)](flat, table, slot, seeds, n_blocks, n_tensors, _FMAX[torch.float32],
                                       2 ** (bits - 1) - 1, bits - 2, MAX_EXPONENT[torch.float32],
                                       STOCHASTIC=rounding == "stochastic", BLOCK=BLOCK)
    torch._foreach_copy_(flats, list(flat.split(sizes)))
    return True
