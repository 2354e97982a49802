"""What both sides of a fedrad federation must agree on: models, config, records, metrics, privacy, ledger, audit."""

__all__: list[str] = []
