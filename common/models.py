"""The shared model registry.

Every model must be Opacus-compatible (no BatchNorm: GroupNorm instead); the tests check that
``ModuleValidator`` finds nothing to fix in each. Add one with::

    @register_model("my-net")
    def my_net(*, in_channels: int = 1, image_size: int = 64, num_outputs: int = 1) -> nn.Module: ...

``num_outputs`` is 1 for a binary task (one logit), else one logit per class.
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


def num_outputs(num_classes: int) -> int:
    """Logits a model needs for ``num_classes`` classes: 1 for binary, else one per class."""
    return 1 if num_classes == 2 else num_classes


def build_model(
    name: str, *, in_channels: int = 1, image_size: int = 64, num_classes: int = 2, seed: int | None = None
) -> nn.Module:
    """Instantiate a registered model; ``seed`` makes the initial weights reproducible.

    Parameters
    ----------
    name
        Registered model name (see :data:`MODELS`).
    in_channels, image_size
        Image channels (1 for CT/greyscale), and the side of the square input image in pixels.
    num_classes, seed
        Classes of the task (2 = binary, one logit), and if given the seed of the initial weights.
    """
    import torch

    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    kwargs = {"in_channels": in_channels, "image_size": image_size, "num_outputs": num_outputs(num_classes)}
    if seed is None:
        return MODELS[name](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](**kwargs)


def _conv_block(cin: int, cout: int) -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(num_groups=min(8, cout), num_channels=cout),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


def _filter_bank() -> nn.Module:
    """A fixed bank of 8 filters: smoothing, 3 blob (difference-of-Gaussians) scales, x/y edges at 2 scales.

    Fixed features make DP-SGD far more effective on small data: fewer trainable parameters, less
    total noise (Tramèr & Boneh, ICLR 2021). A non-persistent buffer, built from code at both ends and
    never trained, sent or averaged, so no site can alter them for the others.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _FilterBank(nn.Module):
        def __init__(self, size: int = 9) -> None:
            super().__init__()
            ax = torch.arange(size, dtype=torch.float32) - size // 2
            yy, xx = torch.meshgrid(ax, ax, indexing="ij")

            def gauss(sigma: float) -> torch.Tensor:
                k = torch.exp(-(xx**2 + yy**2) / (2 * sigma * sigma))
                return k / k.sum()

            kernels = [gauss(0.7)]
            kernels += [4.0 * (gauss(a) - gauss(b)) for a, b in ((1.0, 2.0), (1.5, 3.0), (2.5, 4.0))]
            for sigma in (1.0, 2.0):
                gx, gy = -xx * gauss(sigma), -yy * gauss(sigma)
                kernels += [2.0 * gx / gx.abs().sum(), 2.0 * gy / gy.abs().sum()]
            self.register_buffer("weight", torch.stack(kernels)[:, None], persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.weight.repeat(1, x.shape[1], 1, 1) / x.shape[1]
            return F.conv2d(x, weight, padding=self.weight.shape[-1] // 2)

    return _FilterBank()


@register_model("fedrad-cnn")
def _fedrad_cnn(*, in_channels: int = 1, image_size: int = 64, num_outputs: int = 1) -> nn.Module:
    """Default model: fixed filter bank + a small trainable CNN with a max-pooled head.

    FilterBank(8) → MaxPool2 → Conv3x3(8→16) → ReLU → global max pool → Linear(16→num_outputs);
    1,185 trainable parameters for one logit. "Is there a lesion anywhere" is a max over
    locations, and so few parameters keep the total DP noise small; per-sample
    gradients are cheap, so DP training runs at hundreds of images/s on one
    CPU core. The first 8 conv channels start as the identity on the bank (the
    head starts from the fixed blob/edge responses); the other 8 are random.
    """
    import torch
    from torch import nn

    del in_channels, image_size  # the bank averages input channels; pooling is size-agnostic
    conv = nn.Conv2d(8, 16, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight[:8].zero_()
        conv.bias[:8].zero_()
        for i in range(8):
            conv.weight[i, i, 1, 1] = 1.0
    return nn.Sequential(
        _filter_bank(),
        nn.MaxPool2d(2),
        conv,
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_outputs),
    )


@register_model("plain-cnn")
def _plain_cnn(*, in_channels: int = 1, image_size: int = 64, num_outputs: int = 1) -> nn.Module:
    """A conventional small CNN (Conv3x3 + GroupNorm + ReLU + MaxPool ×3, 16/32/64
    channels, global average pooling for any size of 8 or more, linear head; ~23k parameters).

    Kept for comparison: it needs several non-private epochs to find small
    lesions and learns little under DP-SGD at ε ≤ 8 on a few hundred images.
    """
    from torch import nn

    del image_size
    return nn.Sequential(
        _conv_block(in_channels, 16),
        _conv_block(16, 32),
        _conv_block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_outputs),
    )
