"""Simulation tooling: synthetic hospitals (fl-synth), partitioners and scenarios."""
