"""Quantiser speed against memory bandwidth, measured side by side in one run.

    python benchmarks/quantiser.py [--numel 8388608] [--threads 2] [--reps 21] [--compile]

8-bit stochastic quantisation of one float32 tensor (default 8,388,608 elements, a ResNet
stage-1 activation at batch 128) by each path, with ``x.clone()`` as the bandwidth yardstick.
Interleaved repetitions, medians, ratios to ``clone``. On CUDA the Triton rows also report the
fraction of the device's copy bandwidth (as measured by ``clone``) they reach.
"""
import argparse
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved  # noqa: E402

from muppet_fx import fake_quantise, quantise
from muppet_fx.kernels.quantise import quantise_reference


def eager_composition(x: torch.Tensor) -> torch.Tensor:
    """The same math as a user would write it in eager torch (per-tensor scale, SR, dequantise)."""
    amax = x.abs().amax()
    s = torch.floor(torch.log2(127.0 / amax))
    v = x * torch.exp2(s)
    return (torch.floor(v + torch.rand_like(v)).clamp(-127, 127)) * torch.exp2(-s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=8_388_608)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--compile", action="store_true", help="add the composition under torch.compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        x = torch.randn(args.numel, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        fast = "cpu" if device == "cpu" else "triton"
        cases = {
            "x.clone()": lambda: x.clone(),
            f"{fast}: fake_quantise (float32 out)": lambda: fake_quantise(x, 8, backend=fast),
            f"{fast}: quantise (int8 out)": lambda: quantise(x, 8, backend=fast),
            "reference (muppet_fx, plain torch)": lambda: quantise_reference(x, 8, "stochastic"),
            "eager torch composition": lambda: eager_composition(x),
        }
        if args.compile:
            compiled = torch.compile(eager_composition)
            cases["composition under torch.compile"] = lambda: compiled(x)
        med = interleaved(cases, args.reps, warmup=2, sync=sync)
        base = med["x.clone()"]
        rows = [[k, v * 1e3, v / base] for k, v in med.items()]
        print(f"\n{device} ({torch.cuda.get_device_name() if device == 'cuda' else 'threads=%d' % args.threads})"
              f", numel={args.numel}, torch {torch.__version__}")
        print(tabulate(rows, headers=["path", "median ms", "x clone"], floatfmt=".3g"))


if __name__ == "__main__":
    main()
