"""Environment for the Flower processes fedrad starts (SuperLink, SuperNode, flwr CLI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common.errors import FederationError


def flower_bin(name: str) -> str:
    """Path of a Flower executable installed next to the running Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FederationError(f"`{name}` is not installed next to {sys.executable}; run `make install`")
    return str(path)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Our environment plus what Flower needs: its own FLWR_HOME and our venv first on PATH.

    Flower finds ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp``
    through PATH, so the venv's bin folder must come first.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # no phoning home from a hospital
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def use_flower_log_handlers(*packages: str) -> None:
    """Send our packages' INFO logs through Flower's handlers inside Flower processes.

    A ServerApp/ClientApp process only configures Flower's ``flwr`` logger; without
    this our round summaries would be dropped (``flwr log --stream`` shows them).
    """
    import logging

    flwr_logger = logging.getLogger("flwr")
    for name in packages:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in flwr_logger.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False
