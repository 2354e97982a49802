from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app.site import evaluate_round, plan_privacy, train_round
from client.app.training import _mean_per_group, patient_groups, train_dp
from common.config import PreprocessConfig, RunConfig, SiteConfig
from common.errors import DataError, PrivacyBudgetExceeded
from common.ledger import Ledger
from common.models import build_model
from common.privacy import DPEvent, epsilons, poisson_sample_rate


def _data(n: int = 50, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32) + labels[:, None, None, None]
    return images, labels


def _train(model: torch.nn.Module, **kwargs: object) -> object:
    images, labels = _data()
    args: dict[str, object] = {
        "images": images, "labels": labels, "epochs": 2, "batch_size": 16, "learning_rate": 0.01,
        "max_grad_norm": 1.0, "noise_multiplier": 1.0, "device": torch.device("cpu"), "secure_mode": False, "seed": 0,
    }
    return train_dp(model, **{**args, **kwargs})  # type: ignore[arg-type]


def test_train_dp_reports_exactly_what_opacus_accounted() -> None:
    model = build_model("fedrad-cnn", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    outcome = _train(model)
    assert outcome.num_examples == 50  # examples, not batches
    assert outcome.event.sample_rate == pytest.approx(poisson_sample_rate(num_examples=50, batch_size=16))
    assert outcome.event.steps == 2 * 4
    assert outcome.event.noise_multiplier == 1.0
    assert math.isfinite(outcome.loss)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_patients_are_sampled_not_images() -> None:
    groups = np.repeat(np.arange(10), 5)  # 10 patients × 5 slices
    outcome = _train(build_model("fedrad-cnn", seed=0), groups=groups, batch_size=4)
    assert outcome.num_examples == 50
    assert outcome.event.sample_rate == pytest.approx(poisson_sample_rate(num_examples=10, batch_size=4)) == 1 / 3
    assert outcome.event.steps == 2 * 3


def test_per_patient_gradient_is_the_mean_of_its_images_gradients() -> None:
    from opacus import GradSampleModule

    images, labels = _data(n=7)
    segments = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    model = GradSampleModule(build_model("fedrad-cnn", seed=0))
    x, y = torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels.astype(np.float32))
    torch.nn.BCEWithLogitsLoss()(model(x).squeeze(1), y).backward()
    _mean_per_group(model, segments, 3)
    reference = build_model("fedrad-cnn", seed=0)
    for group in range(3):
        rows = (segments == group).nonzero().flatten()
        reference.zero_grad()
        loss = torch.nn.BCEWithLogitsLoss(reduction="sum")(reference(x[rows]).squeeze(1), y[rows]) / len(rows)
        loss.backward()
        for p, ref in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad_sample[group], ref.grad, rtol=1e-4, atol=1e-6)


def test_secure_mode_noise_is_not_reproducible_from_the_seed() -> None:
    def weights(secure: bool) -> torch.Tensor:
        model = build_model("fedrad-cnn", seed=0)
        _train(model, secure_mode=secure)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(False), weights(False))  # tests only: seeded from the run config
    assert not torch.equal(weights(True), weights(True))  # OS CSPRNG every round


def test_patient_groups_number_hashed_ids_from_zero() -> None:
    assert patient_groups(["b", "a", "b", "c"]).tolist() == [1, 0, 1, 2]


def _weights() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(build_model("fedrad-cnn", seed=0).state_dict())


def _round(site: SiteConfig, run: RunConfig, run_id: int, r: int) -> dict[str, float | int]:
    return train_round(site=site, run=run, run_id=run_id, server_round=r, weights=_weights())[1]


def test_planned_rounds_end_within_the_sites_budget(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    metrics = [_round(site, run, 7, r) for r in (1, 2, 3)]
    eps = [m["epsilon"] for m in metrics]
    assert eps == sorted(eps)
    assert site.max_epsilon * 0.9 <= eps[-1] <= site.max_epsilon
    last = metrics[-1]
    assert last["epsilon"] == min(last["epsilon-rdp"], last["epsilon-prv"])
    assert last["run-epsilon"] == pytest.approx(last["epsilon"])  # nothing else was trained on this data


def test_ledger_holds_one_signed_row_per_round(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    from common.ledger import load_public_key, verify

    site, run = site_and_run
    _, metrics, facts = train_round(site=site, run=run, run_id=5, server_round=1, weights=_weights())
    _round(site, run, 5, 2)
    ledger = Ledger(site.privacy_dir)
    rows = ledger.rows()
    assert [(r.run_id, r.server_round) for r in rows] == [("5", 1), ("5", 2)]
    assert facts["ledger-row"] == 1 and facts["ledger-hash"] == rows[0].hash and facts["privacy-unit"] == "patient"
    assert rows[0].epsilon == pytest.approx(metrics["epsilon"]) and rows[0].steps == metrics["steps"]
    recomputed = epsilons(events=[r.event for r in rows], delta=site.delta)
    assert rows[1].epsilon_rdp == pytest.approx(recomputed.rdp) and rows[1].epsilon == pytest.approx(recomputed.sound)
    assert verify(rows, ledger.head(), load_public_key(ledger.public_pem())) == []
    assert (site.privacy_dir / "site-key.pem").stat().st_mode & 0o777 == 0o600


def test_budget_is_never_exceeded_when_the_coordinator_asks_for_twice_the_rounds(
    site_and_run: tuple[SiteConfig, RunConfig],
) -> None:
    site, run = site_and_run
    trained, declined = [], []
    for r in range(1, 2 * run.num_server_rounds + 1):  # a coordinator that keeps asking
        try:
            trained.append(_round(site, run, 8, r))
        except PrivacyBudgetExceeded as exc:
            assert f"declines round {r}" in str(exc) and exc.spent is not None
            declined.append(r)
    assert len(trained) == run.num_server_rounds and declined == [4, 5, 6]
    rows = Ledger(site.privacy_dir).rows()
    assert len(rows) == 3
    assert epsilons(events=[r.event for r in rows], delta=site.delta).sound <= site.max_epsilon


def test_a_site_with_its_own_sigma_trains_until_its_budget_then_declines(
    site_and_run: tuple[SiteConfig, RunConfig],
) -> None:
    site, run = site_and_run
    site = SiteConfig(**{**site.__dict__, "noise_multiplier": 1.5})
    done = 0
    for r in range(1, 40):
        try:
            m = _round(site, run, 9, r)
        except PrivacyBudgetExceeded:
            break
        assert m["noise-multiplier"] == 1.5
        done += 1
    assert 0 < done < 39
    rows = Ledger(site.privacy_dir).rows()
    assert len(rows) == done and rows[-1].epsilon <= site.max_epsilon


def test_budget_composes_across_runs_and_preprocessing(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    first = [_round(site, run, 10, r) for r in (1, 2, 3)]
    # A second run on the same files, with another image size, is the same dataset: it only gets
    # what is left of the budget (so far more noise), and the ledger keeps composing.
    other = RunConfig(**{**run.__dict__, "preprocess": PreprocessConfig(image_size=24)})
    second = [_round(site, other, 11, r) for r in (1, 2, 3)]
    assert second[0]["noise-multiplier"] > 2 * first[0]["noise-multiplier"]
    # PRV's numerical upper bound can move by ~1e-6 when a nearly free mechanism is added.
    assert first[-1]["epsilon"] - 1e-4 <= second[-1]["epsilon"] <= site.max_epsilon
    assert second[-1]["run-epsilon"] < second[-1]["epsilon"]
    rows = Ledger(site.privacy_dir).rows()
    assert len(rows) == 6 and len({r.fingerprint for r in rows}) == 1
    assert epsilons(events=[r.event for r in rows], delta=site.delta).sound <= site.max_epsilon


def test_second_run_gets_only_the_budget_left(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    one_round = RunConfig(**{**run.__dict__, "num_server_rounds": 1})
    first = _round(SiteConfig(**{**site.__dict__, "max_epsilon": 1.5}), one_round, 12, 1)
    assert first["epsilon"] <= 1.5
    second = _round(site, one_round, 13, 1)
    assert second["epsilon"] <= site.max_epsilon
    assert second["run-epsilon"] < second["epsilon"]  # the ledger counted run 12 too


def test_a_tampered_ledger_stops_training(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    import sqlite3

    site, run = site_and_run
    _round(site, run, 14, 1)
    _round(site, run, 14, 2)
    with sqlite3.connect(site.privacy_dir / "ledger.sqlite") as conn:
        conn.execute("DELETE FROM rounds WHERE seq = 2")  # hide a round to get budget back
    with pytest.raises(DataError, match="fails verification"):
        _round(site, run, 14, 3)


def test_noise_plan_depends_on_the_sites_budget(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    strict = plan_privacy(site=SiteConfig(**{**site.__dict__, "max_epsilon": 1.0}), run=run, num_units=30)
    loose = plan_privacy(site=site, run=run, num_units=30)
    assert strict.noise_multiplier > loose.noise_multiplier
    assert strict.planned_rounds == run.num_server_rounds
    spent = plan_privacy(site=site, run=run, num_units=30, earlier=[DPEvent(loose.noise_multiplier, loose.sample_rate, 3 * loose.steps_per_round)])
    assert spent.noise_multiplier == loose.noise_multiplier or spent.noise_multiplier > loose.noise_multiplier


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
    site = SiteConfig(site="A", data_dir=site_dir, work_dir=tmp_path / "work", max_epsilon=3.0, threads=1, secure_mode=False)
    run = RunConfig(num_server_rounds=1, local_epochs=1, batch_size=8, classes=names, preprocess=PreprocessConfig(image_size=32))
    weights = OrderedDict(build_model("fedrad-cnn", num_classes=3, seed=0).state_dict())
    assert weights["6.weight"].shape == (3, 16)
    state, metrics, _ = train_round(site=site, run=run, run_id=1, server_round=1, weights=weights)
    assert metrics["num-examples"] > 0 and 0 < metrics["epsilon"] <= 3.0
    stats = evaluate_round(site=site, run=run, weights=state)
    from common.metrics import AUROC_THRESHOLDS, pooled_metrics

    assert len(stats["auroc-confmat"]) == AUROC_THRESHOLDS * 3 * 4 and len(stats["stat-scores"]) == 12
    pooled = pooled_metrics([stats], num_classes=3)
    assert pooled["examples"] == stats["num-examples"] and 0 <= pooled["accuracy"] <= 1


def test_train_plain_takes_the_dp_number_of_steps_without_noise() -> None:
    """fl-sim's no-DP baseline: same steps per epoch as DP-SGD (ceil(P / batch)), deterministic, weights move."""
    import numpy as np
    import torch

    from client.app.training import group_members, train_plain
    from common.models import build_model

    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 1, 16, 16)).astype(np.float32)
    labels = (rng.random(30) > 0.5).astype(np.int64)
    groups = np.repeat(np.arange(10), 3)
    assert [list(m) for m in group_members(groups, 30)][:2] == [[0, 1, 2], [3, 4, 5]]
    outcomes, states = [], []
    for _ in range(2):
        model = build_model("fedrad-cnn", image_size=16, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        outcomes.append(train_plain(model, images=images, labels=labels, groups=groups, epochs=2, batch_size=4,
                                    learning_rate=0.01, device=torch.device("cpu"), seed=5))
        states.append([p.detach().clone() for p in model.parameters()])
        assert any(not torch.equal(a, b) for a, b in zip(before, states[-1], strict=True))
    assert outcomes[0].steps == 2 * 3 and outcomes[0].num_examples == 30
    assert all(torch.equal(a, b) for a, b in zip(*states, strict=True))
