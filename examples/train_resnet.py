"""Train a CIFAR-10 network with MuPPET and compare it with FP32, mixed precision and CPT.

    python examples/train_resnet.py                                  # ResNet-20, MuPPET, ~5 min on 2 CPU cores
    python examples/train_resnet.py --compare fp32,muppet,amp,cpt --out runs/compare
    python examples/train_resnet.py --model resnet18 --paper --subset 0 --device cuda   # the paper's recipe
    python examples/train_resnet.py --out runs/compare --resume      # continue from the last checkpoints
    torchrun --nproc_per_node 2 examples/train_resnet.py --comm quantised   # data parallel (gloo/NCCL)

Modes: muppet (ladder 8, 12, 14, 16 bits then FP32, switched by the gradient-diversity policy,
LR constant until FP32 then /10 every --lr-step epochs), fp32, amp (torch.autocast: bf16 on CPU,
fp16 on CUDA), cpt (cyclic forward word length up to 8 bits from a floor that CPT's precision
range test picks in the first epoch, 8-bit gradients, layer outputs in FP32 as in the CPT
paper), int8, int16 (fixed word length throughout), fp16 (half weights, activations and
gradients with loss scaling; bf16 on CPU).
Writes to --out: metrics.csv, policy-<mode>.json, policy-<mode>.png, report.md and
checkpoint-<mode>.pt after every epoch. --compare trains its modes side by side, taking turns
epoch by epoch, each on its own random stream (the results equal each mode's run alone), so
that their wall times compare on a machine whose speed drifts during the run.

Under torchrun the same command trains data-parallel (DistributedDataParallel; gloo on CPU,
NCCL on CUDA): --batch-size stays the global batch, split evenly over the ranks; each rank
reads its own share of every epoch's shuffled order; rank 0 alone prints, writes outputs and
checkpoints; --resume works the same. --comm quantised all-reduces gradients in the current
level's fixed-point format. If a rank dies, the others stop with an error (at the latest
after --dist-timeout seconds) instead of waiting forever.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_data import augment, find_data_dir, load_cifar10, normalise  # noqa: E402
from cifar_models import build_model  # noqa: E402

import muppet_fx  # noqa: E402
from muppet_fx.distributed import register_quantised_allreduce, unwrap  # noqa: E402
from muppet_fx.half import DynamicLossScaler, to_half  # noqa: E402

MODES = ("muppet", "fp32", "amp", "cpt", "int8", "int16", "fp16")
REPO = Path(__file__).resolve().parent.parent
DATA_CANDIDATES = [REPO / "data" / "cifar10", REPO.parent / "shared" / "data" / "cifar10", Path("data")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="resnet20, resnet18, alexnet, googlenet, a "
                   "torchvision classifier name or timm:<name> for a timm model (default resnet20)")
    p.add_argument("--mode", default="muppet", help=f"one of {', '.join(MODES)} (default muppet)")
    p.add_argument("--compare", default=None, help="comma-separated modes trained side by side on the "
                   "same seed, taking turns epoch by epoch, e.g. fp32,muppet,amp,cpt; one table at the end")
    p.add_argument("--data-dir", default=None, help="folder with train.npz/test.npz or "
                   "cifar-10-batches-py (default: the first of ./data/cifar10, ../shared/data/cifar10)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision if missing")
    p.add_argument("--subset", type=int, default=5000, help="training images used (0 = all 50000; default 5000)")
    p.add_argument("--test-subset", type=int, default=2000, help="test images used (0 = all 10000; default 2000)")
    p.add_argument("--epochs", type=int, default=24, help="total epochs per mode (default 24)")
    p.add_argument("--fp32-epochs", type=int, default=6, help="epochs reserved for FP32 at the end of a "
                   "muppet run, and the LR-decay stage of the baselines (default 6)")
    p.add_argument("--lr-step", type=int, default=3, help="divide the LR by 10 every this many FP32 epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--policy-resolution", type=int, default=2, help="gradient-diversity resolution r (paper 3)")
    p.add_argument("--policy-gamma", type=int, default=1, help="violations tolerated (paper 2)")
    p.add_argument("--policy-lambda", type=float, default=0.3, help="threshold decay (paper 0.1)")
    p.add_argument("--cpt-min-bits", default="auto", help="cpt: lowest forward word length of the cycle, "
                   "or auto (default): CPT's precision range test over the first epoch picks it")
    p.add_argument("--cpt-outputs", default="fp32", choices=("fp32", "quantised"), help="cpt: layer outputs "
                   "in FP32 as in the CPT paper (default), or quantised like MuPPET's")
    p.add_argument("--paper", action="store_true", help="the paper's recipe: batch 128, SGD 0.9, wd 1e-4, "
                   "lr 0.1, policy r=3 gamma=2 lambda=0.1, then 45 FP32 epochs with /10 every 15")
    p.add_argument("--out", default="runs/train_resnet", help="output folder (default runs/train_resnet)")
    p.add_argument("--resume", action="store_true", help="continue each mode from --out/checkpoint-<mode>.pt")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--comm", default="fp32", choices=("fp32", "quantised"), help="under torchrun: "
                   "gradient all-reduce in FP32 (default) or in the level's fixed-point format")
    p.add_argument("--dist-timeout", type=float, default=300.0, help="under torchrun: seconds a "
                   "collective may wait for the other ranks before the run stops (default 300)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate everything that can be checked before training starts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.paper:
        args.batch_size, args.lr, args.momentum, args.weight_decay = 128, 0.1, 0.9, 1e-4
        args.policy_resolution, args.policy_gamma, args.policy_lambda = 3, 2, 0.1
        args.fp32_epochs, args.lr_step = 45, 15
        args.epochs = max(args.epochs, 150)
    args.modes = [m.strip() for m in (args.compare or args.mode).split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        parser.error(f"unknown mode(s) {bad or args.modes}; choose from {', '.join(MODES)}")
    try:
        build_model(args.model)
    except ValueError as err:
        parser.error(str(err))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device!r} is not available; use cpu" + (", cuda" if torch.cuda.is_available() else ""))
    if args.epochs < 1 or not 0 <= args.fp32_epochs <= args.epochs or args.lr_step < 1:
        parser.error(f"need epochs >= 1, 0 <= fp32-epochs <= epochs, lr-step >= 1 (got {args.epochs}, "
                     f"{args.fp32_epochs}, {args.lr_step})")
    if args.cpt_min_bits != "auto":
        try:
            args.cpt_min_bits = int(args.cpt_min_bits)
        except ValueError:
            args.cpt_min_bits = None
        if args.cpt_min_bits is None or not 2 <= args.cpt_min_bits <= 8:
            parser.error(f"--cpt-min-bits must be auto or an integer in [2, 8] (the cycle tops at 8), "
                         f"got {args.cpt_min_bits!r}")
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    if args.batch_size % args.world:
        parser.error(f"--batch-size {args.batch_size} is the global batch and must divide evenly "
                     f"over {args.world} ranks")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks check side by side
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        parser.error(f"--out {str(out)!r} is not writable: {err}")
    data_dir = find_data_dir([args.data_dir] if args.data_dir else DATA_CANDIDATES)
    if data_dir is None and args.download and args.data_dir:
        data_dir = Path(args.data_dir)
    if data_dir is None:
        parser.error("no CIFAR-10 found; pass --data-dir (a folder with train.npz/test.npz or "
                     "cifar-10-batches-py), or --download with network access")
    args.data_dir = data_dir
    if args.resume:
        for mode in args.modes:
            ckpt = out / f"checkpoint-{mode}.pt"
            if ckpt.exists():
                extra = torch.load(ckpt, map_location="cpu", weights_only=False).get("extra") or {}
                if extra.get("model") != args.model:
                    parser.error(f"{ckpt} was written for model {extra.get('model')!r}, not {args.model!r}")
    return args


@dataclass
class Run:
    """Everything one mode trains with."""

    mode: str
    model: nn.Module  # the FP32 (or half) network: evaluated directly
    net: nn.Module  # what training calls (a prepared model, or ``model`` itself)
    optimizer: torch.optim.Optimizer
    manager: object = None
    scheduler: object = None
    scaler: object = None
    autocast: object = None
    note: str = ""
    comm: object = None  # the quantised all-reduce's state (byte counters)
    metrics: list = field(default_factory=list)
    elapsed: float = 0.0
    start_epoch: int = 0
    random: tuple = ()  # torch's generator states as this run left them (own_random_stream)


class StepLR:
    """Baselines' schedule: constant, then /10 every ``lr_step`` epochs over the last
    ``fp32_epochs``; the same shape the muppet run gets once it reaches FP32."""

    def __init__(self, optimizer, epochs, fp32_epochs, lr_step):
        self.optimizer, self.start, self.lr_step = optimizer, epochs - fp32_epochs, lr_step
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.epoch = 0

    def step(self):
        self.epoch += 1
        f = 0.1 ** ((self.epoch - self.start) // self.lr_step) if self.epoch >= self.start else 1.0
        for g, lr in zip(self.optimizer.param_groups, self.base):
            g["lr"] = lr * f

    def state_dict(self):
        return {"epoch": self.epoch, "base": self.base}

    def load_state_dict(self, s):
        self.epoch, self.base = s["epoch"], s["base"]


def _data_parallel(run: Run, args) -> Run:
    """Under torchrun: the network trains inside DistributedDataParallel."""
    if args.world > 1:
        pm = run.net
        run.net = nn.parallel.DistributedDataParallel(pm)
        if args.comm == "quantised" and run.manager is not None:
            run.comm = register_quantised_allreduce(run.net, pm)
    return run


def make_run(mode: str, args, steps_per_epoch: int) -> Run:
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(args.device)
    sgd = lambda params: torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,  # noqa: E731
                                         weight_decay=args.weight_decay)
    if mode in ("fp32", "amp"):
        opt = sgd(model.parameters())
        run = Run(mode, model, model, opt, scheduler=StepLR(opt, args.epochs, args.fp32_epochs, args.lr_step))
        if mode == "amp":
            dtype = torch.float16 if args.device == "cuda" else torch.bfloat16
            run.autocast = lambda: torch.autocast(args.device, dtype=dtype)
            run.scaler = torch.amp.GradScaler("cuda") if args.device == "cuda" else None
            run.note = f"autocast {dtype}".replace("torch.", "")
        return _data_parallel(run, args)
    if mode == "fp16":
        model, note = to_half(model, args.device)
        opt = sgd(model.parameters())
        scaler = DynamicLossScaler(init_scale=2.0**16 if args.device == "cuda" else 1.0)
        return _data_parallel(Run(mode, model, model, opt, scaler=scaler, note=note,
                                  scheduler=StepLR(opt, args.epochs, args.fp32_epochs, args.lr_step)), args)
    ladders = {"muppet": (8, 12, 14, 16, "fp32"), "cpt": (8, "fp32"), "int8": (8,), "int16": (16,)}
    quantise_outputs = mode != "cpt" or args.cpt_outputs == "quantised"  # CPT quantises GEMM operands only
    pm = muppet_fx.prepare(model, ladder=ladders[mode], quantise_outputs=quantise_outputs)
    if mode == "muppet":
        policy = muppet_fx.GradientDiversityPolicy(resolution=args.policy_resolution, gamma=args.policy_gamma,
                                                   lam=args.policy_lambda)
    elif mode == "cpt":
        total = steps_per_epoch * args.epochs
        auto = args.cpt_min_bits == "auto"
        policy = muppet_fx.CyclicPolicy(b_min=None if auto else args.cpt_min_bits, b_max=8, bwd_bits=8,
                                        total_iterations=total, num_cycles=max(1, min(32, args.epochs)),
                                        range_test_iterations=max(steps_per_epoch, 7) if auto else 0)
    else:
        policy = muppet_fx.FixedPolicy(ladders[mode][0])
    out = Path(args.out)
    manager = muppet_fx.PrecisionManager(pm, policy, log_path=out / f"policy-{mode}.json")
    opt = muppet_fx.MasterCopyOptimizer(sgd(pm.parameters()), pm, manager)
    sched = muppet_fx.PrecisionLR(opt, manager, gamma=0.1, step_epochs=args.lr_step) if mode == "muppet" \
        else StepLR(opt, args.epochs, args.fp32_epochs, args.lr_step)
    route = pm._muppet_state.route_for(torch.device(args.device))
    return _data_parallel(Run(mode, model, pm, opt, manager=manager, scheduler=sched, note=f"route {route}"), args)


def _level(run: Run):
    if run.manager is None:
        return {"fp32": "fp32", "amp": "amp", "fp16": "fp16"}[run.mode]
    st = run.manager.state
    return st.level if run.mode != "cpt" else f"cpt {st.fwd_bits}/{st.bwd_bits}"


def train_epoch(run: Run, x, y, epoch: int, args) -> tuple[float, float]:
    run.net.train()
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    order = torch.randperm(len(x), generator=g)  # the same order on every rank
    order = order[: len(order) - len(order) % args.world][args.rank:: args.world]  # this rank's share
    batch = args.batch_size // args.world
    dtype = next(run.model.parameters()).dtype
    total_loss, correct, seen = 0.0, 0, 0
    batches = range(0, len(order), batch)
    bar = tqdm(batches, desc=f"{run.mode} epoch {epoch}", leave=False, disable=args.no_progress or args.rank > 0)
    for i in bar:
        idx = order[i:i + batch]
        xb = normalise(augment(x[idx], g)).to(args.device, dtype)
        yb = y[idx].to(args.device)
        run.optimizer.zero_grad(set_to_none=True)
        with (run.autocast() if run.autocast else contextlib.nullcontext()):
            out = run.net(xb)
            loss = F.cross_entropy(out.float(), yb)
        if run.manager is not None:
            run.manager.observe_loss(loss.detach())  # CPT's precision range test reads the losses
        if run.mode == "fp16":
            run.scaler.scale_loss(loss).backward()
            run.scaler.step(run.optimizer)
        elif run.scaler is not None:  # amp on CUDA
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            run.optimizer.step()
        total_loss += float(loss.detach()) * len(idx)
        correct += int((out.argmax(1) == yb).sum())
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", prec=_level(run))
    total_loss, correct, seen = _sum_over_ranks(args, total_loss, correct, seen)
    return total_loss / seen, correct / seen


def _sum_over_ranks(args, *values):
    if args.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(run: Run, x, y, args) -> float:
    """Top-1 of the network itself: the FP32 master weights (half weights in fp16 mode)."""
    run.model.eval()
    dtype = next(run.model.parameters()).dtype
    share = math.ceil(len(x) / args.world)  # each rank scores a slice; counts are summed
    x, y = x[args.rank * share:(args.rank + 1) * share], y[args.rank * share:(args.rank + 1) * share]
    correct = 0
    for i in range(0, len(x), 500):
        out = run.model(normalise(x[i:i + 500]).to(args.device, dtype))
        correct += int((out.argmax(1).cpu() == y[i:i + 500]).sum())
    correct, total = _sum_over_ranks(args, correct, len(x))
    return correct / total


def start_mode(mode: str, args, data) -> Run:
    """The mode's run, resumed from its checkpoint where ``--resume`` finds one."""
    (x, _), _ = data
    run = make_run(mode, args, math.ceil(len(x) / args.batch_size))
    ckpt = Path(args.out) / f"checkpoint-{mode}.pt"
    if args.resume and ckpt.exists():
        extra = muppet_fx.load_checkpoint(ckpt, model=unwrap(run.net), optimizer=run.optimizer,
                                          manager=run.manager, scheduler=run.scheduler)
        run.start_epoch, run.metrics, run.elapsed = extra["epoch"], extra["metrics"], extra["elapsed"]
        say(args, f"[{mode}] resumed from {ckpt} at epoch {run.start_epoch}")
    run.random = _random_state(args.device)
    return run


def _random_state(device: str):
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if device == "cuda" else None)


@contextlib.contextmanager
def own_random_stream(run: Run, device: str):
    """torch's global generators as ``run`` left them: each mode draws (stochastic rounding,
    the seeds of its kernels) from its own stream, as if it trained alone, while the modes
    take turns epoch by epoch."""
    cpu, cuda = run.random
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    try:
        yield
    finally:
        run.random = _random_state(device)


def run_epoch(run: Run, epoch: int, args, data) -> None:
    """One epoch of ``run``: train, let the policy decide, evaluate, log, checkpoint."""
    (x, y), (xt, yt) = data
    mode, out = run.mode, Path(args.out)
    ckpt = out / f"checkpoint-{mode}.pt"
    level = _level(run)
    t0 = time.perf_counter()
    loss, acc = train_epoch(run, x, y, epoch, args)
    if run.manager is not None:
        run.manager.end_epoch()
        forced = mode == "muppet" and epoch + 1 >= args.epochs - args.fp32_epochs \
            and run.manager.level != "fp32"
        if forced:  # the FP32 stage always gets its epochs
            old = run.manager.level
            run.manager.state.set_level("fp32")
            run.manager.fp32_start = epoch + 1
            run.manager.history[-1].update(switched=True, forced=True)
            say(args, f"[{mode}] epoch {epoch}: {old} -> fp32 (forced: last {args.fp32_epochs} epochs are FP32)")
    run.scheduler.step()
    run.elapsed += time.perf_counter() - t0
    test_acc = evaluate(run, xt, yt, args)
    lr = run.optimizer.param_groups[0]["lr"]
    run.metrics.append({"mode": mode, "epoch": epoch, "level": level, "train_loss": round(loss, 4),
                        "train_acc": round(acc, 4), "test_acc": round(test_acc, 4),
                        "epoch_time_s": round(time.perf_counter() - t0, 2), "lr_next": lr})
    comm = "" if run.comm is None else f"  comm {run.comm.bytes_sent / max(run.comm.fp32_bytes, 1):.2f}x fp32 bytes"
    say(args, f"[{mode}] epoch {epoch:3d}  level {str(level):>9}  loss {loss:.3f}  train {acc:.3f}  "
          f"test {test_acc:.3f}  {run.metrics[-1]['epoch_time_s']:.1f}s{comm}")
    if run.comm is not None:
        run.comm.reset_counters()  # the ratio printed is per epoch
    if args.rank > 0:  # rank 0 writes for everyone: the ranks hold identical state
        return
    muppet_fx.save_checkpoint(ckpt, model=unwrap(run.net), optimizer=run.optimizer, manager=run.manager,
                              scheduler=run.scheduler,
                              extra={"epoch": epoch + 1, "model": args.model, "mode": mode,
                                     "metrics": run.metrics, "elapsed": run.elapsed})


def finish_mode(run: Run, args) -> None:
    if run.manager is not None and run.manager.history and args.rank == 0:
        muppet_fx.plot_policy(run.manager.history, Path(args.out) / f"policy-{run.mode}.png")


def say(args, line: str) -> None:
    if args.rank == 0:
        print(line, flush=True)


def summarise(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        tests = [m["test_acc"] for m in r.metrics]
        levels = {}
        for m in r.metrics:
            key = str(m["level"]).split(" ")[0]
            levels[key] = levels.get(key, 0) + 1
        switches = [h["epoch"] for h in (r.manager.history if r.manager else []) if h.get("switched")]
        rows.append({"mode": r.mode, "best top-1 %": 100 * max(tests), "final top-1 %": 100 * tests[-1],
                     "wall time s": r.elapsed, "epochs at each level": ", ".join(f"{k}: {v}" for k, v in levels.items()),
                     "switch epochs": ", ".join(map(str, switches)) or "-", "note": r.note})
    base = next((row for row in rows if row["mode"] == "fp32"), None)
    for row in rows:
        if base is not None:
            row["d final vs fp32 (pp)"] = row["final top-1 %"] - base["final top-1 %"]
            row["time / fp32"] = row["wall time s"] / base["wall time s"]
    return rows


def write_outputs(runs: list[Run], args) -> str:
    out = Path(args.out)
    metrics = [m for r in runs for m in r.metrics]
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(metrics[0]))
        writer.writeheader()
        writer.writerows(metrics)
    rows = summarise(runs)
    table = tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github")
    (out / "report.md").write_text(f"# CIFAR-10, {args.model}\n\n{len(runs[0].metrics)} epochs, "
                                   f"{args.subset or 50000} training images, device {args.device}, seed {args.seed}\n\n"
                                   f"{table}\n")
    return table


def main(argv=None) -> list[Run]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":  # every mode alike: large tensors stop being page-faulted each step
        muppet_fx.reuse_cpu_memory()
    (x, y), (xt, yt) = load_cifar10(args.data_dir, download=args.download)
    if args.subset:
        x, y = x[: args.subset], y[: args.subset]
    if args.test_subset:
        xt, yt = xt[: args.test_subset], yt[: args.test_subset]
    data = ((x, y), (xt, yt))
    with distributed(args):
        # the modes take turns epoch by epoch: a machine that speeds up or slows down over the
        # run does so for every mode alike, so their wall times compare
        runs = [start_mode(mode, args, data) for mode in args.modes]
        for epoch in range(args.epochs):
            for run in runs:
                if epoch >= run.start_epoch:
                    with own_random_stream(run, args.device):
                        run_epoch(run, epoch, args, data)
        for run in runs:
            finish_mode(run, args)
    if args.rank == 0:
        print(write_outputs(runs, args))
    return runs


@contextlib.contextmanager
def distributed(args):
    """Under torchrun: one process group for the run (gloo on CPU, NCCL on CUDA), a clear
    error when another rank fails, and the group torn down at the end."""
    if args.world == 1:
        yield
        return
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                         timeout=datetime.timedelta(seconds=args.dist_timeout))
    try:
        yield
    except (torch.distributed.DistError, RuntimeError) as err:
        if not isinstance(err, torch.distributed.DistError) and "gloo" not in str(err).lower() \
                and "nccl" not in str(err).lower():
            raise
        raise SystemExit(f"[rank {args.rank}] stopped: a collective with the other ranks failed "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}). Another rank has "
                         f"stopped or did not answer within --dist-timeout {args.dist_timeout:g}s; "
                         f"continue from the last checkpoint with --resume.") from err
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
