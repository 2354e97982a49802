"""Fault injection for the fault tests (``tests/e2e/test_faults.py``); inert unless ``FEDRAD_FAULT`` is set.

A real federation meets sites that send broken updates or answer too late. The
fault tests reproduce both on real SuperNodes by starting one site's
``fl-client`` with this environment variable:

- ``FEDRAD_FAULT=nan``: the site trains (and books the round in its ledger) as
  usual, then sends weights full of NaN, as a site with a numerical blow-up would.
- ``FEDRAD_FAULT=slow:SECONDS``: the site trains as usual, then holds its answer
  for ``SECONDS`` more, as an overloaded site would.

No operator sets it; it changes nothing else, and a site that sets it only
harms its own contribution (the coordinator screens every update).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
FAULT_ENV = "FEDRAD_FAULT"


def _fault() -> tuple[str, float]:
    kind, _, value = os.environ.get(FAULT_ENV, "").partition(":")
    return kind.strip(), float(value) if value else 0.0


def after_training(site: str, weights: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The weights this site sends: unchanged, unless a fault is injected."""
    kind, seconds = _fault()
    if kind == "nan":
        log.warning("FAULT INJECTED (%s=nan): site %s sends NaN weights", FAULT_ENV, site)
        return OrderedDict((k, v.float().fill_(float("nan")) if v.is_floating_point() else v) for k, v in weights.items())
    if kind == "slow":
        log.warning("FAULT INJECTED (%s=slow): site %s holds its answer %.0f s", FAULT_ENV, site, seconds)
        time.sleep(seconds)
    return weights
