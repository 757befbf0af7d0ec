"""Helpers shared by the benchmark scripts: CIFAR-style models and an interleaved timer."""
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch.nn as nn
import torchvision.models as tvm


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 with the CIFAR stem: 3x3 stride-1 first convolution, no max-pool."""
    m = tvm.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def interleaved(cases: dict, reps: int, warmup: int = 1, sync=lambda: None, first: dict | None = None) -> dict:
    """Median seconds per case, repetitions interleaved across cases. ``first``, when given,
    receives each case's warm-up seconds (kernels built, tuned and cached) as it completes."""
    for k, fn in cases.items():
        sync()
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync()
        if first is not None:
            first[k] = time.perf_counter() - t0
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def import_transformers():
    """``transformers``, imported after the PyPI package ``kernels`` that it requires (5.25 and
    later): this folder's ``kernels.py`` and the repository's ``kernels/`` would shadow it."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (here, here.parent)]
    try:
        if "kernels" not in sys.modules:
            try:
                importlib.import_module("kernels")
            except ImportError:
                pass
        return importlib.import_module("transformers")
    finally:
        sys.path[:] = saved
