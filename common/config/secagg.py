"""Secure aggregation (Flower's SecAgg+) settings, and the encoding sized from the model.

A site sends ``num-examples / max-weight × weights``, clipped to ±``clipping-range`` and
rounded to ``quantization-range`` levels; the coordinator adds the sites' integers modulo
:data:`MODULUS`. Both ranges default to 0, "auto": the launcher (fl-server, fl-sim) sizes
them once from the initial weights (:func:`sized_secagg`) and writes them into the run config,
so the ServerApp and every site use the same ones. An explicit value wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.config.values import fraction, positive_float, positive_int
from common.errors import ConfigError

if TYPE_CHECKING:
    import torch


CLIPPING_KEY, QUANTIZATION_KEY = "secagg-clipping-range", "secagg-quantization-range"
AUTO = 0  # either key: sized from the model by the launcher
MODULUS = 1 << 32  # Flower's modulus: every sum of the sites' integers must stay below it
BASE_CLIPPING = 8.0  # the smallest range; with BASE_LEVELS, a step of 2**-18 per weight
BASE_LEVELS = 1 << 22
MARGIN = 4  # the range is at least this many times the initial weights' largest magnitude
MAX_LEVELS = 1 << 24  # sums of up to ASSUMED_SITES sites stay below MODULUS
ASSUMED_SITES = MODULUS // MAX_LEVELS  # 256: the sites a run may have when the launcher cannot count them


def _power_of_two_at_least(x: float) -> int:
    power = 1
    while power < x:
        power <<= 1
    return power


def sized_secagg(
    run_config: Mapping[str, Any], *, largest_weight: Callable[[], float], sites: int | None = None
) -> dict[str, Any]:
    """The SecAgg+ encoding of a run: explicit values, else sized from the model.

    - ``secagg-clipping-range`` 0: the next power of two at or above
      ``4 × largest_weight()`` and at least 8, so the initial weights have 4× headroom;
    - ``secagg-quantization-range`` 0: a power of two at least ``2**22 × range / 8``, so
      a weight's rounding step (``2 × range / levels``) is no coarser than 2**-18 (that of
      range 8 with 2**22 levels), capped at 2**24 and at ``2**32 / sites`` so the sum of
      every site's integers stays below the 2**32 modulus.

    Parameters
    ----------
    run_config
        The run config (Flower's, or the launcher's overrides with the project's defaults).
    largest_weight
        The largest magnitude of the run's initial weights; called only when the clipping range is sized.
    sites
        How many sites may take part in a round; ``None`` when the launcher cannot tell (256 assumed).
    """
    clipping, levels = run_config.get(CLIPPING_KEY, AUTO), run_config.get(QUANTIZATION_KEY, AUTO)
    count = max(sites or ASSUMED_SITES, 1)
    cap = min(MAX_LEVELS, 1 << ((MODULUS // count).bit_length() - 1))
    if _is_auto(clipping):
        clipping = float(max(BASE_CLIPPING, _power_of_two_at_least(MARGIN * largest_weight())))
    clipping = positive_float(CLIPPING_KEY, clipping)
    if _is_auto(levels):
        levels = min(cap, _power_of_two_at_least(BASE_LEVELS * clipping / BASE_CLIPPING))
        return {CLIPPING_KEY: clipping, QUANTIZATION_KEY: levels}
    levels = positive_int(QUANTIZATION_KEY, levels)
    if levels & (levels - 1) or levels > cap:
        raise ConfigError(
            f"Expected `{QUANTIZATION_KEY}` to be a power of 2 up to 2**{cap.bit_length() - 1} (sums of up to "
            f"{count} sites stay below the 2**32 modulus), but got {levels!r}; or 0 to size it from the clipping range"
        )
    return {CLIPPING_KEY: clipping, QUANTIZATION_KEY: levels}


def _is_auto(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value == AUTO


def largest_magnitude(weights: Iterable[torch.Tensor]) -> float:
    """The largest ``|w|`` over every weight of a model (0 for none)."""
    return max((float(t.abs().max()) for t in weights if t.numel()), default=0.0)


def check_model_fits(state: Mapping[str, torch.Tensor], secagg: SecAggConfig) -> None:
    """Refuse a clipping range that leaves the model's initial weights ``state`` less than 2× headroom.

    Sites refuse to mask weights outside ±``secagg-clipping-range``; a range that
    starts tight would make them drop out after a few rounds of training.
    """
    largest = largest_magnitude(state.values())
    if largest * 2 > secagg.clipping_range:
        raise ConfigError(
            f"Expected `secagg-clipping-range` to be at least twice the model's largest weight "
            f"({largest:.3g}), but got {secagg.clipping_range:g}"
        )


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+) settings from the run config.

    ``shares`` and ``threshold`` are fractions: of the sites sampled in a round, and of
    the shares (Flower rounds them; at least 2 shares are needed to reconstruct). A run
    config whose encoding was never sized gets that of weights within ±2: range 8, 2**22 levels.
    """

    enabled: bool = True
    shares: float = 1.0
    threshold: float = 0.6
    timeout: float = 600.0  # seconds per protocol stage; the stage that trains included
    max_weight: int = 10_000
    clipping_range: float = BASE_CLIPPING
    quantization_range: int = BASE_LEVELS
    modulus_range: int = MODULUS

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> SecAggConfig:
        """Build and validate from Flower's ``context.run_config`` (keys ``secagg*``)."""
        d = cls()
        enabled = run_config.get("secagg", d.enabled)
        if not isinstance(enabled, bool):
            raise ConfigError(f"Expected `secagg` to be true or false, but got {enabled!r}")
        encoding = sized_secagg(run_config, largest_weight=lambda: 0.0)
        return cls(
            enabled=enabled,
            shares=fraction("secagg-shares", run_config.get("secagg-shares", d.shares)),
            threshold=fraction("secagg-threshold", run_config.get("secagg-threshold", d.threshold)),
            timeout=positive_float("secagg-timeout", run_config.get("secagg-timeout", d.timeout)),
            max_weight=positive_int("secagg-max-weight", run_config.get("secagg-max-weight", d.max_weight)),
            clipping_range=encoding[CLIPPING_KEY],
            quantization_range=encoding[QUANTIZATION_KEY],
        )

    def tolerance(self, *, sites: int, total_examples: int) -> float:
        """Largest per-weight difference between the secure aggregate and plaintext FedAvg.

        Each site's stochastic rounding errs by less than one step, ``2 · clipping-range / quantization-range``,
        on its weighted update; the sum divided by the total weight gives this bound, plus float32 rounding.
        """
        step = 2 * self.clipping_range / self.quantization_range
        return sites * step * self.max_weight / max(total_examples, 1) + 1e-6
