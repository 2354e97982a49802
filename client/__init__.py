"""The hospital side of fedrad: the ClientApp (``app/``), its data pipeline (``data/``), fl-client and fl-predict."""

__all__: list[str] = []
