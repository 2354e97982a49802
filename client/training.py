"""Local DP-SGD training with Opacus.

One call trains the global model for the round's local epochs with Poisson
sampling, per-sample gradient clipping and Gaussian noise (Opacus
``PrivacyEngine.make_private``) and reports the DP event it consumed, so the
caller can add it to the site's persistent accounting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from client.augment import augment_batch
from common.config import AugmentConfig
from common.privacy import ACCOUNTANT, DPEvent

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """What one round of local DP training did."""

    loss: float
    num_examples: int
    event: DPEvent


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    from common.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Expected a CUDA GPU for `device=cuda`, but none is available; use auto or cpu")
    return torch.device(device)


def train_dp(
    model: nn.Module,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    device: torch.device,
    secure_mode: bool,
    seed: int,
    augment: AugmentConfig | None = None,
    num_classes: int = 2,
) -> TrainOutcome:
    """Train ``model`` in place with DP-SGD.

    Parameters
    ----------
    model
        The global model (weights already loaded).
    images, labels
        The site's training split, ``(n, 1, S, S)`` float32 and ``(n,)`` int.
    epochs
        Local epochs; each has ``1 / sample_rate`` Poisson-sampled steps.
    batch_size
        Expected batch size; the sample rate is ``batch_size / n``.
    learning_rate, max_grad_norm, noise_multiplier
        Optimiser step size, per-sample clipping norm C and σ (noise std = σ·C).
    device
        Where to train.
    secure_mode
        Opacus' cryptographically secure noise (needs ``torchcsprng``).
    seed
        Seeds batch sampling and noise when ``secure_mode`` is off, and augmentation.
    augment
        Training-time augmentation (per image, so the DP guarantee is unchanged).
    num_classes
        2: one logit and BCE; K > 2: K logits and cross-entropy.
    """
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)  # Poisson batch sampling uses the global generator
    n = int(labels.shape[0])
    dataset = TensorDataset(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
        torch.from_numpy(labels.astype(np.float32 if num_classes == 2 else np.int64)),
    )
    generator = torch.Generator().manual_seed(seed)
    # Opacus turns this into Poisson sampling at rate 1 / len(loader) = poisson_sample_rate().
    loader = DataLoader(dataset, batch_size=batch_size, generator=generator)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    engine = PrivacyEngine(accountant=ACCOUNTANT, secure_mode=secure_mode)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=None if secure_mode else torch.Generator(device=device).manual_seed(seed + 1),
    )
    binary = num_classes == 2
    criterion = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.CrossEntropyLoss()
    augment = augment or AugmentConfig()
    augment_generator = torch.Generator().manual_seed(seed + 2)
    total_loss, total_seen = 0.0, 0
    for _ in range(epochs):
        for x, y in dp_loader:
            # Poisson sampling can draw an empty batch: Opacus still takes (and
            # accounts) a noise-only step, so we never skip one.
            x, y = x.to(device), y.to(device)
            x = augment_batch(x, augment, augment_generator)
            dp_optimizer.zero_grad()
            logits = dp_model(x)
            loss = criterion(logits.squeeze(1) if binary else logits, y)
            loss.backward()
            dp_optimizer.step()
            if len(y):
                total_loss += float(loss.detach()) * len(y)
                total_seen += len(y)
    # The accountant's own record of what was spent: (sigma, q, steps) exactly as Opacus ran it.
    ((sigma, sample_rate, steps),) = engine.accountant.history
    return TrainOutcome(
        loss=total_loss / max(total_seen, 1),
        num_examples=n,
        event=DPEvent(noise_multiplier=float(sigma), sample_rate=float(sample_rate), steps=int(steps)),
    )
