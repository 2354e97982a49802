"""The shared model registry.

Every model here must be Opacus-compatible: no BatchNorm (GroupNorm instead),
no layers Opacus cannot compute per-sample gradients for. ``ModuleValidator``
must find nothing to fix; the tests check every registered model.

Add a model with::

    @register_model("my-net")
    def my_net(*, in_channels: int = 1, image_size: int = 64) -> nn.Module: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ModelFactory = Callable[..., "nn.Module"]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory`` under ``name`` so run configs can pick it."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return decorator


def build_model(name: str, *, in_channels: int = 1, image_size: int = 64, seed: int | None = None) -> nn.Module:
    """Instantiate a registered model; ``seed`` makes the initial weights reproducible.

    Parameters
    ----------
    name
        Registered model name (see :data:`MODELS`).
    in_channels
        Image channels (1 for CT/greyscale).
    image_size
        Side of the square input image in pixels.
    seed
        If given, the weights are initialised from this seed.
    """
    import torch

    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    if seed is None:
        return MODELS[name](in_channels=in_channels, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](in_channels=in_channels, image_size=image_size)


def _conv_block(cin: int, cout: int) -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(num_groups=min(8, cout), num_channels=cout),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


@register_model("fedrad-cnn")
def fedrad_cnn(*, in_channels: int = 1, image_size: int = 64) -> nn.Module:
    """Small CNN for binary slice classification (one logit out).

    Three Conv3x3 + GroupNorm + ReLU + MaxPool blocks (16/32/64 channels), global
    average pooling, a linear head. ~24k parameters: small enough that DP noise
    stays tolerable, large enough for lesion detection at 64x64.
    """
    from torch import nn

    del image_size  # global pooling makes the net size-agnostic
    return nn.Sequential(
        _conv_block(in_channels, 16),
        _conv_block(16, 32),
        _conv_block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 1),
    )
