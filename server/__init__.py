"""The coordinator side of fedrad: ServerApp, strategy, checkpoints, run report, fl-server.

What runs inside the federation is in :mod:`server.app`; beside it, the launchers: the ``fl-server`` CLI,
the coordinator and SuperLink processes, the nginx proxy and enrollment (:mod:`server.enroll`).
"""

__all__: list[str] = []
