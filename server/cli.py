"""``fl-server``: the coordinator. Enroll sites, then serve a run.

``fl-server enroll --site A`` creates the consortium CA (once), the site's key
pair and its kit (``<workdir>/kits/A/`` and ``A.tar.gz``) for the hospital.
``fl-server rekey --site A``, ``fl-server remove --site A`` and
``fl-server sites`` manage enrolled sites; a running server learns about
every change at once.

``fl-server [serve] --rounds 5 ...`` starts a Flower SuperLink on 127.0.0.1
with TLS and SuperNode authentication (enrolled keys only), puts an nginx
reverse proxy on ``--host:--port`` that lets through the Fleet API only,
submits the fedrad run (SecAgg+ on by default), prints the report and stops.
``--init-weights FILE`` starts the run from given weights (checked against the
run's model before anything starts; :mod:`common.weights`).
``--insecure`` is plain HTTP on loopback, for demos and tests only.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from common.cli import run_typer, setup_logging
from common.config import WINDOW_PRESETS, RunConfig
from common.errors import ConfigError, FederationError
from common.flower import flower_bin, flower_env
from common.processes import (
    LOOPBACK,
    ManagedProcess,
    ProcessSet,
    can_connect,
    free_port,
    port_is_free,
)
from common.runfolder import RunFolder
from server.report import load_report

log = logging.getLogger("fl-server")
CONNECTION = "fedrad"
DEFAULT_PORT = 9092
INSECURE_BANNER = (
    "WARNING: --insecure: plain HTTP. The SuperLink listens on 127.0.0.1 only, without TLS "
    "or site enrollment: for demos and tests on one machine."
)
SUPERLINK_STATE = "superlink.json"  # the running SuperLink of a workdir: pid, Control API port, node per site
SUPERLINK_DB = Path("state") / "superlink.sqlite"  # the SuperLink's state (nodes, runs): survives a crash
NODES_FILE = Path("state") / "nodes.json"  # site → node id and key fingerprint registered in that database

cli = typer.Typer(add_completion=False, help=__doc__)


def app_dir() -> Path:
    """The Flower App folder (the fedrad source tree with its pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FederationError(
            f"fl-server needs the fedrad source tree (pyproject.toml) at {root}; install with `pip install -e .`"
        )
    return root


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_connection(flwr_home: Path, port: int, *, ca_cert: Path | None = None) -> None:
    """The `flwr` CLI's connection to our SuperLink's Control API (loopback), in its own FLWR_HOME."""
    import tomli_w

    flwr_home.mkdir(parents=True, exist_ok=True)
    transport: dict[str, Any] = {"root-certificates": str(ca_cert)} if ca_cert else {"insecure": True}
    superlink = {"default": CONNECTION, CONNECTION: {"address": f"{LOOPBACK}:{port}", **transport}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": superlink}))


def flwr_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    """Run ``flwr ... --format json`` and return its JSON; errors become FederationError."""
    try:
        proc = subprocess.run(
            [flower_bin("flwr"), *args, "--format", "json"],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise FederationError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None
    try:
        out = json.loads(proc.stdout[proc.stdout.find("{"):])
    except ValueError:
        out = {"success": False, "error-message": (proc.stderr or proc.stdout).strip()[-300:]}
    if proc.returncode != 0 or not out.get("success", False):
        raise FederationError(f"`flwr {args[0]}` failed: {out.get('error-message', 'no details')}")
    return out


def start_superlink(
    procs: ProcessSet, *, port: int, workdir: Path, tls: tuple[Path, Path, Path] | None = None
) -> ManagedProcess:
    """Start the SuperLink on 127.0.0.1:``port``; with ``tls`` = (CA, cert, key), HTTPS and node auth.

    Its state (registered nodes, runs, messages) is a SQLite database in the workdir, so a
    SuperLink restarted by ``fl-server --resume`` still knows the sites' SuperNodes: they
    reconnect on their own and go on with the resumed run.
    """
    env = flower_env(workdir / "flwr-home" / "superlink")
    security = ["--insecure"]
    if tls is not None:
        ca, cert, key = tls
        security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                    "--enable-supernode-auth"]
    database = workdir / SUPERLINK_DB
    database.parent.mkdir(parents=True, exist_ok=True)
    superlink = procs.start(
        "SuperLink",
        [
            flower_bin("flower-superlink"), *security, "--host", LOOPBACK, "--port", str(port),
            "--database", str(database), "--disable-runtime-dependency-installation",
        ],
        env=env,
        log_path=workdir / "logs" / "superlink.log",
    )
    deadline = time.monotonic() + 60
    while not can_connect(LOOPBACK, port, timeout=0.5):
        if not superlink.running():
            raise FederationError(f"SuperLink exited at start: {superlink.tail(3)}")
        if time.monotonic() > deadline:
            raise FederationError("SuperLink did not start listening within 60 s")
        time.sleep(0.3)
    return superlink


# -- the live SuperLink of a workdir: enrolled keys are registered with it -------------------


def _state_path(workdir: Path) -> Path:
    return workdir / SUPERLINK_STATE


def live_superlink(workdir: Path) -> dict[str, Any] | None:
    """The state of this workdir's running ``fl-server``, or None when none runs."""
    from common.processes import _alive

    try:
        state = json.loads(_state_path(workdir).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and _alive(int(state.get("pid", 0))) else None


def _save_state(workdir: Path, state: dict[str, Any]) -> None:
    from common.files import write_atomic

    write_atomic(_state_path(workdir), (json.dumps(state, indent=2) + "\n").encode())


def register_site(env: dict[str, str], public_key: Path) -> str:
    """Register a site's public key with the SuperLink (Control API); its node id."""
    return str(flwr_cli(["supernode", "register", str(public_key), CONNECTION], env)["node-id"])


def unregister_node(env: dict[str, str], node_id: str) -> None:
    flwr_cli(["supernode", "unregister", node_id, CONNECTION], env)


def sync_live_superlink(workdir: Path, *, add: dict[str, Path] | None = None, drop: dict[str, str] | None = None) -> bool:
    """Tell this workdir's running SuperLink about new and removed keys; False when none runs."""
    state = live_superlink(workdir)
    if state is None:
        return False
    env = flower_env(workdir / "flwr-home" / "cli")
    nodes: dict[str, str] = state.setdefault("nodes", {})
    for site, node_id in (drop or {}).items():
        if node_id:
            unregister_node(env, node_id)
            log.info("Unregistered site %s (node %s) from the running SuperLink", site, node_id)
        nodes.pop(site, None)
    for site, public_key in (add or {}).items():
        nodes[site] = register_site(env, public_key)
        log.info("Registered site %s with the running SuperLink (node %s)", site, nodes[site])
    _save_state(workdir, state)
    _save_nodes(workdir, nodes)
    return True


def _save_nodes(workdir: Path, nodes: dict[str, str]) -> None:
    """Which node id each enrolled key has in the SuperLink's database (a resumed coordinator reuses them)."""
    from common.files import write_atomic
    from server.enroll import Consortium

    enrolled = Consortium(workdir).sites()
    record = {site: {"node-id": node, "fingerprint": enrolled[site]["fingerprint"]}
              for site, node in sorted(nodes.items()) if site in enrolled}
    write_atomic(workdir / NODES_FILE, (json.dumps(record, indent=2) + "\n").encode())


def print_summary(run_dir: Path) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    report = load_report(run_dir)
    console = Console()
    table = Table(title=f"fedrad run {report['run_id']}: pooled validation metrics")
    for col in ("round", "AUROC", "sensitivity", "specificity", "F1", "accuracy"):
        table.add_column(col, justify="right")
    for r in report["rounds"]:
        p = r.get("evaluate", {}).get("pooled", {})
        table.add_row(str(r["round"]), *(f"{p[k]:.3f}" if p.get(k) is not None else "–" for k in ("auroc", "sensitivity", "specificity", "f1", "accuracy")))
    console.print(table)
    sites = Table(title="privacy spent per site (reported by each site)")
    for col in ("site", "ε", "δ", "max ε", "rounds trained"):
        sites.add_column(col, justify="right")
    for name, s in sorted(report["sites"].items()):
        sites.add_row(name, *(f"{s[k]:{f}}" if s.get(k) is not None else "–"
                              for k, f in (("epsilon", ".3f"), ("delta", "g"), ("max_epsilon", "g"))),
                      str(s.get("rounds_trained", 0)))
    console.print(sites)
    console.print(f"report: {RunFolder(run_dir).report_json}  ({report['wall_seconds']:.0f} s)")
    return report


WORKDIR_OPTION = typer.Option(help="The coordinator's folder: PKI, kits, runs/, logs.")


@cli.command()
def serve(
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    min_sites: Annotated[int, typer.Option(min=1, help="Sites that must be connected before a round starts.")] = 2,
    host: Annotated[str, typer.Option(help="Address the hospitals connect to (the Fleet-API proxy binds it); "
                                      "0.0.0.0 for every interface.")] = LOOPBACK,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port the hospitals connect to.")] = DEFAULT_PORT,
    public_host: Annotated[list[str] | None, typer.Option(help="Name or IP the hospitals use for this coordinator "
                                                          "(goes into its TLS certificate; repeatable).")] = None,
    workdir: Annotated[Path, WORKDIR_OPTION] = Path("fedrad-server"),
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round at each site.")] = 3,
    image_size: Annotated[int, typer.Option(min=16, max=1024, help="Model input size in pixels.")] = 64,
    window: Annotated[str, typer.Option(help=f"Window preset: {', '.join(WINDOW_PRESETS)}.")] = "brain",
    run_config: Annotated[list[str] | None, typer.Option("--run-config", "-c", help="Extra run config, e.g. 'batch-size=16' or 'secagg=false'.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP on 127.0.0.1 without TLS or enrollment: demos and tests only.")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder (<workdir>/runs/<run-id>) from its last "
                                                "completed round, with its saved config (round options are ignored).")] = None,
    init_weights: Annotated[Path | None, typer.Option(
        "--init-weights", metavar="FILE",
        help="Start from these weights instead of random ones: a safetensors file or a torch.save'd state_dict of "
             "the run's model (checked before anything starts; its SHA-256 goes into the report).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Start the SuperLink (and its Fleet-API proxy), run the federation, print the report and stop."""
    setup_logging(verbose)
    saved: dict[str, Any] | None = None
    init: dict[str, str] = {}  # --init-weights: its path and SHA-256; checked against the run's model below
    if init_weights is not None:
        from common.weights import INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY, file_sha256

        if resume is not None:
            raise ConfigError(
                "Expected no `--init-weights` with `--resume`, but got both; a resumed run goes on from its last "
                "checkpoint (or from the initial weights it started with)"
            )
        init_path = init_weights.expanduser().resolve()
        init = {INIT_WEIGHTS_KEY: str(init_path), INIT_WEIGHTS_SHA256_KEY: file_sha256(init_path)}
    if resume is not None:
        workdir, saved = _resume_config(resume.resolve(), insecure=insecure)
        min_sites = int(saved.get("min-sites", min_sites))
    if window not in WINDOW_PRESETS:
        raise ConfigError(f"Expected `--window` to be one of {', '.join(WINDOW_PRESETS)}, but got {window!r}")
    if insecure and host != LOOPBACK:
        raise ConfigError(f"`--insecure` binds {LOOPBACK} only, but got --host {host}; drop --insecure to serve TLS")
    bind = "0.0.0.0" if host in ("0.0.0.0", "*") else host
    if not port_is_free(port, bind):
        raise FederationError(f"Port {port} on {bind} is already in use; choose another with --port")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source = app_dir()
    if live_superlink(workdir) is not None:
        raise FederationError(f"An fl-server already runs in {workdir}; one coordinator per workdir")
    tls: tuple[Path, Path, Path] | None = None
    enrolled: dict[str, dict[str, str]] = {}
    if insecure:
        log.warning(INSECURE_BANNER)
        transport = f"insecure (plain HTTP on {LOOPBACK}:{port}, no enrollment)"
    else:
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
        names = [h for h in (public_host or []) if h not in ("0.0.0.0", "*")]
        if bind not in ("0.0.0.0", LOOPBACK) and bind not in names:
            names.append(bind)
        cert, key = consortium.ensure_server_cert(names)
        tls = (ca, cert, key)
        transport = f"tls (Fleet API only, via nginx on {bind}:{port}; {len(enrolled)} enrolled sites)"
    overrides: dict[str, Any] = {
        "num-server-rounds": rounds,
        "min-sites": min_sites,
        "local-epochs": local_epochs,
        "image-size": image_size,
        "window": window,
        "workdir": str(workdir),
        "transport": transport,
        **init,
    }
    if saved is not None:  # the run's own config; only where the coordinator runs may change
        overrides = {k: v for k, v in saved.items() if k not in ("site-nodes", "resume-run-id")}
        overrides.update(workdir=str(workdir), transport=transport, **{"resume-run-id": saved["resume-run-id"]})
    config_args = [" ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())]
    config_args += list(run_config or []) if saved is None else []
    _check_init_weights(_check_run_config(config_args), resume=resume)
    internal = port if insecure else free_port()
    cli_env = flower_env(workdir / "flwr-home" / "cli")
    write_connection(Path(cli_env["FLWR_HOME"]), internal, ca_cert=tls[0] if tls else None)

    if saved is None:  # a new run starts from a fresh SuperLink state
        for path in (workdir / SUPERLINK_DB).parent.glob(SUPERLINK_DB.name + "*"):
            path.unlink()
        (workdir / NODES_FILE).unlink(missing_ok=True)
    with ProcessSet() as procs:
        superlink = start_superlink(procs, port=internal, workdir=workdir, tls=tls)
        try:
            if saved is not None:
                _stop_stale_runs(cli_env)
            if tls is not None:
                nodes = _register_enrolled(cli_env, workdir, enrolled)
                _save_state(workdir, {"pid": os.getpid(), "port": internal, "nodes": nodes})
                # Lets the report name a site that drops out before it said its name.
                config_args.append("site-nodes=" + toml_value(",".join(f"{n}:{s}" for s, n in sorted(nodes.items()))))
                from server.proxy import start_fleet_proxy

                start_fleet_proxy(
                    procs, listen_host=bind, listen_port=port, upstream_port=internal,
                    cert=tls[1], key=tls[2], ca=tls[0], workdir=workdir,
                )
                log.info("Fleet API on https://%s:%d (nginx); SuperLink on %s:%d; %d enrolled sites",
                         bind, port, LOOPBACK, internal, len(enrolled))
            else:
                log.info("SuperLink listening on %s:%d (log: %s)", LOOPBACK, port, superlink.log_path)
            status, details, flower_run_id = _run(procs, superlink, source, config_args, cli_env, min_sites)
        finally:
            _state_path(workdir).unlink(missing_ok=True)
    run_id = str(saved["resume-run-id"]) if saved is not None else flower_run_id
    run_dir = RunFolder.of(workdir, run_id).path
    if status != "finished:completed":
        why = _report_status(run_dir)
        raise FederationError(
            f"run {run_id} ended as {status}: {why or details or 'see ' + str(workdir / 'logs')}"
            f"; after fixing the cause, continue it with `fl-server --resume {run_dir}`"
        )
    print_summary(run_dir)
    return 0


def _resume_config(run_dir: Path, *, insecure: bool) -> tuple[Path, dict[str, Any]]:
    """The workdir and saved run config of the run to resume (one clear error when it cannot be)."""
    from server.resume import load_state

    state, workdir = load_state(run_dir), RunFolder(run_dir).workdir
    if workdir is None:
        raise ConfigError(f"Expected a run folder <workdir>/runs/<run-id>, but got {run_dir}")
    if state.finished:
        raise ConfigError(f"Run {state.run_id} already completed its {state.num_rounds} rounds; nothing to resume")
    was_insecure = str(state.run_config.get("transport", "")).startswith("insecure")
    if was_insecure != insecure:
        raise ConfigError(
            f"Run {state.run_id} was served {'with' if was_insecure else 'without'} --insecure; resume it the same way"
        )
    log.info("Resuming run %s after round %d of %d", state.run_id, state.completed_round, state.num_rounds)
    return workdir, {**state.run_config, "resume-run-id": state.run_id}


def _report_status(run_dir: Path) -> str:
    """Why a run stopped, from its report (the ServerApp writes the reason there)."""
    try:
        status = str(load_report(run_dir).get("status", ""))
    except (OSError, ValueError):
        return ""
    return status if status.startswith("stopped") else ""


def _stop_stale_runs(env: dict[str, str]) -> None:
    """Runs the crashed coordinator left unfinished in the SuperLink's database: stopped, so no site trains them."""
    for run in flwr_cli(["ls", CONNECTION], env).get("runs", []):
        if not str(run.get("status", "")).startswith("finished"):
            flwr_cli(["stop", str(run["run-id"]), CONNECTION], env)
            log.info("Stopped run %s, left unfinished by the previous coordinator", run["run-id"])


def _check_run_config(config_args: list[str]) -> RunConfig:
    """Validate the run config here, so a bad value is one line now, not a failed run later."""
    from flwr.common.config import parse_config_args

    try:
        values = parse_config_args(config_args)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"Expected `--run-config` as key=value pairs, but got {config_args[1:]!r} ({exc})") from None
    return RunConfig.from_flower(values)


def _check_init_weights(run: RunConfig, *, resume: Path | None) -> None:
    """The run's initial-weights file (if any) still fits its model and the SecAgg+ range, before anything starts.

    A resumed run needs the file only while no round has completed (a checkpoint wins).
    """
    if not run.init_weights.path:
        return
    if resume is not None:
        from server.resume import load_state

        if load_state(resume.resolve()).checkpoint is not None:
            return
    from common.weights import load_init_weights, model_for_run

    weights, _ = load_init_weights(
        Path(run.init_weights.path), model=model_for_run(run), expected_sha256=run.init_weights.sha256,
        option="--init-weights" if resume is None else "init-weights",
    )
    if run.secagg.enabled:
        from server.secure import check_model_fits

        check_model_fits(weights, run.secagg)


def _register_enrolled(env: dict[str, str], workdir: Path, enrolled: dict[str, dict[str, str]]) -> dict[str, str]:
    """Register every enrolled site's public key with a freshly started SuperLink."""
    keys = workdir / "pki" / "registered"
    keys.mkdir(parents=True, exist_ok=True)
    try:  # kept from before a crash: the database still holds these registrations
        known: dict[str, dict[str, str]] = json.loads((workdir / NODES_FILE).read_text())
    except (OSError, ValueError):
        known = {}
    for site, old in known.items():
        if site not in enrolled or enrolled[site]["fingerprint"] != old.get("fingerprint"):
            try:  # removed or re-keyed while the coordinator was down
                unregister_node(env, old["node-id"])
            except FederationError as exc:
                log.warning("Could not unregister the old key of site %s (node %s): %s", site, old["node-id"], exc)
    nodes = {}
    for site, entry in sorted(enrolled.items()):
        if known.get(site, {}).get("fingerprint") == entry["fingerprint"]:
            nodes[site] = known[site]["node-id"]
            continue
        path = keys / f"{site}.pub"
        path.write_text(entry["public_key"].strip() + "\n")
        nodes[site] = register_site(env, path)
    _save_nodes(workdir, nodes)
    log.info("Registered %d enrolled site keys: %s", len(nodes), ", ".join(sorted(nodes)))
    return nodes


def _run(
    procs: ProcessSet, superlink: ManagedProcess, source: Path, config_args: list[str], cli_env: dict[str, str],
    min_sites: int,
) -> tuple[str, str, str]:
    """Submit the run and wait until it finishes; (status, details, run id)."""
    run_args = ["run", str(source), CONNECTION]
    for c in config_args:
        run_args += ["--run-config", c]
    run_id = str(flwr_cli(run_args, cli_env)["run-id"])
    log.info("Submitted run %s; waiting for %d site(s) to connect", run_id, min_sites)
    procs.start("log stream", [flower_bin("flwr"), "log", run_id, CONNECTION, "--stream"], env=cli_env)
    status, details = "", ""
    while True:
        if not superlink.running():
            raise FederationError(f"SuperLink stopped unexpectedly: {superlink.tail(3)}")
        run = flwr_cli(["ls", CONNECTION, "--run-id", run_id], cli_env)["runs"][0]
        status, details = run.get("status", ""), run.get("status-details", "")
        if status.startswith("finished"):
            break
        time.sleep(5)  # each poll starts a `flwr` process (~0.5 s of CPU): not too often on small machines
    time.sleep(1.5)  # let the log stream print the last lines
    return status, details, run_id


SITE_OPTION = typer.Option(help="The site's name, e.g. A.")


@cli.command()
def enroll(
    site: Annotated[str, SITE_OPTION],
    server_address: Annotated[str, typer.Option(help="HOST:PORT the site connects to (written into its kit).")] = f"{LOOPBACK}:{DEFAULT_PORT}",
    workdir: Annotated[Path, WORKDIR_OPTION] = Path("fedrad-server"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Enroll a hospital: its key pair and kit; registered with a running server at once."""
    from server.enroll import Consortium

    setup_logging(verbose)
    consortium = Consortium(workdir.resolve())
    consortium.ensure_ca()
    kit = consortium.enroll(site, server_address=server_address)
    entry = consortium.sites()[site]
    live = sync_live_superlink(workdir.resolve(), add={site: kit / "site.pub"})
    print(f"enrolled site {site} (key {entry['fingerprint']}); hand {consortium.kit_archive(site)} to the site "
          f"over a trusted channel{'; registered with the running server' if live else ''}")
    return 0


@cli.command()
def rekey(
    site: Annotated[str, SITE_OPTION],
    server_address: Annotated[str | None, typer.Option(help="HOST:PORT the site connects to (default: the one in its current kit).")] = None,
    workdir: Annotated[Path, WORKDIR_OPTION] = Path("fedrad-server"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Give a site a new key pair and kit; its old key stops working at once."""
    from common.kit import KIT_FILE, read_kit_toml
    from server.enroll import Consortium

    setup_logging(verbose)
    workdir = workdir.resolve()
    consortium = Consortium(workdir)
    state = live_superlink(workdir) or {}
    if server_address is None:
        try:
            server_address = read_kit_toml(consortium.kit_dir(site) / KIT_FILE)["server"]
        except (ConfigError, KeyError):
            # The kit was deleted after hand-over (as deployment.md advises): never guess an address.
            raise ConfigError(
                f"Site {site}'s current kit is gone, so its address is unknown; give --server-address HOST:PORT"
            ) from None
    rekeyed = consortium.rekey(site, server_address=server_address)
    live = sync_live_superlink(
        workdir, drop={site: str(state.get("nodes", {}).get(site, ""))}, add={site: rekeyed.kit / "site.pub"}
    )
    print(f"re-keyed site {site}: old key {rekeyed.old_fingerprint} revoked"
          f"{' (unregistered from the running server)' if live else ''}; hand {consortium.kit_archive(site)} to the site")
    return 0


@cli.command()
def remove(
    site: Annotated[str, SITE_OPTION],
    workdir: Annotated[Path, WORKDIR_OPTION] = Path("fedrad-server"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Remove a site from the consortium; a running server refuses its key at once."""
    from server.enroll import Consortium

    setup_logging(verbose)
    workdir = workdir.resolve()
    state = live_superlink(workdir) or {}
    Consortium(workdir).remove(site)
    live = sync_live_superlink(workdir, drop={site: str(state.get("nodes", {}).get(site, ""))})
    print(f"removed site {site}{'; unregistered from the running server' if live else ''}")
    return 0


@cli.command()
def sites(
    workdir: Annotated[Path, WORKDIR_OPTION] = Path("fedrad-server"),
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> int:
    """List the enrolled sites and their key fingerprints."""
    from server.enroll import Consortium

    enrolled = Consortium(workdir.resolve()).sites()
    if json_output:
        print(json.dumps({s: {k: e[k] for k in ("fingerprint", "enrolled")} for s, e in enrolled.items()}, indent=2))
        return 0
    if not enrolled:
        print("no site is enrolled")
    for name, entry in sorted(enrolled.items()):
        print(f"{name}\t{entry['fingerprint']}\tenrolled {entry['enrolled']}")
    return 0


COMMANDS = ("serve", "enroll", "rekey", "remove", "sites")


def main(argv: list[str] | None = None) -> None:
    args = list(argv if argv is not None else sys.argv[1:])
    if not args or (args[0] not in COMMANDS and args[0] not in ("--help", "-h")):
        args.insert(0, "serve")  # `fl-server --rounds 5` is `fl-server serve --rounds 5`
    run_typer(cli, args, prog_name="fl-server")


if __name__ == "__main__":
    main()
