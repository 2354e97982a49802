"""Training-time augmentation: per image, seeded, off by default, never at evaluation."""

from __future__ import annotations

import pytest
import torch

from client.app.augment import augment_batch
from common.config import AugmentConfig, RunConfig
from common.errors import ConfigError


def _batch() -> torch.Tensor:
    x = torch.full((6, 1, 16, 16), -1.0)
    x[:, :, 4:12, 2:6] = 1.0  # a bright bar left of centre
    return x


def test_off_by_default_returns_the_batch_unchanged() -> None:
    x = _batch()
    assert not RunConfig().augment.enabled
    assert augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0)) is x


def test_flip_mirrors_the_image() -> None:
    out = augment_batch(_batch(), AugmentConfig(flip=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, _batch().flip(-1))


def test_rotation_shift_and_intensity_stay_in_range_and_are_seeded() -> None:
    config = AugmentConfig(rotate=15, shift=0.1, intensity=0.2)
    a = augment_batch(_batch(), config, torch.Generator().manual_seed(1))
    b = augment_batch(_batch(), config, torch.Generator().manual_seed(1))
    c = augment_batch(_batch(), config, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, _batch())
    assert a.min() >= -1 and a.max() <= 1
    # Each image gets its own transform.
    assert not torch.equal(a[0], a[1])


def test_augmentation_changes_training_but_not_privacy() -> None:
    import numpy as np

    from client.app.training import train_dp
    from common.models import build_model

    images = np.random.default_rng(0).uniform(-1, 1, (64, 1, 32, 32)).astype(np.float32)
    labels = (np.arange(64) % 2).astype(np.int64)
    outcomes = []
    for augment in (AugmentConfig(), AugmentConfig(flip=0.5, rotate=10, shift=0.05, intensity=0.1)):
        torch.manual_seed(0)
        model = build_model("fedrad-cnn", image_size=32)
        outcome = train_dp(
            model, images=images, labels=labels, epochs=1, batch_size=16, learning_rate=0.01, max_grad_norm=1.0,
            noise_multiplier=1.0, device=torch.device("cpu"), secure_mode=False, seed=0, augment=augment,
        )
        outcomes.append((outcome, [p.detach().clone() for p in model.parameters()]))
    (plain, w_plain), (aug, w_aug) = outcomes
    assert plain.event == aug.event  # same (σ, q, steps): the accounting does not see augmentation
    assert any(not torch.equal(a, b) for a, b in zip(w_plain, w_aug, strict=True))


@pytest.mark.parametrize(("key", "value"), [("augment-flip", 1.5), ("augment-rotate", -1), ("augment-shift", "x")])
def test_bad_augmentation_values_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flower({key: value})
