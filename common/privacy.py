"""Differential-privacy accounting shared by sites and auditors.

All ε values come from Opacus accountants; nothing here re-derives a formula.
A site's accounting history — one ``(noise_multiplier, sample_rate, steps)``
entry per DP training round — is kept on disk in the site's work directory,
because Flower starts a fresh ClientApp process for every message: an
in-memory accountant would only ever see one round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import DataError
from common.files import write_atomic

ACCOUNTANT = "rdp"
"""Accountant used for calibration and budget decisions (sound upper bound)."""


@dataclass(frozen=True)
class DPEvent:
    """One DP training round of a site: Poisson-sampled DP-SGD steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon_spent(*, events: Sequence[DPEvent], delta: float, accountant: str = ACCOUNTANT) -> float:
    """ε(δ) of the composition of ``events`` according to an Opacus accountant.

    Parameters
    ----------
    events
        Every DP round ever trained on the data, in order.
    delta
        Target δ.
    accountant
        Opacus accountant name (``"rdp"``, ``"prv"``, ``"gdp"``).
    """
    from opacus.accountants import create_accountant

    if not events:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = ACCOUNTANT
) -> float:
    """Noise multiplier σ such that ``steps`` DP-SGD steps at ``sample_rate`` spend ≤ ``target_epsilon``.

    Uses Opacus ``get_noise_multiplier`` (binary search on the accountant).
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def steps_per_epoch(*, num_examples: int, batch_size: int) -> int:
    """Optimizer steps per epoch under Opacus' Poisson sampling: ``ceil(n / batch_size)``."""
    return max(1, math.ceil(num_examples / batch_size))


def poisson_sample_rate(*, num_examples: int, batch_size: int) -> float:
    """The sample rate Opacus' ``DPDataLoader`` uses: ``1 / steps_per_epoch``."""
    return 1.0 / steps_per_epoch(num_examples=num_examples, batch_size=batch_size)


@dataclass
class AccountantStore:
    """The site's DP history for one run, persisted atomically as JSON.

    One file per run in ``<work-dir>/privacy/``; the round number is stored
    with each event so a retried message never counts a round twice.
    """

    path: Path

    @classmethod
    def for_run(cls, work_dir: Path, run_id: int | str) -> AccountantStore:
        return cls(Path(work_dir) / "privacy" / f"run-{run_id}.json")

    def load(self) -> dict[int, DPEvent]:
        """Events by server round; empty when nothing was trained yet."""
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {int(r): DPEvent(**e) for r, e in raw["events"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"The privacy accounting file {self.path} is unreadable ({exc}); "
                "restore it from backup — training without it would under-count ε"
            ) from exc

    def record(self, server_round: int, event: DPEvent, *, delta: float) -> float:
        """Add ``event`` for ``server_round`` and return the cumulative ε."""
        events = self.load()
        events[server_round] = event
        eps = epsilon_spent(events=[events[r] for r in sorted(events)], delta=delta)
        payload = {
            "accountant": ACCOUNTANT,
            "delta": delta,
            "epsilon": eps,
            "events": {str(r): asdict(e) for r, e in sorted(events.items())},
        }
        write_atomic(self.path, json.dumps(payload, indent=1))
        return eps
