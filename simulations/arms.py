"""The arms of ``fl-sim compare`` and their result records."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from common.metrics import SENSITIVITY_AT_THRESHOLD, SPECIFICITY_AT_THRESHOLD, THRESHOLD
from simulations.scenario import Scenario

ARMS = ("pooled", "local", "fedavg", "fedavg-dp", "public-pretrain")
DP_ARMS = ("fedavg-dp", "public-pretrain")
PUBLIC_SITES = ("public-1", "public-2")
"""The "public" dataset of the public-pretrain arm: fl-synth hospitals whose scanner profiles
(derived from these names) differ from the scenario's, with their own seed; no patient in common."""
METRICS = ("auroc", "sensitivity", "specificity")
OPERATING_POINT = (THRESHOLD, SENSITIVITY_AT_THRESHOLD, SPECIFICITY_AT_THRESHOLD)
"""The operating point chosen on pooled validation (run config ``operating-point``), beside 0.5."""


@dataclass(frozen=True)
class Draw:
    """One training of a DP arm: its final pooled metrics and pooled AUROC per round."""

    pooled: dict[str, float]
    sites: dict[str, dict[str, float]]
    auroc_per_round: list[float | None]
    seconds: float
    run_dir: str


@dataclass(frozen=True)
class ArmResult:
    arm: str
    label: str
    pooled: dict[str, float]
    """Final pooled metrics; for an arm of several draws, the draw with the median AUROC."""
    sites: dict[str, dict[str, float]]
    seconds: float
    run_dir: str = ""
    epsilon: float | None = None
    draws: tuple[Draw, ...] = ()
    """Every draw of a DP arm (one entry per independent noise draw); empty for the others."""
    curve: tuple[float | None, ...] = ()
    """Pooled AUROC per round of a federated arm without draws (FedAvg); empty for the baselines."""

    def spread(self, metric: str) -> dict[str, float | None]:
        """Median, minimum and maximum of ``metric`` over the draws (or the single result)."""
        values = [d.pooled.get(metric) for d in self.draws] if self.draws else [self.pooled.get(metric)]
        finite = sorted(float(v) for v in values if v is not None and np.isfinite(v))
        if not finite:
            return {"median": None, "min": None, "max": None}
        return {"median": float(np.median(finite)), "min": finite[0], "max": finite[-1]}

    def worst(self) -> Draw | None:
        """The draw with the lowest final pooled AUROC."""
        scored = [d for d in self.draws if d.pooled.get("auroc") is not None and np.isfinite(d.pooled["auroc"])]
        return min(scored, key=lambda d: d.pooled["auroc"]) if scored else None


def fmt(v: float | None) -> str:
    """``v`` to three decimals; a dash for a missing or non-finite value."""
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def public_scenario(sc: Scenario) -> Scenario:
    """The public dataset: :data:`PUBLIC_SITES` with the scenario's first site's size, another seed."""
    sites = replace(
        sc.sites, source="synth", count=len(PUBLIC_SITES), names=PUBLIC_SITES, images=(sc.sites.images_per_site()[0],),
        prevalence=(), scanners=(), alpha=0.0, folder="", sizes=(), seed=sc.sites.seed + 1000,
    )
    return replace(sc, name=f"{sc.name}-public", sites=sites)
