"""The coordinator side of fedrad: the ServerApp (``app/``), fl-server, its SuperLink, proxy and enrollment."""

__all__: list[str] = []
