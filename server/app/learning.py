"""Is the run learning? The coordinator's check of the pooled validation AUROC, round by round.

If a model ranked the validation images at random, the AUROC of its ``P``
positives and ``N`` negatives (Mann–Whitney ``U / (P N)``) would have mean 0.5
and standard error ``sqrt((P + N + 1) / (12 P N))`` (Hanley & McNeil 1982,
continuous scores). A pooled AUROC within ``z`` of those standard errors of 0.5
cannot be told from chance; small validation sets get a wide band.

- **not learning**: none of the last ``window`` evaluated rounds lies above the
  band (they sit within it, or wander between it and below it);
- **below chance**: they all lie below it (scores ranked the wrong way round,
  e.g. swapped labels): a separate, softer flag;
- **learning**: the latest round lies above it; **unclear** otherwise.

Pure functions over the report's round entries (:mod:`server.app.report`): the
verdict of a round depends on the rounds up to it only, so a resumed run reaches
the same verdicts. Binary tasks only (multi-class pooled metrics carry no
positive/negative counts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

WINDOW = 3  # evaluated rounds that must all sit in (or below) the band before the run is flagged
Z = 2.0  # half-width of the chance band, in null standard errors
NOISY_SIGMA = 1.0  # a noise multiplier at least this makes "too few patients for the site's ε" the first suspect
SMALL_BAND = 0.1  # a band at least this wide (±) makes the validation set itself a suspect

LEARNING = "learning"
UNCLEAR = "unclear"
NOT_LEARNING = "not-learning"
BELOW_CHANCE = "below-chance"
FLAGGED = (NOT_LEARNING, BELOW_CHANCE)


def null_se(positives: int, negatives: int) -> float:
    """Standard error of the AUROC of a random ranking of ``positives`` and ``negatives`` examples."""
    if positives < 1 or negatives < 1:
        raise ValueError(f"Expected at least one positive and one negative, but got {positives} and {negatives}")
    return math.sqrt((positives + negatives + 1) / (12 * positives * negatives))


@dataclass(frozen=True)
class RoundAuroc:
    """One evaluated round: its pooled AUROC and the pooled validation counts behind it."""

    round: int
    auroc: float
    positives: int
    negatives: int

    def band(self, z: float = Z) -> float:
        """Half-width of this round's chance band, ``z`` null standard errors."""
        return z * null_se(self.positives, self.negatives)


@dataclass(frozen=True)
class Verdict:
    """What the latest evaluated round says about the run."""

    status: str
    round: int
    rounds: tuple[int, ...]  # the rounds judged (the last ``window`` evaluated ones, or fewer early on)
    auroc: float  # the latest round's pooled AUROC
    low: float  # lowest and highest pooled AUROC over ``rounds``
    high: float
    band: float  # widest chance band (±) over ``rounds``
    causes: tuple[str, ...] = field(default=())

    @property
    def flagged(self) -> bool:
        """Whether the status is a flag (``not-learning`` or ``below-chance``) that the report warns about."""
        return self.status in FLAGGED

    @property
    def message(self) -> str:
        """One line for the log and the report."""
        r, n = self.round, len(self.rounds)
        spread = f"{self.low:.2f}–{self.high:.2f}, ±{self.band:.2f}"
        likely = f" Likely causes: {'; '.join(self.causes)}." if self.causes else ""
        if self.status == NOT_LEARNING:
            return (f"Round {r}: pooled AUROC has not risen above chance ({spread} around 0.5) for {n} rounds: "
                    f"the model is not learning.{likely}")
        if self.status == BELOW_CHANCE:
            return (f"Round {r}: pooled AUROC has stayed below chance ({spread} around 0.5) for {n} rounds: "
                    f"the model may rank cases the wrong way round.{likely}")
        if self.status == LEARNING:
            return f"Round {r}: pooled AUROC {self.auroc:.2f} is above chance (0.5 ± {self.band:.2f}): the run is learning."
        return f"Round {r}: pooled AUROC {self.auroc:.2f} cannot be told from chance yet (0.5 ± {self.band:.2f})."

    def to_json(self) -> dict[str, Any]:
        """The verdict as the report's ``learning`` entry of a round (``causes`` only inside ``message``)."""
        return {"status": self.status, "round": self.round, "rounds": list(self.rounds), "auroc": self.auroc,
                "low": self.low, "high": self.high, "band": self.band, "message": self.message}


def assess(history: Sequence[RoundAuroc], *, window: int = WINDOW, z: float = Z) -> Verdict | None:
    """The verdict on the latest round of ``history``; ``None`` when it is empty.

    Parameters
    ----------
    history
        The evaluated rounds with a finite pooled AUROC, oldest first.
    window
        How many of the latest rounds must all sit within (or below) the band to flag the run.
    z
        Half-width of the chance band in null standard errors (:func:`null_se`).
    """
    if window < 1:
        raise ValueError(f"Expected `window` to be at least 1, but got {window}")
    if not history:
        return None
    judged = list(history[-window:])
    bands = [h.band(z) for h in judged]
    latest = judged[-1]
    status = UNCLEAR
    if latest.auroc > 0.5 + bands[-1]:
        status = LEARNING
    elif len(judged) == window and all(h.auroc < 0.5 - b for h, b in zip(judged, bands, strict=True)):
        status = BELOW_CHANCE
    elif len(judged) == window and all(h.auroc <= 0.5 + b for h, b in zip(judged, bands, strict=True)):
        # No round rose above chance; rounds that dip below it (0.45, 0.53, 0.45) are still not learning.
        status = NOT_LEARNING
    aurocs = [h.auroc for h in judged]
    return Verdict(status=status, round=latest.round, rounds=tuple(h.round for h in judged), auroc=latest.auroc,
                   low=min(aurocs), high=max(aurocs), band=max(bands))


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number; ``None`` for JSON null, NaN, Inf, bools and the rest."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def history(rounds: Mapping[int, Mapping[str, Any]], *, upto: int | None = None) -> list[RoundAuroc]:
    """The report's evaluated rounds (up to ``upto``) with a finite pooled AUROC and both classes present."""
    out = []
    for r in sorted(rounds):
        if upto is not None and r > upto:
            break
        pooled = rounds[r].get("evaluate", {}).get("pooled", {})
        auroc, pos, neg = (finite_number(pooled.get(k)) for k in ("auroc", "positives", "negatives"))
        if auroc is not None and pos and neg:
            out.append(RoundAuroc(round=r, auroc=auroc, positives=int(pos), negatives=int(neg)))
    return out


def _noisiest(rounds: Mapping[int, Mapping[str, Any]], upto: int) -> tuple[str, Mapping[str, Any]] | None:
    """The site with the largest noise multiplier in the latest trained round up to ``upto``."""
    for r in sorted((r for r in rounds if r <= upto), reverse=True):
        sites = rounds[r].get("train", {}).get("sites") or {}
        if sites:
            noisy = [(n, m) for n, m in sites.items() if (finite_number(m.get("noise-multiplier")) or 0) > 0]
            return max(noisy, key=lambda item: (item[1]["noise-multiplier"], item[0])) if noisy else None
    return None


def _dp_causes(site: tuple[str, Mapping[str, Any]] | None, config: Mapping[str, Any]) -> list[str]:
    """Noise and learning rate, in the order the noisiest site's σ makes likely."""
    lr = config.get("learning-rate", "?")
    if site is None:
        return [f"a learning rate too high or too low for this model (learning-rate={lr}; no site adds DP noise)"]
    name, m = site
    sigma = float(m["noise-multiplier"])
    rate, batch = finite_number(m.get("sample-rate")), finite_number(config.get("batch-size"))
    facts = [f"noise multiplier σ={sigma:.2f}"]
    if rate:
        facts.append(f"sample rate {rate:.3g}" + (f", about {round(batch / rate)} patients" if batch else ""))
    if m.get("steps") is not None:
        facts.append(f"{m['steps']} steps per round")
    few = f"too few patients per site for its ε (site {name}: {', '.join(facts)})"
    noise = f"; noise ≈ σ/batch-size = {sigma / batch:.2g} × max-grad-norm on each step's mean gradient" if batch else ""
    high_lr = f"a learning rate too high for the noise (learning-rate={lr}{noise})"
    return [few, high_lr] if sigma >= NOISY_SIGMA else [high_lr, few]


def _inverted_sites(rounds: Mapping[int, Mapping[str, Any]], upto: int, z: float) -> list[str]:
    """Sites whose own AUROC, in round ``upto``, lies significantly below chance."""
    sites = rounds.get(upto, {}).get("evaluate", {}).get("sites") or {}
    out = []
    for name, m in sorted(sites.items()):
        auroc, pos, neg = (finite_number((m or {}).get(k)) for k in ("auroc", "positives", "negatives"))
        if auroc is not None and pos and neg and auroc < 0.5 - z * null_se(int(pos), int(neg)):
            out.append(f"{name} ({auroc:.2f})")
    return out


def _likely_causes(verdict: Verdict, rounds: Mapping[int, Mapping[str, Any]], config: Mapping[str, Any], *,
                  z: float = Z) -> tuple[str, ...]:
    """One sentence per likely cause of a flagged ``verdict``, most likely first (none when not flagged).

    Facts used: the noisiest site's noise multiplier, sample rate and steps in the latest trained round, the
    run ``config``'s ``batch-size``, ``learning-rate``, ``classes`` and ``window`` (missing: ``?`` or their
    defaults), the pooled validation counts and the sites' own AUROCs (below chance by ``z`` null SEs).
    """
    if not verdict.flagged:
        return ()
    latest = rounds.get(verdict.round, {}).get("evaluate", {}).get("pooled", {})
    pos, neg = int(latest.get("positives") or 0), int(latest.get("negatives") or 0)
    lr = config.get("learning-rate", "?")
    if verdict.status == BELOW_CHANCE:
        inverted = _inverted_sites(rounds, verdict.round, z)
        where = f"; sites below chance on their own: {', '.join(inverted)}" if inverted else ""
        return (
            f"labels swapped at one or more sites (classes={config.get('classes', '0,1')!r}: the second is the "
            f"positive class; check each site's labels.csv{where})",
            f"an unstable optimisation (learning-rate={lr})",
        )
    causes = _dp_causes(_noisiest(rounds, verdict.round), config)
    if verdict.band >= SMALL_BAND:
        causes.append(f"a validation set too small to see learning ({pos} positives, {neg} negatives: "
                      f"±{verdict.band:.2f} around 0.5 is noise; raise val-fraction or add sites)")
    causes.append(f"labels that do not match the images, or a window that hides the finding "
                  f"(window={config.get('window', 'brain')!r}; check labels.csv and the preprocessing)")
    return tuple(causes)


def check_round(rounds: Mapping[int, Mapping[str, Any]], config: Mapping[str, Any], server_round: int, *,
                window: int = WINDOW, z: float = Z) -> Verdict | None:
    """The verdict on ``server_round`` from the report's rounds up to it, with likely causes when flagged.

    Parameters
    ----------
    rounds
        The report's round entries by round number (:attr:`server.app.report.RunReport.rounds`); rounds
        after ``server_round`` are ignored, so a resumed run reaches the same verdict.
    config
        The run config, for the likely causes.
    server_round
        The round just evaluated.
    window, z
        As for :func:`assess`.

    Returns
    -------
    Verdict or None
        ``None`` when that round has no usable pooled AUROC (multi-class, a class absent, or not evaluated).
    """
    found = assess(history(rounds, upto=server_round), window=window, z=z)
    if found is None or found.round != server_round:
        return None
    return replace(found, causes=_likely_causes(found, rounds, config, z=z))
