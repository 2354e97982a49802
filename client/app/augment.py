"""Training-time augmentation on a batch, on the training device.

Flips, small rotations and shifts (one affine warp) and intensity jitter, each
drawn per image from a seeded generator. Each image's transform depends only on
that image and the generator, so DP-SGD's per-example clipping and the privacy
accounting are unchanged. Never applied at evaluation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from common.config import AugmentConfig

if TYPE_CHECKING:
    import torch


def augment_batch(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """An augmented copy of ``x`` (each image drawn on its own, clamped to ``[-1, 1]``); ``x`` if nothing is enabled.

    Parameters
    ----------
    x
        A batch of preprocessed images, ``(B, C, H, W)`` in ``[-1, 1]``, on the training device.
    config
        The run's augmentation: flip probability, maximum rotation (degrees), maximum shift (fraction
        of the image size) and maximum relative contrast/brightness jitter; all zero turns it off.
    generator
        The CPU generator every random draw comes from, seeded by the caller: same state, same batch.
    """
    import torch
    import torch.nn.functional as F

    if not config.enabled or x.shape[0] == 0:
        return x
    batch = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator) * (high - low) + low).to(x.device, x.dtype)

    out = x
    if config.flip > 0:
        flip = (torch.rand(batch, generator=generator) < config.flip).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if config.rotate > 0 or config.shift > 0:
        angle = uniform(-config.rotate, config.rotate) * (math.pi / 180.0)
        # affine_grid works in [-1, 1] coordinates: a shift of s × size is 2s.
        tx, ty = uniform(-config.shift, config.shift) * 2, uniform(-config.shift, config.shift) * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        # Pad with black (-1), the value of the letterbox padding and of air.
        out = F.grid_sample(out + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    if config.intensity > 0:
        contrast = 1.0 + uniform(-config.intensity, config.intensity)
        brightness = uniform(-config.intensity, config.intensity)
        out = out * contrast[:, None, None, None] + brightness[:, None, None, None]
    return out.clamp(-1.0, 1.0)
