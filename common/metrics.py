"""Federatable evaluation metrics.

A site never sends per-image scores. It sends torchmetrics *states* that sum
across sites: the binned confusion matrices behind ``BinaryAUROC`` (one 2x2
matrix per threshold) and the (tp, fp, tn, fn) counts behind the threshold-0.5
metrics. For a task with K > 2 classes: ``MulticlassAUROC``'s (T, K, 2, 2)
one-vs-rest matrices and per-class (tp, fp, tn, fn) of the arg-max
prediction; pooled metrics are macro averages (accuracy is micro). The server merges the states of all sites with torchmetrics'
``merge_state`` and lets torchmetrics compute pooled AUROC, sensitivity,
specificity, precision, F1 and accuracy — exactly what it would compute on the
pooled predictions (AUROC up to the threshold binning).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from common import records

if TYPE_CHECKING:
    import torch

AUROC_THRESHOLDS = 201
"""Thresholds of the binned AUROC state (0, 0.005, ..., 1)."""
DECISION_THRESHOLD = 0.5


def sufficient_statistics(*, probs: torch.Tensor, targets: torch.Tensor, num_classes: int = 2) -> dict[str, list[int]]:
    """Summable statistics of one site's predictions.

    Parameters
    ----------
    probs
        Binary: probabilities of the positive class, shape ``(n,)``.
        Multi-class: class probabilities, shape ``(n, K)``.
    targets
        True class indices, shape ``(n,)``.
    num_classes
        K; 2 for the binary task.

    Returns
    -------
    dict
        ``auroc-confmat``: flattened ``(T, 2, 2)`` (binary) or ``(T, K, 2, 2)``
        counts; ``stat-scores``: ``[tp, fp, tn, fn]`` at threshold 0.5
        (binary) or those four rows of K per-class counts. Counts only, no
        per-image value.
    """
    from torchmetrics.classification import BinaryAUROC, BinaryStatScores

    if num_classes != 2:
        return _multiclass_statistics(probs=probs, targets=targets, num_classes=num_classes)

    auroc = BinaryAUROC(thresholds=AUROC_THRESHOLDS)
    stats = BinaryStatScores(threshold=DECISION_THRESHOLD)
    if len(probs):
        auroc.update(probs, targets.long())
        stats.update(probs, targets.long())
    return {
        records.AUROC_CONFMAT: [int(v) for v in auroc.confmat.flatten().tolist()],
        records.STAT_SCORES: [int(getattr(stats, k).item()) for k in ("tp", "fp", "tn", "fn")],
    }


def _multiclass_statistics(*, probs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, list[int]]:
    from torchmetrics.classification import MulticlassAUROC, MulticlassStatScores

    auroc = MulticlassAUROC(num_classes=num_classes, thresholds=AUROC_THRESHOLDS)
    stats = MulticlassStatScores(num_classes=num_classes, average=None)
    if len(probs):
        auroc.update(probs, targets.long())
        stats.update(probs, targets.long())
    return {
        records.AUROC_CONFMAT: [int(v) for v in auroc.confmat.flatten().tolist()],
        records.STAT_SCORES: [int(v) for k in ("tp", "fp", "tn", "fn") for v in getattr(stats, k).tolist()],
    }


def _as_counts(value: Any, length: int, key: str) -> list[int]:
    values = list(value) if isinstance(value, Sequence) else []
    if len(values) != length or any(int(v) != v or v < 0 for v in values):
        raise ValueError(f"Expected `{key}` to be {length} non-negative counts, got {len(values)}")
    return [int(v) for v in values]


def pooled_metrics(site_stats: Iterable[Mapping[str, Any]], *, num_classes: int = 2) -> dict[str, float]:
    """Merge sites' sufficient statistics and compute pooled metrics with torchmetrics.

    Returns
    -------
    dict
        ``auroc``, ``sensitivity``, ``specificity``, ``precision``, ``f1``,
        ``accuracy``, and ``positives``/``negatives`` (binary) or
        ``examples`` (multi-class; the other metrics are macro averages over
        classes, accuracy is micro). AUROC is ``nan`` when a class is absent
        from the pooled data.
    """
    if num_classes != 2:
        return _pooled_multiclass(site_stats, num_classes)
    import torch
    from torchmetrics.classification import (
        BinaryAccuracy,
        BinaryAUROC,
        BinaryF1Score,
        BinaryPrecision,
        BinaryRecall,
        BinarySpecificity,
    )

    n_confmat = AUROC_THRESHOLDS * 4
    auroc = BinaryAUROC(thresholds=AUROC_THRESHOLDS)
    threshold_metrics = {
        "sensitivity": BinaryRecall(threshold=DECISION_THRESHOLD),
        "specificity": BinarySpecificity(threshold=DECISION_THRESHOLD),
        "precision": BinaryPrecision(threshold=DECISION_THRESHOLD),
        "f1": BinaryF1Score(threshold=DECISION_THRESHOLD),
        "accuracy": BinaryAccuracy(threshold=DECISION_THRESHOLD),
    }
    confmat = torch.zeros(AUROC_THRESHOLDS, 2, 2, dtype=torch.long)
    counts = torch.zeros(4, dtype=torch.long)
    for stats in site_stats:
        confmat += torch.tensor(
            _as_counts(stats[records.AUROC_CONFMAT], n_confmat, records.AUROC_CONFMAT)
        ).reshape(AUROC_THRESHOLDS, 2, 2)
        counts += torch.tensor(_as_counts(stats[records.STAT_SCORES], 4, records.STAT_SCORES))
    auroc.merge_state({"confmat": confmat})
    tp, fp, tn, fn = (counts[i] for i in range(4))
    for metric in threshold_metrics.values():
        metric.merge_state({"tp": tp, "fp": fp, "tn": tn, "fn": fn})

    positives, negatives = int(tp + fn), int(tn + fp)
    result: dict[str, float] = {"positives": float(positives), "negatives": float(negatives)}
    with warnings.catch_warnings():
        # merge_state() fills the states without counting an update(); torchmetrics
        # then warns that compute() runs "before update". The states are complete.
        warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric .* before")
        result["auroc"] = float(auroc.compute()) if positives and negatives else float("nan")
        for name, metric in threshold_metrics.items():
            result[name] = float(metric.compute()) if positives + negatives else float("nan")
    return result


def _pooled_multiclass(site_stats: Iterable[Mapping[str, Any]], num_classes: int) -> dict[str, float]:
    import torch
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassAUROC,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
        MulticlassSpecificity,
    )

    k = num_classes
    n_confmat = AUROC_THRESHOLDS * k * 4
    confmat = torch.zeros(AUROC_THRESHOLDS, k, 2, 2, dtype=torch.long)
    counts = torch.zeros(4, k, dtype=torch.long)
    for stats in site_stats:
        confmat += torch.tensor(
            _as_counts(stats[records.AUROC_CONFMAT], n_confmat, records.AUROC_CONFMAT)
        ).reshape(AUROC_THRESHOLDS, k, 2, 2)
        counts += torch.tensor(_as_counts(stats[records.STAT_SCORES], 4 * k, records.STAT_SCORES)).reshape(4, k)
    auroc = MulticlassAUROC(num_classes=k, thresholds=AUROC_THRESHOLDS, average="macro")
    auroc.merge_state({"confmat": confmat})
    per_class = {"tp": counts[0], "fp": counts[1], "tn": counts[2], "fn": counts[3]}
    macro = {
        "sensitivity": MulticlassRecall(num_classes=k, average="macro"),
        "specificity": MulticlassSpecificity(num_classes=k, average="macro"),
        "precision": MulticlassPrecision(num_classes=k, average="macro"),
        "f1": MulticlassF1Score(num_classes=k, average="macro"),
    }
    accuracy = MulticlassAccuracy(num_classes=k, average="micro")
    for metric in macro.values():
        metric.merge_state(per_class)
    accuracy.merge_state({name: value.sum().reshape(1) for name, value in per_class.items()})
    support = counts[0] + counts[3]  # tp + fn: examples of each class
    examples = int(support.sum())
    result: dict[str, float] = {"examples": float(examples)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric .* before")
        result["auroc"] = float(auroc.compute()) if bool((support > 0).all()) else float("nan")
        for name, metric in macro.items():
            result[name] = float(metric.compute()) if examples else float("nan")
        result["accuracy"] = float(accuracy.compute()) if examples else float("nan")
    return result
