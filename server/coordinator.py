"""The steps of ``fl-server serve`` (launching, not in the federation): checks first, then run, then report."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import (
    RESUME_RUN_ID_KEY,
    SITE_NODES_KEY,
    WINDOW_PRESETS,
    InitWeightsConfig,
    Launch,
    RunConfig,
    refuse_launch_keys,
)
from common.errors import ConfigError, FederationError
from common.processes import LOOPBACK, ProcessSet, free_port, port_is_free
from common.runfolder import RunFolder
from server import superlink

if TYPE_CHECKING:
    from collections import OrderedDict
    from collections.abc import Iterable, Mapping

    import torch

log = logging.getLogger("fl-server")
INSECURE_BANNER = (
    "WARNING: --insecure: plain HTTP. The SuperLink listens on 127.0.0.1 only, without TLS "
    "or site enrollment: for demos and tests on one machine."
)


@dataclass(frozen=True)
class Transport:
    """How the sites reach the SuperLink: TLS via the Fleet-API proxy with enrolled keys, or plain loopback HTTP."""

    description: str  # the run config's ``transport``, for the report
    bind: str  # the address the proxy listens on
    tls: tuple[Path, Path, Path] | None = None  # (CA, server certificate, server key)
    enrolled: dict[str, dict[str, str]] = field(default_factory=dict)


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal, as ``flwr run --run-config 'key=VALUE'`` reads it."""
    import tomli_w

    return tomli_w.dumps({"v": value})[len("v = "):-1]


def _config_arg(entries: Mapping[str, Any]) -> str:
    """One ``--run-config`` argument setting ``entries`` (``key=VALUE ...``)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in entries.items())


def _parse_config_args(args: list[str], *, shown: list[str]) -> dict[str, Any]:
    """``args`` parsed as Flower does; ConfigError naming ``shown`` when they are not ``key=value`` pairs."""
    from common.adapters.flower import parse_config_args

    try:
        return parse_config_args(args)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"Expected `--run-config` as key=value pairs, but got {shown!r} ({exc})") from None


def init_weights_config(init_weights: Path | None, *, resume: Path | None) -> InitWeightsConfig:
    """``--init-weights``: the file's absolute path and SHA-256 (empty without it)."""
    if init_weights is None:
        return InitWeightsConfig()
    from common.weights import file_sha256

    if resume is not None:
        raise ConfigError(
            "Expected no `--init-weights` with `--resume`, but got both; a resumed run goes on from its last "
            "checkpoint (or from the initial weights it started with)"
        )
    path = init_weights.expanduser().resolve()
    return InitWeightsConfig(path=str(path), sha256=file_sha256(path))


def resume_config(run_dir: Path, *, insecure: bool) -> tuple[Path, dict[str, Any]]:
    """The workdir and saved run config (with ``resume-run-id``) of the run to resume (one clear error when it cannot be)."""
    from server.app.resume import load_state

    state, workdir = load_state(run_dir), RunFolder(run_dir).workdir
    if workdir is None:
        raise ConfigError(f"Expected a run folder <workdir>/runs/<run-id>, but got {run_dir}")
    if state.finished:
        raise ConfigError(f"Run {state.run_id} already completed its {state.num_rounds} rounds; nothing to resume")
    was_insecure = Launch.from_flower(state.run_config).transport.startswith("insecure")
    if was_insecure != insecure:
        raise ConfigError(
            f"Run {state.run_id} was served {'with' if was_insecure else 'without'} --insecure; resume it the same way"
        )
    log.info("Resuming run %s after round %d of %d", state.run_id, state.completed_round, state.num_rounds)
    return workdir, {**state.run_config, RESUME_RUN_ID_KEY: state.run_id}


def check_address(*, window: str, insecure: bool, host: str, port: int) -> str:
    """Check ``--window``, ``--host`` and ``--port``; returns the address to bind (``*`` spelled ``0.0.0.0``).

    Parameters
    ----------
    window
        The name of a window preset (:data:`common.config.WINDOW_PRESETS`).
    insecure
        ``--insecure``: then ``host`` must be 127.0.0.1.
    host, port
        ``--host`` (``0.0.0.0`` or ``*``: every interface) and ``--port``, which must be free there.

    Raises
    ------
    ConfigError
        When the window preset is unknown, or ``insecure`` is asked on another host than loopback.
    FederationError
        When ``port`` is already in use on the bind address.
    """
    if window not in WINDOW_PRESETS:
        raise ConfigError(f"Expected `--window` to be one of {', '.join(WINDOW_PRESETS)}, but got {window!r}")
    if insecure and host != LOOPBACK:
        raise ConfigError(f"`--insecure` binds {LOOPBACK} only, but got --host {host}; drop --insecure to serve TLS")
    bind = "0.0.0.0" if host in ("0.0.0.0", "*") else host
    if not port_is_free(port, bind):
        raise FederationError(f"Port {port} on {bind} is already in use; choose another with --port")
    return bind


def open_workdir(workdir: Path) -> Path:
    """Create the workdir (absolute); FederationError when another ``fl-server`` serves from it."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if superlink.live_superlink(workdir) is not None:
        raise FederationError(f"An fl-server already runs in {workdir}; one coordinator per workdir")
    return workdir


def stage_app(source: Path, workdir: Path) -> Path:
    """The app to submit: the files of ``source``'s bundle copied to ``<workdir>/app`` (``flwr run`` then bundles
    them without walking the project's virtual environment); its FAB hash logged, for the sites to compare."""
    from common.adapters.runtime import stage_app as stage

    staged = workdir / "app"
    fab = stage(source, staged)
    log.info("Submitting app %s (each site's `fl-client apps` prints the app it runs; a site refuses any other)",
             fab)
    return staged


def choose_transport(
    workdir: Path, *, insecure: bool, bind: str, port: int, min_sites: int, public_host: list[str]
) -> Transport:
    """Plain HTTP on loopback with ``insecure``, else TLS for the enrolled sites (CA and server certificate made once).

    Parameters
    ----------
    workdir
        The coordinator's workdir (absolute): its consortium registry and PKI; not read with ``insecure``.
    bind, port
        The proxy's address (:func:`check_address`; a specific one but loopback goes into the certificate) and port.
    min_sites
        ``--min-sites``: at least this many sites must be enrolled.
    public_host
        ``--public-host``: names or IPs for the server certificate (``0.0.0.0`` and ``*`` are left out).

    Raises
    ------
    ConfigError
        When TLS is asked and no site, or fewer than ``min_sites`` sites, are enrolled.
    """
    if insecure:
        log.warning(INSECURE_BANNER)
        return Transport(f"insecure (plain HTTP on {LOOPBACK}:{port}, no enrollment)", bind)
    from server.enroll import Consortium

    consortium = Consortium(workdir)
    enrolled = consortium.sites()
    if not enrolled:
        raise ConfigError(
            f"No site is enrolled in {workdir}; run `fl-server enroll --site A --workdir {workdir}` for "
            "each hospital and hand it the kit (or use --insecure for a loopback demo)"
        )
    if len(enrolled) < min_sites:
        raise ConfigError(f"Expected at least --min-sites {min_sites} enrolled sites, but {len(enrolled)} are")
    ca = consortium.ensure_ca()
    names = [h for h in public_host if h not in ("0.0.0.0", "*")]
    if bind not in ("0.0.0.0", LOOPBACK) and bind not in names:
        names.append(bind)
    cert, key = consortium.ensure_server_cert(names)
    description = f"tls (Fleet API only, via nginx on {bind}:{port}; {len(enrolled)} enrolled sites)"
    return Transport(description, bind, (ca, cert, key), enrolled)


def run_config_args(
    options: dict[str, Any], *, launch: Launch, saved: dict[str, Any] | None, extra: list[str]
) -> list[str]:
    """The ``flwr run --run-config`` arguments: one combining ``options`` and ``launch``, then ``extra``.

    A resumed run keeps its ``saved`` config (:func:`resume_config`) instead of ``options`` and ``extra``;
    only where the coordinator runs (``launch``, applied over the rest) may change.

    Parameters
    ----------
    options
        The command's round options as run-config keys (``num-server-rounds``, ...).
    launch
        What fedrad sets: workdir, transport, initial weights, resumed run id.
    saved
        The resumed run's saved run config; ``None`` for a new run.
    extra
        ``--run-config`` values (``key=value ...``); checked even when resuming.

    Raises
    ------
    ConfigError
        When ``extra`` is not ``key=value`` pairs, or sets a key that fedrad sets (:data:`common.config.LAUNCH_KEYS`).
    """
    refuse_launch_keys(_parse_config_args(extra, shown=extra), option="--run-config")
    if saved is None:
        return [_config_arg({**options, **launch.to_flower()}), *extra]
    kept = {k: v for k, v in saved.items() if k not in (SITE_NODES_KEY, RESUME_RUN_ID_KEY)}
    return [_config_arg({**kept, **launch.to_flower()})]


def check_run_config(config_args: list[str]) -> tuple[RunConfig, Launch]:
    """Validate the run config here, so a bad value is one line now, not a failed run later.

    Returns
    -------
    tuple
        The user's choices, and what fedrad sets (a resumed run's saved ``init-weights`` included).
    """
    values = _parse_config_args(config_args, shown=config_args[1:])
    return RunConfig.from_flower(values), Launch.from_flower(values)


def check_init_weights(
    run: RunConfig, launch: Launch, *, resume: Path | None
) -> OrderedDict[str, torch.Tensor] | None:
    """The weights (CPU, state-dict order) of the ``init-weights`` file, checked against the run's model.

    ``None`` without a file, or when the run being resumed goes on from a checkpoint.

    Parameters
    ----------
    run
        The checked run config (:func:`check_run_config`): it builds the model the file must fit.
    launch
        What fedrad sets: the file's path and the SHA-256 taken when the command started.
    resume
        The run folder being resumed; ``None`` for a new run.

    Raises
    ------
    ConfigError
        When the file cannot be read, has changed since it was hashed, or does not fit the model; or the
        resumed run folder's ``state.json`` cannot be read.
    """
    init = launch.init_weights
    if not init.path:
        return None
    if resume is not None:
        from server.app.resume import load_state

        if load_state(resume.resolve()).checkpoint is not None:
            return None
    from common.weights import load_init_weights, model_for_run

    weights, _ = load_init_weights(
        Path(init.path), model=model_for_run(run), expected_sha256=init.sha256,
        option="--init-weights" if resume is None else "init-weights",
    )
    return weights


def secagg_args(
    config_args: list[str], *, run: RunConfig, start: OrderedDict[str, torch.Tensor] | None, sites: int | None
) -> list[str]:
    """``config_args`` plus the SecAgg+ encoding sized from the initial weights (:func:`common.config.sized_secagg`).

    Parameters
    ----------
    config_args
        The ``--run-config`` arguments so far (:func:`run_config_args`).
    run
        The checked run config; without SecAgg+ ``config_args`` is returned unchanged.
    start
        The initial weights (:func:`check_init_weights`), which must fit the range; ``None``: the seeded model.
    sites
        How many sites may take part in a round (the enrolled ones); ``None`` when unknown (256 assumed).

    Raises
    ------
    ConfigError
        When an explicit encoding value is invalid, or ``start`` has a weight above half the clipping range.
    """
    if not run.secagg.enabled:
        return config_args
    from common.adapters.flower import parse_config_args
    from common.weights import sized_encoding

    encoding = sized_encoding(parse_config_args(config_args), run=run, start=start, sites=sites)
    log.info("SecAgg+ encoding: %s", _config_arg(encoding))
    return [*config_args, _config_arg(encoding)]


def run_federation(
    workdir: Path, *, source: Path, transport: Transport, port: int, config_args: list[str], min_sites: int,
    resumed: bool,
) -> tuple[str, str, str]:
    """Start the SuperLink (with TLS: register the sites, start the proxy), run, stop; (status, details, run id).

    Parameters
    ----------
    workdir
        The coordinator's workdir: the SuperLink's database, ``flwr-home``, ``logs`` and ``superlink.json``.
    source, config_args, min_sites
        As for :func:`server.superlink.submit_and_follow`; with TLS the sites' node ids are added to ``config_args``.
    transport, port
        :func:`choose_transport`'s choice and the sites' port: with TLS the SuperLink listens on a free loopback
        port behind the proxy on ``port``, without it on ``port`` itself.
    resumed
        True keeps the SuperLink's database (the sites' registrations) and stops runs a crashed coordinator
        left; False starts from a fresh database.

    Raises
    ------
    FederationError
        When the SuperLink, the proxy or a ``flwr`` command fails, or the SuperLink stops during the run.
    """
    internal, ca = (port, None) if transport.tls is None else (free_port(), transport.tls[0])
    env = superlink.cli_env(workdir)
    superlink.write_connection(Path(env["FLWR_HOME"]), internal, ca_cert=ca)
    if not resumed:  # a new run starts from a fresh SuperLink state
        superlink.forget_superlink(workdir)
    with ProcessSet() as procs:
        process = superlink.start_superlink(procs, port=internal, workdir=workdir, tls=transport.tls)
        try:
            if resumed:
                superlink.stop_stale_runs(env)
            if transport.tls is not None:
                site_nodes = _open_fleet(procs, workdir, env, transport, transport.tls, port=port, internal=internal)
                config_args = [*config_args, site_nodes]
            else:
                log.info("SuperLink listening on %s:%d (log: %s)", LOOPBACK, port, process.log_path)
            return superlink.submit_and_follow(
                procs, process, source=source, config_args=config_args, env=env, min_sites=min_sites
            )
        finally:
            superlink.save_live_state(workdir, None)


def _open_fleet(
    procs: ProcessSet, workdir: Path, env: dict[str, str], transport: Transport, tls: tuple[Path, Path, Path], *,
    port: int, internal: int,
) -> str:
    """Register the enrolled sites, publish the live state and start the Fleet-API proxy; the ``site-nodes`` entry."""
    from server.proxy import start_fleet_proxy

    ca, cert, key = tls
    nodes = superlink.register_enrolled(env, workdir, transport.enrolled)
    superlink.save_live_state(workdir, {"pid": os.getpid(), "port": internal, "nodes": nodes})
    start_fleet_proxy(procs, listen_host=transport.bind, listen_port=port, upstream_port=internal,
                      cert=cert, key=key, ca=ca, workdir=workdir)
    log.info("Fleet API on https://%s:%d (nginx); SuperLink on %s:%d; %d enrolled sites",
             transport.bind, port, LOOPBACK, internal, len(transport.enrolled))
    # Lets the report name a site that drops out before it said its name.
    return _config_arg(Launch(site_nodes={int(n): s for s, n in nodes.items()}).to_flower())


def report_run(workdir: Path, run_id: str, *, status: str, details: str) -> dict[str, Any]:
    """Print the summary of run ``run_id`` (a resumed run keeps its id) in ``workdir`` and return its report.

    Parameters
    ----------
    workdir, run_id
        The coordinator's workdir, whose ``runs/<run_id>`` holds the report.
    status, details
        Flower's final status of the run (:func:`run_federation`) and its details (the reason if the report has none).

    Raises
    ------
    FederationError
        When ``status`` is not ``finished:completed``: why (the report's ``stopped ...`` status, else
        ``details``, else where the logs are), and the ``fl-server --resume`` command.
    """
    folder = RunFolder.of(workdir, run_id)
    if status != "finished:completed":
        try:  # the ServerApp writes why it stopped into the report
            why = str(folder.read_report().get("status", ""))
        except (OSError, ValueError):
            why = ""
        why = why if why.startswith("stopped") else ""
        raise FederationError(
            f"run {run_id} ended as {status}: {why or details or 'see ' + str(workdir / 'logs')}"
            f"; after fixing the cause, continue it with `fl-server --resume {folder.path}`"
        )
    return _print_summary(folder)


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[str]]) -> Any:
    from rich.table import Column, Table

    table = Table(*(Column(col, justify="right") for col in columns), title=title)
    for row in rows:
        table.add_row(*row)
    return table


def _cell(value: Any, spec: str = ".3f") -> str:
    return f"{value:{spec}}" if value is not None else "–"


def _print_summary(folder: RunFolder) -> dict[str, Any]:
    """Print the pooled metrics per round and the privacy spent per site; returns the report."""
    from rich.console import Console

    report = folder.read_report()
    console = Console()
    metrics = ("auroc", "sensitivity", "specificity", "f1", "accuracy")
    console.print(_table(
        f"fedrad run {report['run_id']}: pooled validation metrics",
        ("round", "AUROC", "sensitivity", "specificity", "F1", "accuracy"),
        ([str(r["round"]), *(_cell(r.get("evaluate", {}).get("pooled", {}).get(k)) for k in metrics)]
         for r in report["rounds"]),
    ))
    console.print(_table(
        "privacy spent per site (reported by each site)",
        ("site", "ε", "δ", "max ε", "rounds trained"),
        ([name, _cell(s.get("epsilon")), _cell(s.get("delta"), "g"), _cell(s.get("max_epsilon"), "g"),
          str(s.get("rounds_trained", 0))] for name, s in sorted(report["sites"].items())),
    ))
    console.print(f"report: {folder.report_json}  ({report['wall_seconds']:.0f} s)")
    return report
