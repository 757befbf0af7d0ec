"""examples/train_resnet.py data-parallel: under torchrun with two gloo ranks, and a rank that dies."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from .helpers import write_cifar_npz

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_resnet.py"
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture
def data_dir(tmp_path):
    return write_cifar_npz(tmp_path / "npz", 256, 100)


def _args(data_dir, out, epochs):
    return [str(SCRIPT), "--data-dir", str(data_dir), "--out", str(out), "--subset", "0",
            "--test-subset", "0", "--epochs", str(epochs), "--fp32-epochs", "1", "--batch-size", "64",
            "--threads", "1", "--no-progress", "--model", "resnet20"]


def _torchrun(args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_trains_writes_once_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    first = _torchrun(_args(data_dir, out, 2) + ["--comm", "quantised"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("epoch   0") == 1  # rank 0 alone prints
    assert "x fp32 bytes" in first.stdout
    for name in ("metrics.csv", "report.md", "policy-muppet.json", "policy-muppet.png", "checkpoint-muppet.pt"):
        assert (out / name).exists(), name
    second = _torchrun(_args(data_dir, out, 3) + ["--comm", "quantised", "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "epoch   2" in second.stdout and "epoch   0" not in second.stdout
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert rows[-1]["level"] == "fp32"


def test_dead_rank_stops_the_others_with_a_clear_error(data_dir, tmp_path):
    port = _free_port()
    procs = []
    for rank in (0, 1):  # what torchrun sets, without its agent, so rank 0 meets the failure itself
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *_args(data_dir, tmp_path / "run", 50),
                                       "--dist-timeout", "30"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        for line in procs[0].stdout:  # training is under way on both ranks
            if "epoch   0" in line:
                break
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode not in (0, None)
    assert "[rank 0] stopped: a collective with the other ranks failed" in err, err[-3000:]
    assert "--resume" in err
    assert waited < 60, waited
