"""FedAvg weighted by examples, with a checkpoint and a report entry each round.

We extend Flower's own ``FedAvg`` through its aggregation hooks instead of
copying its round loop: ``aggregate_train`` adds per-site privacy facts and a
checkpoint, ``aggregate_evaluate`` merges the sites' sufficient statistics
into pooled metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common import records
from common.errors import FederationError
from common.metrics import pooled_metrics
from server.checkpoint import checkpoint_path, save_checkpoint
from server.report import RunReport

log = logging.getLogger(__name__)

PRIVACY_KEYS = (
    records.EPSILON,
    records.EPSILON_RDP,
    records.EPSILON_PRV,
    records.RUN_EPSILON,
    records.RUN_EPSILON_RDP,
    records.RUN_EPSILON_PRV,
    records.DELTA,
    records.MAX_EPSILON,
    records.NOISE_MULTIPLIER,
    records.SAMPLE_RATE,
    records.STEPS,
    records.MAX_GRAD_NORM,
)
SITE_FACTS = (records.PRIVACY_UNIT, records.LEDGER_KEY, records.LEDGER_ROW, records.LEDGER_HASH)


class BudgetsSpent(FederationError):
    """Every site that answered declined the round: their privacy budgets are spent."""


def site_name(content: RecordDict, fallback: str) -> str:
    """The site name a reply carries in its ``site`` ConfigRecord."""
    try:
        return str(content[records.SITE][records.SITE_NAME])
    except KeyError:
        return fallback


def aggregate_train_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Training images in the round, and the largest ε any site reported.

    Sites send no training loss: it is computed on their training data without
    noise, so it would leak outside the DP guarantee. Validation metrics stand in.
    """
    metrics = [c[records.METRICS] for c in contents]
    total = sum(int(m[weighted_by_key]) for m in metrics)
    return MetricRecord({"epsilon-max": max(float(m[records.EPSILON]) for m in metrics), "examples": total})


def aggregate_evaluate_metrics(contents: list[RecordDict], weighted_by_key: str, *, num_classes: int = 2) -> MetricRecord:
    """Pooled metrics from the sum of the sites' sufficient statistics."""
    del weighted_by_key  # statistics are counts: they add up, no weighting needed
    metrics = [c[records.METRICS] for c in contents]
    pooled = pooled_metrics(metrics, num_classes=num_classes)
    total = sum(int(m[records.NUM_EXAMPLES]) for m in metrics)
    pooled["eval-loss"] = sum(float(m[records.EVAL_LOSS]) * int(m[records.NUM_EXAMPLES]) for m in metrics) / max(total, 1)
    return MetricRecord(pooled)


class FedradFedAvg(FedAvg):
    """Flower's FedAvg plus checkpoints and the run report."""

    def __init__(self, *, report: RunReport, num_classes: int = 2, **kwargs: Any) -> None:
        super().__init__(
            train_metrics_aggr_fn=aggregate_train_metrics,
            evaluate_metrics_aggr_fn=partial(aggregate_evaluate_metrics, num_classes=num_classes),
            **kwargs,
        )
        self.report = report
        self.num_classes = num_classes

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        site_metrics: dict[str, dict[str, Any]] = {}
        declined: dict[str, str] = {}
        failed: dict[str, str] = {}
        trained: list[Message] = []
        for msg in replies:
            node = f"node-{msg.metadata.src_node_id}"
            if msg.has_error():
                failed[node] = msg.error.reason
                log.warning("Round %d: %s did not train: %s", server_round, node, msg.error.reason)
                continue
            name = site_name(msg.content, node)
            site_record = msg.content.get(records.SITE, {})
            if records.DECLINED in site_record:
                # The site's own budget decision: it sent no weights, and the run goes on without it.
                declined[name] = str(site_record[records.DECLINED])
                log.warning("Round %d: site %s declined: %s", server_round, name, declined[name])
                continue
            trained.append(msg)
            m = msg.content[records.METRICS]
            site_metrics[name] = {
                records.NUM_EXAMPLES: int(m[records.NUM_EXAMPLES]),
                **{k: m[k] for k in PRIVACY_KEYS if k in m},
                **{k: site_record[k] for k in SITE_FACTS if k in site_record},
            }
        arrays, metrics = super().aggregate_train(server_round, trained) if trained else (None, None)
        if arrays is None:
            self.report.record_train(
                server_round, site_metrics={}, declined=declined, failed=failed, checkpoint=None
            )
            if declined and not failed:
                raise BudgetsSpent(
                    f"Every site declined round {server_round}: "
                    + "; ".join(f"{k}: {v}" for k, v in sorted(declined.items()))
                )
            reasons = "; ".join(sorted({*failed.values(), *declined.values()})) or "no replies"
            raise FederationError(f"No site trained in round {server_round}: {reasons}")
        checkpoint = save_checkpoint(
            checkpoint_path(self.report.run_dir, server_round),
            arrays.to_torch_state_dict(),
            metadata={"run-id": str(self.report.run_id), "round": str(server_round)},
        )
        for name, m in sorted(site_metrics.items()):
            log.info(
                "Round %d: site %s trained on %d images, ε=%.3f (max %.3g)",
                server_round, name, m[records.NUM_EXAMPLES], m.get(records.EPSILON, float("nan")),
                m.get(records.MAX_EPSILON, float("nan")),
            )
        self.report.record_train(
            server_round, site_metrics=site_metrics, declined=declined, failed=failed, checkpoint=checkpoint
        )
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        per_site = {
            site_name(msg.content, f"node-{msg.metadata.src_node_id}"): pooled_metrics(
                [msg.content[records.METRICS]], num_classes=self.num_classes
            )
            for msg in replies
            if not msg.has_error()
        }
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            pooled = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
            self.report.record_evaluate(server_round, pooled=pooled, per_site=per_site)
            log.info(
                "Round %d: pooled AUROC %.3f, sensitivity %.3f, specificity %.3f",
                server_round, pooled["auroc"], pooled["sensitivity"], pooled["specificity"],
            )
        return metrics
