"""Flower's SuperNode (``flower-supernode``, Flower 1.41.0) looking for messages every :data:`POLL` s instead of 3 s.

An idle SuperNode sleeps 3 s between two pulls of the Fleet API (``time.sleep(3)`` in
``flwr/supernode/start_client_internal.py``, hard-coded), so every message waits 1.5 s
on average, up to 3 s, before its site sees it; a SecAgg+ round is five messages per
site. ``python -m common.adapters.supernode ARGS`` runs Flower's own ``flower-supernode``
with ``ARGS``, that module's sleeps capped at :data:`POLL`. The cost is one signed Fleet
API pull per site every :data:`POLL` s while idle (the coordinator's nginx and SuperLink
answer each in a few milliseconds).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common.adapters.flower import TESTED_VERSION
from common.adapters.version import require_version

POLL = 0.5  # s: the longest an idle SuperNode waits before it looks for a message again


class _CappedSleep:
    """The ``time`` module as ``start_client_internal`` sees it: every sleep capped at :data:`POLL`."""

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def main() -> None:
    """Run ``flower-supernode`` with this process's arguments, its idle sleeps capped at :data:`POLL`."""
    require_version("flwr", TESTED_VERSION, install="flwr[simulation]")
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    start_client_internal.time = _CappedSleep()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
