"""``benchmarks/gpu_correctness.py`` runs on small odd shapes in the interpreter, so the GPU
check script cannot rot between GPU runs; a broken kernel makes it report failures.

Oracle: the script's own checks (exact int8 sums, float32-accumulation bounds, bit-equal fused
quantisation) pass on the reference-checked kernels, and fail, with a non-zero exit status, when
the int8 GEMM is replaced by one that drops the last K column, or the stochastic-rounding seed
is frozen as a captured host integer would be.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_correctness.py"
ENV = {**os.environ, "TRITON_INTERPRET": "1"}


def _run(*extra):
    return subprocess.run([sys.executable, *extra, str(SCRIPT), "--device", "cpu", "--tiny", "--batch", "2"],
                          env=ENV, capture_output=True, text=True, timeout=300)


def test_every_check_passes_on_the_interpreted_kernels():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all passed" in proc.stdout and proc.stdout.count("PASS") == 19 and "FAIL" not in proc.stdout


def test_a_wrong_kernel_is_reported():
    # the int8 GEMM loses its last reduction column: the exact checks must see it
    broken = ("import runpy, sys; from muppet_fx.kernels import gemm_triton as g; f = g.int_mm; "
              "g.int_mm = lambda a, b: f(a[:, :-1], b[:-1]); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = _run("-c", broken)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # both int8 GEMM checks
    assert proc.stdout.count("FAIL int8 GEMM") == 2


def test_frozen_seeds_are_reported():
    # a seed fixed on the host (what a CUDA graph would freeze): replays must be seen to repeat
    frozen = ("import runpy, sys; import muppet_fx.numerics as n; n._triton_seed = lambda *a, **k: 5; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = _run("-c", frozen)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL stochastic rounding replayed in a CUDA graph" in proc.stdout
    assert "same draws" in proc.stdout
