"""How a DICOM file becomes model inputs (the site's cache key) and training-time augmentation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config.values import as_number, choice
from common.errors import ConfigError

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # name: (center, width) in Hounsfield units
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "bone": (600.0, 2800.0),
    "lung": (-600.0, 1500.0),
    "soft-tissue": (50.0, 400.0),
}

# `voi` uses each file's own VOI LUT or window (any modality); the presets need CT (HU).
WINDOWS = (*WINDOW_PRESETS, "voi")
MULTIFRAME = ("slices", "reject")  # frames as separate images, or reject the file
COLOR = ("reject", "grey")  # reject RGB/YBR/palette images, or convert them to luminance
ENHANCE = ("none", "equalize", "denoise")  # optional step after windowing


@dataclass(frozen=True)
class PreprocessConfig:
    """How a DICOM file becomes model inputs; part of the site's cache key."""

    image_size: int = 64
    window: str = "brain"
    multiframe: str = "slices"
    color: str = "reject"
    enhance: str = "none"

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size > 1024:
            raise ConfigError(f"Expected `image-size` to be an integer in [16, 1024], but got {self.image_size!r}")
        choice("window", self.window, WINDOWS)
        choice("multiframe", self.multiframe, MULTIFRAME)
        choice("color", self.color, COLOR)
        choice("enhance", self.enhance, ENHANCE)

    def key(self) -> str:
        """Stable text form, hashed into cache keys."""
        return (
            f"v2|size={self.image_size}|window={self.window}|multiframe={self.multiframe}"
            f"|color={self.color}|enhance={self.enhance}"
        )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> PreprocessConfig:
        """Build from the preprocessing keys of a run config (defaults for missing keys)."""
        d = cls()
        image_size = run_config.get("image-size", d.image_size)
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise ConfigError(f"Expected `image-size` to be an integer, but got {image_size!r}")
        return cls(
            image_size=image_size,
            window=choice("window", run_config.get("window", d.window), WINDOWS),
            multiframe=choice("multiframe", run_config.get("multiframe", d.multiframe), MULTIFRAME),
            color=choice("color", run_config.get("color", d.color), COLOR),
            enhance=choice("enhance", run_config.get("enhance", d.enhance), ENHANCE),
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; all zero (the default) means none. Never used for evaluation."""

    flip: float = 0.0  # probability of a left-right flip
    rotate: float = 0.0  # maximum rotation, degrees (uniform in ±rotate)
    shift: float = 0.0  # maximum translation, fraction of the image size
    intensity: float = 0.0  # maximum relative contrast/brightness jitter

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is on."""
        return any((self.flip, self.rotate, self.shift, self.intensity))

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> AugmentConfig:
        """Build from the ``augment-*`` keys of a run config (defaults for missing keys)."""

        def bounded(key: str, default: float, high: float) -> float:
            value = run_config.get(key, default)
            number = as_number(value)
            if not 0 <= number <= high:
                raise ConfigError(f"Expected `{key}` to be a number in [0, {high:g}], but got {value!r}")
            return number

        d = cls()
        return cls(
            flip=bounded("augment-flip", d.flip, 1.0),
            rotate=bounded("augment-rotate", d.rotate, 180.0),
            shift=bounded("augment-shift", d.shift, 0.5),
            intensity=bounded("augment-intensity", d.intensity, 1.0),
        )
