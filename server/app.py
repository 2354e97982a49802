"""The fedrad ServerApp: wiring only (config → model → strategy → report)."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.errors import ConfigError
from common.flower import use_flower_log_handlers
from server.report import RunReport
from server.strategy import BudgetsSpent, FedradFedAvg

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
    """Run FedAvg for the configured rounds and write the run report."""
    from common.models import build_model

    use_flower_log_handlers("server", "common")
    run = RunConfig.from_flower(context.run_config)
    if not run.workdir:
        raise ConfigError("Expected `workdir` in the run config (set by fl-server), but it is empty")
    runs_dir = str(context.run_config.get("runs-dir", "") or "")
    run_dir = (Path(runs_dir) if runs_dir else Path(run.workdir) / "runs") / str(context.run_id)
    transport = str(context.run_config.get("transport", "")) or "unknown"
    aggregation = "SecAgg+" if run.secagg.enabled else "plain FedAvg (no secure aggregation)"
    report = RunReport(
        run_dir=run_dir,
        run_id=context.run_id,
        config={k: v for k, v in context.run_config.items()},
        transport=f"{transport}; {aggregation}",
        kind="simulation" if context.run_config.get("sim-sites") else "deployment",
    )
    if not transport.startswith(("tls", "simulation")):
        log.warning(INSECURE_WARNING)
    if not run.secagg.enabled and report.kind != "simulation":
        log.warning(PLAIN_AGGREGATION_WARNING)
    report.save()
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes), seed=run.seed)
    strategy = FedradFedAvg(
        report=report,
        num_classes=len(run.classes),
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_sites,
        min_evaluate_nodes=run.min_sites if run.fraction_evaluate > 0 else 0,
        min_available_nodes=run.min_sites,
    )
    try:
        if run.secagg.enabled:
            from server.secure import run_secure

            run_secure(grid, context, run=run, report=report, evaluator=strategy, initial=model.state_dict())
        else:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=run.num_server_rounds,
                train_config=ConfigRecord({"local-epochs": run.local_epochs}),
            )
    except BudgetsSpent as exc:
        # Each site enforces its own budget; when none can train any more the run ends early, cleanly.
        log.warning("Stopping early: %s", exc)
        report.finish("stopped: every site's privacy budget is spent")
        return
    except BaseException:
        report.finish("failed")
        raise
    report.finish("completed")
    log.info("Run report: %s", run_dir / "report.json")

