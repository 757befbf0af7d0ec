"""Smallest end-to-end use of muppet_fx: quantise a tensor to each level of the MuPPET ladder.

    python examples/quickstart.py

Prints, for each word length, the shared exponent, the error bound and the measured error of
nearest and stochastic rounding on a random weight tensor.
"""
import torch
from tabulate import tabulate

import muppet_fx


def main() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) * 0.05
    rows = []
    for bits in (8, 12, 14, 16):
        q = muppet_fx.quantise(w, bits, "nearest")
        ulp = 2.0 ** -q.exponent
        err_n = (q.dequantise() - w).abs().max().item()
        ws = torch.stack([muppet_fx.fake_quantise(w, bits, generator=g) for _ in range(64)])
        bias = (ws.mean(0) - w).abs().max().item()
        rows.append([bits, q.mantissa.dtype, q.exponent, ulp / 2, err_n, (ws - w).abs().max().item(), bias])
    print(tabulate(rows, headers=["bits", "mantissa", "exponent", "ulp/2", "max err nearest",
                                  "max err stochastic", "max |mean-w| (64 draws)"], floatfmt=".3g"))


if __name__ == "__main__":
    main()
