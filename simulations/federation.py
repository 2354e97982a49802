"""A real federation on loopback: ``fl-server`` and one ``fl-client`` per site, as a consortium runs it.

The one harness behind ``make demo``, the benchmarks and the end-to-end tests. It enrolls the sites
(unless insecure), starts the coordinator on a free loopback port, waits until it listens, starts the
sites, waits for the run, and stops exactly the processes it started and their children (never by
name). Under ``root``: ``server/`` (the coordinator's workdir), ``site-<X>/`` (each site's), ``logs/``
(``fl-server.log``, ``site-<X>.log``) and ``flwr-home/`` (every child's ``FLWR_HOME``, so nothing
touches ``~/.flwr``).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from common.errors import FederationError
from common.flower import flower_bin
from common.processes import LOOPBACK, ManagedProcess, ProcessSet, can_connect, crash, free_port, wait_until
from common.runfolder import RunFolder

__all__ = ["Federation"]


def _exited(name: str, proc: ManagedProcess, before: str = "") -> FederationError:
    """The error for a process that exited (before ``before``, when given), with its log's last lines."""
    when = f" before {before}" if before else ""
    return FederationError(f"{name} exited with code {proc.popen.returncode}{when}; "
                           f"its log ends with:\n{proc.tail(25)}")


class Federation:
    """fl-server and its sites on loopback; a context manager that stops every process it started.

    Parameters
    ----------
    root
        Work folder of the whole federation (see the module docstring).
    sites
        Site names.
    data
        A folder with one sub-folder per site, or each site's data folder.
    server_args, client_args
        Further ``fl-server`` options (``--rounds``, ``--run-config`` ...); further ``fl-client`` options,
        for every site or per site.
    secure
        Enroll every site and join with its kit (TLS, SecAgg+); else ``--insecure``.
    threads
        ``fl-client --threads``.
    server_cmd, server_cwd
        How to start fl-server (default: the installed one), e.g. from a copy of the app.
    site_app
        The app folder every site runs and approves (``fl-client --app-dir``; default: fedrad's own).
    """

    def __init__(self, root: Path, sites: Sequence[str], data: Path | Mapping[str, Path], *,
                 server_args: Sequence[str] = (), client_args: Sequence[str] | Mapping[str, Sequence[str]] = (),
                 secure: bool = True, threads: int = 1, server_cmd: Sequence[str] | None = None,
                 server_cwd: Path | None = None, site_app: Path | None = None) -> None:
        self.root = root.resolve()
        self.server_dir, self.logs = self.root / "server", self.root / "logs"
        self.sites = list(sites)
        self.data = {s: data[s] for s in self.sites} if isinstance(data, Mapping) else {s: data / s for s in self.sites}
        self.server_args, self.client_args = list(server_args), client_args
        self.secure, self.threads = secure, threads
        self.server_cmd = list(server_cmd) if server_cmd else [flower_bin("fl-server")]
        self.server_cwd = server_cwd
        self.site_app = site_app
        self.port = free_port()
        self.procs = ProcessSet()
        self.server: ManagedProcess | None = None
        self.clients: dict[str, ManagedProcess] = {}
        self.pids: set[int] = set()  # every PID seen: what was started and its children
        self.env = {**os.environ, "FLWR_HOME": str(self.root / "flwr-home")}

    def site_dir(self, site: str) -> Path:
        """The site's work folder, ``<root>/site-<site>``."""
        return self.root / f"site-{site}"

    def kit(self, site: str) -> Path:
        """The site's enrollment kit folder, ``<server_dir>/kits/<site>`` (written by :meth:`enroll`)."""
        return self.server_dir / "kits" / site

    def __enter__(self) -> Self:
        self.procs.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remember()
        self.procs.__exit__(exc_type, exc, tb)

    def enroll(self, site: str) -> Path:
        """``fl-server enroll --site SITE``: the site's key pair and kit; the kit folder."""
        proc = subprocess.run(
            [*self.server_cmd, "enroll", "--site", site, "--workdir", str(self.server_dir),
             "--server-address", f"{LOOPBACK}:{self.port}"],
            capture_output=True, text=True, check=False, cwd=self.server_cwd, env=self.env,
        )
        if proc.returncode != 0:
            raise FederationError(f"fl-server enroll --site {site} failed: {proc.stderr.strip()[-500:]}")
        return self.kit(site)

    def start_server(self, *, resume: Path | None = None, timeout: float = 120.0) -> ManagedProcess:
        """Start fl-server (or ``fl-server --resume RUN_DIR``) and wait until it accepts connections."""
        insecure = [] if self.secure else ["--insecure"]
        if resume is None:
            args = ["--port", str(self.port), "--workdir", str(self.server_dir),
                    "--min-sites", str(len(self.sites)), *insecure, *self.server_args]
            log = self.logs / "fl-server.log"
        else:
            args = [*insecure, "--resume", str(resume), "--port", str(self.port)]
            log = self.logs / "fl-server-resumed.log"
        server = self.procs.start("fl-server", [*self.server_cmd, *args], log_path=log, cwd=self.server_cwd,
                                  env=self.env)
        self.server = server
        accepted = [0]  # two connections in a row: one lucky connect is not a listening SuperLink

        def listening() -> bool:
            if not server.running():
                raise _exited("fl-server", server, "listening")
            accepted[0] = accepted[0] + 1 if can_connect(LOOPBACK, self.port, timeout=0.5) else 0
            return accepted[0] >= 2

        wait_until(listening, timeout=timeout, interval=0.3, what=f"fl-server to listen on {LOOPBACK}:{self.port}")
        self.remember()
        return server

    def join(self, site: str) -> ManagedProcess:
        """Start the site's fl-client (with its kit, or ``--insecure --site``)."""
        if self.secure:
            how = ["--kit", str(self.kit(site))]
        else:
            how = ["--insecure", "--site", site, "--server", f"{LOOPBACK}:{self.port}"]
        extra = self.client_args.get(site, ()) if isinstance(self.client_args, Mapping) else self.client_args
        if self.site_app is not None:
            how += ["--app-dir", str(self.site_app)]
        client = self.procs.start(
            f"fl-client {site}",
            [flower_bin("fl-client"), *how, "--data", str(self.data[site]), "--workdir", str(self.site_dir(site)),
             "--threads", str(self.threads), *extra],
            log_path=self.logs / f"site-{site}.log", env=self.env,
        )
        self.clients[site] = client
        return client

    def start(self) -> Federation:
        """Enroll (when secure and not yet done), start fl-server, then every site."""
        for site in self.sites:
            if self.secure and not self.kit(site).is_dir():
                self.enroll(site)
        self.start_server()
        for site in self.sites:
            self.join(site)
        return self

    def remember(self) -> None:
        """Add every live PID of the federation to :attr:`pids`."""
        self.pids |= self.procs.pids()

    def wait(self, *, timeout: float, until: Callable[[], bool] | None = None, what: str = "the end of the run",
             on_poll: Callable[[], object] | None = None, interval: float = 0.5) -> None:
        """Until ``until()`` holds or, without ``until``, fl-server exits; a site that dies fails the wait.

        Parameters
        ----------
        timeout, interval
            Seconds to wait at most, and between polls.
        until
            Condition polled at each poll; None waits for fl-server to exit, whatever its code
            (:meth:`check_exit` checks it).
        what
            What is awaited, for the error messages.
        on_poll
            Called at every poll before the checks (e.g. to show new log lines).

        Raises
        ------
        FederationError
            When fl-server exits before ``until()`` holds, a site's fl-client exits, or ``timeout``
            passes; the message ends with the log's last lines.
        """
        server = self.server
        assert server is not None, "start the server first"

        def done() -> bool:
            self.remember()
            if on_poll is not None:
                on_poll()
            if until is not None and until():
                return True
            if not server.running():
                if until is None:
                    return True
                raise _exited("fl-server", server, what)
            for site, client in self.clients.items():
                if not client.running():
                    raise _exited(f"fl-client {site}", client, what)
            return False

        try:
            wait_until(done, timeout=timeout, interval=interval, what=what)
        except TimeoutError as exc:
            raise FederationError(f"{exc}; fl-server's log ends with:\n{server.tail(25)}") from exc

    def check_exit(self) -> None:
        """Raise unless fl-server exited with code 0."""
        assert self.server is not None
        if self.server.popen.poll() != 0:
            raise _exited("fl-server", self.server)

    def run_folder(self) -> RunFolder | None:
        """The coordinator's run folder (the latest), or None before it exists."""
        found = RunFolder.in_workdir(self.server_dir)
        return found[-1] if found else None

    def completed_round(self) -> int:
        """The last round the coordinator committed (its state file); 0 before the first or while unreadable."""
        folder = self.run_folder()
        try:
            return int(folder.read_state()["completed_round"]) if folder else 0
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being replaced
            return 0

    def booked(self, site: str) -> set[int]:
        """The rounds of the current run the site's ledger books so far (read while the site runs)."""
        from common.ledger import LEDGER_FILE, Ledger

        folder, privacy = self.run_folder(), self.site_dir(site) / "privacy"
        if folder is None or not (privacy / LEDGER_FILE).is_file():
            return set()
        try:
            rows = Ledger(privacy, create=False).rows()
        except Exception:  # noqa: BLE001 - being created: read it again at the next poll
            return set()
        return {int(row.server_round) for row in rows if str(row.run_id) == folder.path.name}

    def crash_and_resume(self, server_round: int, *, timeout: float,
                         on_poll: Callable[[], object] | None = None) -> dict[str, Any]:
        """Crash the coordinator at the worst moment for round ``server_round + 1``, then ``fl-server --resume``.

        Waits until the coordinator has committed ``server_round`` and a site has trained and booked the
        next round, which the coordinator then loses; SIGKILLs the coordinator's whole process tree, frozen
        first (a crash, nothing cleaned up); then resumes the run on the same port.

        Parameters
        ----------
        server_round
            The last round the coordinator commits before the crash.
        timeout
            Seconds to wait at most for that moment.
        on_poll
            Called at every poll (see :meth:`wait`).

        Returns
        -------
        dict
            ``killed`` (the PIDs), ``completed_round`` and ``booked`` (site -> rounds its ledger books) at the
            crash, ``crashed_at`` (``time.monotonic()``) and ``down_s`` (until the new coordinator listened).

        Raises
        ------
        FederationError
            When a process exits or ``timeout`` passes before that moment (:meth:`wait`), or the resumed
            fl-server exits before it listens.
        """
        lost = server_round + 1
        self.wait(timeout=timeout, on_poll=on_poll, what=f"round {server_round} to be committed and a site to book "
                  f"round {lost}", until=lambda: self.completed_round() >= server_round
                  and any(lost in self.booked(site) for site in self.sites))
        assert self.server is not None
        self.remember()
        killed = crash(self.server.pid)
        self.server.popen.wait(timeout=10)
        wait_until(lambda: not can_connect(LOOPBACK, self.port, timeout=0.5), timeout=30, interval=0.2,
                   what=f"the killed coordinator's port {self.port} to close")
        crashed_at, folder = time.monotonic(), self.run_folder()
        assert folder is not None, "a crash after a committed round leaves a run folder"
        out = {"killed": killed, "completed_round": self.completed_round(), "crashed_at": crashed_at,
               "booked": {site: sorted(self.booked(site)) for site in self.sites}}
        self.start_server(resume=folder.path)
        return {**out, "down_s": time.monotonic() - crashed_at}
