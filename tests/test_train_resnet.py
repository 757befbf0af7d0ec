"""The example training script's pieces: argument validation, both data layouts, one epoch end
to end with every output file, and resuming from the written checkpoint."""
import csv
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import cifar_data  # noqa: E402
import train_resnet  # noqa: E402
import muppet_fx  # noqa: E402
import muppet_fx.policies  # noqa: E402
from cifar_models import build_model  # noqa: E402

from .helpers import write_cifar_npz  # noqa: E402


@pytest.fixture
def npz_dir(tmp_path):
    return write_cifar_npz(tmp_path / "npz", 300, 120)


def test_both_data_layouts(npz_dir, tmp_path):
    (x, y), (xt, yt) = cifar_data.load_cifar10(npz_dir)
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.uint8 and xt.shape == (120, 3, 32, 32)
    with np.load(npz_dir / "train.npz") as d:
        assert torch.equal(x[5].permute(1, 2, 0), torch.from_numpy(d["images"][5]))
    batches = tmp_path / "raw" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    flat = x.reshape(300, -1).numpy()
    for i in range(1, 6):
        with open(batches / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": flat[(i - 1) * 60: i * 60], "labels": y[(i - 1) * 60: i * 60].tolist()}, f)
    with open(batches / "test_batch", "wb") as f:
        pickle.dump({"data": xt.reshape(120, -1).numpy(), "labels": yt.tolist()}, f)
    (x2, y2), (xt2, yt2) = cifar_data.load_cifar10(tmp_path / "raw")
    assert torch.equal(x2, x) and torch.equal(y2, y) and torch.equal(xt2, xt)
    assert cifar_data.find_data_dir([tmp_path / "nothing", tmp_path / "raw"]) == tmp_path / "raw"
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        cifar_data.load_cifar10(tmp_path / "nothing")


def test_augment_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = cifar_data.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    vals = set(out.flatten().tolist()) - {0.0}
    assert vals <= set(x.flatten().tolist())


def test_models_build_and_run():
    for name in ("resnet20", "resnet18", "alexnet", "googlenet", "mobilenet_v2"):
        m = build_model(name).eval()
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in build_model("resnet20").parameters()) == pytest.approx(0.27e6, rel=0.02)


def test_timm_models_by_name():
    pytest.importorskip("timm")
    m = build_model("timm:resnet18").eval()
    assert type(m).__module__.startswith("timm.") and m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'.*timm.list_models"):
        build_model("timm:resnet_nope")
    with pytest.raises(ValueError, match="timm:<name>"):
        build_model("no_such_net")


def _args(npz_dir, out, *extra):
    return ["--data-dir", str(npz_dir), "--out", str(out), "--no-progress", "--subset", "256",
            "--test-subset", "100", "--batch-size", "64", *extra]


def test_argument_validation(npz_dir, tmp_path):
    with pytest.raises(SystemExit):
        train_resnet.parse_args(_args(npz_dir, tmp_path, "--model", "resnet21"))
    with pytest.raises(SystemExit):
        train_resnet.parse_args(_args(npz_dir, tmp_path, "--mode", "int4"))
    with pytest.raises(SystemExit):
        train_resnet.parse_args(_args(tmp_path / "empty", tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        train_resnet.parse_args(_args(npz_dir, blocker / "sub"))
    for bad in ("1", "9", "three"):
        with pytest.raises(SystemExit):
            train_resnet.parse_args(_args(npz_dir, tmp_path, "--cpt-min-bits", bad))
    args = train_resnet.parse_args(_args(npz_dir, tmp_path, "--compare", "fp32,muppet"))
    assert args.modes == ["fp32", "muppet"] and args.device in ("cpu", "cuda")
    assert args.cpt_min_bits == "auto" and train_resnet.parse_args(
        _args(npz_dir, tmp_path, "--cpt-min-bits", "4")).cpt_min_bits == 4


def test_missing_data_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_resnet, "DATA_CANDIDATES", [tmp_path / "none"])
    with pytest.raises(SystemExit):
        train_resnet.parse_args(["--out", str(tmp_path)])
    assert "--data-dir" in capsys.readouterr().err


def test_one_epoch_end_to_end_and_resume(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    runs = train_resnet.main(_args(npz_dir, out, "--mode", "muppet", "--epochs", "1", "--fp32-epochs", "0"))
    for name in ("metrics.csv", "policy-muppet.json", "policy-muppet.png", "report.md", "checkpoint-muppet.pt"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and rows[0]["level"] == "8"
    assert "final top-1" in (out / "report.md").read_text()
    runs2 = train_resnet.main(_args(npz_dir, out, "--mode", "muppet", "--epochs", "2", "--fp32-epochs", "0",
                                    "--resume"))
    assert "resumed" in capsys.readouterr().out
    assert [m["epoch"] for m in runs2[0].metrics] == [0, 1]
    assert runs2[0].metrics[0] == runs[0].metrics[0]
    with pytest.raises(SystemExit):  # a checkpoint written for another model
        train_resnet.parse_args(_args(npz_dir, out, "--model", "resnet18", "--resume"))


def test_cpt_range_test_picks_the_cycle_floor(npz_dir, tmp_path):
    """``cpt`` with ``--cpt-min-bits auto``: the first iterations sweep 2..8 bits forward, one
    word length each (4 steps per epoch here, so the test ends in the second epoch), the losses
    they saw pick ``b_min``, and from then on the forward word length follows the cycle from
    ``b_min`` to 8. Layer outputs stay FP32, as in the CPT paper."""
    runs = train_resnet.main(_args(npz_dir, tmp_path, "--mode", "cpt", "--epochs", "3", "--fp32-epochs", "0"))
    manager = runs[0].manager
    test = next(r for r in manager.history if "range_test" in r)  # what the policy log shows
    assert test["epoch"] == 1 and [r["b_min"] for r in manager.history] == [None, test["b_min"], test["b_min"]]
    assert sorted(test["range_test"]) == list(range(2, 9))
    b_min = test["b_min"]
    assert 2 <= b_min <= 8 and manager.policy.b_min == b_min
    means = test["range_test"]
    first = means[2]
    assert b_min == next((b for b in range(2, 9) if first - means[b] >= 0.05 * abs(first)), 8)
    state = manager.state
    assert state.fwd_bits == muppet_fx.policies.cpt_bits(manager.iteration, b_min, 8, manager.policy.period)
    assert state.bwd_bits == 8 and not state.config.quantise_outputs


def test_compared_modes_take_turns_each_on_its_own_random_stream(npz_dir, tmp_path, capsys):
    """``--compare`` trains the modes epoch by epoch in turn, so that a machine whose speed drifts
    over the run slows every mode alike. Each mode still draws its stochastic rounding from its
    own stream: two quantised modes side by side train exactly as each does alone."""
    steps = ("--epochs", "2", "--fp32-epochs", "0")
    both = train_resnet.main(_args(npz_dir, tmp_path / "both", "--compare", "muppet,int8", *steps))
    order = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "  level " in line]
    assert order == ["[muppet]", "[int8]", "[muppet]", "[int8]"]

    def results(run):
        return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in run.metrics]

    for run in both:
        alone = train_resnet.main(_args(npz_dir, tmp_path / run.mode, "--mode", run.mode, *steps))[0]
        assert results(run) == results(alone), run.mode
        for a, b in zip(run.model.parameters(), alone.model.parameters()):
            assert torch.equal(a, b)
