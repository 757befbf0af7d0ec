"""Test set-up: Triton kernels run in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported, hence at the top of conftest.

pytest puts the repository root on ``sys.path``, where our ``kernels/`` folder (installed as
``muppet_fx.kernels``) would shadow the PyPI package ``kernels`` that ``transformers`` (5.25 and
later) requires and imports: that package is imported first, from the installed packages.
"""
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_saved = sys.path[:]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
try:
    import kernels  # noqa: F401  (the PyPI package, where installed)
except ImportError:
    pass
finally:
    sys.path[:] = _saved

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one autotuning configuration per kernel: the odd test shapes compile once, untimed
    os.environ.setdefault("MUPPET_FX_AUTOTUNE", "0")  # (benchmarks/gpu_correctness.py tunes them all)

import pytest  # noqa: E402

# the Triton kernels run on CPU tensors only in the interpreter
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
