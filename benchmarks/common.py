"""Helpers shared by the benchmark scripts: CIFAR-style models, an interleaved timer and a
CUDA-graph timer of device time."""
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


def capture(fn, calls: int = 1, warmup: int = 1, cuda=None):
    """``(graph, result)``: ``calls`` calls of ``fn`` captured in one CUDA graph, after
    ``warmup`` calls on a side stream (kernels built and tuned, workspaces allocated, off the
    graph); ``result`` is what the last captured call returned, rewritten by each replay.
    ``cuda``: ``torch.cuda``."""
    if cuda is None:
        import torch

        cuda = torch.cuda
    side = cuda.Stream()
    side.wait_stream(cuda.current_stream())
    with cuda.stream(side):
        for _ in range(warmup):
            fn()
    cuda.current_stream().wait_stream(side)
    graph = cuda.CUDAGraph()
    result = None
    with cuda.graph(graph):
        for _ in range(calls):
            result = fn()
    return graph, result


def device_ms(cases: dict, reps: int, calls: int = 20, cuda=None) -> dict:
    """Milliseconds of GPU time per call: ``calls`` calls captured in one CUDA graph, replayed
    ``reps`` times between CUDA events, median over the replays, cases interleaved. The host's
    launch work does not enter (a single timed call of a 0.1 ms kernel is mostly that), so
    kernels compare by what the GPU does, as they run inside a captured training step. Each
    case runs twice on a side stream first; a case whose capture fails is reported on stderr
    and gets NaN. ``cuda``: ``torch.cuda``."""
    if cuda is None:
        import torch

        cuda = torch.cuda
    graphs = {}
    for key, fn in cases.items():
        try:
            graphs[key] = capture(fn, calls, warmup=2, cuda=cuda)[0]
        except Exception as e:  # noqa: BLE001 (reported: why the capture failed is the finding)
            print(f"{key}: no CUDA graph, no device time: {type(e).__name__}: {str(e)[:200]}",
                  file=sys.stderr, flush=True)
    times = {key: [] for key in graphs}
    for _ in range(reps):
        for key, graph in graphs.items():
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end) / calls)
    return {key: statistics.median(times[key]) if key in times else float("nan") for key in cases}


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
