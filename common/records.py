"""Record keys and (de)serialisation shared by the ServerApp and the ClientApp.

The first three keys match Flower's defaults so Flower's strategies find them.
"""

from __future__ import annotations

ARRAYS = "arrays"
"""ArrayRecord with the model weights (both directions)."""

CONFIG = "config"
"""ConfigRecord with the server's per-round instructions."""

METRICS = "metrics"
"""MetricRecord in a reply."""

NUM_EXAMPLES = "num-examples"
"""Examples (images, never batches) a reply was computed on; FedAvg weights by it."""

SITE = "site"
"""ConfigRecord in a reply that names the site and carries non-numeric facts."""

# Keys inside the SITE ConfigRecord.
SITE_NAME = "name"
DECLINED = "declined"  # why the site declined a round (no arrays in that reply)
PRIVACY_UNIT = "privacy-unit"  # "patient" or "image"
LEDGER_KEY = "ledger-key"  # SHA-256 of the site's ledger public key: what an auditor pins
LEDGER_ROW = "ledger-row"  # the ledger row this round added
LEDGER_HASH = "ledger-hash"  # ...and its hash (lets an auditor check the ledger was not rolled back)

# Keys inside a train reply's MetricRecord. ``epsilon*`` are cumulative over every run on
# the site's dataset; ``run-epsilon*`` over this run only (what `fl-audit --run` recomputes).
EPSILON = "epsilon"
EPSILON_RDP = "epsilon-rdp"
EPSILON_PRV = "epsilon-prv"
RUN_EPSILON = "run-epsilon"
RUN_EPSILON_RDP = "run-epsilon-rdp"
RUN_EPSILON_PRV = "run-epsilon-prv"
MAX_GRAD_NORM = "max-grad-norm"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
MAX_EPSILON = "max-epsilon"

# Keys inside an evaluate reply's MetricRecord (sufficient statistics only).
EVAL_LOSS = "eval-loss"
AUROC_CONFMAT = "auroc-confmat"
STAT_SCORES = "stat-scores"

# Keys inside the server's ConfigRecord.
SERVER_ROUND = "server-round"

# Flower's legacy (compat) keys: the SecAgg+ workflow speaks FitIns/FitRes.
FITINS_PARAMETERS = "fitins.parameters"
