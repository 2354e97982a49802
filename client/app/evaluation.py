"""Evaluate the global model on the site's validation split.

Returns only summable statistics (see :mod:`common.metrics`): never a
per-image score, label or identifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.metrics import sufficient_statistics

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class EvalOutcome:
    loss: float
    num_examples: int
    statistics: dict[str, list[int]]


def evaluate(
    model: nn.Module, *, images: np.ndarray, labels: np.ndarray, device: torch.device, num_classes: int = 2,
    batch_size: int = 256,
) -> EvalOutcome:
    """Mean loss per image (BCE, or cross-entropy for K > 2 classes; 0 for no image) and statistics of ``model``.

    Parameters
    ----------
    model, device
        The model to evaluate (moved to ``device``, in eval mode, no gradients) and where it runs.
    images, labels
        The split's preprocessed images ``(n, 1, S, S)`` (float32 batch by batch) and class indices ``(n,)``.
    num_classes
        2: one logit, sigmoid probabilities and BCE; K > 2: K logits, softmax and cross-entropy.
    batch_size
        Images per forward pass; bounds memory, not the result.
    """
    import torch
    import torch.nn.functional as F

    model = model.to(device).eval()
    probs: list[torch.Tensor] = []
    total_loss = 0.0
    targets = torch.from_numpy(labels.astype(np.int64))
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32))
            logits = model(x.to(device)).cpu()
            y = targets[start : start + batch_size]
            if num_classes == 2:
                logits = logits.squeeze(1)
                total_loss += float(F.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum"))
                probs.append(torch.sigmoid(logits))
            else:
                total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                probs.append(torch.softmax(logits, dim=1))
    empty = torch.zeros(0) if num_classes == 2 else torch.zeros(0, num_classes)
    all_probs = torch.cat(probs) if probs else empty
    return EvalOutcome(
        loss=total_loss / max(len(labels), 1),
        num_examples=len(labels),
        statistics=sufficient_statistics(probs=all_probs, targets=targets, num_classes=num_classes),
    )
