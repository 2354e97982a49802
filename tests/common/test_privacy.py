from __future__ import annotations

import math

import pytest

from common.privacy import (
    DPEvent,
    calibrate_noise,
    epsilon_spent,
    epsilons,
    merge_events,
    poisson_sample_rate,
    sound_epsilon,
    steps_per_epoch,
)


def test_rdp_known_value() -> None:
    # Opacus RDP: sigma=1.5, q=0.04, 90 epochs (2250 steps) gives eps ~ 7.329 at delta=1e-5.
    eps = epsilon_spent(events=[DPEvent(1.5, 0.04, int(90 / 0.04))], delta=1e-5)
    assert eps == pytest.approx(7.329, abs=1e-3)


def test_prv_is_reported_beside_rdp_and_is_tighter_here() -> None:
    both = epsilons(events=[DPEvent(1.5, 0.04, 2250)], delta=1e-5)
    assert both.rdp == pytest.approx(7.329, abs=1e-3)
    assert both.prv is not None and 6.0 < both.prv < both.rdp  # PRV's upper bound, still below RDP
    assert both.sound == min(both.rdp, both.prv)


def test_epsilon_grows_with_steps() -> None:
    for accountant in ("rdp", "prv"):
        values = [
            epsilon_spent(events=[DPEvent(1.0, 0.05, steps)], delta=1e-5, accountant=accountant)
            for steps in (10, 50, 100, 400)
        ]
        assert values == sorted(values) and len(set(values)) == 4, accountant


def test_composition_of_rounds_equals_one_long_run() -> None:
    for accountant in ("rdp", "prv"):
        split = epsilon_spent(events=[DPEvent(1.1, 0.1, 20)] * 5, delta=1e-5, accountant=accountant)
        whole = epsilon_spent(events=[DPEvent(1.1, 0.1, 100)], delta=1e-5, accountant=accountant)
        assert split == pytest.approx(whole), accountant


def test_merging_keeps_distinct_mechanisms_apart() -> None:
    events = [DPEvent(1.0, 0.1, 5), DPEvent(2.0, 0.1, 5), DPEvent(1.0, 0.1, 7)]
    assert merge_events(events) == [(1.0, 0.1, 12), (2.0, 0.1, 5)]
    assert epsilon_spent(events=events, delta=1e-5) > epsilon_spent(events=events[:1], delta=1e-5)


def test_no_events_spend_nothing() -> None:
    assert epsilons(events=[], delta=1e-5).sound == 0.0


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibrated_noise_ends_at_or_below_target(target: float) -> None:
    q, steps = 0.1, 100
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    eps = sound_epsilon(events=[DPEvent(sigma, q, steps)], delta=1e-5)
    assert target * 0.95 <= eps <= target


def test_calibration_counts_what_was_spent_before() -> None:
    earlier = [DPEvent(1.0, 0.1, 30)]
    spent = sound_epsilon(events=earlier, delta=1e-5)
    assert 0 < spent < 8
    fresh = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, steps=60)
    after = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, steps=60, earlier=earlier)
    assert after > fresh  # less budget left: more noise
    total = sound_epsilon(events=[*earlier, DPEvent(after, 0.1, 60)], delta=1e-5)
    assert 7.9 <= total <= 8.0


def test_calibration_refuses_a_spent_budget() -> None:
    with pytest.raises(ValueError, match="already spend"):
        calibrate_noise(
            target_epsilon=1.0, delta=1e-5, sample_rate=0.5, steps=10, earlier=[DPEvent(0.5, 0.5, 100)]
        )


def test_sample_rate_is_what_opacus_poisson_loader_uses() -> None:
    assert steps_per_epoch(num_examples=100, batch_size=32) == 4
    assert poisson_sample_rate(num_examples=100, batch_size=32) == 0.25


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0, 3.5])
def test_sigma_search_is_sound_tight_and_needs_few_evaluations(power: float) -> None:
    from common.privacy import _smallest_sigma

    calls: list[float] = []

    def spend(sigma: float) -> float:  # a smooth, decreasing ε(σ), like the accountants'
        calls.append(sigma)
        return math.inf if sigma <= 0 else 5.0 / sigma**power

    sigma = _smallest_sigma(spend, 2.0, 0.0, 10.0, 0.02)
    assert spend(sigma) <= 2.0  # never over budget
    assert spend(sigma) > 2.0 - 0.02 or sigma * 0.995 <= (5.0 / 2.0) ** (1 / power)  # tight
    assert len(calls) <= 12
