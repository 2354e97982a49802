"""Flower's SuperNode (``flower-supernode``, Flower 1.41.0): looking for messages every :data:`POLL` s instead of
3 s, and told gone at once when it could not say so itself (:func:`deactivate_node`).

An idle SuperNode sleeps 3 s between two pulls of the Fleet API (``time.sleep(3)`` in
``flwr/supernode/start_client_internal.py``, hard-coded), so every message waits 1.5 s
on average, up to 3 s, before its site sees it; a SecAgg+ round is five messages per
site. ``python -m common.adapters.supernode ARGS`` runs Flower's own ``flower-supernode``
with ``ARGS``, that module's sleeps capped at :data:`POLL`. The cost is one signed Fleet
API pull per site every :data:`POLL` s while idle (the coordinator's nginx and SuperLink
answer each in a few milliseconds).

A SuperNode that leaves cleanly deactivates its node at the SuperLink; one that is killed
(or whose exit is cut short) stays "online" there until it misses two heartbeats (about
60 s). Until then the coordinator waits for its answers, and the site's next SuperNode,
with the same key, cannot activate. :func:`deactivate_node` sends the same signed
``DeactivateNode`` call on the SuperNode's behalf.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
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


def deactivate_node(address: str, *, ca_cert: Path, private_key: Path, node_id: int, timeout: float = 5.0) -> str | None:
    """Tell the SuperLink behind ``address`` (host:port of its Fleet API) that node ``node_id`` is gone.

    The call is signed with the site's key, as its SuperNode signs every call: the SuperLink
    accepts it only for the node registered with that key. Returns None when the node was
    deactivated, else why not (already offline, coordinator unreachable, ...); never raises.
    """
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    try:
        key = load_ssh_private_key(private_key.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return f"{private_key} is not an EC private key"
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                        NodeAuthHttpInterceptor(key, key.public_key())]
        with FleetHttpClient(f"https://{address}", interceptors=interceptors, verify=str(ca_cert),
                             timeout=timeout) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except httpx.HTTPStatusError as exc:
        return f"HTTP {exc.response.status_code}: {exc.response.text[:200]}"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None


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
