"""The SuperLink's Control API called from this process: what ``flwr ls``, ``flwr stop`` and ``flwr supernode
register/unregister`` do (Flower 1.41.0), without starting a ``flwr`` process (about 1 s of CPU) for each.

:func:`control_call` takes the same arguments as those ``flwr`` commands and answers with the JSON
they print with ``--format json``, so a caller can fall back to the ``flwr`` process for any other
command. The connection is the ``flwr`` CLI's own, read from ``<FLWR_HOME>/config.toml``; the
SuperLink runs without account authentication (fedrad starts it on loopback).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from common.adapters.flower import TESTED_VERSION
from common.adapters.version import require_version
from common.errors import FederationError

require_version("flwr", TESTED_VERSION, install="flwr[simulation]")

#: The ``flwr`` commands :func:`control_call` answers (their first one or two words).
IN_PROCESS = ("ls", "stop", "supernode register", "supernode unregister")


def handles(args: list[str]) -> bool:
    """Whether :func:`control_call` answers ``flwr ARGS``."""
    return args[0] in IN_PROCESS or " ".join(args[:2]) in IN_PROCESS


def control_call(args: list[str], flwr_home: Path) -> dict[str, Any]:
    """Answer ``flwr ARGS --format json`` (one of :data:`IN_PROCESS`) from this process.

    ``ARGS`` are ``ls CONNECTION [--run-id ID]``, ``stop ID CONNECTION``, ``supernode register
    KEY.pub CONNECTION`` or ``supernode unregister NODE_ID CONNECTION``.

    Raises
    ------
    FederationError
        With Flower's error message, as ``flwr`` prints it.
    """
    import click
    from flwr.cli.utils import flwr_cli_exc_handler

    command = " ".join(args[:2]) if args[0] == "supernode" else args[0]
    operands = args[2:] if args[0] == "supernode" else args[1:]
    client = _client(flwr_home, connection=operands[-1] if command != "ls" else operands[0])
    try:
        with client, flwr_cli_exc_handler():
            return _call(client, command, operands)
    except click.ClickException as exc:
        raise FederationError(f"`flwr {args[0]}` failed: {exc.message}") from None


def _call(client: Any, command: str, operands: list[str]) -> dict[str, Any]:
    from flwr.proto.control_pb2 import (
        ListRunsRequest,
        RegisterNodeRequest,
        StopRunRequest,
        UnregisterNodeRequest,
    )

    if command == "ls":
        run_id = int(operands[operands.index("--run-id") + 1]) if "--run-id" in operands else None
        response = client.ListRuns(ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest())
        return {"success": True, "runs": [_run(run) for run in response.run_dict.values()]}
    if command == "stop":
        if not client.StopRun(StopRunRequest(run_id=int(operands[0]))).success:
            raise FederationError(f"`flwr stop` failed: Run {operands[0]} couldn't be stopped.")
        return {"success": True, "run-id": operands[0]}
    if command == "supernode register":
        node_id = client.RegisterNode(RegisterNodeRequest(public_key=_public_key(Path(operands[0])))).node_id
        if not node_id:
            raise FederationError("`flwr supernode` failed: SuperNode couldn't be registered.")
        return {"success": True, "node-id": node_id}
    client.UnregisterNode(UnregisterNodeRequest(node_id=int(operands[0])))
    return {"success": True, "node-id": operands[0]}


def _run(run: Any) -> dict[str, Any]:
    """A run as ``flwr ls --format json`` shows its status."""
    status, sub = run.status.status, run.status.sub_status
    return {"run-id": str(run.run_id), "status": f"{status}:{sub}" if sub else status,
            "status-details": run.status.details or "N/A"}


def _public_key(path: Path) -> bytes:
    """The public key file's bytes as ``flwr supernode register`` sends them."""
    from flwr.cli.supernode.register import try_load_public_key

    return bytes(try_load_public_key(path))


def _client(flwr_home: Path, *, connection: str) -> Any:
    """A Control API client for ``connection`` in ``<flwr_home>/config.toml`` (written by fl-server)."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    try:
        config = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"][connection]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise FederationError(f"No SuperLink connection {connection!r} in {flwr_home / 'config.toml'} ({exc})") from None
    insecure = bool(config.get("insecure", False))
    return ControlHttpClient.from_server_address(
        server_address=config["address"], insecure=insecure,
        root_certificates=None if insecure else str(config["root-certificates"]),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
