"""reuse_cpu_memory: freed large blocks stay mapped, so refilling them costs no page faults."""
import subprocess
import sys

import pytest

import muppet_fx

# A step-like pattern of large tensors, repeated; print the minor page faults of the last four
# rounds. glibc settles its free lists within two or three rounds, and now and then one later
# round maps a block afresh (seen once in about 50 rounds), so the test reads the steady state
# as three of the last four rounds.
PROBE = """
import resource, sys, torch
import muppet_fx
if sys.argv[1] == "reuse":
    assert muppet_fx.reuse_cpu_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 << 20).fill_(1.0)
    b = torch.empty(8 << 20).fill_(2.0)
    c = a[: 8 << 20] + b
    del a, b
    d = torch.empty(16 << 20).fill_(3.0)
    del c, d
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults[-4:])
"""

def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return sorted(int(v) for v in out.stdout.split()[-4:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_second_fill_reuses_mapped_pages():
    pages = (64 << 20) // 4096  # one 64 MiB tensor
    assert _faults("default")[0] > pages // 4  # glibc maps fresh blocks every round: a fault per page
    assert _faults("reuse")[2] < 64  # at least three of the last four rounds reuse mapped pages


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, "1GB"])
def test_bad_threshold_is_named(bad):
    with pytest.raises(ValueError, match="threshold_bytes"):
        muppet_fx.reuse_cpu_memory(bad)
