"""Precision-switching policies (SPEC section 3).

A policy is told, once per epoch, the last minibatch gradients of the quantised layers'
weights and answers whether to climb: ``update(epoch, grads)`` returns ``False`` (stay),
``True`` (next level of the ladder) or a level (jump there; only ``ScheduledPolicy`` does).
Per-iteration policies (``CyclicPolicy``) also set the word lengths through ``on_iteration``.
Every policy keeps a ``history`` of records and round-trips through ``state_dict``.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from muppet_fx.distributed import from_rank0

__all__ = ["Policy", "GradientDiversityPolicy", "FixedPolicy", "ScheduledPolicy", "CyclicPolicy",
           "cpt_bits"]


class Policy:
    """Base class: stays at the first level; subclasses override ``update``."""

    feeds = "weights"  # which gradients the manager passes: quantised layers' "weights" or "all"

    def __init__(self):
        self.history: list[dict] = []

    def initial_level(self, ladder: tuple):
        return ladder[0]

    def update(self, epoch: int, grads: Mapping[str, torch.Tensor]):
        self.history.append(_record(epoch))
        return False

    def on_iteration(self, iteration: int, state) -> None:
        """Called after every optimiser step with the model's precision state."""

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        _check_type(self, state)
        self.history = [dict(r) for r in state["history"]]


def _record(epoch, diversity=None, p=None, threshold=None, violations=None, switched=False):
    return {"epoch": epoch, "diversity": diversity, "p": p, "threshold": threshold,
            "violations": violations, "switched": switched}


def _check_type(policy, state):
    if not isinstance(state, dict) or state.get("type") != type(policy).__name__:
        found = state.get("type") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"policy state is for {found!r}, not {type(policy).__name__!r}")


def _sq(t: torch.Tensor) -> float:
    t = t.detach().double()
    return float((t * t).sum())


class GradientDiversityPolicy(Policy):
    """MuPPET's inter-epoch gradient-diversity policy (paper Eq. 6 and 7).

    Args:
        alpha, beta, lam: threshold ``T(j) = alpha + beta * exp(-lam * j)``.
        resolution: ``r``; diversities are taken over ``r + 1`` epochs (paper) or blocks of
            ``r`` epochs (released code).
        gamma: violations tolerated; the paper switches when they exceed ``gamma``, the released
            code when they reach it.
        variant: ``"paper"`` (SPEC section 3 steps) or ``"released"`` (ICIdsl/muppet
            ``policy.py``: block sums, every parameter fed, running max including the current
            diversity).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.5, lam: float = 0.1,
                 resolution: int = 3, gamma: int = 2, variant: str = "paper"):
        super().__init__()
        if variant not in ("paper", "released"):
            raise ValueError(f"variant={variant!r} is not supported; valid choices: ('paper', 'released')")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution={resolution!r} must be an int >= 1")
        if not isinstance(gamma, int) or gamma < 0:
            raise ValueError(f"gamma={gamma!r} must be an int >= 0")
        self.alpha, self.beta, self.lam = float(alpha), float(beta), float(lam)
        self.resolution, self.gamma, self.variant = resolution, gamma, variant
        self.feeds = "all" if variant == "released" else "weights"
        self._reset()

    def _reset(self):
        self.window: list[dict[str, torch.Tensor]] = []  # paper: last r + 1 gradients per layer
        self.sums: dict[str, torch.Tensor] = {}  # released: block sums of g and of ||g||^2
        self.sq_sums: dict[str, float] = {}
        self.block = 0
        self.S: list[float] = []
        self.violations = 0

    def threshold(self, epoch: int) -> float:
        return self.alpha + self.beta * math.exp(-self.lam * epoch)

    def _diversity_paper(self, grads):
        self.window.append({k: g.detach().clone() for k, g in grads.items()})
        del self.window[: -(self.resolution + 1)]
        if len(self.window) < self.resolution + 1:
            return None
        ratios = []
        for name in self.window[-1]:
            total = sum(w[name] for w in self.window)
            denom = _sq(total)
            if denom > 0:
                ratios.append(sum(_sq(w[name]) for w in self.window) / denom)
        return sum(ratios) / len(ratios) if ratios else None

    def _diversity_released(self, grads):
        for name, g in grads.items():
            g = g.detach()
            self.sums[name] = g.clone() if name not in self.sums else self.sums[name] + g
            self.sq_sums[name] = self.sq_sums.get(name, 0.0) + _sq(g)
        self.block += 1
        if self.block < self.resolution:
            return None
        ratios = [self.sq_sums[n] / _sq(s) for n, s in self.sums.items() if _sq(s) > 0]
        self.sums, self.sq_sums, self.block = {}, {}, 0
        return sum(ratios) / len(ratios) if ratios else None

    def update(self, epoch: int, grads: Mapping[str, torch.Tensor]) -> bool:
        if not grads:
            raise ValueError("GradientDiversityPolicy.update got no gradients; run at least one "
                             "optimiser step per epoch before end_epoch(), and no training-mode "
                             "forward between the epoch's last step and end_epoch() (it starts a "
                             "new step, which releases the last one's gradients)")
        released = self.variant == "released"
        delta = self._diversity_released(grads) if released else self._diversity_paper(grads)
        if delta is None:
            self.history.append(_record(epoch, violations=self.violations))
            return False
        T, p = self.threshold(epoch), None
        if released:
            running_max = max(self.S + [delta])
            if delta < running_max:
                p = running_max / delta
            self.S = [running_max]
        else:
            if self.S:
                p = max(self.S) / delta
            self.S.append(delta)
        if p is not None and p > T:
            self.violations += 1
        switched = self.violations >= self.gamma if released else self.violations > self.gamma
        self.history.append(_record(epoch, delta, p, T, self.violations, switched))
        if switched:
            self._reset()
        return switched

    def state_dict(self) -> dict:
        d = super().state_dict()
        d.update(config=dict(alpha=self.alpha, beta=self.beta, lam=self.lam, resolution=self.resolution,
                             gamma=self.gamma, variant=self.variant),
                 window=[{k: v.clone() for k, v in w.items()} for w in self.window],
                 sums={k: v.clone() for k, v in self.sums.items()}, sq_sums=dict(self.sq_sums),
                 block=self.block, S=list(self.S), violations=self.violations)
        return d

    def load_state_dict(self, state: dict) -> None:
        _check_type(self, state)
        mine = dict(alpha=self.alpha, beta=self.beta, lam=self.lam, resolution=self.resolution,
                    gamma=self.gamma, variant=self.variant)
        if state.get("config") != mine:
            raise ValueError(f"policy configuration {state.get('config')} differs from this one {mine}")
        super().load_state_dict(state)
        self.window = [{k: v.clone() for k, v in w.items()} for w in state["window"]]
        self.sums = {k: v.clone() for k, v in state["sums"].items()}
        self.sq_sums, self.block = dict(state["sq_sums"]), state["block"]
        self.S, self.violations = list(state["S"]), state["violations"]


class FixedPolicy(Policy):
    """Stay at ``level`` for the whole run (8-bit only, INT16 only, FP32 baseline...)."""

    def __init__(self, level):
        super().__init__()
        self.level = level

    def initial_level(self, ladder: tuple):
        if self.level not in ladder:
            raise ValueError(f"FixedPolicy level {self.level!r} is not in the ladder {ladder}")
        return self.level


class ScheduledPolicy(Policy):
    """Switch at given epochs: ``{epoch: level}`` means ``level`` from ``epoch`` on."""

    def __init__(self, schedule: Mapping[int, object]):
        super().__init__()
        if not schedule or any(not isinstance(e, int) or e < 0 for e in schedule):
            raise ValueError(f"schedule {schedule!r} must map epochs (ints >= 0) to levels")
        self.schedule = dict(sorted(schedule.items()))

    def initial_level(self, ladder: tuple):
        bad = [lvl for lvl in self.schedule.values() if lvl not in ladder]
        if bad:
            raise ValueError(f"scheduled levels {bad} are not in the ladder {ladder}")
        return self.schedule.get(0, ladder[0])

    def update(self, epoch: int, grads):
        target = self.schedule.get(epoch + 1)
        self.history.append(_record(epoch, switched=target is not None))
        return target if target is not None else False


def cpt_bits(t: int, b_min: int, b_max: int, period: float) -> int:
    """CPT's cosine schedule: rises from ``b_min`` to ``b_max`` within each period of ``period``
    iterations, ``rint(b_min + (b_max - b_min) * (1 - cos(pi * (t mod P) / P)) / 2)``."""
    phase = (t % period) / period
    return int(round(b_min + (b_max - b_min) * (1 - math.cos(math.pi * phase)) / 2))


class CyclicPolicy(Policy):
    """Cyclic precision training (Fu et al. 2021): forward word length on a cosine cycle per
    iteration between ``b_min`` and ``b_max``, gradients at ``bwd_bits``, ``num_cycles`` cycles
    over ``total_iterations``. No level switches: word lengths change inside the level, so
    nothing is retraced.

    With ``b_min=None`` a precision range test picks it: for the first ``range_test_iterations``
    iterations the forward word length sweeps ``2 .. b_max`` in equal chunks, and ``b_min`` is
    the smallest word length whose mean training loss is at least ``range_test_threshold``
    (relative) below the first chunk's. Losses come from ``manager.observe_loss``.
    """

    def __init__(self, b_max: int = 8, total_iterations: int = 1, b_min: int | None = 3,
                 bwd_bits: int = 8, num_cycles: int = 32, range_test_iterations: int = 0,
                 range_test_threshold: float = 0.05):
        super().__init__()
        for name, v in (("b_max", b_max), ("bwd_bits", bwd_bits)):
            if not isinstance(v, int) or not 2 <= v <= 24:
                raise ValueError(f"{name}={v!r} must be an int in [2, 24]")
        if b_min is None and range_test_iterations < b_max - 1:
            raise ValueError("b_min=None needs range_test_iterations >= b_max - 1 (one iteration "
                             f"per tested word length), got {range_test_iterations}")
        if b_min is not None and not (isinstance(b_min, int) and 2 <= b_min <= b_max):
            raise ValueError(f"b_min={b_min!r} must be an int in [2, b_max={b_max}]")
        if total_iterations < 1 or num_cycles < 1:
            raise ValueError(f"total_iterations={total_iterations} and num_cycles={num_cycles} must be >= 1")
        self.b_min, self.b_max, self.bwd_bits = b_min, b_max, bwd_bits
        self.total_iterations, self.num_cycles = total_iterations, num_cycles
        self.range_test_iterations, self.range_test_threshold = range_test_iterations, range_test_threshold
        self.losses: dict[int, list[float]] = {}
        self.range_test_result: dict[int, float] | None = None
        self.iteration = 0

    @property
    def period(self) -> float:
        return self.total_iterations / self.num_cycles

    def _test_bits(self, t: int) -> int:
        span = self.b_max - 1  # word lengths 2 .. b_max
        return 2 + min(span - 1, t * span // self.range_test_iterations)

    def bits_at(self, t: int) -> int:
        if self.b_min is None:
            return self._test_bits(t)
        return cpt_bits(t, self.b_min, self.b_max, self.period)

    @property
    def wants_losses(self) -> bool:
        return self.b_min is None

    def observe_loss(self, loss: float) -> None:
        if self.b_min is None:
            self.losses.setdefault(self._test_bits(self.iteration), []).append(float(loss))

    def _finish_range_test(self) -> None:
        # rank 0's losses decide on every rank, so that data-parallel ranks pick one floor
        means = from_rank0({b: sum(v) / len(v) for b, v in sorted(self.losses.items()) if v})
        if not means:
            raise ValueError("the precision range test saw no losses; call manager.observe_loss(loss) "
                             "every iteration during the test")
        first = next(iter(means.values()))
        self.b_min = next((b for b, m in means.items() if first - m >= self.range_test_threshold * abs(first)),
                          self.b_max)
        self.history.append({"epoch": None, "range_test": means, "b_min": self.b_min})
        self.range_test_result = means

    def update(self, epoch: int, grads) -> bool:
        """Never switches; the epoch's record carries the cycle floor (``None`` while the range
        test runs) and, in the epoch the test ended, its mean loss per word length."""
        record = _record(epoch)
        record["b_min"] = self.b_min
        if self.range_test_result is not None:
            record["range_test"], self.range_test_result = self.range_test_result, None
        self.history.append(record)
        return False

    def on_iteration(self, iteration: int, state) -> None:
        self.iteration = iteration
        if self.b_min is None and iteration >= self.range_test_iterations:
            self._finish_range_test()
        if state.quantised:
            state.set_bits(self.bits_at(iteration), self.bwd_bits)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d.update(b_min=self.b_min, iteration=self.iteration, losses={k: list(v) for k, v in self.losses.items()})
        return d

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.b_min, self.iteration = state["b_min"], state["iteration"]
        self.losses = {int(k): list(v) for k, v in state["losses"].items()}
