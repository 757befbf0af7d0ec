"""``benchmarks/routes.py`` runs on tiny batches, so the script that re-derives the kernel
choices on a new CPU cannot rot: the routes' hooks it forces must exist, every forced route
must give the same exact sums, and each row marks the route's current pick.

Oracle: on AVX-512 VNNI CPUs without AMX, a table per model whose rows each carry three picks
(forward, grad-input, weight gradient); a route made to return wrong sums is reported."""
import subprocess
import sys
from pathlib import Path

import pytest

from muppet_fx.kernels import amx_cpu, vnni_cpu

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "routes.py"
pytestmark = pytest.mark.skipif(not vnni_cpu.available() or amx_cpu.available(),
                                reason="the route study needs AVX-512 VNNI without AMX")


def _run(*extra, prefix=()):
    return subprocess.run([sys.executable, *prefix, str(SCRIPT), "--models", "resnet20", "--batch", "2",
                           "--reps", "1", *extra], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bits", [8, 12])
def test_each_layer_is_timed_with_the_routes_pick_marked(bits):
    proc = _run("--bits", str(bits))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "@" in line and "->" in line]
    assert len(rows) == 7 and all(row.count("*") == 3 for row in rows), proc.stdout


def test_forced_routes_that_disagree_are_reported():
    # the VNNI forward made off by one: its forced forward differs from oneDNN's and im2col's
    broken = ("import runpy, sys; from muppet_fx.kernels import vnni_cpu as v; f = v.conv2d; "
              "v.conv2d = lambda *a, **k: (lambda y: None if y is None else y.add_(1.0))(f(*a, **k)); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = _run(prefix=("-c", broken))
    assert proc.returncode != 0 and "routes disagree" in proc.stderr, proc.stdout + proc.stderr
