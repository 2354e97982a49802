"""The hospital side of fedrad: data ingest and cache, DP training, evaluation, ClientApp, fl-client.

What runs inside the federation is in :mod:`client.app`; beside it, the launchers (the ``fl-client`` CLI,
``fl-predict`` in :mod:`client.predict`) and the site data pipeline (:mod:`client.data`).
"""

__all__: list[str] = []
