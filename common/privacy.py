"""Differential-privacy accounting shared by sites and auditors.

All ε values come from Opacus accountants, run side by side on the same DP events: ``rdp``
(Rényi DP, a sound upper bound, usually loose by 5–15 %) and ``prv`` (privacy random
variables; ``get_epsilon`` returns the *upper* end of its error interval, so it is sound
too and usually tighter). Budget decisions use the smaller of the two (:func:`sound_epsilon`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

PRV_EPS_ERROR = 0.01
"""Width of PRV's ε error interval; ``get_epsilon`` returns its upper end."""


@dataclass(frozen=True)
class DPEvent:
    """One DP training round of a site: ``steps`` Poisson-sampled DP-SGD steps at rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def merge_events(events: Sequence[DPEvent]) -> list[tuple[float, float, int]]:
    """Opacus accountant history for ``events``: identical mechanisms merged into one entry.

    Composing ``k`` steps and then ``m`` more of the same subsampled Gaussian is
    exactly ``k + m`` steps of it, so merging changes no ε; it only keeps the
    PRV accountant fast (its cost grows with the number of distinct entries).
    """
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        key = (float(e.noise_multiplier), float(e.sample_rate))
        merged[key] = merged.get(key, 0) + int(e.steps)
    return [(sigma, q, steps) for (sigma, q), steps in merged.items() if steps > 0]


def epsilon_spent(*, events: Sequence[DPEvent], delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composition of ``events`` (every DP round ever trained on the data) by one Opacus accountant.

    Parameters
    ----------
    events, delta
        The DP events, and the target δ.
    accountant
        Opacus accountant name (``"rdp"`` or ``"prv"``).
    """
    history = merge_events(events)
    if not history:
        return 0.0
    return _accountant_epsilon(tuple(history), float(delta), accountant)


# Accounting is a pure function of numbers, and slow (PRV ~1 s, a calibration ~10 s). Under fl-client a
# ClientApp process answers one message, so this memo never outlives it; fl-sim's Ray actors serve many
# virtual sites with the same data shapes in one process. Exceptions are not cached.
@lru_cache(maxsize=4096)
def _accountant_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class Epsilons:
    """ε by each accountant, and the one budget decisions use."""

    rdp: float
    prv: float | None  # None when PRV cannot bound this history (reported, RDP is used)

    @property
    def sound(self) -> float:
        """The tighter of the two sound upper bounds."""
        return self.rdp if self.prv is None else min(self.rdp, self.prv)


def epsilons(*, events: Sequence[DPEvent], delta: float) -> Epsilons:
    """ε(δ) of ``events`` by RDP and by PRV, side by side."""
    rdp = epsilon_spent(events=events, delta=delta, accountant="rdp")
    try:
        prv = epsilon_spent(events=events, delta=delta, accountant="prv")
    except (ValueError, RuntimeError, OverflowError, FloatingPointError):
        prv = math.inf  # PRV's numerical domain can fail for extreme histories (huge ε); RDP still bounds it.
    return Epsilons(rdp=rdp, prv=prv if math.isfinite(prv) else None)


def sound_epsilon(*, events: Sequence[DPEvent], delta: float) -> float:
    """The ε budget decisions use: min(RDP, PRV), both sound upper bounds."""
    return epsilons(events=events, delta=delta).sound


def _smallest_sigma(spend, target: float, low: float, high: float, tolerance: float) -> float:  # type: ignore[no-untyped-def]
    """The smallest σ in [low, high] found with spend(σ) ≤ target, to within ``tolerance`` in ε or 0.5 % in σ.

    A bracket search (``high`` always fits, so the answer is sound whenever it stops). Each step tries where
    the line through the ends' (log σ, log ε) meets the target (ε(σ) is nearly a power law: two or three steps
    where bisection needs eight), kept 10 % inside the bracket; it bisects when an end's ε is unknown.
    """
    eps_high = spend(high)
    eps_low = math.inf
    while eps_high > target:
        low, high, eps_low = high, 2 * high, eps_high
        if high > 1e4:
            raise ValueError("no noise multiplier up to 1e4 fits the remaining budget")
        eps_high = spend(high)
    if low > 0 and math.isinf(eps_low):
        eps_low = spend(low)
    while target - eps_high > tolerance and high - low > 0.005 * high:
        mid = (low + high) / 2
        if low > 0 and math.isfinite(eps_low) and eps_low > target >= eps_high > 0:
            slope = (math.log(eps_high) - math.log(eps_low)) / (math.log(high) - math.log(low))
            # Aim a little below the target, so the new point tends to fit and become `high`.
            aim = math.log(max(target - tolerance / 2, eps_high))
            guess = math.exp(math.log(low) + (aim - math.log(eps_low)) / slope) if slope < 0 else mid
            margin = 0.1 * (high - low)
            mid = min(max(guess, low + margin), high - margin)
        eps_mid = spend(mid)
        if eps_mid <= target:
            high, eps_high = mid, eps_mid
        else:
            low, eps_low = mid, eps_mid
    return high


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, earlier: Sequence[DPEvent] = (),
    tolerance: float = 0.02,
) -> float:
    """Smallest noise multiplier σ (within ``tolerance`` in ε) such that ``earlier`` plus ``steps`` steps at
    ``sample_rate`` and σ spend at most ``target_epsilon`` by :func:`sound_epsilon`: never more.

    To keep PRV (slow) evaluations few, σ for RDP alone is found first (sound already), then lowered
    between 0.6× and 1× of itself while PRV stays within budget.

    Parameters
    ----------
    target_epsilon, delta
        The ε(δ) the whole composition, ``earlier`` included, must stay within (a site's ``max-epsilon``).
    sample_rate, steps
        Poisson sampling rate q (:func:`poisson_sample_rate`) and DP-SGD steps still to take at σ (all rounds).
    earlier
        DP events already spent on the same data, at any σ; empty for data never trained on.
    tolerance
        The search stops once ε is within this of ``target_epsilon`` (or σ is known to within 0.5 %).

    Raises
    ------
    ValueError
        When ``earlier`` alone already spends ``target_epsilon``, or no σ up to 10⁴ fits.
    """
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), tuple(earlier), float(tolerance))


@lru_cache(maxsize=1024)  # see _accountant_epsilon
def _calibrate(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, earlier: tuple[DPEvent, ...], tolerance: float
) -> float:
    if earlier and sound_epsilon(events=earlier, delta=delta) >= target_epsilon:
        raise ValueError("the earlier events already spend the whole budget")
    def spend_rdp(sigma: float) -> float:
        return epsilon_spent(events=[*earlier, DPEvent(sigma, sample_rate, steps)], delta=delta)

    # RDP can exceed the target however large σ is when RDP alone says the budget is gone.
    try:
        sigma_rdp = _smallest_sigma(spend_rdp, target_epsilon, 0.0, 10.0, tolerance)
    except ValueError:
        sigma_rdp = 1e4

    # Below sigma_rdp RDP alone is over budget (it decreases with σ), so there
    # min(RDP, PRV) ≤ target exactly when PRV ≤ target: only PRV needs evaluating.
    def spend(sigma: float) -> float:
        try:
            return epsilon_spent(events=[*earlier, DPEvent(sigma, sample_rate, steps)], delta=delta, accountant="prv")
        except (ValueError, RuntimeError, OverflowError, FloatingPointError):
            return math.inf

    low = 0.6 * sigma_rdp
    if spend(low) <= target_epsilon:
        return low  # PRV is far tighter here; 0.6× the RDP σ already fits
    return _smallest_sigma(spend, target_epsilon, low, sigma_rdp, tolerance)


def steps_per_epoch(*, num_examples: int, batch_size: int) -> int:
    """Optimizer steps per epoch under Opacus' Poisson sampling: ``ceil(n / batch_size)``."""
    return max(1, math.ceil(num_examples / batch_size))


def poisson_sample_rate(*, num_examples: int, batch_size: int) -> float:
    """The sample rate Opacus' ``DPDataLoader`` uses: ``1 / steps_per_epoch``."""
    return 1.0 / steps_per_epoch(num_examples=num_examples, batch_size=batch_size)
