"""Round bookkeeping shared by the plain and secure paths (:class:`RoundBook`), and the evaluation strategy.

:class:`FedradFedAvg` reuses Flower's ``FedAvg`` hooks to sample sites and pool their evaluation statistics.
After each binary evaluation it writes the threshold chosen on the pooled statistics (``operating-point``)
into that round's checkpoint — saved when the round closed, before its evaluation — and checks whether the
run is learning (:mod:`server.app.learning`), warning once when the verdict turns to a flag.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common import records
from common.config import YOUDEN, parse_operating_point
from common.errors import FederationError
from common.metrics import (
    SENSITIVITY_AT_THRESHOLD,
    SPECIFICITY_AT_THRESHOLD,
    THRESHOLD,
    describe_operating_point,
    pooled_metrics,
)
from server.app.checkpoint import (
    annotate_checkpoint,
    checkpoint_metadata,
    checkpoint_path,
    save_checkpoint,
    threshold_metadata,
)
from server.app.learning import FLAGGED, LEARNING, check_round
from server.app.report import RunReport

log = logging.getLogger(__name__)

PRIVACY_KEYS = (
    records.EPSILON, records.EPSILON_RDP, records.EPSILON_PRV, records.RUN_EPSILON, records.RUN_EPSILON_RDP,
    records.RUN_EPSILON_PRV, records.DELTA, records.MAX_EPSILON, records.NOISE_MULTIPLIER, records.SAMPLE_RATE,
    records.STEPS, records.MAX_GRAD_NORM,
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
    spent = [float(m[records.EPSILON]) for m in metrics if records.EPSILON in m]  # none: fl-sim's no-DP baseline
    return MetricRecord({**({"epsilon-max": max(spent)} if spent else {}), "examples": total})


def aggregate_evaluate_metrics(
    contents: list[RecordDict], weighted_by_key: str, *, num_classes: int = 2, operating_point: str | float = YOUDEN
) -> MetricRecord:
    """:func:`common.metrics.pooled_metrics` of the sites' summed sufficient statistics, plus ``eval-loss``.

    Parameters
    ----------
    contents
        The sites' evaluation replies; ``metrics``: statistics, ``num-examples``, ``eval-loss`` (example-weighted).
    weighted_by_key
        Flower's weighting key; unused, since statistics are counts that simply add up.
    num_classes
        K; 2 for the binary task.
    operating_point
        Binary: how the decision threshold is chosen (``"youden"`` or a target sensitivity).
    """
    del weighted_by_key  # statistics are counts: they add up, no weighting needed
    metrics = [c[records.METRICS] for c in contents]
    pooled = pooled_metrics(metrics, num_classes=num_classes, operating_point=operating_point)
    total = sum(int(m[records.NUM_EXAMPLES]) for m in metrics)
    pooled["eval-loss"] = sum(float(m[records.EVAL_LOSS]) * int(m[records.NUM_EXAMPLES]) for m in metrics) / max(total, 1)
    return MetricRecord(pooled)


class Names:
    """Node id → site name: enrolled sites from fl-server, others as they introduce themselves."""

    def __init__(self, known: dict[int, str] | None = None) -> None:
        self.enrolled = dict(known or {})
        self.learned: dict[int, str] = {}

    def of(self, node_id: int, content: Any = None) -> str:
        """The site behind ``node_id``; an unenrolled node is named by its first reply (``content``).

        Several nodes may carry one name over a run: an unenrolled (``--insecure``) site whose
        client restarts comes back as a new node. The round loop keeps two nodes that answer
        the same round under one name apart.
        """
        if node_id in self.enrolled:  # the key the SuperLink authenticated: a reply cannot claim another name
            return self.enrolled[node_id]
        if content is not None and node_id not in self.learned:
            self.learned[node_id] = site_name(content, f"node-{node_id}")
        return self.learned.get(node_id, f"node-{node_id}")


class RoundBook:
    """What one training round brought in, site by site: trained updates, declines (a site's own budget
    decision), failures and rejections. :meth:`close` checkpoints and reports the round."""

    def __init__(self, server_round: int, dropped: Mapping[str, str] | None = None) -> None:
        self.server_round = server_round
        self.site_metrics: dict[str, dict[str, Any]] = {}
        self.declined: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        self.rejected_metrics: dict[str, dict[str, Any]] = {}
        for name, reason in (dropped or {}).items():  # sites known to have dropped out already
            self.fail(name, reason)

    def fail(self, name: str, reason: str) -> None:
        """Book site ``name`` as having not trained this round (``reason``: deadline, lost connection...) and log it."""
        self.failed[name] = reason
        log.warning("Round %d: %s did not train: %s", self.server_round, name, reason)

    def reject(self, name: str, reason: str) -> None:
        """The site trained, but its update failed the coordinator's checks: it is left out of the aggregate."""
        self.rejected[name] = reason
        if name in self.site_metrics:  # it trained: its privacy facts stay in the report (the audit needs them)
            self.rejected_metrics[name] = self.site_metrics.pop(name)
        log.warning("Round %d: update of site %s REJECTED: %s", self.server_round, name, reason)

    def reply(self, name: str, metrics: Mapping[str, Any], site: Mapping[str, Any]) -> bool:
        """Book one answer; True when the site trained (booked in :attr:`site_metrics`), False when it declined.

        Parameters
        ----------
        name
            The site's name (:meth:`Names.of`).
        metrics
            The reply's metrics: ``num-examples`` (unless declined) and the privacy facts (:data:`PRIVACY_KEYS`).
        site
            The reply's site record: a ``declined`` reason, or the ledger facts (:data:`SITE_FACTS`).
        """
        if records.DECLINED in site:
            # The site's own budget decision: it sent no update, and the run goes on without it.
            self.declined[name] = str(site[records.DECLINED])
            log.warning("Round %d: site %s declined: %s", self.server_round, name, self.declined[name])
            return False
        self.site_metrics[name] = {
            records.NUM_EXAMPLES: int(metrics[records.NUM_EXAMPLES]),
            **{k: metrics[k] for k in PRIVACY_KEYS if k in metrics},
            **{k: site[k] for k in SITE_FACTS if k in site},
        }
        return True

    def close(self, report: RunReport, state: Mapping[str, Any] | None, *, aggregation: str | None = None) -> None:
        """Checkpoint ``state`` (the new global weights) into ``report.run_dir`` and record the round in ``report``.

        Parameters
        ----------
        report
            The run's report.
        state
            The new global weights; ``None`` when there is no aggregate (nobody trained).
        aggregation
            How the updates were combined, booked in the report; ``None`` leaves it out (SecAgg+).

        Raises
        ------
        BudgetsSpent
            When nobody trained and every answer was a decline.
        FederationError
            When nobody trained for any other reason.
        """
        r = self.server_round
        if state is None or not self.site_metrics:
            report.record_train(r, site_metrics={}, declined=self.declined, failed=self.failed, checkpoint=None,
                                rejected=self.rejected, rejected_metrics=self.rejected_metrics)
            if self.declined and not self.failed:
                raise BudgetsSpent(
                    f"Every site declined round {r}: "
                    + "; ".join(f"{k}: {v}" for k, v in sorted(self.declined.items()))
                )
            reasons = "; ".join(sorted({*self.failed.values(), *self.declined.values()})) or "no replies"
            raise FederationError(f"No site trained in round {r}: {reasons}")
        checkpoint = save_checkpoint(checkpoint_path(report.run_dir, r), state, metadata=checkpoint_metadata(report, r))
        for name, m in sorted(self.site_metrics.items()):
            log.info("Round %d: site %s trained on %d images, ε=%.3f (max %.3g)", r, name, m[records.NUM_EXAMPLES],
                     m.get(records.EPSILON, float("nan")), m.get(records.MAX_EPSILON, float("nan")))
        report.record_train(
            r, site_metrics=self.site_metrics, declined=self.declined, failed=self.failed, checkpoint=checkpoint,
            rejected=self.rejected, rejected_metrics=self.rejected_metrics, aggregation=aggregation,
        )


class FedradFedAvg(FedAvg):
    """Flower's FedAvg hooks for sampling sites and pooling evaluation; the report.

    Training rounds are run by :class:`server.app.rounds.PlainRounds` or :mod:`server.app.secure`.
    ``operating_point``: ``"youden"`` or a target sensitivity; by default the run config's (``report.config``).
    """

    def __init__(
        self, *, report: RunReport, num_classes: int = 2, names: Names | None = None,
        operating_point: str | float | None = None, **kwargs: Any,
    ) -> None:
        if operating_point is None:
            operating_point = parse_operating_point(report.config.get("operating-point", YOUDEN))
        super().__init__(
            train_metrics_aggr_fn=aggregate_train_metrics,
            evaluate_metrics_aggr_fn=partial(
                aggregate_evaluate_metrics, num_classes=num_classes, operating_point=operating_point
            ),
            **kwargs,
        )
        self.report = report
        self.num_classes = num_classes
        self.names = names or Names()
        self.operating_point = operating_point

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pool and book round ``server_round``'s evaluation replies (binary: threshold and learning check too);
        the pooled metrics, ``None`` when no reply was usable (nothing is booked then)."""
        replies = list(replies)
        per_site = {
            self.names.of(msg.metadata.src_node_id, msg.content): pooled_metrics(
                [msg.content[records.METRICS]], num_classes=self.num_classes, operating_point=self.operating_point
            )
            for msg in replies
            if not msg.has_error()
        }
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            pooled = {k: float(v) for k, v in metrics.items()}
            self.report.record_evaluate(server_round, pooled=pooled, per_site=per_site)
            self._log_pooled(server_round, pooled)
            if self.num_classes == 2:
                self._store_threshold(server_round, pooled.get(THRESHOLD, float("nan")))
                self._check_learning(server_round)
        return metrics

    def _log_pooled(self, server_round: int, pooled: dict[str, float]) -> None:
        if THRESHOLD not in pooled:  # multi-class: macro averages, no threshold
            log.info("Round %d: pooled AUROC %.3f, sensitivity %.3f, specificity %.3f",
                     server_round, pooled["auroc"], pooled["sensitivity"], pooled["specificity"])
            return
        log.info("Round %d: pooled AUROC %.3f; at threshold 0.5 sensitivity %.3f, specificity %.3f; "
                 "at threshold %.3f (%s) sensitivity %.3f, specificity %.3f",
                 server_round, pooled["auroc"], pooled["sensitivity"], pooled["specificity"], pooled[THRESHOLD],
                 describe_operating_point(self.operating_point), pooled[SENSITIVITY_AT_THRESHOLD],
                 pooled[SPECIFICITY_AT_THRESHOLD])

    def _store_threshold(self, server_round: int, threshold: float) -> None:
        """Write the threshold chosen on this round's evaluation into its checkpoint (fl-predict's default);
        a failure costs a warning: the threshold is in the report too, where fl-predict also looks."""
        name = self.report.rounds.get(server_round, {}).get("checkpoint")
        if name is None or not 0 < threshold < 1:  # no checkpoint, or no threshold (a class absent)
            return
        try:
            annotate_checkpoint(self.report.run_dir / name, threshold_metadata(threshold, self.operating_point))
        except Exception as exc:  # noqa: BLE001 - a convenience for fl-predict; the run goes on
            log.warning("Round %d: could not write the chosen threshold into %s (%s: %s); it is in report.json",
                        server_round, name, type(exc).__name__, exc)

    def _check_learning(self, server_round: int) -> None:
        """Judge the run on the rounds so far; log when the verdict turns to a flag, or back to learning."""
        rounds = self.report.rounds
        earlier = [r for r in sorted(rounds) if r < server_round and "learning" in rounds[r]]
        previous = rounds[earlier[-1]]["learning"].get("status") if earlier else None
        verdict = check_round(rounds, self.report.config, server_round)
        if verdict is None:
            return
        self.report.record_learning(server_round, verdict.to_json())
        if verdict.flagged and verdict.status != previous:
            log.warning("%s", verdict.message)
        elif verdict.status == LEARNING and previous in FLAGGED:
            log.info("%s", verdict.message)
