"""What a long-lived process keeps between the messages of one run: the site's opened data.

In fedrad's site worker (:mod:`client.worker`) one process answers every message, so
the second message of a run finds the cache already mapped and the data report already
made; the worker calls :func:`forget` when a message of another run arrives, so nothing
carries over between runs but what the site keeps on disk. Only a process that called
:func:`enable` keeps anything (the worker does; Flower's per-message processes, fl-sim and
the tests do not), so a process that cannot tell runs apart never sees stale data.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")
KEEP = 2  # entries: the data of the run's training and evaluation settings
_kept: OrderedDict[Hashable, Any] = OrderedDict()
_enabled = False


def enable() -> None:
    """Keep values between calls in this process from now on (the site worker)."""
    global _enabled
    _enabled = True


def kept(key: Hashable, build: Callable[[], T]) -> T:
    """``build()``'s result for ``key``, built on first use and kept (the :data:`KEEP` most recent) once enabled."""
    if not _enabled:
        return build()
    if key in _kept:
        _kept.move_to_end(key)
        return _kept[key]
    value = build()
    _kept[key] = value
    while len(_kept) > KEEP:
        _kept.popitem(last=False)
    return value


def forget() -> None:
    """Drop everything kept (a new run starts)."""
    _kept.clear()
    gc.collect()
