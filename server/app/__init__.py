"""Code that runs inside the federation on the coordinator: the ServerApp and what it calls."""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    """Import ``app`` on first access, so a launcher importing ``server.app.resume`` does not import Flower's server runtime."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from server.app.main import app

    return app
