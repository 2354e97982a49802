"""Code that runs inside the federation on the coordinator: the ServerApp and what it calls.

Flower loads ``server.app:app`` (``pyproject.toml``) in the SuperLink's ServerApp
process; everything under ``server/app/`` runs there. The launchers
(``server/cli.py``, ``coordinator.py``, ``superlink.py``, ``proxy.py``,
``enroll/``) live beside this package.
"""

from server.app.main import app

__all__ = ["app"]
