"""``fl-client``: check and cache a site's DICOM data, then join the federation.

``fl-client --site A --data DIR --check [--json]`` only checks and caches the
data and prints the data report (exit 0 when the data is usable, 3 when not).
Without ``--check`` it does the same, then starts a Flower SuperNode for the
site and the site's worker (:mod:`client.worker`), which runs the site's installed
ClientApp for runs of an approved app only (``fl-client apps`` prints the hashes;
``fl-client --approve-app HASH`` approves another). The data settings (window, image size, ...) are the coordinator's, from the
site's kit (``-c`` overrides them; without a kit, the run's defaults). The
site's own choices — data folder, privacy budget, device — travel in the
SuperNode's node config, which the coordinator cannot change.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from client.approval import APPROVALS_FILE, SiteApp, approve, read_approvals
from common.cli import run_typer, setup_logging
from common.config import DEVICES, RunConfig, SiteConfig, positive_float, site_name
from common.errors import ConfigError, DataError, FederationError
from common.files import json_safe, write_atomic
from common.flower import flower_env
from common.kit import DATA_KEYS, check_data_settings, parse_data_args
from common.processes import LOOPBACK, ManagedProcess, ProcessSet, can_connect, free_port, parse_address

if TYPE_CHECKING:
    from common.kit import Kit

log = logging.getLogger("fl-client")
INSECURE_BANNER = (
    "WARNING: --insecure: plain HTTP. This site's model updates travel to the coordinator "
    "without TLS and without a site key: for demos and tests on one machine only."
)
cli = typer.Typer(add_completion=False, help=__doc__)


CONNECTED_MARKER = "connected.json"  # in the site's workdir while its SuperNode is connected
NODE_ID = re.compile(r"SuperNode ID: (\d+)")  # what flower-supernode logs once its node is active
REJOIN_WAIT = 180  # s: how long a restarted site waits for the coordinator to notice its previous client is gone
REJOIN_RETRY = 5  # s between tries (a try costs one short SuperNode start)
APP_DIR_HELP = ("The project folder whose ClientApp this site runs (default: the folder fedrad is installed from). "
                "Its FAB hash is the app this site approves; `fl-client apps` prints it.")
WORKER_RETRIES = 3  # worker deaths in a row, each within WORKER_HEALTHY s of its start, before fl-client gives up
WORKER_HEALTHY = 60.0
RUN_CONFIG_HELP = (
    "The run's data settings, when they differ from the kit's (the coordinator's), e.g. "
    "-c 'image-size=64 window=\"voi\"'. Keys: " + ", ".join(DATA_KEYS) + "."
)


def _data_settings(items: list[str] | None, *, kit: Kit | None) -> dict[str, dict[str, Any]]:
    """Every data setting → ``{"value": ..., "from": "-c" | "kit" | "default"}``: ``-c`` wins, then the kit's."""
    layers = (("-c", parse_data_args(items)), ("kit", kit.data if kit is not None and kit.data else {}),
              ("default", check_data_settings({})))
    return {key: next({"value": values[key], "from": source} for source, values in layers if key in values)
            for key in DATA_KEYS}


@cli.command()
def join(
    data: Annotated[Path | None, typer.Option(help="Folder with the site's DICOM files and labels.csv.")] = None,
    site: Annotated[str | None, typer.Option(help="This site's name, e.g. A (default: the kit's).")] = None,
    kit: Annotated[Path | None, typer.Option(help="The enrollment kit from the coordinator (`fl-server enroll`): "
                                             "TLS trust, this site's key and the coordinator's address.")] = None,
    server: Annotated[str | None, typer.Option(help="Coordinator address HOST:PORT (default: the kit's).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP without a kit: loopback demos and tests only.")] = False,
    max_epsilon: Annotated[float, typer.Option(help="This site's privacy budget ε (its ceiling, whatever the run asks).")] = 8.0,
    delta: Annotated[float, typer.Option(help="δ of the site's (ε, δ) guarantee.")] = 1e-5,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workdir: Annotated[Path | None, typer.Option(help="Site work folder (cache, privacy accounting, logs). Default: ./fedrad-site-<site>.")] = None,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for training (0 = all).")] = 0,
    secure_mode: Annotated[bool, typer.Option(
        "--secure-mode/--no-secure-mode", help="DP sampling and noise seeded from the OS CSPRNG every round (default). "
        "--no-secure-mode makes them reproducible from the run's seed: tests only, the guarantee does not hold.",
    )] = True,
    privacy_unit: Annotated[str, typer.Option(help="What one DP record is: patient (all of a patient's images) or image.")] = "patient",
    noise_multiplier: Annotated[float, typer.Option(
        min=0.0, help="Fix this site's σ instead of calibrating it to the run's rounds (0 = calibrate). "
        "The site then trains until its max-epsilon is reached and declines later rounds.",
    )] = 0.0,
    check: Annotated[bool, typer.Option("--check", help="Only check and cache the data, print the report and exit (0 = usable).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="With --check: print the report as JSON.")] = False,
    run_config: Annotated[list[str] | None, typer.Option("--run-config", "-c", help=RUN_CONFIG_HELP)] = None,
    workers: Annotated[int, typer.Option(min=0, help="Processes decoding DICOM (0 = one per CPU core).")] = 0,
    app_dir: Annotated[Path | None, typer.Option(help=APP_DIR_HELP)] = None,
    approve_app: Annotated[str | None, typer.Option(help=(
        "Approve runs of the app with this FAB hash at this site (besides the installed app), remember it in "
        "the site's work folder and exit. Its runs are still executed by the installed code."))] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> int:
    """Check the data, then run a SuperNode for this site until stopped (Ctrl-C)."""
    setup_logging(verbose)
    if json_output and not check:
        raise ConfigError("`--json` only goes with `--check`")
    site_kit = _site_kit(kit, site=site, insecure=insecure)
    site = site or (site_kit.site if site_kit else None)
    if not site:
        raise ConfigError("Expected `--site` (or `--kit`), but got neither")
    if approve_app is not None:
        return _approve(approve_app, work_dir=_work_dir(workdir, site))
    if data is None:
        raise ConfigError("Expected `--data DIR` (the site's DICOM folder), but got none")
    server = server or (site_kit.server if site_kit else f"{LOOPBACK}:9092")
    if device not in DEVICES:
        raise ConfigError(f"Expected `--device` to be one of {', '.join(DEVICES)}, but got {device!r}")
    site_cfg = SiteConfig(
        site=site_name(site),
        data_dir=data.resolve(),
        work_dir=_work_dir(workdir, site),
        max_epsilon=positive_float("max-epsilon", max_epsilon),
        delta=positive_float("delta", delta),
        device=device,
        threads=threads,
        secure_mode=secure_mode,
        privacy_unit=privacy_unit,
        noise_multiplier=noise_multiplier,
    )
    from common.adapters.flower import parse_config_args

    # The node config as Flower will parse it: one validation path for every key.
    SiteConfig.from_flower(parse_config_args([site_cfg.to_flower()]))
    host, port = parse_address(server)
    if insecure and host not in (LOOPBACK, "localhost"):
        raise ConfigError(f"`--insecure` connects to {LOOPBACK} only, but got --server {server}; use the kit (--kit) for TLS")
    if not site_cfg.data_dir.is_dir():
        raise DataError(f"Data folder {site_cfg.data_dir} does not exist or is not a folder")
    if site_kit is None and not insecure and not check:
        raise ConfigError(
            "Expected `--kit DIR` (the enrollment kit from the coordinator's `fl-server enroll --site NAME`), "
            "or --insecure for a loopback demo"
        )
    if not secure_mode and not check:
        log.warning("SECURE MODE IS OFF (--no-secure-mode): this site's DP noise is reproducible from the run's seed")
    if device == "cuda" and not check:
        from client.app.training import resolve_device

        resolve_device(device)

    settings = _data_settings(run_config, kit=site_kit)
    log.info("Site %s data settings: %s", site_cfg.site, _describe_settings(settings))
    from client.app.site import open_data

    site_data = open_data(site_cfg, RunConfig.from_flower({key: s["value"] for key, s in settings.items()}),
                          workers=workers, require_usable=False)
    report = {"site": site_cfg.site, **site_data.report, "settings": settings}
    if check:
        if json_output:
            print(json.dumps(json_safe(report), indent=2, allow_nan=False))
        else:
            print_report(report)
        if not report["usable"]:
            raise DataError(f"Site {site_cfg.site} data is not usable: {report['summary']}")
        return 0
    if not report["usable"]:
        raise DataError(f"Site {site_cfg.site} data is not usable: {report['summary']}; see fl-client --check")
    log.info("Site %s data: %s", site_cfg.site, report["summary"])
    for warning in report["warnings"]:
        log.warning("Site %s data: %s", site_cfg.site, warning)
    if not can_connect(host, port, timeout=3):
        raise FederationError(f"Cannot reach the coordinator at {host}:{port}; is fl-server running there?")
    if site_kit is None:
        log.warning(INSECURE_BANNER)
        security = ["--insecure"]
    else:
        _check_coordinator_tls(host, port, site_kit.ca_cert)
        security = ["--root-certificates", str(site_kit.ca_cert), "--auth-supernode-private-key", str(site_kit.private_key)]

    app = SiteApp.load(app_dir, work_dir=site_cfg.work_dir)
    log.info("Site %s runs app %s (from %s)%s", site_cfg.site, app.installed, app.folder,
             f"; also approved: {', '.join(sorted(app.approved - {app.installed}))}" if len(app.approved) > 1 else "")
    env = flower_env(site_cfg.work_dir / "flwr-home")
    marker = site_cfg.work_dir / CONNECTED_MARKER
    crashed = site_kit is not None and _rejoin_after_crash(site_cfg, site_kit, marker, address=f"{host}:{port}")
    deadline = time.monotonic() + REJOIN_WAIT
    try:
        while True:
            code, output = _run_supernode(site_cfg, site_kit, app, host=host, port=port, security=security,
                                          env=env, marker=marker)
            refused = site_kit is not None and "Failed to activate SuperNode" in output
            if not (refused and crashed) or time.monotonic() > deadline:
                break
            log.warning("The coordinator still counts this site's previous client (which did not leave cleanly) "
                        "as connected; rejoining in %d s", REJOIN_RETRY)
            time.sleep(REJOIN_RETRY)
    finally:
        marker.unlink(missing_ok=True)
    if refused and site_kit is not None:
        waited = f" (after waiting {REJOIN_WAIT} s for its previous connection to expire)" if crashed else ""
        raise FederationError(
            f"The coordinator at {host}:{port} refused this site's key {site_kit.fingerprint}{waited}: site "
            f"{site_cfg.site} is not enrolled there (or was removed or re-keyed, or another fl-client of this site "
            "is connected); ask the coordinator to check `fl-server sites` and send a new kit"
        )
    raise FederationError(
        f"SuperNode of site {site_cfg.site} exited with code {code} (log: {site_cfg.work_dir / 'logs' / 'supernode.log'})"
    )


def _rejoin_after_crash(site_cfg: SiteConfig, site_kit: Kit, marker: Path, *, address: str) -> bool:
    """Whether this site's previous client died without leaving (its marker is left behind); if so, say it is gone.

    The coordinator would count that client's node online until it misses two heartbeats (about
    60 s), wait for its answers meanwhile, and refuse this site's key until then. The marker holds
    the node id, so the site tells the coordinator at once (:func:`deactivate_node`, signed with
    its key). A client of this site that still runs is an error: two cannot share one key.
    """
    if not marker.exists():
        return False
    try:
        previous = json.loads(marker.read_text())
        pid, since, node_id = int(previous["pid"]), float(previous["since"]), previous.get("node_id")
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable (cut short while written): the crashed case, without a node id to tell
    if _is_supernode(pid, since):
        raise FederationError(f"Another fl-client of site {site_cfg.site} is connected (its SuperNode has pid {pid}); "
                              f"stop it first, or give this one its own --workdir")
    if isinstance(node_id, int):
        from common.adapters.supernode import deactivate_node

        why = deactivate_node(address, ca_cert=site_kit.ca_cert, private_key=site_kit.private_key, node_id=node_id)
        log.info("Site %s: its previous client did not leave cleanly; %s", site_cfg.site,
                 "told the coordinator it is gone" if why is None else f"the coordinator did not take note ({why})")
    return True


def _is_supernode(pid: int, since: float) -> bool:
    """Whether ``pid`` is still the SuperNode that connected at ``since`` (not a later process with its PID)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() <= since + 1 and "common.adapters.supernode" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _run_supernode(
    site_cfg: SiteConfig, site_kit: Kit | None, app: SiteApp, *, host: str, port: int, security: list[str],
    env: dict[str, str], marker: Path,
) -> tuple[int | None, str]:
    """Run the site's SuperNode and its worker until the SuperNode exits, echoing their log; its exit code and output.

    The SuperNode leaves each message on its Runtime API (``--isolation process``), guarded by a secret
    only the site's worker (:mod:`client.worker`) holds; a worker that dies is started again.
    ``marker`` is written once the SuperNode is connected (and removed by the caller when it leaves).
    """
    runtime = f"{LOOPBACK}:{free_port()}"
    secret = site_cfg.work_dir / "worker.secret"
    write_atomic(secret, secrets.token_bytes(32))  # a new one at every start, readable by this user only
    joined = _Joined()
    try:
        with ProcessSet() as procs:
            return _supervise(site_cfg, site_kit, app, procs, joined, marker=marker, runtime=runtime, secret=secret,
                              env=env, host=host, port=port, security=security)
    finally:
        if joined.node_id is not None and site_kit is not None:
            # Flower's SuperNode deactivates its node when it leaves, unless its exit is cut short
            # (a second signal, its force-exit timer); then the coordinator would wait out its heartbeats.
            from common.adapters.supernode import deactivate_node

            if deactivate_node(f"{host}:{port}", ca_cert=site_kit.ca_cert, private_key=site_kit.private_key,
                               node_id=joined.node_id, timeout=3.0) is None:
                log.info("Site %s: told the coordinator this site has left (its SuperNode did not)", site_cfg.site)


@dataclass
class _Joined:
    """The node id this site's SuperNode activated at the coordinator, once it has."""

    node_id: int | None = None


def _supervise(
    site_cfg: SiteConfig, site_kit: Kit | None, app: SiteApp, procs: ProcessSet, joined: _Joined, *, marker: Path,
    runtime: str, secret: Path, env: dict[str, str], host: str, port: int, security: list[str],
) -> tuple[int | None, str]:
    """Start the SuperNode and the worker in ``procs`` and follow them until the SuperNode exits: its code and output.

    Once the SuperNode is connected, its node id goes into ``joined`` and the ``marker``.
    """
    supernode_log = site_cfg.work_dir / "logs" / "supernode.log"
    start = supernode_log.stat().st_size if supernode_log.exists() else 0
    supernode = procs.start(
        f"SuperNode {site_cfg.site}",
        [
            sys.executable, "-m", "common.adapters.supernode", *security, "--superlink", f"{host}:{port}",
            "--host", LOOPBACK, "--port", runtime.rsplit(":", 1)[1], "--isolation", "process",
            "--superexec-auth-secret-file", str(secret), "--node-config", site_cfg.to_flower(),
        ],
        env=env,
        log_path=supernode_log,
    )
    worker_cmd = [sys.executable, "-m", "client.worker", "--runtime-api", runtime, "--secret-file", str(secret),
                  "--site", site_cfg.site, "--installed", app.installed, "--approvals", str(app.approvals),
                  "--stats", str(supernode_log.with_name("worker.jsonl")), "--parent-pid", str(os.getpid())]
    workers = _WorkerKeeper(procs, f"worker {site_cfg.site}", worker_cmd, env=env, cwd=app.folder,
                            log_path=supernode_log)
    log.info("Site %s joined via %s:%d over %s (SuperNode pid %d, log %s); Ctrl-C to leave", site_cfg.site, host,
             port, "plain HTTP" if site_kit is None else f"TLS, key {site_kit.fingerprint}", supernode.pid,
             supernode_log)
    with supernode_log.open(errors="replace") as follow:
        follow.seek(start)
        while supernode.running():
            workers.check()
            chunk = _echo(follow)
            if joined.node_id is None and (found := NODE_ID.search(chunk)):
                joined.node_id = int(found.group(1))
                write_atomic(marker, json.dumps({"pid": supernode.pid, "since": time.time(),
                                                 "node_id": joined.node_id}).encode())
            time.sleep(0.5)
        _echo(follow)
        follow.seek(start)
        return supernode.popen.returncode, follow.read()


class _WorkerKeeper:
    """The site's worker process, started again (and the reason logged) whenever it exits."""

    def __init__(self, procs: ProcessSet, name: str, cmd: list[str], **kwargs: Any) -> None:
        self.procs, self.name, self.cmd, self.kwargs = procs, name, cmd, kwargs
        self.failures = 0
        self.proc = self._start()

    def _start(self) -> ManagedProcess:
        self.started = time.monotonic()
        return self.procs.start(self.name, self.cmd, **self.kwargs)

    def check(self) -> None:
        """Start the worker again if it exited; give up after :data:`WORKER_RETRIES` quick deaths in a row."""
        if self.proc.running():
            return
        code = self.proc.popen.returncode
        self.failures = self.failures + 1 if time.monotonic() - self.started < WORKER_HEALTHY else 1
        if self.failures > WORKER_RETRIES:
            raise FederationError(f"The {self.name} process exited with code {code} {self.failures} times in a row "
                                  f"within {WORKER_HEALTHY:.0f} s of its start; last lines:\n{self.proc.tail(5)}")
        log.warning("The %s process (pid %d) exited with code %s; starting it again", self.name, self.proc.pid, code)
        self.proc = self._start()


def _work_dir(workdir: Path | None, site: str) -> Path:
    return (workdir or Path(f"fedrad-site-{site}")).resolve()


def _approve(value: str, *, work_dir: Path) -> int:
    """``--approve-app``: remember ``value`` in the site's approvals; 0."""
    path = work_dir / APPROVALS_FILE
    added = approve(path, value)
    print(f"{'Approved' if added else 'Already approved'}: app {value.strip().lower()} ({path}); "
          "a running fl-client applies it from the next message on")
    return 0


def _echo(follow: Any) -> str:
    """Copy what the SuperNode wrote since last time to our stdout (the operator sees it live)."""
    chunk = follow.read()
    if chunk:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return str(chunk)


def _site_kit(kit: Path | None, *, site: str | None, insecure: bool) -> Kit | None:
    """The site's enrollment kit, checked; None for --insecure or a data check."""
    from common.kit import load_kit

    if kit is not None and insecure:
        raise ConfigError("`--kit` and `--insecure` exclude each other")
    if kit is None:
        return None
    loaded = load_kit(kit)
    if site is not None and site != loaded.site:
        raise ConfigError(f"Expected `--site` to match the kit's site {loaded.site!r}, but got {site!r}")
    return loaded


def _check_coordinator_tls(host: str, port: int, ca_cert: Path) -> None:
    """Refuse a coordinator whose TLS certificate (for ``host``) the kit's consortium CA did not sign."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=10) as sock, context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise FederationError(
            f"The coordinator at {host}:{port} is not the one your kit trusts: its TLS certificate "
            f"failed verification against the kit's consortium CA ({exc.verify_message}); "
            "check --server, or ask the coordinator for a new kit"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise FederationError(
            f"No TLS connection to the coordinator at {host}:{port} ({exc}); is it serving TLS (not --insecure)?"
        ) from None


def _describe_settings(settings: dict[str, dict[str, Any]]) -> str:
    """``settings`` as ``-c`` pairs grouped by source: ``image-size=128 window="voi" (kit); seed=0 (default)``."""
    names = {"-c": "-c", "kit": "the kit", "default": "defaults"}
    groups = [
        " ".join(f"{key}={json.dumps(s['value'])}" for key, s in settings.items() if s["from"] == source)
        + f" ({names[source]})"
        for source in names if any(s["from"] == source for s in settings.values())
    ]
    return "; ".join(groups)


def _fmt(value: Any) -> str:
    """A report value as plain text, escaped for rich (file names and DICOM values may hold [...])."""
    from rich.markup import escape

    if isinstance(value, dict):
        return ", ".join(f"{escape(str(k))}: {_fmt(v)}" for k, v in value.items()) or "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else escape(str(value))


def print_report(report: dict[str, Any]) -> None:
    """The data report as rich tables (what ``--check`` prints)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    status = "[green]usable[/green]" if report["usable"] else "[red]NOT usable[/red]"
    console.print(f"[bold]Site {escape(report['site'])} data check[/bold]: {status} — {escape(report['summary'])}")
    files = report["files"]
    overview = Table(show_header=False, box=None)
    for label, value in (
        ("files seen / accepted / rejected", f"{files['seen']} / {files['accepted']} / {files['rejected']}"),
        ("images (frames) accepted", report["images"]),
        ("labels", f"keyed by {report['labels']['key']}; per class {_fmt(report['labels']['classes'])}"),
        ("patients / studies / series", f"{report['patients']} / {report['studies']} / {report['series']}"),
        ("modalities", report["modalities"]),
        ("manufacturers", report["manufacturers"]),
        ("transfer syntaxes", report["transfer_syntaxes"]),
        ("photometric", report["photometric"]),
        ("image sizes", report["image_sizes"]),
        ("pixel spacing (mm)", report["pixel_spacing_mm"]),
        ("intensity (modality values)", report["intensity"]),
        ("train split", report["split"]["train"]),
        ("validation split", report["split"]["validation"]),
        ("cache", f"{report['cache']['decoded']} files decoded now, {report['cache']['reused']} reused"),
        ("data settings", _describe_settings(report["settings"]) if "settings" in report else None),
    ):
        overview.add_row(label, _fmt(value))
    console.print(overview)
    if report["rejections"]:
        table = Table(title="Rejected files (one reason each)")
        table.add_column("files", justify="right")
        table.add_column("reason")
        table.add_column("examples (relative paths, on this site only)")
        for group in report["rejections"]:
            table.add_row(str(group["count"]), escape(group["reason"]), escape(", ".join(group["files"][:3])))
        console.print(table)
    problems = report["labels"]
    for name in ("unmatched_rows", "conflicting", "unknown_class", "empty_key"):
        if problems[name]["count"]:
            console.print(f"labels.csv {name.replace('_', ' ')}: {problems[name]['count']} (lines {problems[name]['lines']})")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {escape(problem)}")


apps_cli = typer.Typer(add_completion=False)


@apps_cli.command()
def apps(
    site: Annotated[str | None, typer.Option(help="This site's name (default: the kit's).")] = None,
    kit: Annotated[Path | None, typer.Option(help="The site's enrollment kit.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Site work folder (default: ./fedrad-site-<site>).")] = None,
    app_dir: Annotated[Path | None, typer.Option(help=APP_DIR_HELP)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> int:
    """Print the FAB hash of the app this site runs, and the other app hashes it approved.

    The coordinator's `fl-server` logs the hash of the app it submits: the two must match (or the
    site must approve the coordinator's with `fl-client --approve-app HASH`), or the site refuses the run.
    """
    site_kit = _site_kit(kit, site=site, insecure=False)
    name = site or (site_kit.site if site_kit else None)
    if not name:
        raise ConfigError("Expected `--site` (or `--kit`), but got neither")
    app = SiteApp.load(app_dir, work_dir=_work_dir(workdir, name))
    approved = read_approvals(app.approvals)
    if json_output:
        print(json.dumps({"site": name, "installed": {"hash": app.installed, "folder": str(app.folder)},
                          "approved": approved, "approvals-file": str(app.approvals)}, indent=2))
        return 0
    print(f"Site {name} runs app {app.installed} (installed in {app.folder})")
    for entry in approved:
        print(f"  also approved: {entry['hash']} (since {entry['approved-at']})")
    if not approved:
        print(f"  no other app approved ({app.approvals})")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run the ``fl-client`` command line on ``argv`` (default: ``sys.argv[1:]``); ``fl-client apps ...`` lists apps."""
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["apps"]:
        run_typer(apps_cli, args[1:], prog_name="fl-client apps")
    run_typer(cli, args, prog_name="fl-client")


if __name__ == "__main__":
    main()
