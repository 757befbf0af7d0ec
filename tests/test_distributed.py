"""Data-parallel training on gloo with two processes spawned by the test (CPU)."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import muppet_fx
from muppet_fx.distributed import (from_rank0, quantised_allreduce, register_quantised_allreduce,
                                   wire_dtype)

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, bias=False)
        self.fc = nn.Linear(8 * 7 * 7, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).flatten(1))


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train_worker(rank, port, hook, results):
    _init(rank, port)
    torch.manual_seed(100 + rank)  # different random state per rank: forward draws differ
    model = SmallCNN()
    pm = muppet_fx.prepare(model, ladder=(8, 12, "fp32"))
    ddp = nn.parallel.DistributedDataParallel(pm)
    state = register_quantised_allreduce(ddp) if hook else None
    # rank 1's own policy would never climb: the switch at epoch 2 shows that rank 0 decides
    policy = muppet_fx.ScheduledPolicy({2: 12}) if rank == 0 else muppet_fx.FixedPolicy(8)
    manager = muppet_fx.PrecisionManager(ddp, policy)
    opt = muppet_fx.MasterCopyOptimizer(torch.optim.SGD(pm.parameters(), lr=0.05, momentum=0.9), ddp, manager)
    data = torch.Generator().manual_seed(7 + rank)  # each rank its own shard of data
    same, levels = [], []
    for epoch in range(6):
        for _ in range(3):
            x = torch.randn(6, 3, 16, 16, generator=data)
            y = torch.randint(0, 5, (6,), generator=data)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        manager.end_epoch()
        if epoch == 4 and manager.level != "fp32":  # a forced switch, as train_resnet's FP32 stage
            manager.state.set_level("fp32")
        mine = _flat_params(pm)
        gathered = [torch.empty_like(mine) for _ in range(WORLD)]
        dist.all_gather(gathered, mine)
        same.append(all(torch.equal(g, gathered[0]) for g in gathered))
        levels.append(manager.level)
    results[rank] = {"same": same, "levels": levels, "history": manager.history,
                     "bytes": None if state is None else (state.bytes_sent, state.fp32_bytes),
                     "finite": bool(torch.isfinite(_flat_params(pm)).all())}
    dist.destroy_process_group()


@pytest.mark.parametrize("hook", [False, True], ids=["fp32-allreduce", "quantised-allreduce"])
def test_ranks_stay_identical_across_switches(hook):
    results = mp.Manager().dict()
    mp.spawn(_train_worker, args=(_free_port(), hook, results), nprocs=WORLD)
    r0, r1 = results[0], results[1]
    assert all(r0["same"]) and r0["finite"], r0["same"]
    assert r0["levels"] == r1["levels"] == [8, 12, 12, 12, "fp32", "fp32"]
    switches0 = [h["epoch"] for h in r0["history"] if h["switched"]]
    switches1 = [h["epoch"] for h in r1["history"] if h["switched"]]
    assert switches0 == switches1 == [1], (switches0, switches1)
    if hook:
        sent, fp32 = r0["bytes"]
        # 8-bit levels travel as int8, 12-bit as int32, FP32 as float32: fewer bytes than FP32
        assert 0 < sent < fp32, (sent, fp32)


BLOCK = 16


def _hook_worker(rank, port, results):
    _init(rank, port)
    g = torch.Generator().manual_seed(rank)
    sizes = [1, 7, 33, 129, 1000]  # magnitudes 1e-2 .. 1e2 so blocks need their own exponents
    flat = torch.cat([torch.randn(n, generator=g) * 10.0 ** (i - 2) for i, n in enumerate(sizes)])
    flat[40:40 + BLOCK] = 0.0  # an all-zero block
    exact = flat.clone()
    dist.all_reduce(exact)
    exact /= WORLD
    out = {}
    for bits in (4, 8, 12, 16):
        fut, sent = quantised_allreduce(flat.clone(), bits, block=BLOCK,
                                        generator=torch.Generator().manual_seed(rank))
        avg = fut.wait()
        amax = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % BLOCK)).view(-1, BLOCK).amax(1)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        out[bits] = (avg, amax, sent)
    bad = flat.clone()
    if rank == 1:
        bad[3] = float("nan")
    nan_avg, _ = quantised_allreduce(bad, 8, block=BLOCK)
    results[rank] = {"exact": exact, "out": out, "n": flat.numel(), "nan_avg": nan_avg.wait()}
    dist.destroy_process_group()


def test_quantised_allreduce_within_one_unit_of_each_blocks_grid():
    results = mp.Manager().dict()
    mp.spawn(_hook_worker, args=(_free_port(), results), nprocs=WORLD)
    r0, r1 = results[0], results[1]
    n = r0["n"]
    for bits, (avg, amax, sent) in r0["out"].items():
        assert torch.equal(avg, r1["out"][bits][0])  # integer sums: identical on every rank
        wire = wire_dtype(bits, "gloo")
        limit = min(2 ** (bits - 1) - 1, torch.iinfo(wire).max // WORLD)
        s = torch.where(amax > 0, torch.floor(torch.log2(limit / amax.double())), torch.full_like(amax.double(), 126))
        unit = torch.exp2(-s).repeat_interleave(BLOCK)[:n]
        err = (avg.double() - r0["exact"].double()).abs()
        assert bool((err <= unit * (1 + 1e-6)).all()), (bits, float((err / unit).max()))
        # the average lies on each block's grid 2**-s / WORLD: every such multiple is an integer
        steps = avg.double() * WORLD / unit
        assert torch.equal(steps, steps.round())
        blocks = -(-n // BLOCK)
        assert sent == blocks * BLOCK * torch.tensor([], dtype=wire).element_size() + blocks + 1  # padded
    assert float((r0["out"][16][0] - r0["exact"]).abs().max()) < float((r0["out"][4][0] - r0["exact"]).abs().max())
    # a NaN on one rank reaches every rank (FP32 fallback), so every optimiser skips the step
    assert torch.isnan(r0["nan_avg"][3]) and torch.isnan(r1["nan_avg"][3])
    assert torch.equal(r0["nan_avg"][4:], r1["nan_avg"][4:])


def _broadcast_worker(rank, port, results):
    _init(rank, port)
    results[rank] = from_rank0({"rank": rank, "p": 1.0 + rank * 1e-9})
    dist.destroy_process_group()


def test_from_rank0_gives_every_rank_rank0s_object():
    results = mp.Manager().dict()
    mp.spawn(_broadcast_worker, args=(_free_port(), results), nprocs=WORLD)
    assert results[0] == results[1] == {"rank": 0, "p": 1.0}


def test_wire_dtype_and_bad_input():
    assert wire_dtype(8, "gloo") == torch.int8 and wire_dtype(12, "nccl") == torch.int32
    assert wire_dtype(None, "gloo") == torch.float32
    with pytest.raises(ValueError, match="bits=30"):
        wire_dtype(30, "gloo")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_quantised_allreduce(nn.Linear(2, 2))
