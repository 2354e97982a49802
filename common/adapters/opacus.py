"""Opacus' private APIs fedrad uses, behind one version check (Opacus 1.6.0).

Importing this module checks the installed Opacus and raises
:class:`common.errors.IncompatibleVersion` on any other version; Opacus itself
is imported only when a function here runs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common.adapters.version import require_version

TESTED_VERSION = "1.6.0"
"""The Opacus version fedrad was tested with."""

require_version("opacus", TESTED_VERSION, install="opacus")

_memo_lock = threading.Lock()
_memo_depth = 0
_memo_original: Any = None


@contextmanager
def memoized_rdp() -> Iterator[None]:
    """Memoize Opacus' per-step RDP curve ``_compute_rdp(q, σ, α)`` for the duration.

    Both accountants evaluate it for every order α of the same few (q, σ) over and over; for
    short histories it is most of the cost of :func:`common.privacy.epsilons`. It is a pure
    function, so every ε is bit-for-bit what it is without the memo. Re-entrant; thread-safe.
    """
    global _memo_depth, _memo_original
    from opacus.accountants.analysis import rdp as rdp_analysis

    with _memo_lock:
        if _memo_depth == 0:
            _memo_original = rdp_analysis._compute_rdp
            rdp_analysis._compute_rdp = functools.lru_cache(maxsize=None)(_memo_original)
        _memo_depth += 1
    try:
        yield
    finally:
        with _memo_lock:
            _memo_depth -= 1
            if _memo_depth == 0:
                rdp_analysis._compute_rdp = _memo_original
                _memo_original = None
