"""The fedrad ServerApp's main: config → model → strategy → round engine → report."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RESUME_RUN_ID_KEY, Launch, RunConfig
from common.flower import use_flower_log_handlers
from server.app.report import RunReport
from server.app.resume import CoordinatorState, load_state, load_weights, participation, save_state
from server.app.rounds import PlainRounds, RoundEngine, RunStopped
from server.app.secure import SecureRounds
from server.app.strategy import BudgetsSpent, FedradFedAvg, Names

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
app = ServerApp()

INSECURE_WARNING = (
    "PLAIN TRANSPORT: updates travel unencrypted. Use this only on loopback for demos and tests."
)
PLAIN_AGGREGATION_WARNING = (
    "NO SECURE AGGREGATION (secagg=false): the coordinator sees every site's update in the clear."
)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds (from the last completed one when resuming) and write the run report."""
    from common.weights import model_for_run, run_init_weights

    use_flower_log_handlers("server", "common")
    run, launch = RunConfig.from_flower(context.run_config), Launch.from_flower(context.run_config)
    folder = launch.run_folder(context.run_id)
    run_dir, run_id = folder.path, launch.run_id(context.run_id)
    aggregation = "SecAgg+" if run.secagg.enabled else f"plain {run.rounds.aggregation} (no secure aggregation)"
    transport = f"{launch.transport or 'unknown'}; {aggregation}"
    config = {k: v for k, v in context.run_config.items() if k != RESUME_RUN_ID_KEY}
    model = model_for_run(run)
    weights = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    saved: OrderedDict[str, torch.Tensor] | None = None
    if launch.resume_run_id:
        state = load_state(run_dir)
        report = RunReport.load(run_dir, keep_rounds=state.completed_round)
        report.status = "running"
        report.transport = transport
        saved = load_weights(run_dir, state)
        if saved is not None:
            weights = OrderedDict((k, saved[k]) for k in weights)
        first, segments = state.completed_round + 1, list(state.segments)
        log.info("Resuming run %s at round %d of %d (Flower run %d)", run_id, first, run.num_server_rounds, context.run_id)
    else:
        report = RunReport(run_dir=run_dir, run_id=int(run_id), config=config, transport=transport,
                           kind="simulation" if launch.sim_sites else "deployment")
        first, segments = 1, []
    segments.append({"flower-run-id": context.run_id, "first-round": first, "started": time.time()})
    if saved is None and launch.init_weights.path:  # --init-weights, checked by the launcher; a checkpoint wins
        weights = run_init_weights(launch, model=model)
    if not transport.startswith(("tls", "simulation")):
        log.warning(INSECURE_WARNING)
    if not run.secagg.enabled and report.kind != "simulation":
        log.warning(PLAIN_AGGREGATION_WARNING)
    report.save()
    names = Names(launch.site_nodes)
    strategy = FedradFedAvg(
        report=report, names=names, num_classes=len(run.classes), fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_sites,  # sample at least min-sites; the quorum of answers is the round loop's
        min_evaluate_nodes=1 if run.fraction_evaluate > 0 else 0, min_available_nodes=1,
    )

    def round_done(server_round: int, new_weights: OrderedDict[str, torch.Tensor]) -> None:
        del new_weights  # already in the round's checkpoint
        checkpoint = report.rounds[server_round].get("checkpoint")
        save_state(run_dir, CoordinatorState(
            run_id=run_id, completed_round=server_round, num_rounds=run.num_server_rounds, checkpoint=checkpoint,
            run_config=config, participation=participation(report), segments=segments,
            strategy={"aggregation": run.rounds.aggregation, "trim-fraction": run.rounds.trim_fraction,
                      "norm-factor": run.rounds.norm_factor, "secagg": run.secagg.enabled,
                      "names": {str(k): v for k, v in {**names.learned, **names.enrolled}.items()}},
        ))

    if report.kind != "simulation":  # fl-sim keeps Flower's in-memory grid as it is
        from server.app.grid import PromptGrid

        grid = PromptGrid(grid)
    engine: RoundEngine = (
        SecureRounds(grid, context, run=run, strategy=strategy, on_round_done=round_done) if run.secagg.enabled
        else PlainRounds(grid, run=run, strategy=strategy, names=names, on_round_done=round_done)
    )
    try:
        if first > run.num_server_rounds:
            log.info("Run %s had already completed its %d rounds", run_id, run.num_server_rounds)
        else:
            engine.run_rounds(first, weights)
    except BudgetsSpent as exc:
        # Each site enforces its own budget; when none can train any more the run ends early, cleanly.
        log.warning("Stopping early: %s", exc)
        report.finish("stopped: every site's privacy budget is spent")
        return
    except RunStopped as exc:
        log.error("Stopping: %s", exc)
        report.finish(f"stopped: {exc}")
        raise
    except BaseException:
        report.finish("failed")
        raise
    report.finish("completed")
    log.info("Run report: %s", folder.report_json)
