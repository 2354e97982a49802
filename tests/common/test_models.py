from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from common.models import MODELS, build_model, num_outputs

# Logits per task, as the registry's docstring defines them: one for binary, else one per class.
LOGITS = {2: 1, 3: 3, 5: 5}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_opacus_compatible(name: str) -> None:
    model = build_model(name, image_size=32)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_gradients_are_each_images_own(name: str) -> None:
    """What DP-SGD needs of a model: Opacus' per-sample gradient of every trainable tensor is the
    gradient of that image alone (a layer that mixed the batch, like BatchNorm, would break it)."""
    model = build_model(name, image_size=32, num_classes=3, seed=0)
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    wrapped = GradSampleModule(model, loss_reduction="sum")  # the loss below is a sum over images
    wrapped(images).square().sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    per_sample = {n: p.grad_sample.clone() for n, p in trainable}  # type: ignore[union-attr]
    wrapped._close()
    for index in range(images.shape[0]):
        model.zero_grad()
        model(images[index : index + 1]).square().sum().backward()
        for n, p in trainable:
            assert p.grad is not None
            torch.testing.assert_close(per_sample[n][index], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_num_outputs() -> None:
    assert {k: num_outputs(k) for k in LOGITS} == LOGITS


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", sorted(LOGITS))
def test_one_logit_per_image_and_class_at_every_size(
    name: str, in_channels: int, num_classes: int
) -> None:
    for size in (32, 48, 64):
        model = build_model(name, in_channels=in_channels, image_size=size, num_classes=num_classes)
        out = model(torch.rand(3, in_channels, size, size))
        assert out.shape == (3, LOGITS[num_classes]), (size, out.shape)
        assert torch.isfinite(out).all()


def test_seed_makes_initial_weights_reproducible() -> None:
    a = build_model("fedrad-cnn", seed=1).state_dict()
    b = build_model("fedrad-cnn", seed=1).state_dict()
    c = build_model("fedrad-cnn", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_seeded_build_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model("fedrad-cnn", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        build_model("nope")


@pytest.mark.parametrize("num_classes", sorted(LOGITS))
def test_fixed_filter_bank_never_travels_with_the_weights(num_classes: int) -> None:
    """Only the trainable head is sent (and clipped, noised, averaged): Conv3x3(8→16) with bias
    and Linear(16→logits), as the model's docstring declares; the 8 fixed filters are rebuilt
    from code at both ends, so the weights that travel are enough to reproduce the model."""
    model = build_model("fedrad-cnn", num_classes=num_classes, seed=0)
    state = model.state_dict()
    params = dict(model.named_parameters())
    assert set(state) == set(params)  # what travels is exactly what trains
    assert all(p.requires_grad for p in params.values())
    assert all(not k.startswith("0.") for k in state)  # rebuilt from code, not sent
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    assert [type(m) for m in owners] == [nn.Conv2d, nn.Linear]
    conv, head = owners
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 16, (3, 3))
    assert (head.in_features, head.out_features) == (16, LOGITS[num_classes])
    assert conv.bias is not None and head.bias is not None
    declared = (8 * 3 * 3 + 1) * 16 + (16 + 1) * LOGITS[num_classes]  # weights + biases per output
    assert sum(t.numel() for t in state.values()) == declared

    # The filter bank is a buffer: fixed, not trained, and the same in every build.
    bank = model[0]  # type: ignore[index]
    assert not list(bank.parameters()) and list(bank.buffers())
    receiver = build_model("fedrad-cnn", num_classes=num_classes, seed=1)
    assert not torch.equal(receiver(torch.ones(1, 1, 32, 32)), model(torch.ones(1, 1, 32, 32)))
    receiver.load_state_dict(state)
    images = torch.rand(4, 1, 40, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(receiver(images), model(images), rtol=0, atol=0)


def test_fedrad_cnn_head_starts_from_the_filter_responses() -> None:
    """The first 8 conv channels start as the identity on the 8 fixed filters, whatever the seed."""
    for seed in (0, 1):
        conv = build_model("fedrad-cnn", seed=seed)[2]  # type: ignore[index]
        identity = torch.zeros(8, 8, 3, 3)
        identity[range(8), range(8), 1, 1] = 1.0
        assert torch.equal(conv.weight[:8].detach(), identity)
        assert torch.equal(conv.bias[:8].detach(), torch.zeros(8))
        assert conv.weight[8:].abs().sum() > 0  # the other 8 are random
