"""Data-parallel step time and gradient traffic: FP32 all-reduce against the fixed-point hook.

    python benchmarks/ddp.py [--model resnet20] [--batch 128] [--reps 5] [--world 2]

Spawns ``--world`` gloo processes on this machine (one thread each). Per level of the ladder
(8, 12, 16 bits, FP32), two copies of the same prepared model run inside
DistributedDataParallel side by side, interleaved: one with DDP's FP32 all-reduce, one with
``register_quantised_allreduce``. Columns: median step time (forward, backward with gradient
all-reduce, optimiser step), gradient bytes each rank hands to all-reduce per step, and the
relative L2 error of the averaged gradient against the FP32 average of the same gradients,
next to the error of the optimiser's own rounding of that average to the level's grid (which
MuPPET applies in any case).
``--batch`` is the global batch, split over the ranks.
"""
import argparse
import copy
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from cifar_models import build_model  # noqa: E402
from common import interleaved  # noqa: E402

import muppet_fx  # noqa: E402
from muppet_fx.distributed import quantised_allreduce, register_quantised_allreduce  # noqa: E402

LEVELS = (8, 12, 16, "fp32")


def _worker(rank, args, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    model = build_model(args.model)
    per_rank = args.batch // args.world
    x = torch.randn(per_rank, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, 10, (per_rank,), generator=torch.Generator().manual_seed(rank))
    nets = {}
    for comm in ("fp32 all-reduce", "fixed-point hook"):
        pm = muppet_fx.prepare(copy.deepcopy(model), ladder=LEVELS)
        ddp = nn.parallel.DistributedDataParallel(pm)
        hook = register_quantised_allreduce(ddp) if comm == "fixed-point hook" else None
        opt = torch.optim.SGD(pm.parameters(), lr=1e-3, momentum=0.9)
        nets[comm] = (pm, ddp, hook, opt)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())

    def step(comm):
        pm, ddp, hook, opt = nets[comm]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    rows = []
    for level in LEVELS:
        for pm, *_ in nets.values():
            pm.set_precision(level)
        hook = nets["fixed-point hook"][2]
        step("fixed-point hook")
        hook.reset_counters()
        step("fixed-point hook")
        sent = hook.bytes_sent
        med = interleaved({c: (lambda c=c: step(c)) for c in nets}, args.reps, sync=dist.barrier)
        # error of the averaged gradient: this rank's local gradients, averaged both ways
        pm = nets["fp32 all-reduce"][0]
        pm.zero_grad(set_to_none=True)
        F.cross_entropy(pm(x), y).backward()
        grads = [p.grad.reshape(-1) for p in pm.parameters() if p.grad is not None]
        flat = torch.cat(grads)
        exact = flat.clone()
        dist.all_reduce(exact)
        exact /= args.world
        bits = None if level == "fp32" else level
        avg = quantised_allreduce(flat, bits)[0].wait()
        err = float((avg - exact).norm() / exact.norm())
        # the optimiser's own rounding of the averaged gradient (per tensor, stochastic)
        if bits is None:
            own = 0.0
        else:
            rounded = torch.cat([muppet_fx.fake_quantise(t, bits) for t in exact.split([g.numel() for g in grads])])
            own = float((rounded - exact).norm() / exact.norm())
        base = med["fp32 all-reduce"]
        rows.append([level, base * 1e3, med["fixed-point hook"] * 1e3, base / med["fixed-point hook"],
                     grad_bytes / 2**20, sent / 2**20, sent / grad_bytes, err, own])
    if rank == 0:
        results["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128, help="global batch, split over the ranks")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    if args.batch % args.world:
        p.error(f"--batch {args.batch} must divide evenly over --world {args.world}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(args, port, results), nprocs=args.world)
    print(f"\n{args.model}, global batch {args.batch}, {args.world} gloo ranks x {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(tabulate(results["rows"], floatfmt=".3f", headers=[
        "level", "fp32 all-reduce ms", "hook ms", "speed-up", "fp32 MiB/step", "hook MiB/step",
        "bytes ratio", "hook grad rel. error", "optimiser rounding rel. error"]))


if __name__ == "__main__":
    main()
