from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from common.metrics import pooled_metrics, sufficient_statistics


def _predictions(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, n)
    probs = np.clip(rng.normal(0.35 + 0.3 * targets, 0.2), 0, 1)
    return torch.tensor(probs, dtype=torch.float32), torch.tensor(targets)


def test_pooled_statistics_match_scikit_learn_on_the_pooled_predictions() -> None:
    probs, targets = _predictions(600, seed=0)
    sites = [(probs[:100], targets[:100]), (probs[100:350], targets[100:350]), (probs[350:], targets[350:])]
    pooled = pooled_metrics([sufficient_statistics(probs=p, targets=t) for p, t in sites])

    y, s = targets.numpy(), probs.numpy()
    tn, fp, fn, tp = confusion_matrix(y, s >= 0.5).ravel()
    assert pooled["auroc"] == pytest.approx(roc_auc_score(y, s), abs=0.01)  # binned at 201 thresholds
    assert pooled["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert pooled["specificity"] == pytest.approx(tn / (tn + fp))
    assert pooled["precision"] == pytest.approx(tp / (tp + fp))
    assert pooled["accuracy"] == pytest.approx((tp + tn) / len(y))
    assert pooled["f1"] == pytest.approx(f1_score(y, s >= 0.5))
    assert (pooled["positives"], pooled["negatives"]) == (y.sum(), len(y) - y.sum())


def test_merging_sites_equals_computing_on_all_predictions_at_once() -> None:
    probs, targets = _predictions(300, seed=1)
    split = pooled_metrics(
        [sufficient_statistics(probs=probs[:120], targets=targets[:120]), sufficient_statistics(probs=probs[120:], targets=targets[120:])]
    )
    whole = pooled_metrics([sufficient_statistics(probs=probs, targets=targets)])
    assert split == pytest.approx(whole)


def test_statistics_are_counts_only() -> None:
    probs, targets = _predictions(50, seed=2)
    stats = sufficient_statistics(probs=probs, targets=targets)
    assert set(stats) == {"auroc-confmat", "stat-scores"}
    assert all(isinstance(v, int) for values in stats.values() for v in values)
    assert sum(stats["stat-scores"]) == 50


def test_auroc_is_nan_when_a_class_is_missing() -> None:
    stats = sufficient_statistics(probs=torch.tensor([0.2, 0.7]), targets=torch.tensor([0, 0]))
    assert math.isnan(pooled_metrics([stats])["auroc"])


def test_malformed_statistics_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-negative counts"):
        pooled_metrics([{"auroc-confmat": [1, 2, 3], "stat-scores": [0, 0, 0, 0]}])


def test_multiclass_pooled_statistics_match_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, precision_score, recall_score

    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, 500)
    logits = rng.normal(0, 1, (500, 3)) + 1.5 * np.eye(3)[targets]
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=1)
    t = torch.tensor(targets)
    sites = [sufficient_statistics(probs=probs[a:b], targets=t[a:b], num_classes=3) for a, b in ((0, 150), (150, 500))]
    pooled = pooled_metrics(sites, num_classes=3)
    pred = probs.argmax(1).numpy()
    assert pooled["auroc"] == pytest.approx(roc_auc_score(targets, probs.numpy(), multi_class="ovr"), abs=0.01)
    assert pooled["accuracy"] == pytest.approx(accuracy_score(targets, pred))
    assert pooled["sensitivity"] == pytest.approx(recall_score(targets, pred, average="macro"))
    assert pooled["precision"] == pytest.approx(precision_score(targets, pred, average="macro"))
    assert pooled["f1"] == pytest.approx(f1_score(targets, pred, average="macro"))
    cm = confusion_matrix(targets, pred)
    spec = [(cm.sum() - cm[k].sum() - cm[:, k].sum() + cm[k, k]) / (cm.sum() - cm[k].sum()) for k in range(3)]
    assert pooled["specificity"] == pytest.approx(float(np.mean(spec)))
    assert pooled["examples"] == 500
    with pytest.raises(ValueError, match="auroc-confmat"):
        pooled_metrics(sites, num_classes=4)  # statistics of another task size are refused


# ---------------------------------------------------------------- the operating point


def _grid_roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sensitivity and 1 - specificity at the grid thresholds in (0, 1), from scikit-learn's ROC curve.

    A score counts as positive at grid threshold g when score >= g, with g as torchmetrics
    holds it (float32 ``linspace(0, 1, 201)``): sklearn's point for g is the last one (of
    descending score thresholds) whose threshold is still >= g.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, cut = roc_curve(y, s, drop_intermediate=False)
    grid = torch.linspace(0, 1, 201).numpy()[1:-1]
    at = np.array([np.nonzero(cut >= g)[0].max() for g in grid])  # cut[0] is +inf: always there
    return np.arange(1, 200) / 200, tpr[at], fpr[at]


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_youden_threshold_matches_scikit_learns_roc_curve(seed: int) -> None:
    from common.metrics import choose_threshold

    probs, targets = _predictions(400, seed=seed)
    stats = sufficient_statistics(probs=probs, targets=targets)
    pooled = pooled_metrics([stats])
    grid, sens, fpr = _grid_roc(targets.numpy(), probs.numpy())
    youden = sens - fpr
    best = youden.max()
    assert pooled["sensitivity-at-threshold"] + pooled["specificity-at-threshold"] - 1 == pytest.approx(best, abs=1e-12)
    # ties: the best threshold closest to 0.5, then the lower one
    tied = grid[np.isclose(youden, best, rtol=0, atol=1e-12)]
    expected = min(tied, key=lambda g: (abs(g - 0.5), g))
    assert pooled["threshold"] == pytest.approx(expected, abs=1e-12)
    i = int(np.argmin(np.abs(grid - pooled["threshold"])))
    assert (pooled["sensitivity-at-threshold"], 1 - pooled["specificity-at-threshold"]) == pytest.approx((sens[i], fpr[i]))
    confmat = np.array(stats["auroc-confmat"]).reshape(201, 2, 2)
    assert choose_threshold(confmat, method="youden").threshold == pooled["threshold"]


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_target_sensitivity_is_the_highest_threshold_reaching_it(target: float) -> None:
    probs, targets = _predictions(500, seed=7)
    pooled = pooled_metrics([sufficient_statistics(probs=probs, targets=targets)], operating_point=target)
    grid, sens, fpr = _grid_roc(targets.numpy(), probs.numpy())
    expected = grid[sens >= target].max()
    assert pooled["threshold"] == pytest.approx(expected, abs=1e-12)
    assert pooled["sensitivity-at-threshold"] >= target
    assert pooled["specificity-at-threshold"] == pytest.approx(1 - fpr[grid == expected][0])


def test_operating_point_edge_cases() -> None:
    from common.metrics import choose_threshold

    # a target met exactly by a count ratio: 9 of 10 positives is sensitivity 0.9, no float slack needed
    probs = torch.tensor([0.052 + 0.1 * i for i in range(10)] + [0.01] * 5)  # off the grid: no float32 tie
    targets = torch.tensor([1] * 10 + [0] * 5)
    point = pooled_metrics([sufficient_statistics(probs=probs, targets=targets)], operating_point=0.9)
    assert point["sensitivity-at-threshold"] == 0.9 and point["threshold"] == pytest.approx(0.15)
    # an uninformative model: every threshold has J = 0, so 0.5 stays
    flat = sufficient_statistics(probs=torch.full((8,), 0.3), targets=torch.tensor([0, 1] * 4))
    assert pooled_metrics([flat])["threshold"] == 0.5
    # one class only: no operating point
    one_class = pooled_metrics([sufficient_statistics(probs=torch.tensor([0.2, 0.7]), targets=torch.tensor([0, 0]))])
    assert math.isnan(one_class["threshold"]) and math.isnan(one_class["sensitivity-at-threshold"])
    assert choose_threshold(np.zeros((201, 2, 2))) is None
    assert "threshold" not in pooled_metrics([flat | {"auroc-confmat": [0] * 201 * 3 * 4, "stat-scores": [0] * 12}],
                                             num_classes=3)


@pytest.mark.parametrize(
    ("value", "expected"), [("youden", "youden"), (0.9, 0.9), ("0.8", 0.8), (None, ValueError), (1, ValueError),
                            (0.0, ValueError), ("nan", ValueError), (True, ValueError), ("max-f1", ValueError)]
)
def test_the_run_configs_operating_point(value: object, expected: object) -> None:
    from common.config import RunConfig

    if expected is ValueError:
        with pytest.raises(ValueError, match=r"Expected `operating-point` to be \"youden\" or a target sensitivity"):
            RunConfig.from_flower({"operating-point": value})
    else:
        assert RunConfig.from_flower({"operating-point": value}).operating_point == expected
    assert RunConfig.from_flower({}).operating_point == "youden"
