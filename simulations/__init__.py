"""Simulation tooling: fl-sim, fl-synth, partitioners, scenarios, the demo and the one federation harness."""

__all__: list[str] = []
