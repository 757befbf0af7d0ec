"""``benchmarks/train_step.py``'s bookkeeping around the timed steps (and ``common.device_ms``, the
CUDA-graph timer of the kernel tables), without a GPU: the
first-step seconds (each configuration's first call only), and ``--cuda-graphs``, which must
time each eager step's first call before capturing it, add a replay per autocast and quantised
configuration, and report a failed capture instead of stopping the run.

Oracle: fake steps that record their calls, and a fake capture (one of them failing)."""
from pathlib import Path

import pytest
import torch

from .helpers import load_script

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def train_step():
    return load_script(BENCH / "train_step.py", "train_step_under_test")


@pytest.fixture(scope="module")
def common():
    return load_script(BENCH / "common.py", "common_under_test")


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


class _FakeCuda:
    """Stands in for ``torch.cuda`` in ``device_ms``: a graph records the calls made while it
    captures and replays them; events read a clock that each replayed call advances by 2 ms."""

    def __init__(self, fail_on=None):
        self.clock, self.capturing, self.fail_on = 0.0, None, fail_on

    def Stream(self):
        return self

    def current_stream(self):
        return self

    def wait_stream(self, other):
        pass

    def stream(self, s):
        import contextlib
        return contextlib.nullcontext()

    def CUDAGraph(self):
        return _FakeGraph(self)

    def graph(self, g):
        import contextlib

        @contextlib.contextmanager
        def capture():
            self.capturing = g
            try:
                yield
            finally:
                self.capturing = None
        return capture()

    def Event(self, enable_timing):
        return _FakeEvent(self)


class _FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.calls = cuda, []

    def replay(self):
        for fn in self.calls:
            fn(replay=True)


class _FakeEvent:
    def __init__(self, cuda):
        self.cuda = cuda

    def record(self):
        self.t = self.cuda.clock

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.t - self.t


def test_device_time_divides_a_replay_by_its_captured_calls(common):
    """``device_ms``: two warm-up calls, then ``calls`` captured calls; the replay's time over
    ``calls`` is the per-call figure; a case whose capture raises is NaN, the others stay."""
    import math

    device_ms = common.device_ms
    cuda = _FakeCuda()
    counts = {"fast": 0, "slow": 0}

    def case(name, ms, fail=False):
        def fn(replay=False):
            if replay:
                cuda.clock += ms
                return
            counts[name] = counts.get(name, 0) + 1
            if cuda.capturing is not None:
                if fail:
                    raise RuntimeError("operation not permitted when stream is capturing")
                cuda.capturing.calls.append(fn)
        return fn
    out = device_ms({"fast": case("fast", 2.0), "slow": case("slow", 5.0), "bad": case("bad", 1.0, True)},
                    reps=3, calls=4, cuda=cuda)
    assert out["fast"] == 2.0 and out["slow"] == 5.0 and math.isnan(out["bad"])
    assert counts == {"fast": 6, "slow": 6, "bad": 3}  # 2 warm-ups + 4 captured; the bad one failed at its first capture


def test_master_copy_case_takes_the_device_checked_path(train_step):
    """``--master``: the 8-bit step through ``MasterCopyOptimizer`` and a fused SGD trains the
    shared weights, and from its second step on leaves the NaN check on the device (the path a
    CUDA graph can capture)."""
    import torch

    cases = train_step.make_cases("resnet20", 2, "cpu", levels=(8,), master=True)
    run = cases["aten 8-bit, master copy"]
    opt = next(c.cell_contents for c in run.__closure__ if type(c.cell_contents).__name__ == "MasterCopyOptimizer")
    before = [p.detach().clone() for p in cases.parameters]
    run()
    assert opt._skipped_on_device is None  # the first step: checked on the host
    run()
    assert opt._skipped_on_device is not None and opt.skipped_steps == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, cases.parameters))


def test_host_profile_names_the_step_functions(train_step):
    """``--host-profile``: the profile of the step's calls (after one untimed call) lists the
    functions the step spent its host time in."""
    calls = []

    def busy_step():
        calls.append(sum(i * i for i in range(2000)))
    text = train_step.host_profile(busy_step, lambda: None, steps=3)
    rows = [line.split() for line in text.splitlines() if "busy_step" in line]
    assert len(calls) == 4 and rows and rows[0][0] == "3"  # profiled: the three calls after the first


def test_capture_warms_up_then_records_the_calls(common):
    """``common.capture``: the warm-up calls run outside the graph, then ``calls`` calls are
    captured; the result is what the last captured call returned."""
    capture = common.capture
    cuda = _FakeCuda()
    seen = []

    def fn(replay=False):
        seen.append(cuda.capturing is not None)
        if cuda.capturing is not None:
            cuda.capturing.calls.append(fn)
        return len(seen)
    graph, result = capture(fn, calls=3, warmup=2, cuda=cuda)
    assert seen == [False, False, True, True, True] and result == 5 and len(graph.calls) == 3


def test_device_profile_counts_the_steps_kernels(train_step):
    """``--device-profile`` (here on CPU: CPU time): the table lists the step's ops with their
    call counts over the profiled steps, after one untimed call."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    calls = []

    def step():
        calls.append(torch.mm(a, b))
    text = train_step.device_profile(step, lambda: None, cuda=False, steps=3)
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == ["aten::mm"]]
    assert len(calls) == 4 and rows and rows[0][-1] == "3"


def test_eager_levels_name_the_real_routes_eager_steps(train_step):
    """``--host-profile`` and ``--device-profile`` profile these: not the emulation, the compiled
    model, a CUDA-graph replay or the master-copy step."""
    names = ["fp32 eager", "autocast bf16", "emulate 8-bit", "triton 8-bit", "torch.compile, triton 8-bit",
             "triton 8-bit, master copy", "triton 8-bit, CUDA graph", "triton 16-bit", "aten 12-bit"]
    assert train_step.eager_levels(dict.fromkeys(names)) == {8: "triton 8-bit", 16: "triton 16-bit",
                                                              12: "aten 12-bit"}
