"""Cost of the compiler pass and of the emulate route, measured in one run.

    python benchmarks/prepare.py [--threads 2] [--batch 128] [--reps 3]

1. ``prepare`` time (median of 3) for ResNet-50 and ViT-B/16, and the time of a precision switch
   (``set_precision`` between two cached levels).
2. Training-step time (forward, backward, SGD step) of ResNet-18 with the CIFAR stem on 32x32
   inputs: FP32 eager against the prepared model's ``emulate`` route at 8 bits, interleaved,
   medians, ratio to FP32.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from tabulate import tabulate

from common import cifar_resnet18, interleaved
from muppet_fx import prepare


def _prepare_times(make, reps=3):
    model = make()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pm = prepare(model)
        t.append(time.perf_counter() - t0)
    levels = [lvl for lvl in pm.ladder]
    sw = []
    for i in range(200):
        t0 = time.perf_counter()
        pm.set_precision(levels[i % len(levels)])
        sw.append(time.perf_counter() - t0)
    return statistics.median(t), statistics.median(sw)


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, make in (("resnet50", tvm.resnet50), ("vit_b_16", tvm.vit_b_16)):
        prep, switch = _prepare_times(make)
        rows.append([name, prep, switch * 1e3])
    print(tabulate(rows, headers=["model", "prepare s", "switch ms"], floatfmt=".3g"))

    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    fp32 = cifar_resnet18()
    emu = cifar_resnet18()
    pm = prepare(emu, backend="emulate")
    opt_a = torch.optim.SGD(fp32.parameters(), lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD(pm.parameters(), lr=0.01, momentum=0.9)
    med = interleaved({"fp32 eager": lambda: _step(fp32, opt_a, x, y),
                       "emulate 8-bit": lambda: _step(pm, opt_b, x, y)}, args.reps)
    base = med["fp32 eager"]
    print(f"\nResNet-18 (CIFAR stem) training step, batch {args.batch}, threads {args.threads}, "
          f"torch {torch.__version__}")
    print(tabulate([[k, v, v / base] for k, v in med.items()], headers=["config", "s/step", "x fp32"],
                   floatfmt=".3g"))


if __name__ == "__main__":
    main()
