"""Quantiser speed: each backend against the reference, measured side by side in one run.

    python benchmarks/quantise.py [--threads 2] [--reps 15]

Prints one table per device: median time of fake_quantise per backend and its speed-up over
the reference (interleaved repetitions, so drift hits every row alike).
"""
import argparse
import statistics
import time

import torch
from tabulate import tabulate

from muppet_fx import fake_quantise


def _time(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--reps", type=int, default=15, help="repetitions per configuration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        backends = ["reference", "cpu"] if device == "cpu" else ["reference", "triton"]
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        rows = []
        for numel in (2**16, 2**20, 2**23):
            x = torch.randn(numel, device=device)
            for rounding in ("nearest", "stochastic"):
                cases = {b: (lambda b=b: fake_quantise(x, 8, rounding, backend=b)) for b in backends}
                times = {b: [] for b in backends}
                for fn in cases.values():
                    fn()  # warm-up
                for _ in range(args.reps):
                    for b, fn in cases.items():
                        times[b].append(_time(fn, sync))
                med = {b: statistics.median(t) for b, t in times.items()}
                fast = backends[1]
                rows.append([numel, rounding, med["reference"] * 1e3, med[fast] * 1e3,
                             med["reference"] / med[fast]])
        print(f"\ndevice={device} threads={args.threads} torch={torch.__version__}")
        print(tabulate(rows, headers=["numel", "rounding", "reference ms", f"{backends[1]} ms",
                                      "speed-up"], floatfmt=".3g"))


if __name__ == "__main__":
    main()
