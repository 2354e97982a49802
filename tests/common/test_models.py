from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from common.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_opacus_compatible(name: str) -> None:
    model = build_model(name, image_size=32)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("size", [32, 64])
def test_default_model_gives_one_logit_per_image(size: int) -> None:
    model = build_model("fedrad-cnn", image_size=size)
    assert model(torch.zeros(3, 1, size, size)).shape == (3, 1)


def test_seed_makes_initial_weights_reproducible() -> None:
    a = build_model("fedrad-cnn", seed=1).state_dict()
    b = build_model("fedrad-cnn", seed=1).state_dict()
    c = build_model("fedrad-cnn", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        build_model("nope")


def test_fixed_filter_bank_never_travels_with_the_weights() -> None:
    model = build_model("fedrad-cnn", seed=0)
    assert all(not k.startswith("0.") for k in model.state_dict())  # rebuilt from code, not sent
    assert sum(p.numel() for p in model.parameters()) == 1185
