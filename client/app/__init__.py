"""Code that runs inside the federation at a site: the ClientApp and what it calls."""

from __future__ import annotations

from typing import Any

__all__ = ["app", "client_app"]


def __getattr__(name: str) -> Any:
    """Build ``app`` on first access (once per process), so importing ``client.app.training`` does not import Flower."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from client.app import handlers

    if name == "client_app":
        return handlers.client_app
    built = handlers.client_app()
    globals()["app"] = built  # built once per process
    return built
