"""ε recomputed the way the sites compute it, and compared with what they recorded."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from common.privacy import DPEvent, Epsilons, epsilons, merge_events

REL_TOL = 1e-6
"""Relative tolerance when a recorded ε is compared with its recomputation."""
ABS_TOL = 1e-9
"""...plus this absolute tolerance."""
BUDGET_TOL = 1e-9
"""Relative tolerance of a budget check (what the sites use too)."""


def memoized_rdp() -> AbstractContextManager[None]:
    """:func:`common.adapters.opacus.memoized_rdp`, imported when used (the adapter checks Opacus' version)."""
    from common.adapters import opacus

    return opacus.memoized_rdp()


def close(recorded: Any, recomputed: float | None) -> bool:
    """Whether a recorded ε equals its recomputation (1e-6 relative + 1e-9 absolute)."""
    if recorded is None or recomputed is None:
        return recorded is None and recomputed is None
    try:
        a, b = float(recorded), float(recomputed)
    except (TypeError, ValueError):
        return False
    return a == b or abs(a - b) <= REL_TOL * max(abs(a), abs(b)) + ABS_TOL


def exceeds(epsilon: float | None, max_epsilon: Any) -> bool:
    """Whether ``epsilon`` is above ``max_epsilon`` (beyond the 1e-9 relative tolerance)."""
    if epsilon is None:
        return False
    try:
        limit = float(max_epsilon)
    except (TypeError, ValueError):
        return True  # no readable budget: nothing is within it
    return not epsilon <= limit * (1 + BUDGET_TOL)


def number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def span(values: Sequence[Any]) -> dict[str, float | None]:
    """``{"min", "max"}`` of the finite numbers among ``values`` (both None when there are none)."""
    nums = [v for v in map(number, values) if v is not None]
    return {"min": min(nums), "max": max(nums)} if nums else {"min": None, "max": None}


def fmt(value: Any, digits: int = 4) -> str:
    """``value`` as an audit message or table shows it: ``—`` for None, ``digits`` for floats."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def recompute(tasks: Sequence[tuple[Sequence[DPEvent], Any]]) -> list[Epsilons | Exception]:
    """:func:`common.privacy.epsilons` of every ``(events, δ)`` in ``tasks``, in order, or the exception that stopped it.

    Each is computed in full by the function the sites use, once per distinct task, the longest
    first, on one thread per CPU core (Opacus' PRV numerics release the GIL).
    """
    keys: list[tuple[Any, ...]] = []
    for events, delta in tasks:
        try:
            keys.append((tuple(merge_events(events)), float(delta)))
        except (TypeError, ValueError) as exc:
            keys.append(("error", id(exc), exc))
    unique = list(dict.fromkeys(k for k in keys if k[0] != "error"))
    if not unique:
        return [key[2] for key in keys]

    def one(key: tuple[Any, ...]) -> Epsilons | Exception:
        history, delta = key
        try:
            return epsilons(events=[DPEvent(*entry) for entry in history], delta=delta)
        except (ArithmeticError, TypeError, ValueError, RuntimeError) as exc:
            return exc

    # Opacus warns about loose RDP orders and logs of 0 at q = 1: noise for an auditor, not findings.
    with memoized_rdp(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        order = sorted(unique, key=lambda k: -sum(steps for _, _, steps in k[0]) * len(k[0]))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=min(max(1, cores), len(order))) as pool:
            results = dict(zip(order, pool.map(one, order), strict=True))
    return [key[2] if key[0] == "error" else results[key] for key in keys]
