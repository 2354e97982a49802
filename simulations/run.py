"""One simulated run: the run config fl-sim sets; data, caches and site table; the Flower App run with a live display.

What :func:`simulate` leaves is described in :mod:`simulations.sim`; ``fl-sim compare``
(:mod:`simulations.compare`) runs it once per federated arm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY, LAUNCH_KEYS, Launch, RunConfig
from common.errors import ConfigError, FederationError
from common.files import write_atomic
from common.runfolder import RunFolder
from simulations.runtime import SimulationMetrics, new_run_id, project_dir, run_app
from simulations.scenario import SCENARIO_LAUNCH_KEYS, Scenario
from simulations.sites import prepare_data, site_rows, warm_caches

SIM_TRANSPORT = "simulation (Flower Simulation Runtime, Ray, one process)"


@dataclass(frozen=True)
class SimResult:
    """One finished simulated run."""

    run_id: int
    run_dir: Path
    report: dict[str, Any]
    seconds: float
    messages: int
    clientapp_seconds: float
    finished: list[tuple[float, float]]  # per ClientApp message: (time.time() at its end, seconds), in that order


def project_run_defaults() -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` defaults of the project."""
    import tomllib

    with (project_dir() / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def run_overrides(sc: Scenario, *, workdir: Path, runs_dir: Path, table: Path) -> dict[str, Any]:
    """The scenario's ``[run]`` values plus what fl-sim sets itself; unknown keys, and keys fedrad sets, are errors.

    Parameters
    ----------
    sc
        The scenario: its ``[run]`` table and its number of sites.
    workdir, runs_dir
        fl-sim's work folder (the run's ``workdir``), and where the ServerApp writes ``<run-id>/``.
    table
        The JSON site table (one node config per virtual site) the run reads (its ``sim-sites``).

    Returns
    -------
    dict[str, Any]
        Flower run-config overrides: the scenario's ``[run]`` values; ``min-sites`` when ``[run]`` leaves it
        out (the project's default, at least 2, at most the number of sites); the launch keys; the checked
        ``init-weights`` and its SHA-256 when given; the SecAgg+ encoding sized from the initial weights
        when SecAgg+ is on.

    Raises
    ------
    ConfigError
        When ``[run]`` holds a key the project's run config does not know, a value does not check, or
        the initial weights do not fit the run's model or SecAgg+ encoding.
    """
    defaults = project_run_defaults()
    unknown = sorted(set(sc.run) - set(defaults))
    if unknown:
        known = (k for k in defaults if k not in LAUNCH_KEYS or k in SCENARIO_LAUNCH_KEYS)
        raise ConfigError(
            f"Expected [run] keys of the project's run config, but got {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    overrides = dict(sc.run)
    overrides.setdefault("min-sites", min(sc.sites.count, max(2, int(defaults.get("min-sites", 2)))))
    launch = Launch(workdir=str(workdir), runs_dir=str(runs_dir), sim_sites=str(table), transport=SIM_TRANSPORT)
    overrides.update(launch.to_flower())
    if overrides.get(INIT_WEIGHTS_KEY):
        overrides.update(checked_init_weights(overrides, sites=sc.sites.count))
    else:
        run = checked_run_config(overrides)
        if run.secagg.enabled:
            from common.weights import sized_encoding

            overrides.update(sized_encoding(overrides, run=run, start=None, sites=sc.sites.count))
    return overrides


def checked_init_weights(overrides: dict[str, Any], *, sites: int | None = None) -> dict[str, Any]:
    """The scenario's ``run.init-weights`` file (``fl-sim run --init-weights FILE``), checked against the run's model.

    A relative path is taken from the current folder. A scenario may pin the file's
    hash with ``run.init-weights-sha256``; otherwise it is computed here.

    Returns
    -------
    dict
        ``init-weights`` (the absolute path) and ``init-weights-sha256``, for the run config; with
        SecAgg+ on, also its encoding sized from these weights (an explicit one must fit them).
    """
    from common.weights import init_weights_config, load_init_weights, model_for_run, sized_encoding

    path, pinned = overrides[INIT_WEIGHTS_KEY], overrides.get(INIT_WEIGHTS_SHA256_KEY) or None
    if not isinstance(path, str) or (pinned is not None and not isinstance(pinned, str)):
        raise ConfigError(
            f"Expected `run.init-weights` to be a file path (and `run.init-weights-sha256` a hex string), "
            f"but got {path!r}"
        )
    rest = {k: v for k, v in overrides.items() if k not in SCENARIO_LAUNCH_KEYS}
    run = checked_run_config(rest)
    entries = init_weights_config(Path(path), run=run, expected_sha256=pinned)
    if not run.secagg.enabled:
        return entries
    weights, _ = load_init_weights(Path(entries[INIT_WEIGHTS_KEY]), model=model_for_run(run),
                                   expected_sha256=entries[INIT_WEIGHTS_SHA256_KEY])
    return {**entries, **sized_encoding(rest, run=run, start=weights, sites=sites)}


def checked_run_config(overrides: dict[str, Any]) -> RunConfig:
    """The run's config: the project's defaults with ``overrides``, validated as the ServerApp does."""
    return RunConfig.from_flower({**project_run_defaults(), **overrides})


def _read_report(folder: RunFolder) -> dict[str, Any]:
    try:
        return folder.read_report()
    except (OSError, ValueError):
        return {}


def _show_progress(folder: RunFolder, total: int, sites: int, metrics: SimulationMetrics,
                   stop: threading.Event) -> None:
    """Show rounds and site messages live (from report.json and the runtime's counters) until ``stop``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        rounds = bar.add_task("rounds", total=total)
        messages = bar.add_task(f"site messages ({sites} sites)", total=None)
        while not stop.wait(0.5):
            report = _read_report(folder)
            done = [r for r in report.get("rounds", []) if "evaluate" in r or "train" in r]
            last = next((r for r in reversed(report.get("rounds", [])) if "evaluate" in r), None)
            auroc = (last or {}).get("evaluate", {}).get("pooled", {}).get("auroc")
            spent = [s.get("epsilon") for s in report.get("sites", {}).values() if s.get("epsilon") is not None]
            text = "rounds"
            if auroc is not None:
                text += f"  AUROC {auroc:.3f}"
            if spent:
                text += f"  ε ≤ {max(spent):.2f}"
            bar.update(rounds, completed=len(done), description=text)
            with metrics.lock:
                n, secs = metrics.messages, metrics.clientapp_seconds
            bar.update(messages, completed=n, description=f"site messages ({sites} sites, {secs:.0f} s compute)")
        report = _read_report(folder)
        bar.update(rounds, completed=len([r for r in report.get("rounds", []) if "train" in r]))


@contextlib.contextmanager
def _progress(run_dir: Path, rounds: int, sites: int, metrics: SimulationMetrics, enabled: bool) -> Iterator[None]:
    """:func:`_show_progress` in a thread while the block runs (when ``enabled``)."""
    stop = threading.Event()
    thread = threading.Thread(target=_show_progress, args=(RunFolder(run_dir), rounds, sites, metrics, stop),
                              name="fl-sim-progress", daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if enabled:
            thread.join(timeout=5)


@contextlib.contextmanager
def _flower_logs(log_file: Path, verbose: bool) -> Iterator[None]:
    """Flower's console shows warnings only; everything (ours included) goes to ``log_file`` for the run."""
    from common.adapters.flower import console_warnings_only

    if not verbose:
        console_warnings_only()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    flwr_logger.propagate = False
    try:
        yield
    finally:
        flwr_logger.removeHandler(handler)
        for name in ("server", "common", "client"):  # use_flower_log_handlers copied it onto ours
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def simulate(sc: Scenario, *, workdir: Path, runs_dir: Path, progress: bool = True, verbose: bool = False,
             echo: Any = None) -> SimResult:
    """Run one scenario end to end; returns the run's report (``runs_dir/<run-id>/report.json``).

    Parameters
    ----------
    sc
        The scenario to run.
    workdir
        fl-sim's work folder: data, caches, site tables, ledgers and the run's log (``logs/<run-id>.log``).
    runs_dir
        Where the ServerApp leaves ``<run-id>/`` (report, checkpoints, plots).
    progress, verbose
        Show a live display of rounds and site messages; show Flower's whole console output (else
        warnings only; the log file gets everything).
    echo
        Called with each line of progress text (sites ready, the run's settings); None for silence.

    Returns
    -------
    SimResult
        The run's id, folder and ``report.json``, the seconds the run took (data preparation aside), and
        the ClientApp messages and compute seconds the runtime counted.

    Raises
    ------
    ConfigError
        When the scenario does not check, or has fewer sites than ``min-sites``.
    FederationError
        When the simulation stops with an error or leaves no report; an exception behind the runtime's
        error (other than a RuntimeError) is raised as itself.
    """
    say = echo or (lambda _text: None)
    workdir, runs_dir = workdir.resolve(), runs_dir.resolve()
    run_id = new_run_id()
    table = workdir / "tables" / f"{run_id}.json"
    overrides = run_overrides(sc, workdir=workdir, runs_dir=runs_dir, table=table)
    run = checked_run_config(overrides)
    t0 = time.monotonic()
    data_dirs = prepare_data(sc.sites, workdir, classes=run.classes)
    sites_dir = workdir / "sites" / sc.sites.data_key()
    warm_caches(data_dirs, sites_dir, run)
    say(f"{len(data_dirs)} sites ready ({time.monotonic() - t0:.1f} s: data and preprocessing caches)")
    if len(data_dirs) < run.min_sites:
        raise ConfigError(f"Expected at least min-sites={run.min_sites} sites, but the scenario has {len(data_dirs)}")
    rows = site_rows(sc, data_dirs, sites_dir=sites_dir, ledgers_dir=workdir / "ledgers" / str(run_id))
    write_atomic(table, json.dumps(rows, indent=1))
    run_dir = runs_dir / str(run_id)
    metrics = SimulationMetrics()
    budgets = ", ".join(sorted({f"{r['max-epsilon']:g}" for r in rows}))
    say(
        f"run {run_id}: {len(rows)} sites, {run.num_server_rounds} rounds, "
        f"DP {f'on (max ε {budgets})' if sc.privacy.dp else 'OFF'}, "
        f"SecAgg+ {'on' if run.secagg.enabled else 'off'}, {sc.simulation.concurrency} sites at a time"
    )
    t1 = time.monotonic()
    log = workdir / "logs" / f"{run_id}.log"
    with _flower_logs(log, verbose), _progress(run_dir, run.num_server_rounds, len(rows), metrics, progress):
        try:
            run_app(
                run_id=run_id, num_sites=len(rows), run_config=overrides, concurrency=sc.simulation.concurrency,
                threads_per_site=sc.simulation.threads_per_site, metrics=metrics, verbose=verbose,
            )
        except RuntimeError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, Exception) and not isinstance(cause, RuntimeError):
                raise cause from None
            raise FederationError(f"the simulation stopped: {exc} (log: {log})") from exc
    seconds = time.monotonic() - t1
    try:
        report = RunFolder(run_dir).read_report()
    except (OSError, ValueError) as exc:
        raise FederationError(f"the simulation left no report in {run_dir} ({exc})") from exc
    return SimResult(
        run_id=run_id, run_dir=run_dir, report=report, seconds=seconds,
        messages=metrics.messages, clientapp_seconds=metrics.clientapp_seconds, finished=sorted(metrics.finished),
    )
