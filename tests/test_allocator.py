"""reuse_cpu_memory: freed large blocks stay mapped, so refilling them costs no page faults."""
import subprocess
import sys

import pytest

import muppet_fx

# A step-like pattern of large tensors, repeated; print the minor page faults of the last round.
PROBE = """
import resource, sys, torch
import muppet_fx
if sys.argv[1] == "reuse":
    assert muppet_fx.reuse_cpu_memory()
for _ in range(6):  # glibc settles its free lists within a few rounds
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 << 20).fill_(1.0)
    b = torch.empty(8 << 20).fill_(2.0)
    c = a[: 8 << 20] + b
    del a, b
    d = torch.empty(16 << 20).fill_(3.0)
    del c, d
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_second_fill_reuses_mapped_pages():
    pages = (64 << 20) // 4096  # one 64 MiB tensor
    assert _faults("default") > pages // 4  # glibc maps fresh blocks: a fault per page (or huge page)
    assert _faults("reuse") < 64


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, "1GB"])
def test_bad_threshold_is_named(bad):
    with pytest.raises(ValueError, match="threshold_bytes"):
        muppet_fx.reuse_cpu_memory(bad)
