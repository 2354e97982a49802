"""Rounds under secure aggregation: Flower's SecAgg+ workflow (its workflow API only), fedrad's bookkeeping.

- fit: :class:`FedradSecAggPlus`, Flower's ``SecAggPlusWorkflow`` that stops the run with the reason (instead
  of silently skipping a round) when too few sites are left, knowing who dropped out at which stage;
- aggregation: :class:`SecureFedAvg`, the legacy ``FedAvg`` hook, gets the unmasked weighted sum and each
  site's metrics; it checkpoints and reports the round like the plain path;
- evaluation: plain messages with sufficient statistics only (:func:`evaluate_workflow`), as in a plain run.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow

from common import records
from common.adapters import flower
from common.config import Launch, RunConfig, SecAggConfig, check_model_fits
from common.errors import FederationError
from server.app.report import RunReport
from server.app.rounds import destinations, origin
from server.app.strategy import SITE_FACTS, RoundBook

if TYPE_CHECKING:
    import numpy as np
    import torch
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

    from server.app.strategy import FedradFedAvg

log = logging.getLogger(__name__)

SITE_KEYS = (records.SITE_NAME, records.DECLINED, *SITE_FACTS)


class SecAggHalted(FederationError):
    """Too few sites were left for SecAgg+ to unmask the round's sum."""


class SecureFedAvg(LegacyFedAvg):
    """The legacy FedAvg hook Flower's SecAgg+ workflow calls with the unmasked sum."""

    def __init__(self, *, report: RunReport, keys: list[str], run: RunConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.report = report
        self.keys = keys
        self.run = run
        self.dropped: dict[str, str] = {}  # set by FedradSecAggPlus before each aggregation

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[tuple[Any, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Book the round, checkpoint the sum and report it; the new weights and ``{"examples": N}`` (trained).

        Parameters
        ----------
        server_round
            The round being aggregated.
        results
            Per site: the same unmasked weighted mean, and its own metrics (name, examples, privacy facts, decline).
        failures
            Not read: the sites that dropped out, and at which SecAgg+ stage, are in :attr:`dropped`.

        Raises
        ------
        BudgetsSpent
            When every site that answered declined the round.
        FederationError
            When no site trained for another reason, or the sum's arrays do not match the model's keys.
        """
        book = RoundBook(server_round, self.dropped)
        trained: list[FitRes] = []
        for proxy, fitres in results:
            metrics = dict(fitres.metrics)
            name = str(metrics.get(records.SITE_NAME, f"node-{proxy.node_id}"))
            site = {k: metrics.pop(k) for k in SITE_KEYS if k in metrics}
            metrics.setdefault(records.NUM_EXAMPLES, fitres.num_examples)
            if book.reply(name, metrics, site):
                trained.append(fitres)
        total = sum(f.num_examples for f in trained)
        # SecAgg+ gives every result the same unmasked weighted mean.
        state = self.to_state(parameters_to_ndarrays(trained[0].parameters)) if total > 0 else None
        book.close(self.report, state)
        assert state is not None  # close() raised otherwise
        return ndarrays_to_parameters([t.numpy() for t in state.values()]), {"examples": total}

    def to_state(self, arrays: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
        """Name the aggregate's arrays with the model's state-dict keys (float32, like the model)."""
        import torch

        if len(arrays) != len(self.keys):
            raise FederationError(f"The secure aggregate has {len(arrays)} arrays, the model {len(self.keys)}")
        return OrderedDict((k, torch.from_numpy(a.astype("float32"))) for k, a in zip(self.keys, arrays, strict=True))


class _TrackingGrid:
    """The ServerApp's grid, noting which site failed or fell silent at which stage."""

    def __init__(self, grid: Grid, names: dict[int, str], server_round: int) -> None:
        self._grid = grid
        self.names = names
        self.dropped: dict[str, str] = {}
        self.stage = 0
        self.server_round = server_round

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        sent_to = destinations(messages)  # the SuperLink answers for an unreachable node: go by what a reply answers
        answered = {origin(m, sent_to) for m in replies}
        stage = ("setup", "share keys", "collect masked vectors", "unmask")[min(self.stage, 3)]
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.dropped[self.name(m.metadata.dst_node_id)] = f"no answer within {timeout:g} s at SecAgg+ stage '{stage}'"
        for m in replies:
            node = origin(m, sent_to)
            if m.has_error():
                self.dropped[self.name(node)] = f"failed at SecAgg+ stage '{stage}': {m.error.reason}"
            elif self.stage == 2:
                metrics = m.content.config_records.get("fitres.metrics", {})
                if records.SITE_NAME in metrics:
                    self.names[node] = str(metrics[records.SITE_NAME])
        ok = len([m for m in replies if not m.has_error()])
        log.info("Round %d, SecAgg+ stage '%s': %d of %d sites answered", self.server_round, stage, ok, len(messages))
        self.stage += 1
        return replies


class FedradSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow; it stops the run with the reason when a round cannot be unmasked."""

    def __init__(self, secagg: SecAggConfig, names: dict[int, str] | None = None) -> None:
        super().__init__(
            num_shares=secagg.shares, reconstruction_threshold=secagg.threshold, max_weight=float(secagg.max_weight),
            clipping_range=secagg.clipping_range, quantization_range=secagg.quantization_range,
            modulus_range=secagg.modulus_range, timeout=secagg.timeout,
        )
        self.names: dict[int, str] = dict(names or {})

    def __call__(self, grid: Grid, context: LegacyContext) -> None:  # type: ignore[override, unused-ignore]
        server_round = flower.current_round(context)
        log.info("[ROUND %d/%d] (SecAgg+)", server_round, context.config.num_rounds)
        tracking = _TrackingGrid(grid, self.names, server_round)
        strategy: SecureFedAvg = context.strategy  # type: ignore[assignment, unused-ignore]

        def before_unmask(results: list[tuple[Any, FitRes]]) -> None:
            if results and all(fitres.num_examples == 0 for _, fitres in results):
                # Everybody declined: there is no sum to unmask (and no weight to divide by).
                strategy.dropped = dict(tracking.dropped)
                strategy.aggregate_fit(server_round, results, [])
            strategy.dropped = tracking.dropped  # the same dict: the unmask stage's own dropouts count too

        halt = flower.run_secaggplus_stages(self, tracking, context, before_unmask=before_unmask)  # type: ignore[arg-type, unused-ignore]
        if halt is not None:
            book = RoundBook(server_round, tracking.dropped)
            strategy.report.record_train(server_round, site_metrics={}, declined={}, failed=book.failed, checkpoint=None)
            raise SecAggHalted(
                f"Round {server_round}: secure aggregation stopped at stage {tracking.stage}: "
                f"{halt.active} site(s) left, {halt.threshold} needed to unmask"
                + (f" ({'; '.join(f'{k}: {v}' for k, v in sorted(tracking.dropped.items()))})" if tracking.dropped else "")
            )


def evaluate_workflow(evaluator: FedradFedAvg, keys: list[str]) -> Callable[[Grid, LegacyContext], None]:
    """Federated evaluation of the current global weights, in plain messages (statistics only)."""

    def evaluate(grid: Grid, context: LegacyContext) -> None:
        from flwr.app import ArrayRecord, ConfigRecord

        server_round = flower.current_round(context)
        strategy: SecureFedAvg = context.strategy  # type: ignore[assignment, unused-ignore]
        arrays = ArrayRecord(strategy.to_state(flower.global_arrays(context)))
        messages = evaluator.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        if not messages:
            return
        replies = grid.send_and_receive(messages, timeout=strategy.run.secagg.timeout)
        evaluator.aggregate_evaluate(server_round, replies)

    return evaluate


class SecureRounds:
    """Rounds under SecAgg+ (a :class:`server.app.rounds.RoundEngine`); BudgetsSpent / SecAggHalted stop early."""

    def __init__(self, grid: Grid, context: Context, *, run: RunConfig, strategy: FedradFedAvg,
                 on_round_done: Callable[[int, OrderedDict[str, torch.Tensor]], None]) -> None:
        self.grid, self.context, self.run, self.evaluator, self.on_round_done = grid, context, run, strategy, on_round_done

    def run_rounds(self, first: int, weights: OrderedDict[str, torch.Tensor]) -> None:
        """Rounds ``first..num-server-rounds`` from the global ``weights``."""
        run = self.run
        if first == 1:
            check_model_fits(weights, run.secagg)  # a resumed model has trained inside the range already
        keys = list(weights)
        strategy = SecureFedAvg(
            report=self.evaluator.report, keys=keys, run=run, fraction_fit=run.fraction_train,
            fraction_evaluate=0.0,  # evaluation runs in plain messages, see evaluate_workflow
            min_fit_clients=max(run.min_sites, 2), min_available_clients=max(run.min_sites, 2),
            on_fit_config_fn=lambda r: {records.SERVER_ROUND: r, "local-epochs": run.local_epochs},
            initial_parameters=ndarrays_to_parameters([t.numpy() for t in weights.values()]),
        )
        legacy = LegacyContext(self.context, config=ServerConfig(num_rounds=run.num_server_rounds), strategy=strategy)
        flower.run_workflow_rounds(
            self.grid, legacy, first_round=first,
            on_round_done=lambda r: self.on_round_done(r, strategy.to_state(flower.global_arrays(legacy))),
            fit=FedradSecAggPlus(run.secagg, Launch.from_flower(self.context.run_config).site_nodes),
            evaluate=evaluate_workflow(self.evaluator, keys),
        )
