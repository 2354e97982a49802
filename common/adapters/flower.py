"""Flower's private and internal APIs fedrad uses, behind one version check (Flower 1.41.0).

Importing this module checks the installed Flower and raises :class:`common.errors.IncompatibleVersion`
on any other version; Flower itself is imported only when a function here runs (a ClientApp
process starts per message). Wrapped: the Simulation Runtime entry ``flwr-simulation`` uses (the
public ``run_simulation`` cannot pass a run config), the SuperLink's delivery error codes, the
legacy ``fitins.*``/``fitres.*`` format SecAgg+ speaks, the workflows' stage state and round loop,
and the ``flwr`` CLI's run-config parser and console log handler.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.adapters.version import require_version

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import Context, RecordDict
    from flwr.common import FitRes
    from flwr.server import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.serverapp import Grid

TESTED_VERSION = "1.41.0"
"""The Flower version fedrad was tested with."""

require_version("flwr", TESTED_VERSION, install="flwr[simulation]")

# -- The flwr CLI's config and logging ---------------------------------------------------------------


def parse_config_args(items: list[str]) -> dict[str, Any]:
    """What the user passed with ``--run-config`` / ``-c`` (``key=value ...`` strings or a TOML file's path),
    parsed as ``flwr run --run-config`` parses it: flat keys to TOML values; ``ValueError`` or ``OSError``."""
    from flwr.common.config import parse_config_args as flwr_parse

    return dict(flwr_parse(items))


def console_warnings_only() -> None:
    """Make Flower's console handler show warnings and errors only (fedrad logs the rest to a file)."""
    import logging

    from flwr.common.logger import update_console_handler

    update_console_handler(level=logging.WARNING, timestamps=False, colored=True)


# -- Simulation Runtime --------------------------------------------------------------------------


def clientapp_metrics(on_runtime: Callable[[float], None]) -> Any:
    """The Simulation Runtime's ClientApp metrics (``VceMetrics``, for :func:`run_simulation`), also calling
    ``on_runtime(seconds)`` from the runtime's threads per ClientApp message."""
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics

    class _Counting(VceMetrics):  # type: ignore[misc, unused-ignore]
        def add_clientapp_runtime(self, runtime: float) -> None:
            super().add_clientapp_runtime(runtime)
            on_runtime(runtime)

    return _Counting()


@contextmanager
def serverapp_identity(*, run_id: int, task_id: int) -> Iterator[None]:
    """Act as the primary task ``task_id`` of run ``run_id`` (Flower stamps instruction messages with it);
    the previous identity is restored on exit."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_simulation(
    *, app_dir: Path, server_app_attr: str, client_app_attr: str, run_id: int, task_id: int,
    run_config: dict[str, Any], num_supernodes: int, backend_config: dict[str, Any], metrics: Any, verbose: bool,
) -> None:
    """Run the Flower App in ``app_dir`` on the Simulation Runtime, as ``flwr-simulation`` does.

    Parameters
    ----------
    app_dir
        The folder holding the App's ``pyproject.toml``.
    server_app_attr, client_app_attr
        ``module:attribute`` of the ServerApp and the ClientApp.
    run_id, task_id
        The run's id and its primary task's id.
    run_config
        Overrides of the App's ``[tool.flwr.app.config]`` defaults.
    num_supernodes, backend_config
        Virtual SuperNodes, and Flower's backend config (``client_resources``, ``init_args``).
    metrics, verbose
        From :func:`clientapp_metrics`, and Flower's verbose logging.
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(run_config)
    run.primary_task_id = task_id
    run.federation_id = NOOP_FEDERATION_ID
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
        run_config=get_fused_config_from_dir(app_dir, run.override_config),
    )
    with serverapp_identity(run_id=run_id, task_id=task_id):
        _run_simulation(
            server_app_attr=server_app_attr, client_app_attr=client_app_attr, num_supernodes=num_supernodes,
            backend_name="ray", backend_config=backend_config, app_dir=str(app_dir), run=run,
            server_app_context=context, is_app=True, verbose_logging=verbose,
            exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE, metrics=metrics,
        )


# -- messages --------------------------------------------------------------------------------------


def undelivered(error_code: int) -> str | None:
    """Why the SuperLink answered for a site, from a reply's ``error.code``: ``"expired"``, ``"node unavailable"``, or None."""
    from flwr.common.constant import ErrorCode

    if error_code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return "expired"
    return "node unavailable" if error_code == ErrorCode.NODE_UNAVAILABLE else None


def read_fit_instructions(content: RecordDict) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The arrays and the config of a legacy fit instruction (``fitins.*``, what SecAgg+ sends)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    fitins = recorddict_to_fitins(content, keep_input=True)
    return parameters_to_ndarrays(fitins.parameters), dict(fitins.config)


def fit_reply(arrays: list[np.ndarray], *, num_examples: int, metrics: dict[str, Any]) -> RecordDict:
    """A legacy fit reply (``fitres.*``, an OK ``FitRes``), what ``secaggplus_mod`` masks.

    Parameters
    ----------
    arrays, num_examples
        The site's new weights, one array per model tensor, and the examples it trained on (the update's weight);
        zeros and 0 from a site that declines the round.
    metrics
        The reply's fit metrics (the site's name, its training numbers or why it declined): Flower scalars.
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    fitres = FitRes(status=Status(code=Code.OK, message="OK"), parameters=ndarrays_to_parameters(arrays),
                    num_examples=num_examples, metrics=metrics)
    return fitres_to_recorddict(fitres, keep_input=True)


def secaggplus_stage(content: RecordDict) -> str | None:
    """The SecAgg+ stage a message is for (``"?"`` when unnamed), or None for other messages."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    if RECORD_KEY_CONFIGS not in content.config_records:
        return None
    return str(content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))


# -- the workflow API (SecAgg+) --------------------------------------------------------------------


def current_round(context: Context) -> int:
    """The round a ``LegacyContext`` under Flower's default workflow is in."""
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

    return int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])  # type: ignore[arg-type, unused-ignore]


def global_arrays(context: Context) -> list[np.ndarray]:
    """The current global parameters of a ``LegacyContext`` as arrays."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    record = context.state.array_records[MAIN_PARAMS_RECORD]
    return list(parameters_to_ndarrays(arrayrecord_to_parameters(record, keep_input=True)))


def run_workflow_rounds(
    grid: Grid, context: LegacyContext, *, first_round: int, fit: Callable[[Grid, LegacyContext], None],
    evaluate: Callable[[Grid, LegacyContext], None], on_round_done: Callable[[int], None],
) -> None:
    """Flower's ``DefaultWorkflow`` from round ``first_round`` on, with a hook after each round.

    Parameters
    ----------
    grid, context
        The ServerApp's grid and a ``LegacyContext`` (its strategy gives the initial parameters).
    first_round
        The first round to run (a resumed run starts after its last completed one).
    fit, evaluate
        The round's fit and evaluate workflows.
    on_round_done
        Called with the round number after each round's evaluation.
    """
    from flwr.app import ConfigRecord
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_init_params_workflow

    thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
    try:
        c_done.wait()
        default_init_params_workflow(grid, context)
        cfg = ConfigRecord({Key.START_TIME: timeit.default_timer()})
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        for server_round in range(first_round, context.config.num_rounds + 1):
            cfg[Key.CURRENT_ROUND] = server_round
            fit(grid, context)
            evaluate(grid, context)
            on_round_done(server_round)
    finally:
        f_stop.set()
        thread.join()


@dataclass(frozen=True)
class SecAggPlusHalt:
    """Why a SecAgg+ round stopped: ``active`` sites were left, ``threshold`` are needed to unmask."""

    active: int
    threshold: int


def run_secaggplus_stages(
    workflow: SecAggPlusWorkflow, grid: Grid, context: LegacyContext, *,
    before_unmask: Callable[[list[tuple[Any, FitRes]]], None],
) -> SecAggPlusHalt | None:
    """One round of Flower's SecAgg+ protocol (setup, share keys, collect masked vectors, unmask).

    Unlike ``SecAggPlusWorkflow.__call__`` it says why a round stopped (None: the sum was unmasked and
    aggregated), and a site that left before sharing its keys is not "unmasked" later (Flower 1.41 would
    ask the others for shares they never received, and the round would fail).

    Parameters
    ----------
    workflow, grid, context
        The configured workflow whose stages run, the grid to send through and the round's ``LegacyContext``.
    before_unmask
        Called with the sites' (still masked) fit results before the unmask stage.
    """
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    state = WorkflowState()
    stages = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage,
              workflow.unmask_stage)
    for index, stage in enumerate(stages):
        if index == 3:
            before_unmask(state.legacy_results)
        if not stage(grid, context, state):
            return SecAggPlusHalt(active=len(state.active_node_ids), threshold=state.threshold)
        if index == 1:
            state.sampled_node_ids = set(state.active_node_ids)
    return None
