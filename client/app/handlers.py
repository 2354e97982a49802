"""The fedrad ClientApp's message handlers (train, evaluate) and its builder, :func:`client_app`.

Flower starts a fresh process for every message, so this module imports nothing heavy: torch and
Opacus are imported inside :mod:`client.app.site` when a message is handled.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app.secure import secure_mod
from common import records
from common.config import Launch, RunConfig, SiteConfig
from common.flower import use_flower_log_handlers

if TYPE_CHECKING:
    import torch
    from flwr.clientapp.typing import Mod

log = logging.getLogger(__name__)


def _configs(context: Context) -> tuple[SiteConfig, RunConfig]:
    use_flower_log_handlers("client", "common")
    return SiteConfig.from_context(context.node_config, context.run_config), RunConfig.from_flower(context.run_config)


def _weights(msg: Message) -> OrderedDict[str, torch.Tensor]:
    import torch  # noqa: F401 - ArrayRecord.to_torch_state_dict() needs torch imported

    return msg.content[records.ARRAYS].to_torch_state_dict()


def _reply(msg: Message, site: SiteConfig, facts: dict[str, Any], content: dict[str, Any] | None = None) -> Message:
    """A reply with ``content`` and the site record: the site's name and ``facts``."""
    site_record = ConfigRecord({records.SITE_NAME: site.site, **facts})
    return Message(content=RecordDict({**(content or {}), records.SITE: site_record}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Train the received global model with DP-SGD inside the site's budget.

    Plain runs send named arrays and get them back; secure-aggregation runs
    speak Flower's legacy fit format, and :func:`client.app.secure.secure_mod`
    masks the reply before it leaves the site.
    """
    from client.app.secure import is_legacy_fit

    if _expired(msg):
        site, _ = _configs(context)
        reason = f"site {site.site} did not train: the round's deadline had passed when its message arrived"
        log.warning("%s", reason)
        return _reply(msg, site, {records.DECLINED: reason})
    if is_legacy_fit(msg.content):
        return _train_secure(msg, context)
    site, run = _configs(context)
    server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
    outcome = _train_or_decline(site, run, context, server_round, _weights(msg))
    if isinstance(outcome, _Declined):
        return _reply(msg, site, {records.DECLINED: outcome.reason}, {records.METRICS: MetricRecord(outcome.budget)})
    new_weights, metrics, facts = outcome
    return _reply(msg, site, facts, {records.ARRAYS: ArrayRecord(new_weights), records.METRICS: MetricRecord(metrics)})


def _expired(msg: Message) -> bool:
    """Whether the coordinator's deadline for this message (its TTL) has passed: training it would spend
    privacy on an update the coordinator no longer takes."""
    import time

    return msg.metadata.created_at + msg.metadata.ttl < time.time()


class _Declined(NamedTuple):
    reason: str
    budget: dict[str, float]


def _train_or_decline(
    site: SiteConfig, run: RunConfig, context: Context, server_round: int, weights: OrderedDict[str, torch.Tensor]
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float | int], dict[str, str | int]] | _Declined:
    from client.app.site import train_round
    from common.errors import PrivacyBudgetExceeded

    run_id = Launch.from_flower(context.run_config).run_id(context.run_id)
    try:
        return train_round(site=site, run=run, run_id=run_id, server_round=server_round, weights=weights)
    except PrivacyBudgetExceeded as exc:
        # A decline is an answer, not a failure: no weights, the reason and the budget facts only.
        log.warning("%s", exc)
        budget = {records.MAX_EPSILON: site.max_epsilon, records.DELTA: site.delta}
        if exc.spent is not None:
            budget[records.EPSILON] = exc.spent
        return _Declined(str(exc), budget)


def _train_secure(msg: Message, context: Context) -> Message:
    import numpy as np

    from client.app.secure import check_bounds, read_fitins
    from common.adapters.flower import fit_reply
    from common.models import build_model

    site, run = _configs(context)
    keys = list(build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes)).state_dict())
    weights, config = read_fitins(msg.content, keys)
    server_round = int(config[records.SERVER_ROUND])
    outcome = _train_or_decline(site, run, context, server_round, weights)
    if isinstance(outcome, _Declined):
        # Still part of the protocol (the other sites' masks must cancel): zeros, weight 0.
        zeros = [np.zeros_like(w.numpy()) for w in weights.values()]
        metrics: dict[str, Any] = {records.SITE_NAME: site.site, records.DECLINED: outcome.reason, **outcome.budget}
        return Message(content=fit_reply(zeros, num_examples=0, metrics=metrics), reply_to=msg)
    new_weights, numbers, facts = outcome
    arrays = [w.detach().cpu().numpy() for w in new_weights.values()]
    num_examples = int(numbers[records.NUM_EXAMPLES])
    check_bounds(arrays, num_examples=num_examples, secagg=run.secagg)
    metrics = {records.SITE_NAME: site.site, **numbers, **facts}
    return Message(content=fit_reply(arrays, num_examples=num_examples, metrics=metrics), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model; reply with summable statistics only."""
    from client.app.site import evaluate_round

    site, run = _configs(context)
    metrics = evaluate_round(site=site, run=run, weights=_weights(msg))
    return _reply(msg, site, {}, {records.METRICS: MetricRecord(metrics)})


def client_app(*, mods: Sequence[Mod] = ()) -> ClientApp:
    """A new fedrad ClientApp: ``train`` and ``evaluate`` behind :func:`client.app.secure.secure_mod`.

    Parameters
    ----------
    mods
        Extra Flower mods, run inside ``secure_mod`` (closest to the handlers): they see each reply before
        it is masked. The project's app (``client.app:app``) has none; ``tests/e2e/apps.py`` adds its own.
    """
    client = ClientApp(mods=[secure_mod, *mods])
    client.train()(train)
    client.evaluate()(evaluate)
    return client


