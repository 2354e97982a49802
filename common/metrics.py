"""Federatable evaluation metrics.

A site never sends per-image scores. It sends torchmetrics *states* that sum
across sites: the binned confusion matrices behind ``BinaryAUROC`` (one 2x2
matrix per threshold) and the (tp, fp, tn, fn) counts behind the threshold-0.5
metrics. The server merges the states of all sites with torchmetrics'
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


def sufficient_statistics(*, probs: torch.Tensor, targets: torch.Tensor) -> dict[str, list[int]]:
    """Summable statistics of one site's predictions.

    Parameters
    ----------
    probs
        Predicted probabilities of the positive class, shape ``(n,)``.
    targets
        True labels (0/1), shape ``(n,)``.

    Returns
    -------
    dict
        ``auroc-confmat``: flattened ``(T, 2, 2)`` counts; ``stat-scores``:
        ``[tp, fp, tn, fn]`` at threshold 0.5. Counts only, no per-image value.
    """
    from torchmetrics.classification import BinaryAUROC, BinaryStatScores

    auroc = BinaryAUROC(thresholds=AUROC_THRESHOLDS)
    stats = BinaryStatScores(threshold=DECISION_THRESHOLD)
    if len(probs):
        auroc.update(probs, targets.long())
        stats.update(probs, targets.long())
    return {
        records.AUROC_CONFMAT: [int(v) for v in auroc.confmat.flatten().tolist()],
        records.STAT_SCORES: [int(getattr(stats, k).item()) for k in ("tp", "fp", "tn", "fn")],
    }


def _as_counts(value: Any, length: int, key: str) -> list[int]:
    values = list(value) if isinstance(value, Sequence) else []
    if len(values) != length or any(int(v) != v or v < 0 for v in values):
        raise ValueError(f"Expected `{key}` to be {length} non-negative counts, got {len(values)}")
    return [int(v) for v in values]


def pooled_metrics(site_stats: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Merge sites' sufficient statistics and compute pooled metrics with torchmetrics.

    Returns
    -------
    dict
        ``auroc``, ``sensitivity``, ``specificity``, ``precision``, ``f1``,
        ``accuracy``, ``positives``, ``negatives``. AUROC is ``nan`` when one
        class is absent from the pooled data.
    """
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
