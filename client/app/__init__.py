"""Code that runs inside the federation at a site: the ClientApp and what it calls.

Flower loads ``client.app:app`` (``pyproject.toml``) in a fresh process for each
message; everything under ``client/app/`` runs there. The launchers
(``client/cli.py``, ``client/predict/``) live beside this package.
"""

from client.app.handlers import client_app

__all__ = ["app", "client_app"]

app = client_app()
