"""Simulation tooling: fl-sim (many virtual hospitals on one machine), fl-synth, partitioners, scenarios.

Also the demo (``make demo``) and the one federation harness (:mod:`simulations.federation`) that the demo,
the e2e tests and the benchmarks start real federations with.
"""

__all__: list[str] = []
