"""Code that runs inside the federation on the coordinator: the ServerApp and what it calls.

Flower loads ``server.app:app`` (``pyproject.toml``) in the SuperLink's ServerApp
process; everything under ``server/app/`` runs there. The launchers
(``server/cli.py``, ``coordinator.py``, ``superlink.py``, ``proxy.py``,
``enroll/``) live beside this package.

``app`` is imported on first access, so a launcher that imports ``server.app.resume``
does not import the ServerApp and Flower's server runtime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from server.app.main import app

    return app
