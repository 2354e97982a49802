"""Local DP-SGD training with Opacus, with the patient as the privacy unit.

One call trains the global model for the round's local epochs and reports the
DP event it consumed, so the caller can record it in the site's ledger.

**Patient-level DP.** Opacus' Poisson sampling runs over *patients*, not
images: each step draws every patient independently with probability q, takes
(up to ``slices_per_patient``) of that patient's images, and replaces the
per-image gradients by their mean per patient *before* clipping. Opacus then
clips each patient's gradient to C and adds N(0, σ²C²) noise, so adding or
removing one patient — with all their images — changes a step by at most one
clipped gradient: the (ε, δ) guarantee is per patient. With one image per
group (``groups=None``) this is ordinary image-level DP-SGD.

**Noise and sampling randomness.** With ``secure_mode`` the sampling and noise
generators are seeded from the operating system's CSPRNG (``secrets``) every
round, never from the run config the coordinator chose, and Opacus' defence
against floating-point attacks on Gaussian sampling is on. Opacus' own
``secure_mode`` additionally swaps torch's generator for ``torchcsprng``; that
package is used when installed (it has no build for current torch).
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client.app.augment import augment_batch
from common.config import AugmentConfig
from common.errors import ConfigError
from common.privacy import DPEvent

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

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Expected a CUDA GPU for `device=cuda`, but none is available; use auto or cpu")
    return torch.device(device)


INSECURE_NOISE_WARNING = (
    "SECURE MODE IS OFF: DP sampling and noise are seeded from the run config, so whoever knows the "
    "seed can reproduce them and the privacy guarantee does not hold. Use this only for tests."
)
# Patient-level DP averages each patient's per-image gradients before clipping, so the mode must
# materialise them; of those (hooks, functorch, ew), only hooks survives an empty Poisson batch in
# Opacus 1.6 (functorch and ew raise), which small batches draw often.
GRAD_SAMPLE_MODES = ("hooks",)


def _make_optimizer(model: nn.Module, name: str, *, learning_rate: float, momentum: float) -> torch.optim.Optimizer:
    """A fresh local optimiser: ``sgd`` (heavy-ball ``momentum``) or ``adam`` (ignores it).

    SGD is the default under DP: its step is proportional to the noisy gradient, so a
    coordinate that carries only noise moves by the noise's (small) size. Adam divides
    each coordinate by its own running scale, which turns pure-noise coordinates into
    full-size steps (a fresh Adam's first step is ``lr · sign(g)`` on every weight); on
    the demo's data that left one draw in four to ten near chance (docs/simulation.md).
    """
    import torch

    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=learning_rate)
    raise ValueError(f"Expected `optimizer` to be sgd or adam, but got {name!r}")


def patient_groups(patients: tuple[str, ...] | list[str] | np.ndarray) -> np.ndarray:
    """Group index per image: images of one (hashed) patient share one index, numbered from 0."""
    _, inverse = np.unique(np.asarray(patients), return_inverse=True)
    return inverse.astype(np.int64)


def group_members(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Image indices of each group (patient) 0…P-1; ``None`` makes every image its own group."""
    groups = np.arange(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if groups.shape != (n,):
        raise ValueError(f"Expected one group per image ({n}), but got {groups.shape}")
    order = np.argsort(groups, kind="stable")
    num_groups = int(groups.max()) + 1 if n else 0
    bounds = np.searchsorted(groups[order], np.arange(num_groups + 1))
    return [order[bounds[g] : bounds[g + 1]] for g in range(num_groups)]


def _mean_per_group(model: nn.Module, segments: torch.Tensor, num_groups: int) -> None:
    """Replace each trainable parameter's per-image gradients by their mean per group (patient)."""
    import torch

    counts = torch.bincount(segments, minlength=num_groups).clamp(min=1)
    for p in model.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is None:
            continue
        summed = torch.zeros((num_groups, *grad_sample.shape[1:]), dtype=grad_sample.dtype, device=grad_sample.device)
        summed.index_add_(0, segments, grad_sample)
        p.grad_sample = summed / counts.view(-1, *([1] * (grad_sample.dim() - 1))).to(summed.dtype)


class _Batches:
    """The training split as tensors, and one step's forward and backward on a batch of patients (DP or not)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, device: torch.device,
                 seed: int, slices_per_patient: int, augment: AugmentConfig | None, num_classes: int) -> None:
        import torch

        self.members = group_members(groups, int(labels.shape[0]))
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self.labels = torch.from_numpy(labels.astype(np.float32 if num_classes == 2 else np.int64))
        self.binary = num_classes == 2
        self.criterion = torch.nn.BCEWithLogitsLoss() if self.binary else torch.nn.CrossEntropyLoss()
        self.augment = augment or AugmentConfig()
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.device, self.slices_per_patient = device, slices_per_patient
        self.total_loss, self.total_seen = 0.0, 0

    def pick(self, sampled: Iterable[Any], rng: np.random.Generator) -> list[np.ndarray]:
        """The images of each sampled patient: all of them, or ``slices_per_patient`` drawn at random."""
        k, members = self.slices_per_patient, (self.members[int(g)] for g in sampled)
        return [m if len(m) <= k else rng.choice(m, k, replace=False) for m in members]

    def backward(self, model: nn.Module, picked: list[np.ndarray]) -> None:
        """Augment the picked images, compute their loss and its gradients; the loss adds to ``total_loss``."""
        import torch

        rows = torch.from_numpy(np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64))
        x, y = self.images[rows].to(self.device), self.labels[rows].to(self.device)
        logits = model(augment_batch(x, self.augment, self.generator))
        loss = self.criterion(logits.squeeze(1) if self.binary else logits, y)
        loss.backward()
        if len(y):
            self.total_loss += float(loss.detach()) * len(y)
            self.total_seen += len(y)


def train_dp(
    model: nn.Module, *, images: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int, learning_rate: float,
    max_grad_norm: float, noise_multiplier: float, device: torch.device, secure_mode: bool, seed: int,
    groups: np.ndarray | None = None, slices_per_patient: int = 16, augment: AugmentConfig | None = None,
    num_classes: int = 2, grad_sample_mode: str = "hooks", optimizer: str = "sgd", momentum: float = 0.9,
) -> TrainOutcome:
    """Train ``model`` in place with DP-SGD, one patient (group) per privacy unit.

    Parameters
    ----------
    model, device
        The global model (weights already loaded) and where to train it.
    images, labels, groups
        The site's training split, ``(n, 1, S, S)`` float32 and ``(n,)`` int, and the patient index
        (0…P-1) of each image; ``None`` makes every image its own unit.
    epochs, batch_size
        Local epochs, each of ``1 / q`` Poisson-sampled steps; the expected *patients* per step
        (q = ``1 / ceil(P / batch_size)``).
    learning_rate, max_grad_norm, noise_multiplier
        Optimiser step size, per-patient clipping norm C and σ (noise std = σ·C).
    secure_mode
        Seed sampling and noise from the OS CSPRNG (see the module docstring); off only in tests.
    seed
        Seeds augmentation and the choice of slices, and (only with ``secure_mode`` off) sampling and noise.
    slices_per_patient
        At most this many of a sampled patient's images are drawn per step (bounds memory).
    augment
        Training-time augmentation (per image, so the DP guarantee is unchanged); None for none.
    num_classes
        2: one logit and BCE; K > 2: K logits and cross-entropy.
    grad_sample_mode
        Opacus per-sample-gradient mode (one of :data:`GRAD_SAMPLE_MODES`).
    optimizer, momentum
        The local optimiser, fresh every round: ``sgd`` with this momentum, or ``adam``.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"Expected `grad_sample_mode` to be one of {', '.join(GRAD_SAMPLE_MODES)}, but got {grad_sample_mode!r}"
        )
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    csprng = secure_mode and importlib.util.find_spec("torchcsprng") is not None
    if secure_mode:
        sampling_seed, noise_seed, slice_seed = (secrets.randbits(63) for _ in range(3))
    else:
        log.warning(INSECURE_NOISE_WARNING)
        sampling_seed, noise_seed, slice_seed = seed, seed + 1, seed + 3
    if not csprng:
        torch.manual_seed(sampling_seed)  # Opacus' Poisson sampler draws from the global generator

    batches = _Batches(images, labels, groups, device, seed, slices_per_patient, augment, num_classes)
    one_per_group = all(len(m) == 1 for m in batches.members)
    # Opacus turns this into Poisson sampling of patients at rate 1 / len(loader) = poisson_sample_rate().
    loader = DataLoader(TensorDataset(torch.arange(len(batches.members))), batch_size=batch_size)
    model = model.to(device).train()
    engine = PrivacyEngine(accountant="rdp", secure_mode=csprng)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=_make_optimizer(model, optimizer, learning_rate=learning_rate, momentum=momentum),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
        noise_generator=None if csprng else torch.Generator(device=device).manual_seed(noise_seed),
    )
    if secure_mode:
        dp_optimizer.secure_mode = True  # Opacus' floating-point-safe Gaussian sampling
    slice_rng = np.random.default_rng(slice_seed)
    for _ in range(epochs):
        for (sampled,) in dp_loader:
            # Poisson sampling can draw no patient: Opacus still takes (and accounts) a noise-only step.
            picked = batches.pick(sampled, slice_rng)
            dp_optimizer.zero_grad()
            batches.backward(dp_model, picked)
            if not one_per_group:
                counts = torch.tensor([len(m) for m in picked], dtype=torch.long)
                segments = torch.repeat_interleave(torch.arange(len(picked)), counts)
                _mean_per_group(dp_model, segments.to(device), len(picked))
            dp_optimizer.step()
    # The accountant's own record of what was spent: (sigma, q, steps) exactly as Opacus ran it.
    ((sigma, sample_rate, steps),) = engine.accountant.history
    return TrainOutcome(
        loss=batches.total_loss / max(batches.total_seen, 1),
        num_examples=int(labels.shape[0]),
        event=DPEvent(noise_multiplier=float(sigma), sample_rate=float(sample_rate), steps=int(steps)),
    )


@dataclass(frozen=True)
class PlainOutcome:
    """What one round of non-private training did (fl-sim baselines only)."""

    loss: float
    num_examples: int
    steps: int


def train_plain(
    model: nn.Module, *, images: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int, learning_rate: float,
    device: torch.device, seed: int, groups: np.ndarray | None = None, slices_per_patient: int = 16,
    augment: AugmentConfig | None = None, num_classes: int = 2, optimizer: str = "sgd", momentum: float = 0.9,
    max_grad_norm: float | None = None,
) -> PlainOutcome:
    """Train ``model`` in place without DP: the non-private baseline of fl-sim's comparisons.

    Everything but the privacy mechanism matches :func:`train_dp`: optimiser, step size,
    ``ceil(P / batch_size)`` steps per epoch (a shuffled partition of the patients instead
    of Poisson draws), slices per patient and augmentation. No per-patient clipping, no
    noise, no accounting: no privacy guarantee. Sites in a federation never train this way.

    Parameters
    ----------
    model, images, labels, groups, epochs, learning_rate, device, slices_per_patient, augment, num_classes
        As for :func:`train_dp`.
    batch_size
        Patients per step.
    seed
        Seeds the patient shuffle, the choice of slices, augmentation and torch's global generator.
    optimizer, momentum
        The local optimiser, fresh every call: ``sgd`` with this momentum, or ``adam``.
    max_grad_norm
        Cap on the norm of each step's whole batch gradient (ordinary clipping, so step sizes tuned for DP
        do not blow up without it); None for no cap.
    """
    import torch

    batches = _Batches(images, labels, groups, device, seed, slices_per_patient, augment, num_classes)
    num_groups = len(batches.members)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = model.to(device).train()
    plain_optimizer = _make_optimizer(model, optimizer, learning_rate=learning_rate, momentum=momentum)
    steps = 0
    for _ in range(epochs):
        permutation = rng.permutation(num_groups)
        for start in range(0, num_groups, batch_size):
            plain_optimizer.zero_grad()
            batches.backward(model, batches.pick(permutation[start : start + batch_size], rng))
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            plain_optimizer.step()
            steps += 1
    return PlainOutcome(batches.total_loss / max(batches.total_seen, 1), int(labels.shape[0]), steps)
