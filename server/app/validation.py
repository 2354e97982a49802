"""Coordinator-side checks of the sites' model updates (full state dicts, not deltas), and robust aggregation.

:func:`screen` rejects a malformed update (:func:`check_update`: names, shapes, dtypes, finite values; the
reason names tensors and counts only) and, among the rest, one that moved the model far more than the others
(:func:`norm_outliers`). :func:`aggregate` combines the accepted ones: ``fedavg`` (weighted by examples, like
Flower's ``FedAvg``), or the robust coordinate-wise ``trimmed-mean`` and ``median``, which bound the pull of a
poisoned site the screening let through. Pure functions of torch tensors: no Flower messages, I/O or logging.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from common.config import AGGREGATIONS

StateDict = Mapping[str, torch.Tensor]


_TRIM_EPS = 1e-9  # so that e.g. 0.29 * 100 trims 29, not 28, despite float rounding


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape)


def check_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """Why a site's ``update`` cannot be used (e.g. ``"'fc.bias' has 3 NaN/Inf values"``), or ``None`` when it can.

    It must hold exactly the tensors of ``reference`` (the round's global state dict), with the same shapes
    and dtypes, and no NaN or Inf. Checked in this order: missing names, unexpected names, then tensor by
    tensor (in the reference's order) type, shape, dtype and finiteness; the reason names the first problem.
    """
    for name in reference:
        if name not in update:
            return f"missing {name!r}"
    for name in update:
        if name not in reference:
            return f"unexpected {name!r}"
    for name, expected in reference.items():
        tensor = update[name]
        if not isinstance(tensor, torch.Tensor):
            return f"{name!r} is a {type(tensor).__name__}, not a tensor"
        if tensor.shape != expected.shape:
            return f"{name!r} has shape {_shape(tensor)}, expected {_shape(expected)}"
        if tensor.dtype != expected.dtype:
            return f"{name!r} is {_dtype_name(tensor.dtype)}, expected {_dtype_name(expected.dtype)}"
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum().item())
            if bad:
                return f"{name!r} has {bad} NaN/Inf value{'s' if bad != 1 else ''}"
    return None


def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm (in float64) of ``update - reference`` over the floating-point tensors; :func:`check_update` first.

    Integer buffers (step counters and the like) are left out: they are not weights and their scale is unrelated.
    """
    total = 0.0
    for name, ref in reference.items():
        if not ref.is_floating_point():
            continue
        diff = update[name].detach().to(torch.float64) - ref.detach().to(update[name].device, torch.float64)
        total += float(torch.sum(diff * diff).item())
    return math.sqrt(total)


def norm_outliers(norms: Mapping[str, float], *, factor: float, min_sites: int = 3) -> dict[str, str]:
    """Flagged site → reason (``"update norm 41.2 is 13.7x the median 3.01 of the other sites (limit 10x)"``).

    A site is flagged when its norm exceeds ``factor`` times the median of the *other* sites' norms
    (leave-one-out: one huge update cannot raise the median it is judged against, and two honest sites are not
    flagged because a third sent a tiny update). Only large norms are flagged: a tiny update can only pull the
    model back towards the previous global one. Nothing is flagged with fewer than ``min_sites`` norms, nor when
    the others' median is 0 (no scale: flagging would reject the round's only training; robust aggregation still
    bounds it). A NaN or Inf norm is always flagged and left out of the others' medians.

    Parameters
    ----------
    norms
        Site name to update norm (:func:`update_norm`).
    factor
        How many times the others' median a norm may be; must be > 1.
    min_sites
        The fewest norms with which outliers are looked for; must be >= 2.

    Raises
    ------
    ValueError
        ``factor <= 1``, ``min_sites < 2`` or a negative norm.
    """
    if not factor > 1:
        raise ValueError(f"norm factor must be > 1 (got {factor}); use a factor such as 10")
    if min_sites < 2:
        raise ValueError(f"min_sites must be at least 2 (got {min_sites})")
    for site, norm in norms.items():
        if norm < 0:
            raise ValueError(f"update norm of site {site!r} is negative ({norm}); norms are >= 0")
    if len(norms) < min_sites:
        return {}
    flagged: dict[str, str] = {}
    for site, norm in norms.items():
        if not math.isfinite(norm):
            flagged[site] = f"update norm is {norm}"
            continue
        others = [n for s, n in norms.items() if s != site and math.isfinite(n)]
        if len(others) < min_sites - 1:
            continue  # too few usable norms left to judge this one
        median = statistics.median(others)
        if median > 0 and norm > factor * median:
            flagged[site] = (
                f"update norm {norm:.3g} is {norm / median:.1f}x the median {median:.3g} "
                f"of the other sites (limit {factor:g}x)"
            )
    return flagged


class Screening(NamedTuple):
    """The outcome of :func:`screen`; unpacks as ``accepted, rejected``."""

    accepted: dict[str, tuple[StateDict, int]]
    """Site to (state dict, example count), in the input order."""
    rejected: dict[str, str]
    """Site to the reason its update was rejected."""


def screen(
    updates: Mapping[str, tuple[StateDict, int]], reference: StateDict, *, norm_factor: float, min_sites: int = 3
) -> Screening:
    """Split the sites' updates into accepted and rejected ones.

    :func:`check_update` and a non-negative example count first; then :func:`norm_outliers` among the
    updates that passed (so a malformed update never skews the medians).

    Parameters
    ----------
    updates
        Site name to (state dict, example count).
    reference
        The global state dict the sites started from.
    norm_factor, min_sites
        As for :func:`norm_outliers` (``factor``); ``norm_factor <= 0`` disables the norm check.

    Raises
    ------
    ValueError
        ``0 < norm_factor <= 1`` or ``min_sites < 2``.
    """
    passed: dict[str, tuple[StateDict, int]] = {}
    rejected: dict[str, str] = {}
    for site, (state, examples) in updates.items():
        reason = check_update(state, reference)
        if reason is None and int(examples) < 0:
            reason = f"reports {int(examples)} examples"
        if reason is None:
            passed[site] = (state, int(examples))
        else:
            rejected[site] = reason
    if norm_factor > 0:
        norms = {site: update_norm(state, reference) for site, (state, _) in passed.items()}
        outliers = norm_outliers(norms, factor=norm_factor, min_sites=min_sites)
        rejected.update(outliers)
        passed = {site: value for site, value in passed.items() if site not in outliers}
    return Screening(passed, rejected)


def aggregate(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], int]], *, method: str, trim_fraction: float = 0.2
) -> OrderedDict[str, torch.Tensor]:
    """Combine the sites' state dicts into the next global model.

    ``fedavg`` is the mean weighted by example count; ``trimmed-mean`` drops the ``k = floor(trim_fraction * n)``
    largest and ``k`` smallest of the ``n`` values of each coordinate and averages the rest; ``median`` is the
    coordinate-wise median (even ``n``: the mean of the two middle values). The robust methods ignore example
    counts (else one site claiming many examples would dominate again). All accumulate in float64; integer and
    bool tensors are rounded to the nearest integer (half to even), where Flower returns float64.

    Parameters
    ----------
    updates
        (state dict, example count) per site, with the same names and shapes (:func:`screen` first).
    method
        One of :data:`AGGREGATIONS`.
    trim_fraction
        Fraction trimmed at *each* end by ``trimmed-mean``; in [0, 0.5).

    Returns
    -------
    OrderedDict
        New tensors, in the first update's order, dtypes and devices.

    Raises
    ------
    ValueError
        Unknown method, no updates, trim fraction outside [0, 0.5), updates whose names or shapes differ, a
        complex tensor, or (``fedavg``) a negative example count or no examples at all.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}")
    if not updates:
        raise ValueError("no updates to aggregate: every site failed or was rejected")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5) (got {trim_fraction})")
    states = [state for state, _ in updates]
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if list(state) != list(first):
            raise ValueError(f"update {i} has tensor names different from update 0; screen updates first")
        for name, tensor in first.items():
            if state[name].shape != tensor.shape:
                raise ValueError(
                    f"update {i}: {name!r} has shape {_shape(state[name])}, update 0 has {_shape(tensor)}"
                )
    for name, tensor in first.items():
        if tensor.is_complex():
            raise ValueError(f"{name!r} is {_dtype_name(tensor.dtype)}; complex tensors are not supported")

    n = len(states)
    weights: list[float] = []
    if method == "fedavg":
        counts = [int(examples) for _, examples in updates]
        if any(c < 0 for c in counts):
            raise ValueError(f"example counts must be >= 0 (got {counts})")
        total = sum(counts)
        if total <= 0:
            raise ValueError("no examples in any update: cannot weight the average")
        weights = [c / total for c in counts]
    k = math.floor(trim_fraction * n + _TRIM_EPS) if method == "trimmed-mean" else 0
    if n - 2 * k < 1:  # cannot happen for trim_fraction < 0.5; kept as a guard
        raise ValueError(f"trimming {k} of {n} values at each end leaves nothing to average")

    result: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, template in first.items():
        values = [state[name].detach().to(device=template.device, dtype=torch.float64) for state in states]
        if method == "fedavg":
            combined = sum((v * w for v, w in zip(values, weights, strict=True)), torch.zeros_like(values[0]))
        else:
            ordered = torch.sort(torch.stack(values), dim=0).values
            if method == "trimmed-mean":
                combined = ordered[k : n - k].mean(dim=0)
            else:  # median
                combined = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        if not template.is_floating_point():
            combined = torch.round(combined)
        result[name] = combined.to(template.dtype)
    return result
