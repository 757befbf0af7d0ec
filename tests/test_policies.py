"""Policies against hand-computed sequences (SPEC section 3)."""
import math

import pytest
import torch

from muppet_fx.policies import (CyclicPolicy, FixedPolicy, GradientDiversityPolicy, ScheduledPolicy,
                                cpt_bits)


def _feed(policy, values):
    """One layer whose last-minibatch gradient in epoch j is the scalar values[j]."""
    return [policy.update(j, {"w": torch.tensor([v])}) for j, v in enumerate(values)]


def test_paper_variant_hand_computed():
    """Window r+1 = 4. Worked by hand:
    j=3: g = 1, -.9, 1, -.9: D = 3.62 / 0.2**2 = 90.5, first diversity, no p.
    j=4: -.9, 1, -.9, 1: D = 90.5, p = 1 <= T.
    j=5: 1, -.9, 1, 1: D = 3.81 / 2.1**2 = 0.86395, p = 104.75 > T(5) = 1.9098: 1 violation.
    j=6: -.9, 1, 1, 1: same D, p: 2 violations.
    j=7: 1, 1, 1, 1: D = 4 / 16 = 0.25, p = 362: 3 violations > gamma = 2: switch at epoch 7."""
    pol = GradientDiversityPolicy()
    out = _feed(pol, [1, -0.9, 1, -0.9, 1, 1, 1, 1, 1])
    assert out == [False] * 7 + [True, False]
    h = pol.history
    assert [r["diversity"] for r in h[:3]] == [None] * 3
    assert h[3]["diversity"] == pytest.approx(90.5) and h[3]["p"] is None
    assert h[4]["p"] == pytest.approx(1.0) and h[4]["violations"] == 0
    d5 = 3.81 / 2.1**2
    assert h[5]["diversity"] == pytest.approx(d5) and h[5]["p"] == pytest.approx(90.5 / d5)
    assert h[5]["threshold"] == pytest.approx(1 + 1.5 * math.exp(-0.5)) and h[5]["violations"] == 1
    assert h[6]["violations"] == 2 and not h[6]["switched"]
    assert h[7]["diversity"] == pytest.approx(0.25) and h[7]["p"] == pytest.approx(362.0)
    assert h[7]["violations"] == 3 and h[7]["switched"]
    assert h[8]["diversity"] is None and pol.violations == 0 and pol.S == []  # reset, new level


def test_released_variant_hand_computed():
    """Blocks of r = 3 epochs, diversity at j = 2, 5, 8:
    j=2: 1, -.9, 1: D = 2.81 / 1.1**2 = 2.3223 (the running max, no p);
    j=5: 1, 1, 1: D = 1/3, p = 6.967 > T(5): 1 violation;
    j=8: 1, 1, 1: D = 1/3, p = 6.967 > T(8): 2 violations >= gamma = 2: switch at epoch 8."""
    pol = GradientDiversityPolicy(variant="released")
    out = _feed(pol, [1, -0.9, 1, 1, 1, 1, 1, 1, 1])
    assert out == [False] * 8 + [True]
    h = pol.history
    assert h[2]["diversity"] == pytest.approx(2.81 / 1.21) and h[2]["p"] is None
    assert h[5]["p"] == pytest.approx((2.81 / 1.21) * 3) and h[5]["violations"] == 1
    assert h[8]["violations"] == 2 and h[8]["switched"]
    assert [r["diversity"] for r in h if r["diversity"] is not None][1:] == pytest.approx([1 / 3, 1 / 3])


def test_zero_summed_gradient_is_left_out():
    pol = GradientDiversityPolicy(resolution=1)
    out = _feed(pol, [1, -1, 1, -1])
    assert out == [False] * 4 and all(r["diversity"] is None for r in pol.history)


def test_multi_layer_mean_and_state_roundtrip():
    """Delta is the mean of the per-layer ratios; a policy restored from state_dict continues
    identically."""
    pol = GradientDiversityPolicy(resolution=1)
    pol.update(0, {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0])})
    pol.update(1, {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0])})
    assert pol.history[1]["diversity"] == pytest.approx((2 / 2 + 8 / 16) / 2)
    clone = GradientDiversityPolicy(resolution=1)
    clone.load_state_dict(pol.state_dict())
    g = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([-1.0])}
    assert pol.update(2, g) == clone.update(2, g) and pol.history == clone.history
    with pytest.raises(ValueError, match="differs"):
        GradientDiversityPolicy(resolution=2).load_state_dict(pol.state_dict())
    with pytest.raises(ValueError, match="FixedPolicy"):
        pol.load_state_dict(FixedPolicy(8).state_dict())


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="variant='paper2'"):
        GradientDiversityPolicy(variant="paper2")
    with pytest.raises(ValueError, match="resolution=0"):
        GradientDiversityPolicy(resolution=0)
    with pytest.raises(ValueError, match="no gradients"):
        GradientDiversityPolicy().update(0, {})
    with pytest.raises(ValueError, match="not in the ladder"):
        FixedPolicy(10).initial_level((8, 16, "fp32"))
    with pytest.raises(ValueError, match="b_min=9"):
        CyclicPolicy(b_max=8, b_min=9)


def test_fixed_and_scheduled():
    assert FixedPolicy(16).initial_level((8, 16, "fp32")) == 16
    assert _feed(FixedPolicy(8), [1, 2, 3]) == [False] * 3
    pol = ScheduledPolicy({0: 8, 3: 14, 5: "fp32"})
    assert pol.initial_level((8, 14, "fp32")) == 8
    assert _feed(pol, [0] * 6) == [False, False, 14, False, "fp32", False]


def test_cpt_schedule_values():
    """b_t = rint(3 + 5 (1 - cos(pi (t mod 10) / 10)) / 2), worked by hand: t=3: 3 + 5 * 0.2061 =
    4.03 -> 4; t=4: 4.73 -> 5; t=5: 5.5 -> 6 (half to even); t=8: 7.52 -> 8; t=10 restarts."""
    assert [cpt_bits(t, 3, 8, 10) for t in range(11)] == [3, 3, 3, 4, 5, 6, 6, 7, 8, 8, 3]
    # period 2.5: phases 0, .4, .8, .2, .6, 0 -> 3, 4.73, 7.52, 3.48, 6.27, 3
    assert [cpt_bits(t, 3, 8, 2.5) for t in range(6)] == [3, 5, 8, 3, 6, 3]


class _State:
    quantised = True

    def set_bits(self, f, b):
        self.bits = (f, b)


def test_precision_range_test_picks_b_min():
    """Losses flat at 2-3 bits and 10% lower from 4 bits on: b_min = 4."""
    pol = CyclicPolicy(b_max=8, b_min=None, total_iterations=100, num_cycles=2, range_test_iterations=14)
    st = _State()
    for t in range(20):
        pol.on_iteration(t, st)
        bits = st.bits[0]
        pol.observe_loss(2.0 if bits <= 3 else 1.8)
    assert pol.b_min == 4
    assert pol.history[-1]["b_min"] == 4 and st.bits[1] == 8


def test_precision_range_test_takes_rank0s_losses(monkeypatch):
    """Data-parallel ranks see different losses; the floor comes from rank 0's on every rank
    (``from_rank0`` stands in for the broadcast: this rank's losses say 4 bits, rank 0's 6)."""
    import muppet_fx.policies as policies

    sent = []

    def rank0(means):
        sent.append(means)
        return {b: (2.0 if b < 6 else 1.5) for b in means}
    monkeypatch.setattr(policies, "from_rank0", rank0)
    pol = CyclicPolicy(b_max=8, b_min=None, total_iterations=100, num_cycles=2, range_test_iterations=14)
    st = _State()
    for t in range(20):
        pol.on_iteration(t, st)
        pol.observe_loss(2.0 if st.bits[0] <= 3 else 1.8)
    assert sent and sorted(sent[0]) == list(range(2, 9)) and pol.b_min == 6
