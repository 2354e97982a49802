from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import DataError
from common.privacy import (
    AccountantStore,
    DPEvent,
    calibrate_noise,
    epsilon_spent,
    poisson_sample_rate,
    steps_per_epoch,
)


def test_rdp_known_value() -> None:
    # Opacus RDP: sigma=1.5, q=0.04, 90 epochs (2250 steps) gives eps ~ 7.329 at delta=1e-5.
    eps = epsilon_spent(events=[DPEvent(1.5, 0.04, int(90 / 0.04))], delta=1e-5)
    assert eps == pytest.approx(7.329, abs=1e-3)


def test_epsilon_grows_with_steps() -> None:
    values = [epsilon_spent(events=[DPEvent(1.0, 0.05, steps)], delta=1e-5) for steps in (10, 50, 100, 400)]
    assert values == sorted(values) and len(set(values)) == 4


def test_composition_of_rounds_equals_one_long_run() -> None:
    split = epsilon_spent(events=[DPEvent(1.1, 0.1, 20)] * 5, delta=1e-5)
    whole = epsilon_spent(events=[DPEvent(1.1, 0.1, 100)], delta=1e-5)
    assert split == pytest.approx(whole)


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibrated_noise_ends_at_or_below_target(target: float) -> None:
    q, steps = 0.1, 100
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    eps = epsilon_spent(events=[DPEvent(sigma, q, steps)], delta=1e-5)
    assert target * 0.95 <= eps <= target


def test_sample_rate_is_what_opacus_poisson_loader_uses() -> None:
    assert steps_per_epoch(num_examples=100, batch_size=32) == 4
    assert poisson_sample_rate(num_examples=100, batch_size=32) == 0.25


def test_store_records_each_round_once_and_persists(tmp_path: Path) -> None:
    store = AccountantStore.for_run(tmp_path, 42)
    assert store.load() == {}
    e1 = store.record(1, DPEvent(1.0, 0.1, 10), delta=1e-5)
    e1_again = store.record(1, DPEvent(1.0, 0.1, 10), delta=1e-5)  # a retried message
    e2 = AccountantStore.for_run(tmp_path, 42).record(2, DPEvent(1.0, 0.1, 10), delta=1e-5)
    assert e1 == e1_again < e2
    assert e2 == pytest.approx(epsilon_spent(events=[DPEvent(1.0, 0.1, 20)], delta=1e-5))
    saved = json.loads(store.path.read_text())
    assert saved["epsilon"] == pytest.approx(e2) and sorted(saved["events"]) == ["1", "2"]


def test_corrupt_store_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    store = AccountantStore.for_run(tmp_path, 1)
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    with pytest.raises(DataError, match="under-count"):
        store.load()
