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

**Operating point (binary).** The binned AUROC state holds the confusion matrix
at each of the 201 thresholds ``k / 200``, so the pooled state gives sensitivity
and specificity at every one of them. :func:`choose_threshold` picks the
decision threshold there (the run config's ``operating-point``: Youden's J, or
a target sensitivity); :func:`pooled_metrics` reports it beside the metrics at
0.5.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from common import records
from common.config import YOUDEN

if TYPE_CHECKING:
    import torch
    from torchmetrics import Metric

AUROC_THRESHOLDS = 201
"""Thresholds of the binned AUROC state (0, 0.005, ..., 1)."""
DECISION_THRESHOLD = 0.5
THRESHOLD = "threshold"
"""Pooled metrics (binary): the threshold :func:`choose_threshold` picked, and the rates there."""
SENSITIVITY_AT_THRESHOLD = "sensitivity-at-threshold"
SPECIFICITY_AT_THRESHOLD = "specificity-at-threshold"


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
    auroc: Metric
    stats: Metric
    if num_classes == 2:
        from torchmetrics.classification import BinaryAUROC, BinaryStatScores

        auroc, stats = BinaryAUROC(thresholds=AUROC_THRESHOLDS), BinaryStatScores(threshold=DECISION_THRESHOLD)
    else:
        from torchmetrics.classification import MulticlassAUROC, MulticlassStatScores

        auroc = MulticlassAUROC(num_classes=num_classes, thresholds=AUROC_THRESHOLDS)
        stats = MulticlassStatScores(num_classes=num_classes, average=None)
    if len(probs):
        auroc.update(probs, targets.long())
        stats.update(probs, targets.long())
    return {
        records.AUROC_CONFMAT: [int(v) for v in auroc.confmat.flatten().tolist()],
        records.STAT_SCORES: [int(v) for k in ("tp", "fp", "tn", "fn") for v in getattr(stats, k).flatten().tolist()],
    }


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and the pooled sensitivity and specificity at it."""

    threshold: float
    sensitivity: float
    specificity: float


def describe_operating_point(method: str | float) -> str:
    """``"Youden's J"`` or ``"target sensitivity 0.9"``: how a threshold was chosen, in words."""
    return "Youden's J" if method == YOUDEN else f"target sensitivity {float(method):g}"


def choose_threshold(confmat: Any, *, method: str | float = YOUDEN) -> OperatingPoint | None:
    """The decision threshold, chosen on binned (pooled) statistics.

    Parameters
    ----------
    confmat
        ``BinaryAUROC(thresholds=T)``'s state, shape ``(T, 2, 2)``: at threshold
        ``k / (T - 1)`` the counts ``[[tn, fp], [fn, tp]]``, a score counting as
        positive when ``score >= threshold`` (torchmetrics' rule).
    method
        ``"youden"``: maximise Youden's J = sensitivity + specificity - 1; among
        thresholds with the same J (compared exactly, on counts), the one closest
        to 0.5, then the lower one. A number in (0, 1): the target sensitivity,
        and the highest threshold whose sensitivity is at least that; when none
        reaches it, the lowest candidate.

    Returns
    -------
    OperatingPoint or None
        The threshold (one of ``k / (T - 1)``, strictly between 0 and 1: 0 and 1
        would call every or no image positive) and the rates at it; ``None``
        when the statistics hold no positive or no negative example.
    """
    counts = np.asarray(confmat, dtype=np.int64).reshape(-1, 2, 2)
    last = len(counts) - 1
    tp, fn, tn, fp = counts[:, 1, 1], counts[:, 1, 0], counts[:, 0, 0], counts[:, 0, 1]
    positives, negatives = int(tp[0] + fn[0]), int(tn[0] + fp[0])
    if last < 2 or not positives or not negatives:
        return None
    candidates = range(1, last)  # 0 < k / last < 1
    if method == YOUDEN:
        # J * P * N = tp * N + tn * P - P * N: integers, so ties are exact
        k = max(candidates, key=lambda i: (int(tp[i]) * negatives + int(tn[i]) * positives, -abs(2 * i - last), -i))
    else:
        target = Fraction(str(float(method)))  # the decimal the user wrote: 0.9 is 9/10, not 0.900000000000000022
        if not 0 < target < 1:
            raise ValueError(f"Expected the operating point to be {YOUDEN!r} or a number in (0, 1), but got {method!r}")
        reached = [i for i in candidates if Fraction(int(tp[i]), positives) >= target]
        k = max(reached) if reached else candidates[0]  # sensitivity falls as the threshold rises
    return OperatingPoint(
        threshold=k / last, sensitivity=int(tp[k]) / positives, specificity=int(tn[k]) / negatives
    )


def _as_counts(value: Any, length: int, key: str) -> list[int]:
    values = list(value) if isinstance(value, Sequence) else []
    if len(values) != length or any(int(v) != v or v < 0 for v in values):
        raise ValueError(f"Expected `{key}` to be {length} non-negative counts, got {len(values)}")
    return [int(v) for v in values]


def _summed(site_stats: Iterable[Mapping[str, Any]], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sites' AUROC confusion matrices and (tp, fp, tn, fn) counts, checked and added up."""
    import torch

    per_class = () if num_classes == 2 else (num_classes,)  # binary states have no class axis
    confmat = torch.zeros(AUROC_THRESHOLDS, *per_class, 2, 2, dtype=torch.long)
    counts = torch.zeros(4, *per_class, dtype=torch.long)
    for stats in site_stats:
        for total, key in ((confmat, records.AUROC_CONFMAT), (counts, records.STAT_SCORES)):
            total += torch.tensor(_as_counts(stats[key], total.numel(), key)).reshape(total.shape)
    return confmat, counts


def pooled_metrics(
    site_stats: Iterable[Mapping[str, Any]], *, num_classes: int = 2, operating_point: str | float = YOUDEN
) -> dict[str, float]:
    """Merge sites' sufficient statistics and compute pooled metrics with torchmetrics.

    Parameters
    ----------
    site_stats
        Each site's :func:`sufficient_statistics`.
    num_classes
        K; 2 for the binary task.
    operating_point
        Binary: how :func:`choose_threshold` picks the decision threshold
        (``"youden"`` or a target sensitivity).

    Returns
    -------
    dict
        ``auroc``, ``sensitivity``, ``specificity``, ``precision``, ``f1``,
        ``accuracy`` (at threshold 0.5), and ``positives``/``negatives``
        (binary) or ``examples`` (multi-class; the other metrics are macro
        averages over classes, accuracy is micro). Binary also:
        ``threshold`` (the chosen one), ``sensitivity-at-threshold`` and
        ``specificity-at-threshold``. AUROC and the chosen threshold are
        ``nan`` when a class is absent from the pooled data.
    """
    if num_classes != 2:
        return _pooled_multiclass(site_stats, num_classes)
    from torchmetrics.classification import (
        BinaryAccuracy,
        BinaryAUROC,
        BinaryF1Score,
        BinaryPrecision,
        BinaryRecall,
        BinarySpecificity,
    )

    auroc = BinaryAUROC(thresholds=AUROC_THRESHOLDS)
    threshold_metrics = {
        "sensitivity": BinaryRecall(threshold=DECISION_THRESHOLD),
        "specificity": BinarySpecificity(threshold=DECISION_THRESHOLD),
        "precision": BinaryPrecision(threshold=DECISION_THRESHOLD),
        "f1": BinaryF1Score(threshold=DECISION_THRESHOLD),
        "accuracy": BinaryAccuracy(threshold=DECISION_THRESHOLD),
    }
    confmat, counts = _summed(site_stats, 2)
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
    point = choose_threshold(confmat.numpy(), method=operating_point)
    result[THRESHOLD] = point.threshold if point else float("nan")
    result[SENSITIVITY_AT_THRESHOLD] = point.sensitivity if point else float("nan")
    result[SPECIFICITY_AT_THRESHOLD] = point.specificity if point else float("nan")
    return result


def _pooled_multiclass(site_stats: Iterable[Mapping[str, Any]], num_classes: int) -> dict[str, float]:
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassAUROC,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
        MulticlassSpecificity,
    )

    k = num_classes
    confmat, counts = _summed(site_stats, k)
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
