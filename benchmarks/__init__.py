"""Benchmark scripts (``python -m benchmarks.<name>``) that print ratios measured side by side in one run.

Each is a lean script on the shared :mod:`benchmarks.harness`; docs/benchmarks.md has what each measures.
"""

__all__: list[str] = []
