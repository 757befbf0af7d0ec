"""Helpers shared by the benchmark scripts: CIFAR-style models and an interleaved timer."""
import statistics
import time

import torch.nn as nn
import torchvision.models as tvm


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 with the CIFAR stem: 3x3 stride-1 first convolution, no max-pool."""
    m = tvm.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def interleaved(cases: dict, reps: int, warmup: int = 1, sync=lambda: None) -> dict:
    """Median seconds per case, repetitions interleaved across cases."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
