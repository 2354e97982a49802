"""``python -m simulations.synth``: the ``fl-synth`` command line."""

from simulations.synth.cli import main

main()
