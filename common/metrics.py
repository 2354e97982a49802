"""Federatable evaluation metrics.

A site never sends per-image scores, only torchmetrics *states* that sum across sites: the
binned confusion matrices behind ``BinaryAUROC`` (one 2x2 per threshold; ``MulticlassAUROC``'s
one-vs-rest (T, K, 2, 2) for K > 2 classes) and the (tp, fp, tn, fn) counts at threshold 0.5
(per class, of the arg-max, for K > 2: macro averages, micro accuracy). The server merges them
with ``merge_state``, so torchmetrics computes exactly what it would on the pooled predictions
(AUROC up to the binning). The binned state also gives sensitivity and specificity at each of
the 201 thresholds ``k / 200``: :func:`choose_threshold` picks the binary decision threshold there.
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

AUROC_THRESHOLDS = 201
"""Thresholds of the binned AUROC state (0, 0.005, ..., 1)."""
DECISION_THRESHOLD = 0.5
THRESHOLD = "threshold"
"""Pooled metrics (binary): the threshold :func:`choose_threshold` picked, and the rates there."""
SENSITIVITY_AT_THRESHOLD = "sensitivity-at-threshold"
SPECIFICITY_AT_THRESHOLD = "specificity-at-threshold"


def sufficient_statistics(*, probs: torch.Tensor, targets: torch.Tensor, num_classes: int = 2) -> dict[str, list[int]]:
    """Summable statistics of one site's predictions: counts only, no per-image value.

    Parameters
    ----------
    probs, targets
        Probabilities of the positive class ``(n,)`` (binary) or of each class ``(n, K)``; true class indices ``(n,)``.
    num_classes
        K; 2 for the binary task.

    Returns
    -------
    dict
        ``auroc-confmat``: flattened ``(T, 2, 2)`` or ``(T, K, 2, 2)`` counts; ``stat-scores``: ``[tp, fp, tn, fn]``
        at threshold 0.5 (binary) or those four rows of K per-class counts.
    """
    from torchmetrics import classification as tm

    if num_classes == 2:
        auroc, stats = tm.BinaryAUROC(thresholds=AUROC_THRESHOLDS), tm.BinaryStatScores(threshold=DECISION_THRESHOLD)
    else:
        auroc = tm.MulticlassAUROC(num_classes=num_classes, thresholds=AUROC_THRESHOLDS)
        stats = tm.MulticlassStatScores(num_classes=num_classes, average=None)
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
        ``BinaryAUROC(thresholds=T)``'s state ``(T, 2, 2)``: at threshold ``k / (T - 1)`` the counts
        ``[[tn, fp], [fn, tp]]``, a score counting as positive when ``score >= threshold``.
    method
        ``"youden"``: maximise Youden's J = sensitivity + specificity - 1 (ties, compared exactly on counts: the
        threshold closest to 0.5, then the lower). A number in (0, 1): the target sensitivity, and the highest
        threshold reaching it (none does: the lowest candidate).

    Returns
    -------
    OperatingPoint or None
        A threshold ``k / (T - 1)`` strictly between 0 and 1 and the rates at it; ``None`` when the statistics
        hold no positive or no negative example.
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
    return OperatingPoint(threshold=k / last, sensitivity=int(tp[k]) / positives, specificity=int(tn[k]) / negatives)


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
        Binary: how :func:`choose_threshold` picks the decision threshold (``"youden"`` or a target sensitivity).

    Returns
    -------
    dict
        ``auroc``, ``sensitivity``, ``specificity``, ``precision``, ``f1``, ``accuracy`` (at 0.5; multi-class:
        macro averages, micro accuracy), ``positives``/``negatives`` (binary) or ``examples``; binary also
        ``threshold``, ``sensitivity-at-threshold``, ``specificity-at-threshold``. AUROC and the threshold are
        ``nan`` when a class is absent.
    """
    from torchmetrics import classification as tm

    k = num_classes
    confmat, counts = _summed(site_stats, k)
    state = dict(zip(("tp", "fp", "tn", "fn"), counts, strict=True))
    result: dict[str, float]
    if k == 2:
        auroc = tm.BinaryAUROC(thresholds=AUROC_THRESHOLDS)
        rates = {
            "sensitivity": tm.BinaryRecall(threshold=DECISION_THRESHOLD),
            "specificity": tm.BinarySpecificity(threshold=DECISION_THRESHOLD),
            "precision": tm.BinaryPrecision(threshold=DECISION_THRESHOLD),
            "f1": tm.BinaryF1Score(threshold=DECISION_THRESHOLD),
            "accuracy": tm.BinaryAccuracy(threshold=DECISION_THRESHOLD),
        }
        positives, negatives = int(state["tp"] + state["fn"]), int(state["tn"] + state["fp"])
        result = {"positives": float(positives), "negatives": float(negatives)}
        examples, auroc_defined = positives + negatives, bool(positives and negatives)
    else:
        auroc = tm.MulticlassAUROC(num_classes=k, thresholds=AUROC_THRESHOLDS, average="macro")
        rates = {
            "sensitivity": tm.MulticlassRecall(num_classes=k, average="macro"),
            "specificity": tm.MulticlassSpecificity(num_classes=k, average="macro"),
            "precision": tm.MulticlassPrecision(num_classes=k, average="macro"),
            "f1": tm.MulticlassF1Score(num_classes=k, average="macro"),
            "accuracy": tm.MulticlassAccuracy(num_classes=k, average="micro"),
        }
        support = state["tp"] + state["fn"]  # examples of each class
        examples = int(support.sum())
        result = {"examples": float(examples)}
        auroc_defined = bool((support > 0).all())
    auroc.merge_state({"confmat": confmat})
    for name, metric in rates.items():
        micro = k != 2 and name == "accuracy"  # multi-class accuracy: the per-class counts summed
        metric.merge_state({key: value.sum().reshape(1) for key, value in state.items()} if micro else state)
    with warnings.catch_warnings():
        # merge_state() fills the states without counting an update(); torchmetrics
        # then warns that compute() runs "before update". The states are complete.
        warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric .* before")
        result["auroc"] = float(auroc.compute()) if auroc_defined else float("nan")
        for name, metric in rates.items():
            result[name] = float(metric.compute()) if examples else float("nan")
    if k == 2:
        point = choose_threshold(confmat.numpy(), method=operating_point)
        result[THRESHOLD] = point.threshold if point else float("nan")
        result[SENSITIVITY_AT_THRESHOLD] = point.sensitivity if point else float("nan")
        result[SPECIFICITY_AT_THRESHOLD] = point.specificity if point else float("nan")
    return result
