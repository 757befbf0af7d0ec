"""Data-parallel training on ``torch.distributed`` (DDP; NCCL on GPUs, gloo on CPUs).

A prepared model goes into ``DistributedDataParallel`` as it is and stays there across
precision switches: a switch changes word lengths that the quantised ops read when they run,
never a parameter, a module or a graph, so DDP's hooks and buckets stay valid.

- Every rank takes the same decision in the same epoch: :class:`~muppet_fx.PrecisionManager`
  lets rank 0 decide and broadcasts its decision and record (:func:`from_rank0`).
- :class:`~muppet_fx.MasterCopyOptimizer` rounds the averaged gradients with draws from a seed
  agreed across ranks (:func:`shared_seed`), so the master weights stay identical.
- :func:`register_quantised_allreduce` installs a communication hook that sums gradient
  buckets as fixed-point mantissas at the current backward word length, FP32 at the FP32 level.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "unwrap", "from_rank0", "shared_seed", "wire_dtype",
           "QuantisedAllReduce", "quantised_allreduce", "register_quantised_allreduce"]

_MAX_EXPONENT = 126  # 2**s stays a normal float32 scale factor


def is_distributed(group=None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def unwrap(model):
    """The prepared model inside a ``DistributedDataParallel`` (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def from_rank0(obj, group=None):
    """Rank 0's ``obj`` on every rank (a picklable Python object); ``obj`` itself when not
    distributed."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return box[0]


def shared_seed(group=None) -> int:
    """A seed drawn on rank 0 from torch's generator and broadcast to every rank."""
    return int(from_rank0(int(torch.randint(0, 2**62, ())), group))


def wire_dtype(bits: int | None, backend: str) -> torch.dtype:
    """The integer type gradients travel in: int8 up to 8 bits, int32 above (gloo and NCCL have
    no int16 all-reduce: gloo rejects it with "Invalid scalar type"), float32 at FP32."""
    if bits is None:
        return torch.float32
    if not isinstance(bits, int) or not 2 <= bits <= 24:
        raise ValueError(f"bits={bits!r} must be an int in [2, 24] or None (FP32)")
    return torch.int8 if bits <= 8 else torch.int32


def _limit(bits: int, wire: torch.dtype, world: int) -> int:
    """Largest mantissa a rank may send so that the sum of ``world`` of them fits ``wire``:
    the full ``bits`` when the wire type has room, else ``bits`` minus the headroom."""
    full = 2 ** (bits - 1) - 1
    room = torch.iinfo(wire).max // world
    if room < 1:
        raise ValueError(f"{world} ranks do not fit a {wire} sum; pass wire=torch.int32")
    return min(full, room)


def _block_exponents(blocks: Tensor, limit: int) -> Tensor:
    """int8 ``s`` per row with ``absmax * 2**s <= limit`` as large as possible; all-zero rows
    get the largest exponent (they do not constrain the other ranks)."""
    a = blocks.abs().amax(1).double()
    s = torch.floor(torch.log2(limit / a)).clamp(-_MAX_EXPONENT, _MAX_EXPONENT)
    s = s - (a * torch.exp2(s) > limit).double()  # log2 rounding at exact powers of two
    return s.clamp_min(-_MAX_EXPONENT).to(torch.int8)


def quantised_allreduce(flat: Tensor, bits: int | None, *, group=None, block: int = 256,
                        generator: torch.Generator | None = None, wire: torch.dtype | None = None):
    """Average the float32 vector ``flat`` over the ranks in fixed point. Returns
    ``(future, bytes_sent)``; the future yields the average.

    Every ``block`` consecutive elements share one exponent, agreed across ranks (an int8
    all-reduce MIN of the local exponents, one byte per block). Each rank rounds
    ``g * 2**s`` stochastically to integers bounded so that the sum of ``world`` of them fits
    the wire type; the integers are summed exactly and scaled once by ``2**-s / world``. Every
    element's error is below ``2**-s`` of its block. A non-finite value on any rank sends the
    bucket through an FP32 all-reduce on every rank, so the optimiser sees it and skips."""
    world = dist.get_world_size(group)
    wire = wire or wire_dtype(bits, dist.get_backend(group))
    if bits is None or wire == torch.float32:
        out = flat.div(world)
        fut = dist.all_reduce(out, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0]), flat.numel() * 4
    limit = _limit(bits, wire, world)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)
    finite = bool(torch.isfinite(flat).all())
    exps = torch.empty(padded.shape[0] + 1, dtype=torch.int8, device=flat.device)
    exps[-1] = 127 if finite else -128  # MIN over ranks: -128 when any rank holds NaN/inf
    if finite:
        exps[:-1] = _block_exponents(padded, limit)
    dist.all_reduce(exps, op=dist.ReduceOp.MIN, group=group)
    sent = exps.numel()
    if int(exps[-1]) == -128:
        fut, fp32 = quantised_allreduce(flat, None, group=group)
        return fut, sent + fp32
    s = exps[:-1].float().unsqueeze(1)
    q = torch.ldexp(padded, s)
    q.add_(torch.rand(q.shape, generator=generator, device=q.device)).floor_().clamp_(-limit, limit)
    m = q.to(wire)

    def dequantise(f):
        return torch.ldexp(f.value()[0].float(), -s).div_(world).view(-1)[:n]

    fut = dist.all_reduce(m, group=group, async_op=True).get_future()
    return fut.then(dequantise), sent + m.numel() * m.element_size()


class QuantisedAllReduce:
    """State of the communication hook: the model's precision, the process group, a per-rank
    generator for the rounding draws, and byte counters (``bytes_sent`` on the wire,
    ``fp32_bytes`` what an FP32 all-reduce of the same buckets would send; per rank)."""

    def __init__(self, pm, process_group=None, wire: torch.dtype | None = None, block: int = 256,
                 seed: int | None = None):
        pm = unwrap(pm)
        if not hasattr(pm, "_muppet_state"):
            raise TypeError(f"expected a model returned by muppet_fx.prepare, got {type(pm).__name__}")
        if wire not in (None, torch.int8, torch.int16, torch.int32):
            raise ValueError(f"wire={wire!r}; valid choices: None (auto), torch.int8, torch.int16, torch.int32")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block={block!r} must be an int >= 1 (elements sharing an exponent)")
        self.precision, self.group, self.wire, self.block = pm._muppet_state, process_group, wire, block
        base = shared_seed(process_group) if seed is None else seed
        self.seed = base + dist.get_rank(process_group)  # independent rounding on each rank
        self._generators: dict[torch.device, torch.Generator] = {}
        self.bytes_sent = 0
        self.fp32_bytes = 0

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def reset_counters(self) -> None:
        self.bytes_sent = self.fp32_bytes = 0


def _hook(state: QuantisedAllReduce, bucket):  # no annotation: DDP checks it against a runtime type
    flat = bucket.buffer()
    bits = state.precision.bwd_bits if state.precision.quantised else None
    fut, sent = quantised_allreduce(flat, bits, group=state.group, wire=state.wire, block=state.block,
                                    generator=state.generator(flat.device))
    state.bytes_sent += sent
    state.fp32_bytes += flat.numel() * 4
    return fut


def register_quantised_allreduce(ddp, pm=None, *, process_group=None, wire: torch.dtype | None = None,
                                 block: int = 256) -> QuantisedAllReduce:
    """Install the fixed-point gradient all-reduce on ``ddp`` (a ``DistributedDataParallel``
    around a prepared model, or ``pm``'s wrapper). Returns the hook state with its byte
    counters. Call once, before the first backward, on every rank."""
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"expected a DistributedDataParallel model, got {type(ddp).__name__}")
    state = QuantisedAllReduce(pm if pm is not None else ddp.module, process_group, wire, block)
    ddp.register_comm_hook(state, _hook)
    return state
