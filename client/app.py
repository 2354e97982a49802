"""The fedrad ClientApp: wiring only.

Flower starts a fresh process for every message, so this module imports
nothing heavy: torch and Opacus are imported inside :mod:`client.site` when a
message is handled, and the site's data comes from its on-disk cache.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import records
from common.config import RunConfig, SiteConfig
from common.flower import use_flower_log_handlers

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
app = ClientApp()


def _configs(context: Context) -> tuple[SiteConfig, RunConfig]:
    use_flower_log_handlers("client", "common")
    return SiteConfig.from_flower(context.node_config), RunConfig.from_flower(context.run_config)


def _weights(msg: Message) -> OrderedDict[str, torch.Tensor]:
    import torch  # noqa: F401 - ArrayRecord.to_torch_state_dict() needs torch imported

    return msg.content[records.ARRAYS].to_torch_state_dict()


def _site_record(site: SiteConfig) -> ConfigRecord:
    return ConfigRecord({records.SITE_NAME: site.site})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model with DP-SGD inside the site's budget."""
    from client.site import train_round
    from common.errors import PrivacyBudgetExceeded

    site, run = _configs(context)
    server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
    weights = _weights(msg)
    try:
        new_weights, metrics, facts = train_round(
            site=site, run=run, run_id=context.run_id, server_round=server_round, weights=weights
        )
    except PrivacyBudgetExceeded as exc:
        # A decline is an answer, not a failure: no weights, the reason and the budget facts only.
        log.warning("%s", exc)
        declined = ConfigRecord({records.SITE_NAME: site.site, records.DECLINED: str(exc)})
        budget = {records.MAX_EPSILON: site.max_epsilon, records.DELTA: site.delta}
        if exc.spent is not None:
            budget[records.EPSILON] = exc.spent
        content = RecordDict({records.SITE: declined, records.METRICS: MetricRecord(budget)})
        return Message(content=content, reply_to=msg)
    content = RecordDict(
        {
            records.ARRAYS: ArrayRecord(new_weights),
            records.METRICS: MetricRecord(metrics),
            records.SITE: ConfigRecord({records.SITE_NAME: site.site, **facts}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model; reply with summable statistics only."""
    from client.site import evaluate_round

    site, run = _configs(context)
    weights = _weights(msg)
    metrics = evaluate_round(site=site, run=run, weights=weights)
    content = RecordDict({records.METRICS: MetricRecord(metrics), records.SITE: _site_record(site)})
    return Message(content=content, reply_to=msg)
