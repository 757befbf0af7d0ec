"""What the CUDA code path asks of the host per training step, measured without a GPU.

    python benchmarks/cuda_host.py [--models resnet18] [--batch 256] [--levels 8,16] [--reps 10]

The prepared model runs the ``triton`` route on CPU tensors (``FORCE_TRITON_PATH``) with every
Triton launch replaced by a recorder, so the step does the host's work of a GPU step (the
routes' Python, the tensor bookkeeping, the launch decisions) and none of the kernels'. Per
level:
- **launches per step**, per kernel, and the step's **torch launches**: its aten ops that are
  neither views, nor allocations, nor host reads (what would launch a kernel on a GPU; the
  batch norm's and ReLU's C kernels are switched off, as on a GPU);
- **compilations**: the distinct specialisation keys among those launches, worked out as Triton
  does at launch (integers equal to 1, integers and pointers divisible by 16, dtypes and
  constexpr flags; arguments a kernel marks ``do_not_specialize`` excepted), times the
  kernel's autotuning configurations after pruning. Each one is a compilation at the first
  step of a fresh cache; "without" ignores the ``do_not_specialize`` lists;
- **host ms per step** at ``--host-batch`` (default 1): the stubbed step's time, which still
  includes the CPU's own work on the parts that do not go to Triton (batch norm, ReLU, the
  loss) and on weight-sized tensors, so it bounds the host's share from above.
A GPU step whose device time is below the host's is host-bound, whatever its kernels do.
"""
import argparse
import collections
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from cifar_models import build_model  # noqa: E402

import muppet_fx  # noqa: E402
from muppet_fx import compact, routes  # noqa: E402
from muppet_fx.kernels import quantise, triton_aot  # noqa: E402


class Recorder:
    """Replaces Triton's launch entry points; keeps each launch's kernel name, number of
    autotuning configurations and specialisation keys (without and with do_not_specialize)."""

    def __init__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self.calls, self.recording = [], True
        self._saved = [(Autotuner, Autotuner.run), (JITFunction, JITFunction.run)]

    def _run(self, kernel, *args, **kwargs):
        if not self.recording:  # timing: a launch costs the host nothing here
            return
        fn, configs = triton_aot.jit_function(kernel), triton_aot.launch_configs(kernel, kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        # keys only: holding the arguments would keep a whole step's tensors alive
        self.calls.append((fn.__name__, len(configs), specialisation(fn, args, constexprs, honour_plain=False),
                           specialisation(fn, args, constexprs)))

    def __enter__(self):
        recorder = self
        for cls, _ in self._saved:
            cls.run = lambda kernel, *a, **k: recorder._run(kernel, *a, **k)
        self._force = (quantise.FORCE_TRITON_PATH, routes.resolve_route,
                       *(getattr(compact, name) for name in _CPU_KERNELS))
        quantise.FORCE_TRITON_PATH = True
        for name in _CPU_KERNELS:  # on a GPU these C kernels never run: the Triton ones or torch ops do
            setattr(compact, name, lambda *a, **k: None)
        real = routes.resolve_route
        routes.resolve_route = lambda backend, device, exact: ("triton" if backend == "triton"
                                                               else real(backend, device, exact))
        return self

    def __exit__(self, *exc):
        for cls, run in self._saved:
            cls.run = run
        quantise.FORCE_TRITON_PATH, routes.resolve_route = self._force[:2]
        for name, fn in zip(_CPU_KERNELS, self._force[2:]):
            setattr(compact, name, fn)


# compact's C kernels (batch norm, ReLU), which would take the stubbed step's CPU tensors
_CPU_KERNELS = ("batch_norm_forward", "batch_norm_backward", "relu_with_mask", "add_relu_with_mask",
                "relu_mask_backward")


# aten ops that launch no kernel on a GPU: allocations and host-side reads (views are told by
# their schema)
_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "_local_scalar_dense",
              "lift_fresh", "set_", "resize_", "is_nonzero", "equal", "size", "stride", "sym_size", "sym_stride",
              "sym_numel", "sym_storage_offset"}


class TorchLaunches(TorchDispatchMode):
    """Counts the aten ops of a step that would launch a kernel on a GPU (every op that is
    neither a view nor an allocation nor a host read), as Triton's launches are counted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def specialisation(fn, args, constexprs, honour_plain: bool = True) -> tuple:
    """The part of Triton's compilation key a launch's arguments decide."""
    plain = triton_aot.unspecialised(fn) if honour_plain else set()
    key = []
    for name, a in zip(fn.arg_names, args):
        if isinstance(a, torch.Tensor):
            key.append(("pointer", a.data_ptr() % 16 == 0, str(a.dtype)))
        elif isinstance(a, bool) or not isinstance(a, int) or name in plain:
            key.append(type(a).__name__)
        else:
            key.append("1" if a == 1 else "16" if a % 16 == 0 else "int")
    return tuple(key), tuple(sorted(constexprs.items()))


def step_fn(net, x, y, opt=None):
    def step():
        F.cross_entropy(net(x), y).backward()
        if opt is not None:
            opt.step()
        for p in net.parameters():
            p.grad = None
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18")
    p.add_argument("--batch", type=int, default=256, help="batch of the recorded step (shapes decide the keys)")
    p.add_argument("--host-batch", type=int, default=1, help="batch of the timed step")
    p.add_argument("--levels", type=lambda v: tuple(int(b) for b in v.split(",")), default=(8, 16))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--master", action="store_true", help="steps end with an SGD step, MuPPET's through "
                   "MasterCopyOptimizer (each gradient quantised)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    muppet_fx.reuse_cpu_memory()  # as train_step.py: freed CPU memory stays mapped
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name)
        # The stubbed kernels leave their outputs unwritten: whatever the allocator hands back
        # flows on, into the shared batch-norm statistics too. Denormals there would slow the
        # CPU's own work, so they flush to zero, and the FP32 step times a copy of the model.
        reference = copy.deepcopy(model)
        rows, launch_rows = [], []
        for bits in args.levels:
            pm = muppet_fx.prepare(model, ladder=(bits, "fp32"), backend="triton")
            # fused, as on a GPU: the NaN check stays on the device (the stubbed kernels leave
            # garbage in the gradients, and a host check would skip the quantisation)
            sgd = (lambda params: torch.optim.SGD(params, lr=0.0, momentum=0.9, fused=True)) if args.master else None
            opt, ref_opt = (muppet_fx.MasterCopyOptimizer(sgd(pm.parameters()), pm), sgd(reference.parameters())) \
                if args.master else (None, None)
            with Recorder() as rec:
                x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
                if opt is not None:  # a finite first step initialises the optimiser's state (checked path)
                    F.cross_entropy(pm(x), y).backward()
                    for p in pm.parameters():
                        p.grad.nan_to_num_(0.0, 0.0, 0.0)
                    opt.step()
                    opt.zero_grad()
                    rec.calls.clear()
                with TorchLaunches() as torch_launches:
                    step_fn(pm, x, y, opt)()
                per_kernel = collections.defaultdict(lambda: [0, set(), set(), 0])
                for kernel, configs, without, with_plain in rec.calls:
                    r = per_kernel[kernel]
                    r[0] += 1
                    r[1].add(without)
                    r[2].add(with_plain)
                    r[3] = configs
                rec.recording = False
                xs, ys = torch.randn(args.host_batch, 3, 32, 32), torch.randint(0, 10, (args.host_batch,))
                timed = {"fp32 eager, CPU kernels": step_fn(reference, xs, ys, ref_opt),
                         f"{bits}-bit triton route, kernels stubbed": step_fn(pm, xs, ys, opt)}
                for f in timed.values():
                    f()
                times = {k: [] for k in timed}
                for _ in range(args.reps):
                    for k, f in timed.items():
                        t0 = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t0)
            for kernel, (n, old, new, configs) in sorted(per_kernel.items()):
                launch_rows.append([bits, kernel, n, len(old), len(new), configs, len(old) * configs, len(new) * configs])
            total = sum(r[0] for r in per_kernel.values())
            rows.append([bits, total, torch_launches.count, sum(len(r[1]) * r[3] for r in per_kernel.values()),
                         sum(len(r[2]) * r[3] for r in per_kernel.values())]
                        + [statistics.median(v) * 1e3 for v in times.values()])
        print(f"\n{name}: recorded at batch {args.batch}, timed at batch {args.host_batch}, threads {args.threads}, "
              f"torch {torch.__version__}{', with MasterCopyOptimizer(SGD)' if args.master else ''}")
        print(tabulate(launch_rows, headers=["level", "kernel", "launches", "keys without", "keys with",
                                             "configs", "compilations without", "compilations with"]))
        print(tabulate(rows, headers=["level", "Triton launches per step", "torch launches per step",
                                      "compilations without do_not_specialize",
                                      "compilations", "fp32 eager step ms (CPU kernels)",
                                      "stubbed step ms (host's share, upper bound)"], floatfmt=".1f"))


if __name__ == "__main__":
    main()
