"""Launching the federation (``fl-server`` only): the SuperLink, the `flwr` CLI, site registration, the run.

While ``fl-server serve`` runs, ``<workdir>/superlink.json`` says where its SuperLink is, so
``fl-server enroll|rekey|remove`` register or unregister keys with it at once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from common.errors import FederationError
from common.files import write_atomic
from common.flower import flower_bin, flower_env
from common.processes import LOOPBACK, ManagedProcess, ProcessSet, alive, can_connect, wait_until

log = logging.getLogger("fl-server")
CONNECTION = "fedrad"
SUPERLINK_STATE = "superlink.json"  # the running SuperLink of a workdir: pid, Control API port, node per site
SUPERLINK_DB = Path("state") / "superlink.sqlite"  # the SuperLink's state (nodes, runs): survives a crash
NODES_FILE = Path("state") / "nodes.json"  # site → node id and key fingerprint registered in that database
STATUS_POLL = 1.0  # s between two questions for a run's status (answered by the Control API, not a `flwr` process)


def app_dir() -> Path:
    """The Flower App folder (the fedrad source tree with its pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FederationError(
            f"fl-server needs the fedrad source tree (pyproject.toml) at {root}; install with `pip install -e .`"
        )
    return root


def cli_env(workdir: Path) -> dict[str, str]:
    """The environment of the `flwr` CLI of ``workdir``'s coordinator (its own ``FLWR_HOME``)."""
    return flower_env(workdir / "flwr-home" / "cli")


def write_connection(flwr_home: Path, port: int, *, ca_cert: Path | None = None) -> None:
    """Write the `flwr` CLI's connection to the SuperLink's Control API on 127.0.0.1:``port`` into its FLWR_HOME.

    Parameters
    ----------
    flwr_home
        The CLI's ``FLWR_HOME`` (:func:`cli_env`); created if missing, its ``config.toml`` overwritten.
    port
        The SuperLink's port on 127.0.0.1.
    ca_cert
        The CA of the SuperLink's certificate; ``None`` for plain HTTP (``insecure = true``).
    """
    import tomli_w

    flwr_home.mkdir(parents=True, exist_ok=True)
    transport: dict[str, Any] = {"root-certificates": str(ca_cert)} if ca_cert else {"insecure": True}
    superlink = {"default": CONNECTION, CONNECTION: {"address": f"{LOOPBACK}:{port}", **transport}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": superlink}))


def flwr_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON (``"success": true``); ``ls``, ``stop`` and ``supernode
    register/unregister`` are answered from this process (:mod:`common.adapters.control`), the same way.

    Parameters
    ----------
    args
        The ``flwr`` subcommand and its arguments, e.g. ``["ls", CONNECTION]``.
    env
        The CLI's environment (:func:`cli_env`).
    timeout
        Seconds to wait for the command.

    Raises
    ------
    FederationError
        When ``flwr`` is not installed, does not answer within ``timeout`` seconds, exits with an error or
        reports no success; with ``flwr``'s error message.
    """
    from common.adapters import control

    if control.handles(args):  # the same call and answer, without a `flwr` process (about 1 s of CPU)
        return control.control_call(args, Path(env["FLWR_HOME"]))
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
    """Start the SuperLink on 127.0.0.1:``port``; returned once it accepts connections.

    Its state (registered nodes, runs, messages) is a SQLite database in the workdir, so a
    SuperLink restarted by ``fl-server --resume`` still knows the sites' SuperNodes: they
    reconnect on their own and go on with the resumed run.

    Parameters
    ----------
    procs
        The process set that owns the SuperLink (stops it on exit).
    port
        The port on 127.0.0.1.
    workdir
        The coordinator's workdir: the SuperLink's ``FLWR_HOME`` (``flwr-home/superlink``), its database
        (``state/superlink.sqlite``) and log (``logs/superlink.log``).
    tls
        (CA, server certificate, server key) files: HTTPS and node auth; ``None``: plain HTTP, any SuperNode.

    Raises
    ------
    FederationError
        When the SuperLink exits at start or does not listen within 60 s.
    """
    env = flower_env(workdir / "flwr-home" / "superlink")
    security = ["--insecure"]
    if tls is not None:
        ca, cert, key = tls
        security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                    "--enable-supernode-auth"]
    database = workdir / SUPERLINK_DB
    database.parent.mkdir(parents=True, exist_ok=True)
    superlink = procs.start("SuperLink", [
        flower_bin("flower-superlink"), *security, "--host", LOOPBACK, "--port", str(port),
        "--database", str(database), "--disable-runtime-dependency-installation",
    ], env=env, log_path=workdir / "logs" / "superlink.log")

    def listening() -> bool:
        if not superlink.running():
            raise FederationError(f"SuperLink exited at start: {superlink.tail(3)}")
        return can_connect(LOOPBACK, port, timeout=0.5)

    try:
        wait_until(listening, timeout=60, interval=0.3, what="the SuperLink to listen")
    except TimeoutError:
        raise FederationError("SuperLink did not start listening within 60 s") from None
    return superlink


def forget_superlink(workdir: Path) -> None:
    """Delete the SuperLink database and node registrations of ``workdir``: a new run starts afresh."""
    for path in (workdir / SUPERLINK_DB).parent.glob(SUPERLINK_DB.name + "*"):
        path.unlink()
    (workdir / NODES_FILE).unlink(missing_ok=True)


# -- the live SuperLink of a workdir: enrolled keys are registered with it -------------------


def live_superlink(workdir: Path) -> dict[str, Any] | None:
    """The state of this workdir's running ``fl-server``, or None when none runs."""
    try:
        state = json.loads((workdir / SUPERLINK_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and alive(int(state.get("pid", 0))) else None


def save_live_state(workdir: Path, state: dict[str, Any] | None) -> None:
    """Write (or, with ``None``, delete) ``workdir``'s ``superlink.json``."""
    if state is None:
        (workdir / SUPERLINK_STATE).unlink(missing_ok=True)
    else:
        _write_json(workdir / SUPERLINK_STATE, state)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def _register_site(env: dict[str, str], public_key: Path) -> str:
    """Register a site's public key with the SuperLink (Control API); returns its node id."""
    return str(flwr_cli(["supernode", "register", str(public_key), CONNECTION], env)["node-id"])


def sync_live_superlink(workdir: Path, *, add: dict[str, Path] | None = None, drop: tuple[str, ...] = ()) -> bool:
    """Tell this workdir's running SuperLink about new and removed sites; False when none runs (nothing done).

    Parameters
    ----------
    workdir
        The coordinator's workdir, whose ``superlink.json`` names the running SuperLink.
    add
        Site name → its public key file, to register; ``None``: none.
    drop
        Sites whose node is unregistered (their key refused from then on); done before ``add``, so a
        re-keyed site is in both.

    Raises
    ------
    FederationError
        When the SuperLink refuses a registration or an unregistration.
    """
    state = live_superlink(workdir)
    if state is None:
        return False
    env = cli_env(workdir)
    nodes: dict[str, str] = state.setdefault("nodes", {})
    for site in drop:
        if node_id := nodes.pop(site, ""):
            flwr_cli(["supernode", "unregister", node_id, CONNECTION], env)  # its key is refused from now on
            log.info("Unregistered site %s (node %s) from the running SuperLink", site, node_id)
    for site, public_key in (add or {}).items():
        nodes[site] = _register_site(env, public_key)
        log.info("Registered site %s with the running SuperLink (node %s)", site, nodes[site])
    save_live_state(workdir, state)
    _save_nodes(workdir, nodes)
    return True


def _save_nodes(workdir: Path, nodes: dict[str, str]) -> None:
    """Which node id each enrolled key has in the SuperLink's database (a resumed coordinator reuses them)."""
    from server.enroll import Consortium

    enrolled = Consortium(workdir).sites()
    _write_json(workdir / NODES_FILE, {site: {"node-id": node, "fingerprint": enrolled[site]["fingerprint"]}
                                       for site, node in sorted(nodes.items()) if site in enrolled})


def register_enrolled(env: dict[str, str], workdir: Path, enrolled: dict[str, dict[str, str]]) -> dict[str, str]:
    """Register every enrolled site's public key with a freshly started SuperLink; site → node id.

    Registrations the SuperLink's database kept from before a crash are reused; those of
    sites removed or re-keyed meanwhile are dropped.

    Parameters
    ----------
    env
        The CLI's environment (:func:`cli_env`).
    workdir
        The coordinator's workdir: keys go to ``pki/registered/<site>.pub``, registrations to ``state/nodes.json``.
    enrolled
        The enrolled sites (:meth:`server.enroll.Consortium.sites`): name → ``public_key``, ``fingerprint``...

    Raises
    ------
    FederationError
        When a key cannot be registered (an old registration that cannot be dropped costs a warning).
    """
    keys = workdir / "pki" / "registered"
    keys.mkdir(parents=True, exist_ok=True)
    try:  # kept from before a crash: the database still holds these registrations
        known: dict[str, dict[str, str]] = json.loads((workdir / NODES_FILE).read_text())
    except (OSError, ValueError):
        known = {}
    for site, old in known.items():
        if site not in enrolled or enrolled[site]["fingerprint"] != old.get("fingerprint"):
            try:  # removed or re-keyed while the coordinator was down
                flwr_cli(["supernode", "unregister", old["node-id"], CONNECTION], env)
            except FederationError as exc:
                log.warning("Could not unregister the old key of site %s (node %s): %s", site, old["node-id"], exc)
    nodes = {}
    for site, entry in sorted(enrolled.items()):
        if known.get(site, {}).get("fingerprint") == entry["fingerprint"]:
            nodes[site] = known[site]["node-id"]
            continue
        path = keys / f"{site}.pub"
        path.write_text(entry["public_key"].strip() + "\n")
        nodes[site] = _register_site(env, path)
    _save_nodes(workdir, nodes)
    log.info("Registered %d enrolled site keys: %s", len(nodes), ", ".join(sorted(nodes)))
    return nodes


# -- the run ------------------------------------------------------------------------------


def stop_stale_runs(env: dict[str, str]) -> None:
    """Stop the runs a crashed coordinator left unfinished in the SuperLink's database, so no site trains them."""
    for run in flwr_cli(["ls", CONNECTION], env).get("runs", []):
        if not str(run.get("status", "")).startswith("finished"):
            try:
                flwr_cli(["stop", str(run["run-id"]), CONNECTION], env)
            except FederationError as exc:
                # Flower marks a run whose ServerApp stopped heartbeating as finished lazily, so it may
                # finish between `flwr ls` and `flwr stop`: finished is what we want.
                if "already finished" not in str(exc):
                    raise
                log.info("Run %s, left unfinished by the previous coordinator, has finished", run["run-id"])
                continue
            log.info("Stopped run %s, left unfinished by the previous coordinator", run["run-id"])


def submit_and_follow(
    procs: ProcessSet, superlink: ManagedProcess, *, source: Path, config_args: list[str], env: dict[str, str],
    min_sites: int,
) -> tuple[str, str, str]:
    """Submit the run with ``flwr run``, stream its log and wait until it finishes (no limit).

    Parameters
    ----------
    procs
        The process set that owns the ``flwr log --stream`` process.
    superlink
        The running SuperLink, checked at every poll.
    source
        The Flower App folder to submit.
    config_args
        Each one ``--run-config`` argument of ``flwr run``.
    env
        The CLI's environment (:func:`cli_env`).
    min_sites
        Sites the run waits for, for the log.

    Returns
    -------
    tuple of str
        Flower's final status (``finished:completed``, ``finished:failed``...), its details, and the run id.

    Raises
    ------
    FederationError
        When submitting or polling the run fails, or the SuperLink stops before the run finishes.
    """
    run_args = ["run", str(source), CONNECTION, *(a for c in config_args for a in ("--run-config", c))]
    run_id = str(flwr_cli(run_args, env)["run-id"])
    log.info("Submitted run %s; waiting for %d site(s) to connect", run_id, min_sites)
    stream = procs.start("log stream", [flower_bin("flwr"), "log", run_id, CONNECTION, "--stream"], env=env)
    while True:
        if not superlink.running():
            raise FederationError(f"SuperLink stopped unexpectedly: {superlink.tail(3)}")
        run = flwr_cli(["ls", CONNECTION, "--run-id", run_id], env)["runs"][0]  # from this process: milliseconds
        status, details = run.get("status", ""), run.get("status-details", "")
        if status.startswith("finished"):
            break
        time.sleep(STATUS_POLL)
    done = time.monotonic() + 1.5  # the log stream ends with the run: let it print its last lines
    while stream.running() and time.monotonic() < done:
        time.sleep(0.1)
    return status, details, run_id
