"""Label skew: Dirichlet prevalences for synthetic sites; patients assigned to virtual sites."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from common.errors import ConfigError

MIN_PREVALENCE, MAX_PREVALENCE = 0.05, 0.95


def is_int(value: object) -> bool:
    """An integer, numpy's included, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_alpha(alpha: object) -> float:
    """``alpha`` as a positive float, or :class:`ConfigError`."""
    if not _is_real(alpha) or not math.isfinite(float(alpha)) or float(alpha) <= 0:  # type: ignore[arg-type]
        raise ConfigError(f"Expected `alpha` to be a positive number (smaller: more label skew), but got {alpha!r}")
    return float(alpha)  # type: ignore[arg-type]


def check_seed(seed: object) -> int:
    """``seed`` as a non-negative int, or :class:`ConfigError`."""
    if not is_int(seed) or seed < 0:  # type: ignore[operator]
        raise ConfigError(f"Expected `seed` to be a non-negative integer, but got {seed!r}")
    return int(seed)  # type: ignore[call-overload]


def check_fractions(sizes: Sequence[float] | None, sites: int) -> np.ndarray:
    """One fraction per site, summing to 1 (equal without ``sizes``), or :class:`ConfigError`."""
    if sizes is None:
        return np.full(sites, 1.0 / sites)
    values = list(sizes) if not isinstance(sizes, str) else [sizes]
    if len(values) != sites:
        raise ConfigError(f"Expected `sizes` to give one fraction per site ({sites}), but got {len(values)}")
    if not all(_is_real(v) and math.isfinite(float(v)) and float(v) > 0 for v in values):
        raise ConfigError(f"Expected `sizes` to be positive fractions, but got {values!r}")
    total = math.fsum(float(v) for v in values)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"Expected `sizes` to sum to 1, but they sum to {total:.6g}")
    return np.array([float(v) for v in values]) / total


def dirichlet_prevalences(n_sites: int, *, alpha: float, base: float = 0.45, seed: int = 0) -> list[float]:
    """Per-site prevalences with Dirichlet label skew (for synthetic sites).

    For each site ``(p, 1 - p) ~ Dirichlet(alpha * [base, 1 - base])``, drawn with
    ``numpy.random.default_rng(seed)``, then clipped to ``[0.05, 0.95]`` so that every site can still
    see both classes. Large ``alpha``: every ``p`` is close to ``base``; small: most sites are almost
    all-negative or all-positive.

    Parameters
    ----------
    n_sites : int
        Number of sites (at least 1).
    alpha : float
        Concentration (> 0).
    base : float, optional
        Mean prevalence, strictly between 0 and 1.
    seed : int, optional
        Non-negative seed; same arguments, same list.

    Returns
    -------
    list of float
        One prevalence per site, each in ``[0.05, 0.95]``.

    Raises
    ------
    ConfigError
        If an argument is out of range.
    """
    if not is_int(n_sites) or n_sites < 1:
        raise ConfigError(f"Expected `n_sites` to be a positive integer, but got {n_sites!r}")
    a = check_alpha(alpha)
    if not _is_real(base) or not 0.0 < float(base) < 1.0:
        raise ConfigError(f"Expected `base` to be between 0 and 1 (exclusive), but got {base!r}")
    rng = np.random.default_rng(check_seed(seed))
    draws = rng.dirichlet(a * np.array([float(base), 1.0 - float(base)]), size=n_sites)[:, 0]
    # A draw can underflow to exactly 0 (or be NaN for tiny alpha): clipping covers 0 and 1.
    draws = np.nan_to_num(draws, nan=float(base))
    return [float(p) for p in np.clip(draws, MIN_PREVALENCE, MAX_PREVALENCE)]


def _waterfill(amount: float, weights: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Split ``amount`` in proportion to ``weights``, no site beyond its ``room``.

    What a full site cannot take goes to the others, again by weight; what
    no weighted site can take goes to the sites with room left, by room.
    """
    alloc = np.zeros_like(room)
    free = (weights > 0) & (room > 0)
    remaining = amount
    while remaining > 1e-9 and free.any():
        share = remaining * weights[free] / weights[free].sum()
        take = np.minimum(share, room[free] - alloc[free])
        alloc[free] += take
        remaining -= float(take.sum())
        free &= alloc < room - 1e-9
    left = np.maximum(room - alloc, 0.0)
    if remaining > 1e-9 and left.sum() > 0:
        alloc += np.minimum(left, remaining * left / left.sum())
    return alloc


def assign(files: np.ndarray, classes: np.ndarray, *, n_classes: int, fractions: np.ndarray, alpha: float | None,
           rng: np.random.Generator) -> np.ndarray:
    """Site index of each patient.

    Classes are taken in a seeded order. Each class's files are shared out by weight (the size
    fractions, times a ``Dirichlet(alpha)`` draw with ``alpha``) with no site taking more than its
    remaining share of all files (:func:`_waterfill`), and its patients, in seeded order, are cut into
    consecutive runs of those sizes (a patient goes where the middle of its files falls).

    Parameters
    ----------
    files, classes : np.ndarray
        Number of labelled files and class index (in ``[0, n_classes)``) of each patient, ``(P,)`` int.
    n_classes : int
        Number of classes; an absent class still takes its Dirichlet draw, so the others do not shift.
    fractions : np.ndarray
        Target share of all files per site (:func:`check_fractions`: positive, summing to 1).
    alpha : float or None
        Dirichlet concentration of the label skew; None: every class is shared by ``fractions`` alone.
    rng : np.random.Generator
        Source of every random choice; the same generator state gives the same assignment.

    Returns
    -------
    np.ndarray
        Site index (0 to ``len(fractions) - 1``) of each patient, ``(P,)`` int64; every site gets at least
        one patient when there are at least as many patients as sites.
    """
    n_sites = len(fractions)
    order = rng.permutation(len(files))
    target = fractions * float(files.sum())
    load = np.zeros(n_sites)
    site = np.zeros(len(files), dtype=np.int64)
    for c in rng.permutation(n_classes):
        # Drawn for every class, present or not, so one class's absence does not shift the others.
        weights = fractions.copy()
        if alpha is not None:
            weights *= np.nan_to_num(rng.dirichlet(np.full(n_sites, alpha)))
        members = order[classes[order] == c]
        if len(members) == 0:
            continue
        sizes = files[members].astype(np.float64)
        cumulative = np.cumsum(sizes)
        room = np.maximum(target - load, 0.0)
        if not room.sum() > 0:
            room = fractions * cumulative[-1]
        alloc = _waterfill(float(cumulative[-1]), weights, room)
        bounds = np.cumsum(alloc) * (cumulative[-1] / alloc.sum())
        middle = cumulative - sizes / 2
        chosen = np.minimum(np.searchsorted(bounds, middle, side="right"), n_sites - 1)
        site[members] = chosen
        np.add.at(load, chosen, sizes)
    # Every site gets at least one patient: take the smallest patient of the site with the most.
    counts = np.bincount(site, minlength=n_sites)
    for empty in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        mine = np.flatnonzero(site == donor)
        moved = mine[np.argmin(files[mine])]
        site[moved] = empty
        counts[donor] -= 1
        counts[empty] += 1
    return site
