"""Which kernel each convolution product should take on this CPU, through the route functions.

    python benchmarks/routes.py [--bits 8] [--models resnet18,resnet20] [--batch 128] [--reps 5]

Per layer of the models' convolutions (distinct shapes, CIFAR input), the three products of a
training step (``routes.conv_forward``, ``conv_grad_input``, ``conv_grad_weight`` on random
mantissas, scaling included) with each kernel forced, milliseconds, and ``*`` on the one the
routes pick now. At 8 bits: our VNNI kernels (``kernels/vnni_cpu``), oneDNN's int8
convolution and im2col + ``torch._int_mm`` (forward and grad-input), VNNI and im2col (weight
gradient). At 9-14 bits: the int16 VNNI kernels, the split int8 products (three, Karatsuba) and
FP32 on the values. The rule this measures is ``routes._vnni_cpu_kernel`` (8 bits) and
``gemm_cpu.vnni_weight_gradient``; run it on a new CPU before trusting them there. CPUs with
AVX-512 VNNI and without AMX only (elsewhere these kernels do not run); forced outputs are
checked equal, since every route is an exact integer sum.
"""
import argparse
import contextlib
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved  # noqa: E402

import muppet_fx  # noqa: E402
from muppet_fx import routes  # noqa: E402
from muppet_fx.kernels import amx_cpu, gemm_cpu, vnni_cpu  # noqa: E402

LAYERS = {  # (in, out, map size, kernel, stride)
    "resnet20": [(16, 16, 32, 3, 1), (16, 32, 32, 3, 2), (16, 32, 32, 1, 2), (32, 32, 16, 3, 1), (32, 64, 16, 3, 2),
                 (32, 64, 16, 1, 2), (64, 64, 8, 3, 1)],
    "resnet18": [(64, 64, 32, 3, 1), (64, 128, 32, 3, 2), (64, 128, 32, 1, 2), (128, 128, 16, 3, 1),
                 (128, 256, 16, 3, 2), (128, 256, 16, 1, 2), (256, 256, 8, 3, 1), (256, 512, 8, 3, 2),
                 (256, 512, 8, 1, 2), (512, 512, 4, 3, 1)],
}


@contextlib.contextmanager
def forced(kind: str, bits: int):
    """Route to ``kind`` for the duration (monkeypatching the routes' choices)."""
    saved = (routes._vnni_cpu_kernel, routes._use_vnni, routes._vnni_wide, gemm_cpu.vnni_weight_gradient,
             vnni_cpu.conv_grad_weight)
    use_vnni, wide, grad_weight = saved[1], saved[2], saved[4]
    try:
        if bits <= 8:
            routes._vnni_cpu_kernel = lambda *a, **k: kind
            gemm_cpu.vnni_weight_gradient = lambda *a: kind == "vnni"
        else:  # the int16 kernels, the split products (no VNNI), or FP32 on the values
            routes._use_vnni = use_vnni if kind == "vnni" else (lambda *a: False)
            routes._vnni_wide = (lambda a: False) if kind == "fp32" else wide
            vnni_cpu.conv_grad_weight = grad_weight if kind == "vnni" else (lambda *a: None)
        yield
    finally:
        (routes._vnni_cpu_kernel, routes._use_vnni, routes._vnni_wide, gemm_cpu.vnni_weight_gradient,
         vnni_cpu.conv_grad_weight) = saved


def chosen(x, w, g, geo, bits):
    """The kinds the routes pick now for (forward, grad-input, weight gradient)."""
    strided = geo[0][0] != 1
    if bits > 8:
        return ("vnni",) * 3 if routes._vnni_wide(x) else ("fp32",) * 3
    pick = lambda a, b, n, gi: routes._vnni_cpu_kernel(a, b, n, strided, grad_input=gi) or "vnni"  # noqa: E731
    fwd = pick(x, w, g.shape[2] * g.shape[3], False)
    dx = pick(g, w.transpose(0, 1), x.shape[2] * x.shape[3], True)
    dw = "vnni" if gemm_cpu.vnni_weight_gradient(x.shape[1], *w.shape[2:]) else "gemm"
    return fwd, dx, dw


def study(cin, cout, size, k, stride, args):
    top = 2 ** (args.bits - 1) - 1
    dtype = torch.int8 if args.bits <= 8 else torch.int16
    gen = torch.Generator().manual_seed(cin + size)
    rand = lambda *shape: torch.randint(-top, top + 1, shape, dtype=dtype, generator=gen)  # noqa: E731
    out = (size + 2 * (k // 2) - k) // stride + 1
    x = rand(args.batch, cin, size, size).contiguous(memory_format=torch.channels_last)
    g = rand(args.batch, cout, out, out).contiguous(memory_format=torch.channels_last)
    w = rand(cout, cin, k, k)
    geo = ([stride] * 2, [k // 2] * 2, [1, 1])
    s = torch.tensor(-float(args.bits + 3))
    products = {
        "fwd": lambda: routes.conv_forward("aten", x, s, w, s, None, None, *geo, 1)[0],
        "dX": lambda: routes.conv_grad_input("aten", g, s, w, s, None, list(x.shape), *geo, 1),
        "dW": lambda: routes.conv_grad_weight("aten", g, s, x, s, tuple(w.shape), *geo, 1),
    }
    kinds = ("vnni", "onednn", "gemm") if args.bits <= 8 else ("vnni", "split", "fp32")
    cases, results = {}, {}
    for kind in kinds:
        for name, fn in products.items():
            if name == "dW" and kind == "onednn":
                continue  # oneDNN has no weight gradient of its own here
            with forced(kind, args.bits):
                results[name, kind] = fn()

            def run(fn=fn, kind=kind):
                with forced(kind, args.bits):
                    fn()
            cases[name, kind] = run
    for name in products:  # exact sums (8 bits) or the same values rounded alike (FP32 ones aside)
        exact = [results[key] for key in results if key[0] == name and key[1] != "fp32"]
        if not all(torch.equal(exact[0], other) for other in exact[1:]):
            raise RuntimeError(f"{cin}->{cout} {k}x{k}/{stride}: the forced {name} routes disagree")
    t = interleaved(cases, args.reps)
    picked = dict(zip(products, chosen(x, w, g, geo, args.bits)))
    row = [f"{cin}->{cout} {k}x{k}/{stride} @{size}"]
    for name in products:
        for kind in kinds:
            if (name, kind) in t:
                row.append(f"{t[name, kind] * 1e3:.2f}{'*' if picked[name] == kind else ''}")
    return row, [f"{name} {kind}" for name in products for kind in kinds if (name, kind) in t]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet20")
    p.add_argument("--bits", type=int, default=8, choices=(8, 12, 14))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    muppet_fx.reuse_cpu_memory()
    if not vnni_cpu.available() or amx_cpu.available():
        print("this CPU has no AVX-512 VNNI kernels, or has AMX tiles (which take these layers): nothing to compare")
        return
    for model in args.models.split(","):
        rows, headers = [], None
        for layer in LAYERS[model]:
            row, headers = study(*layer, args)
            rows.append(row)
        print(f"\n{model}, {args.bits}-bit products, batch {args.batch}, threads {args.threads}, torch "
              f"{torch.__version__}: ms per product, * = the route's pick")
        print(tabulate(rows, headers=["layer"] + headers, tablefmt="simple"))


if __name__ == "__main__":
    main()
