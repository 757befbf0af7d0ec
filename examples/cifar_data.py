"""CIFAR-10 loading (our npz copy or torchvision's ``cifar-10-batches-py``) and batched
augmentation on tensors (random 4-pixel-padded crop, horizontal flip)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_cifar10", "augment", "normalise", "find_data_dir", "MEAN", "STD"]

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
HOW_TO_GET = ("get CIFAR-10 as a folder with train.npz/test.npz (keys images, labels) or torchvision's "
              "cifar-10-batches-py (https://www.cs.toronto.edu/~kriz/cifar.html), and pass --data-dir")


def find_data_dir(candidates) -> Path | None:
    """The first folder holding CIFAR-10 in a layout ``load_cifar10`` reads."""
    for c in candidates:
        if c is None:
            continue
        p = Path(c)
        if any((p / f).exists() for f in ("train.npz", "cifar-10-batches-py/data_batch_1", "data_batch_1")):
            return p
    return None


def _from_batches(folder: Path):
    def read(names):
        xs, ys = [], []
        for n in names:
            with open(folder / n, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"])


def _from_npz(folder: Path):
    def read(name):
        with np.load(folder / name) as d:
            return torch.from_numpy(d["images"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["labels"])
    return read("train.npz"), read("test.npz")


def load_cifar10(data_dir, download: bool = False):
    """Returns ``((x_train uint8 [N,3,32,32], y_train), (x_test, y_test))``."""
    folder = Path(data_dir)
    if (folder / "train.npz").exists():
        return _from_npz(folder)
    for f in (folder / "cifar-10-batches-py", folder):
        if (f / "data_batch_1").exists():
            return _from_batches(f)
    if download:
        try:
            import torchvision

            torchvision.datasets.CIFAR10(str(folder), download=True)
            return _from_batches(folder / "cifar-10-batches-py")
        except Exception as err:
            raise FileNotFoundError(f"no CIFAR-10 in {str(folder)!r} and the download failed "
                                    f"({type(err).__name__}); {HOW_TO_GET}") from err
    raise FileNotFoundError(f"no CIFAR-10 in {str(folder)!r}; {HOW_TO_GET}")


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float().div_(255) - MEAN) / STD


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the 4-pixel zero-padded image and random horizontal flip, per sample."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=generator)
    j = torch.randint(0, 9, (n,), generator=generator)
    rows = (i.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1)
    cols = (j.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
