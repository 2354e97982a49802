"""Benchmark scripts (``python -m benchmarks.<name>``) that print ratios measured side by side in one run."""

__all__: list[str] = []
