from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from client.site import evaluate_round, plan_privacy, train_round
from client.training import train_dp
from common.config import PreprocessConfig, RunConfig, SiteConfig
from common.errors import PrivacyBudgetExceeded
from common.models import build_model
from common.privacy import AccountantStore, epsilon_spent, poisson_sample_rate


def _data(n: int = 50, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32) + labels[:, None, None, None]
    return images, labels


def test_train_dp_reports_exactly_what_opacus_accounted() -> None:
    images, labels = _data()
    model = build_model("fedrad-cnn", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    outcome = train_dp(
        model, images=images, labels=labels, epochs=2, batch_size=16, learning_rate=0.01,
        max_grad_norm=1.0, noise_multiplier=1.0, device=torch.device("cpu"), secure_mode=False, seed=0,
    )
    assert outcome.num_examples == 50  # examples, not batches
    assert outcome.event.sample_rate == pytest.approx(poisson_sample_rate(num_examples=50, batch_size=16))
    assert outcome.event.steps == 2 * 4
    assert outcome.event.noise_multiplier == 1.0
    assert math.isfinite(outcome.loss)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.fixture
def site_and_run(tiny_sites: Path, tmp_path: Path) -> tuple[SiteConfig, RunConfig]:
    site = SiteConfig(site="A", data_dir=tiny_sites / "A", work_dir=tmp_path / "work", max_epsilon=3.0, threads=1)
    run = RunConfig(num_server_rounds=3, local_epochs=1, batch_size=8, preprocess=PreprocessConfig(image_size=32))
    return site, run


def _weights() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(build_model("fedrad-cnn", seed=0).state_dict())


def test_planned_rounds_end_within_the_sites_budget(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    eps = [train_round(site=site, run=run, run_id=7, server_round=r, weights=_weights())[1]["epsilon"] for r in (1, 2, 3)]
    assert eps == sorted(eps)
    assert site.max_epsilon * 0.9 <= eps[-1] <= site.max_epsilon


def test_site_declines_rounds_beyond_its_budget(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    for r in (1, 2, 3):
        train_round(site=site, run=run, run_id=8, server_round=r, weights=_weights())
    with pytest.raises(PrivacyBudgetExceeded, match="declines round 4"):
        train_round(site=site, run=run, run_id=8, server_round=4, weights=_weights())
    events = AccountantStore.for_run(site.work_dir, 8).load()
    assert sorted(events) == [1, 2, 3]
    assert epsilon_spent(events=list(events.values()), delta=site.delta) <= site.max_epsilon


def test_noise_plan_depends_on_the_sites_budget(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    strict = plan_privacy(site=SiteConfig(**{**site.__dict__, "max_epsilon": 1.0}), run=run, num_train=30)
    loose = plan_privacy(site=site, run=run, num_train=30)
    assert strict.noise_multiplier > loose.noise_multiplier
    assert strict.planned_steps == run.num_server_rounds * strict.steps_per_round


def test_evaluation_sends_only_counts(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    metrics = evaluate_round(site=site, run=run, weights=_weights())
    assert set(metrics) == {"num-examples", "eval-loss", "auroc-confmat", "stat-scores"}
    assert sum(metrics["stat-scores"]) == metrics["num-examples"] > 0


def test_multiclass_site_trains_and_evaluates(tiny_sites: Path, tmp_path: Path) -> None:
    import csv
    import shutil

    site_dir = tmp_path / "A"
    shutil.copytree(tiny_sites / "A", site_dir)
    with (site_dir / "labels.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    names = ("none", "small", "large")
    rows = [rows[0]] + [[key, names[i % 3]] for i, (key, _) in enumerate(rows[1:])]
    with (site_dir / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    site = SiteConfig(site="A", data_dir=site_dir, work_dir=tmp_path / "work", max_epsilon=3.0, threads=1)
    run = RunConfig(num_server_rounds=1, local_epochs=1, batch_size=8, classes=names, preprocess=PreprocessConfig(image_size=32))
    weights = OrderedDict(build_model("fedrad-cnn", num_classes=3, seed=0).state_dict())
    assert weights["6.weight"].shape == (3, 16)
    state, metrics = train_round(site=site, run=run, run_id=1, server_round=1, weights=weights)
    assert metrics["num-examples"] > 0 and 0 < metrics["epsilon"] <= 3.0
    stats = evaluate_round(site=site, run=run, weights=state)
    from common.metrics import AUROC_THRESHOLDS, pooled_metrics

    assert len(stats["auroc-confmat"]) == AUROC_THRESHOLDS * 3 * 4 and len(stats["stat-scores"]) == 12
    pooled = pooled_metrics([stats], num_classes=3)
    assert pooled["examples"] == stats["num-examples"] and 0 <= pooled["accuracy"] <= 1
