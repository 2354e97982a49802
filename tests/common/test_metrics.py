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
