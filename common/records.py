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

# Keys inside a train reply's MetricRecord.
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
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
