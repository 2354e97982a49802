"""A site's connection to the federation: its SuperNode and worker, rejoining after a crash, and leaving.

``fl-client`` (:mod:`client.cli`) checks the data and the coordinator's certificate, then
:func:`connect` runs Flower's SuperNode (``--isolation process``) and the site's worker
(:mod:`client.worker`) until the SuperNode exits. While connected, ``connected.json`` in the
site's workdir holds the SuperNode's PID and node id. A client that dies without leaving
leaves it behind: the next one tells the coordinator that node is gone before it joins,
and a client that leaves tells it too when its SuperNode could not
(:func:`common.adapters.supernode.deactivate_node`); either way the coordinator stops
waiting for the site at once instead of after two missed heartbeats.
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
from typing import TYPE_CHECKING, Any, NoReturn

from client.approval import SiteApp
from common.config import SiteConfig
from common.errors import FederationError
from common.files import write_atomic
from common.flower import flower_env
from common.processes import LOOPBACK, ManagedProcess, ProcessSet, free_port

if TYPE_CHECKING:
    from common.kit import Kit

log = logging.getLogger("fl-client")

CONNECTED_MARKER = "connected.json"  # in the site's workdir while its SuperNode is connected
NODE_ID = re.compile(r"SuperNode ID: (\d+)")  # what flower-supernode logs once its node is active
REJOIN_WAIT = 180  # s: how long a restarted site waits for the coordinator to notice its previous client is gone
REJOIN_RETRY = 5  # s between tries (a try costs one short SuperNode start)
WORKER_RETRIES = 3  # worker deaths in a row, each within WORKER_HEALTHY s of its start, before fl-client gives up
WORKER_HEALTHY = 60.0


def connect(site_cfg: SiteConfig, site_kit: Kit | None, app: SiteApp, *, host: str, port: int,
            security: list[str]) -> NoReturn:
    """Run the site's SuperNode and worker until the SuperNode exits; always ends in a :class:`FederationError`.

    Parameters
    ----------
    site_cfg, site_kit, app
        The site, its enrollment kit (None: ``--insecure``) and the app its worker runs.
    host, port, security
        The coordinator's Fleet API and the SuperNode's TLS and key arguments.

    Raises
    ------
    FederationError
        Why the SuperNode stopped: the coordinator refused the site's key, or the SuperNode's exit code.
    """
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


def _echo(follow: Any) -> str:
    """Copy what the SuperNode wrote since last time to our stdout (the operator sees it live)."""
    chunk = follow.read()
    if chunk:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return str(chunk)
