"""``benchmarks/train_step.py``'s bookkeeping around the timed steps, without a GPU: the
first-step seconds (each configuration's first call only), and ``--cuda-graphs``, which must
time each eager step's first call before capturing it, add a replay per autocast and quantised
configuration, and report a failed capture instead of stopping the run.

Oracle: fake steps that record their calls, and a fake capture (one of them failing)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def train_step():
    saved = sys.path[:]  # the script puts benchmarks/ first, whose kernels.py would shadow PyPI's kernels
    try:
        spec = importlib.util.spec_from_file_location("train_step_under_test", BENCH / "train_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path[:] = saved


def test_first_step_seconds_keep_the_first_call(train_step, capsys):
    first = train_step._Reporting("resnet20")
    first["aten 8-bit"] = 1.5
    first["aten 8-bit"] = 0.1  # a later warm-up of the same configuration
    assert first == {"aten 8-bit": 1.5}
    assert capsys.readouterr().err.count("first step of aten 8-bit: 1.50 s") == 1


def test_interleaved_reports_each_warm_up(train_step):
    calls = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    first = {}
    med = train_step.interleaved(cases, 2, warmup=2, first=first)
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b"]
    assert set(first) == set(med) == {"a", "b"} and all(v >= 0 for v in first.values())


def test_cuda_graphs_time_the_eager_step_then_capture(train_step, monkeypatch, capsys):
    calls = []
    cases = {"fp32 eager": lambda: calls.append("fp32"), "autocast bf16": lambda: calls.append("amp"),
             "triton 8-bit": lambda: calls.append("t8")}

    def fake_capture(run):
        if run is cases["autocast bf16"]:
            raise RuntimeError("operation not permitted when stream is capturing")
        run()
        return lambda: calls.append("replay")

    monkeypatch.setattr(train_step, "cuda_graphed", fake_capture)
    first = train_step._Reporting("resnet18")
    train_step.add_cuda_graphs(cases, first, lambda: None)
    assert list(cases) == ["fp32 eager", "autocast bf16", "triton 8-bit", "triton 8-bit, CUDA graph"]
    assert calls == ["amp", "t8", "t8"]  # each eager first call, then the capture's own call
    assert set(first) == {"autocast bf16", "triton 8-bit", "triton 8-bit, CUDA graph"}
    assert "autocast bf16, CUDA graph: failed: RuntimeError: operation not permitted" in capsys.readouterr().err
    cases["triton 8-bit, CUDA graph"]()
    assert calls[-1] == "replay"


def test_a_failing_configuration_is_dropped_not_fatal(train_step, capsys):
    """``drop_failing``: each listed configuration's first step is timed; one that raises (a
    compiler's limit) leaves the table with its reason on stderr, the others stay; memory
    figures that raise come back as ``None``."""
    calls = []

    def broken():
        raise RuntimeError("skipping cudagraphs due to mutated inputs")
    cases = {"fp32 eager": lambda: calls.append("fp32"), "torch.compile, triton 8-bit": lambda: calls.append("c"),
             "torch.compile reduce-overhead, triton 8-bit": broken}
    first = train_step._Reporting("resnet18")
    train_step.drop_failing(cases, [k for k in cases if k.startswith("torch.compile")], first, lambda: None)
    assert list(cases) == ["fp32 eager", "torch.compile, triton 8-bit"] and calls == ["c"]
    assert set(first) == {"torch.compile, triton 8-bit"}
    err = capsys.readouterr().err
    assert "torch.compile reduce-overhead, triton 8-bit: failed: RuntimeError: skipping cudagraphs" in err
    assert train_step._or_none(broken, "x") is None and train_step._or_none(lambda: 2.5, "y") == 2.5
    assert "x: memory not measured: RuntimeError" in capsys.readouterr().err
