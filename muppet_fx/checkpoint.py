"""Checkpoints that resume a run bit for bit: model, optimiser, manager and policy, LR rule
and the random-number state, validated in full before anything is restored."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]

FORMAT = "muppet_fx-checkpoint-1"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path, *, model, optimizer=None, manager=None, scheduler=None, extra=None) -> None:
    """Write everything needed to continue training to ``path`` (atomically: a crash while
    writing never leaves a half-written file under that name)."""
    state = {"format": FORMAT, "model": model.state_dict(),
             "optimizer": None if optimizer is None else optimizer.state_dict(),
             "manager": None if manager is None else manager.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng": _rng_state(), "extra": extra}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_model(model, saved: dict) -> None:
    mine = model.state_dict()
    missing = sorted(set(mine) - set(saved))
    unexpected = sorted(set(saved) - set(mine))
    shapes = sorted(k for k in set(mine) & set(saved)
                    if not isinstance(saved[k], torch.Tensor) or saved[k].shape != mine[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint does not match this model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatch {shapes[:5]}")


def load_checkpoint(path, *, model, optimizer=None, manager=None, scheduler=None,
                    restore_rng: bool = True):
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``extra``.

    Raises ``ValueError`` for an unreadable, foreign or mismatched file, before any object is
    modified.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, corrupt or not a torch file
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a muppet_fx checkpoint (format {FORMAT!r})")
    _check_model(model, state["model"])
    for name, obj in (("optimizer", optimizer), ("manager", manager), ("scheduler", scheduler)):
        if obj is not None and state[name] is None:
            raise ValueError(f"checkpoint {str(path)!r} holds no {name} state")
    if manager is not None:
        saved = state["manager"]
        if list(saved["ladder"]) != list(manager.ladder):
            raise ValueError(f"checkpoint ladder {saved['ladder']} differs from this model's {list(manager.ladder)}")
        if saved["policy"].get("type") != type(manager.policy).__name__:
            raise ValueError(f"checkpoint policy {saved['policy'].get('type')!r} differs from "
                             f"{type(manager.policy).__name__!r}")
    if optimizer is not None:
        groups = state["optimizer"]["optimizer"]["param_groups"]
        sizes = [len(g["params"]) for g in groups]
        mine = [len(g["params"]) for g in optimizer.param_groups]
        if sizes != mine:
            raise ValueError(f"checkpoint optimiser has parameter groups of sizes {sizes}, this one {mine}")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if manager is not None:
        manager.load_state_dict(state["manager"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["extra"]
