"""The precision manager: one call per epoch climbs the ladder when the policy says so."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import torch

from muppet_fx.config import FP32
from muppet_fx.distributed import from_rank0, unwrap
from muppet_fx.policies import GradientDiversityPolicy, Policy

__all__ = ["PrecisionManager"]


class PrecisionManager:
    """Drives a prepared model along its ladder.

    Args:
        pm: the model returned by ``prepare``.
        policy: a :mod:`~muppet_fx.policies` policy (default: ``GradientDiversityPolicy()``).
        log_path: optional ``.csv`` or ``.json`` file rewritten with ``history`` every epoch.

    Under ``torch.distributed`` (pass the prepared model or its DDP wrapper), every rank runs
    the policy on the same averaged gradients and then adopts rank 0's decision and record, so
    no floating-point difference can split the ranks.

    Use: ``manager.end_epoch()`` after each epoch (with a :class:`MasterCopyOptimizer` the
    per-iteration hooks run by themselves). ``history`` holds one record per epoch: the policy's
    record (``epoch, diversity, p, threshold, violations, switched``) plus the ``level`` trained.
    """

    def __init__(self, pm, policy: Policy | None = None, *, log_path: str | Path | None = None):
        pm = unwrap(pm)
        if not hasattr(pm, "_muppet_state"):
            raise TypeError(f"PrecisionManager needs a model returned by muppet_fx.prepare, got {type(pm).__name__}")
        self.pm, self.state = pm, pm._muppet_state
        self.policy = policy if policy is not None else GradientDiversityPolicy()
        self.log_path = Path(log_path) if log_path is not None else None
        if self.log_path is not None and self.log_path.suffix not in (".csv", ".json"):
            raise ValueError(f"log_path {str(self.log_path)!r} must end in .csv or .json")
        self.callbacks: list[Callable] = []
        self.epoch = 0
        self.iteration = 0
        self.fp32_start: int | None = None
        self.history: list[dict] = []
        self.state.set_level(self.policy.initial_level(self.ladder))
        self.policy.on_iteration(0, self.state)

    @property
    def ladder(self) -> tuple:
        return self.state.config.ladder

    @property
    def level(self):
        return self.state.level

    def on_switch(self, fn: Callable) -> Callable:
        """Register ``fn(old_level, new_level, epoch)``; usable as a decorator."""
        self.callbacks.append(fn)
        return fn

    def gradients(self) -> dict[str, torch.Tensor]:
        """Last minibatch gradients the policy sees (references to ``.grad``, no copies)."""
        if self.policy.feeds == "all":
            return {n: p.grad for n, p in self.pm.named_parameters() if p.grad is not None}
        return {s.name: s.weight.grad for s in self.state.sites.values()
                if s.weight is not None and s.weight.grad is not None}

    def observe_loss(self, loss) -> None:
        """Report the training loss of the iteration in progress, before ``optimizer.step()``
        (CPT's precision range test files it under that iteration's word length). Converted to
        a float (a device sync) only while a policy wants losses."""
        if getattr(self.policy, "wants_losses", False):
            self.policy.observe_loss(float(loss))

    def after_step(self) -> None:
        self.iteration += 1
        # end_epoch feeds the policy these even where the loop clears .grad after each step
        # (optimizer.step(); optimizer.zero_grad()): held until the next training forward
        self.state.stepped_gradients = self.gradients() if self.level != FP32 else {}
        self.policy.on_iteration(self.iteration, self.state)

    def keep_gradients(self) -> None:
        """Called before the gradients are zeroed in place (``zero_grad(set_to_none=False)``):
        the last step's, still to be fed to the policy, are copied first."""
        grads = {id(p.grad) for p in self.pm.parameters() if p.grad is not None}
        self.state.stepped_gradients = {k: g.clone() if id(g) in grads else g
                                        for k, g in self.state.stepped_gradients.items()}

    def _policy_gradients(self) -> dict[str, torch.Tensor]:
        """The last step's gradients, or the current ones where no step was taken through
        :class:`MasterCopyOptimizer` (or gradients were computed since)."""
        current, stepped = self.gradients(), self.state.stepped_gradients
        return stepped if stepped and not any(k not in stepped for k in current) else current

    def end_epoch(self) -> bool:
        """Feed the policy, switch if it says so. Returns whether the level changed."""
        level = self.level
        if level == FP32:  # the top of the ladder: nothing left to decide
            decision, record = False, {"epoch": self.epoch, "switched": False}
        else:
            decision = self.policy.update(self.epoch, self._policy_gradients())
            record = dict(self.policy.history[-1])
        decision, record = from_rank0((decision, record))
        if self.policy.history and level != FP32:
            self.policy.history[-1] = dict(record)
        record["level"] = level
        new = None
        if decision is True:
            i = self.ladder.index(level)
            new = self.ladder[i + 1] if i + 1 < len(self.ladder) else None
        elif decision is not False and decision is not None:
            new = decision
        if new is not None and new != level:
            self.state.set_level(new)
            if new == FP32 and self.fp32_start is None:
                self.fp32_start = self.epoch + 1
            self.policy.on_iteration(self.iteration, self.state)
            for fn in self.callbacks:
                fn(level, new, self.epoch)
        record["switched"] = new is not None and new != level
        self.history.append(record)
        self.epoch += 1
        self._write_log()
        return record["switched"]

    def _write_log(self) -> None:
        if self.log_path is None:
            return
        if self.log_path.suffix == ".json":
            self.log_path.write_text(json.dumps(self.history, indent=1, default=str))
            return
        keys = sorted({k for r in self.history for k in r})
        with self.log_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "iteration": self.iteration, "level": self.level,
                "fp32_start": self.fp32_start, "history": [dict(r) for r in self.history],
                "ladder": list(self.ladder), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if list(self.ladder) != list(state.get("ladder", [])):
            raise ValueError(f"checkpoint ladder {state.get('ladder')} differs from this model's {list(self.ladder)}")
        self.policy.load_state_dict(state["policy"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.fp32_start, self.history = state["fp32_start"], [dict(r) for r in state["history"]]
        self.state.set_level(state["level"])
        self.policy.on_iteration(self.iteration, self.state)
