"""``benchmarks/cuda_host.py``: the host's side of a GPU training step, counted without a GPU.

Oracles: Triton's specialisation rule on hand-made arguments (integers equal to 1 and multiples
of 16 are told apart, ``do_not_specialize`` arguments are not, pointers by their alignment and
dtype); and the script on a small network, whose 8-bit step must launch the convolution and
quantiser kernels and compile fewer variants with the kernels' ``do_not_specialize`` lists
than without."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muppet_fx.kernels.quantise import HAS_TRITON

from .helpers import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_host.py"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _module():
    return load_script(SCRIPT, "cuda_host")


class _Fn:
    arg_names = ["x_ptr", "n", "m", "k", "stride"]
    do_not_specialize = ["k"]


def test_specialisation_follows_tritons_rule():
    key = _module().specialisation
    x = torch.zeros(64)
    base = key(_Fn, (x, 1, 32, 7, 16), {"BLOCK": 64})
    assert base[0] == (("pointer", True, "torch.float32"), "1", "16", "int", "16")
    assert key(_Fn, (x, 1, 32, 48, 16), {"BLOCK": 64}) == base  # k is not specialised
    assert key(_Fn, (x, 1, 32, 48, 16), {"BLOCK": 64}, honour_plain=False) != base
    assert key(_Fn, (x, 2, 32, 7, 16), {"BLOCK": 64}) != base  # 1 against another integer
    assert key(_Fn, (x, 1, 33, 7, 16), {"BLOCK": 64}) != base  # divisible by 16 or not
    assert key(_Fn, (x[1:], 1, 32, 7, 16), {"BLOCK": 64}) != base  # a 4-byte offset pointer
    assert key(_Fn, (x, 1, 32, 7, 16), {"BLOCK": 128}) != base  # constexpr flags


def test_small_network_step_is_counted():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it stubs compiled kernels' launches
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet20", "--batch", "4", "--levels", "8",
                           "--reps", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels = {m.group(1): [int(v) for v in m.group(2).split()]
               for m in re.finditer(r"^\s+8\s+(_\w+)\s+([\d ]+)$", proc.stdout, re.M)}
    assert {"_conv_kernel", "_conv_grad_weight_kernel", "_quantise_kernel"} <= set(kernels), proc.stdout
    launches, keys_without, keys_with, configs, without, with_plain = kernels["_conv_kernel"]
    assert launches >= 2 * 19 and keys_with < keys_without and with_plain == keys_with * configs


def test_torch_launches_count_kernels_not_views_allocations_or_reads():
    """The torch-launch count: ops that would launch a GPU kernel count, views, allocations and
    host reads do not."""
    counter = _module().TorchLaunches()
    with counter:
        x = torch.zeros(3, 4)          # a fill kernel
        x.view(-1)                     # a view
        y = x + 1                      # an elementwise kernel
        torch.empty(2, 5)              # an allocation
        y[0, 0].item()                 # a host read
        y.t().contiguous()             # a copy kernel
    assert counter.count == 3
