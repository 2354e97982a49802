"""What both sides of a fedrad federation must agree on.

Model registry, typed configuration, record keys, federatable metrics,
privacy accounting, process handling and the error hierarchy.
"""

__all__: list[str] = []
