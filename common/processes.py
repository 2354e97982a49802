"""Starting, waiting for, measuring and stopping the processes we own (psutil for process trees).

fedrad starts Flower's SuperLink and SuperNodes as child processes; those
start ``flower-superexec`` children of their own, which outlive a killed
parent. We therefore keep every PID we start, collect its descendants
*before* stopping it, and stop exactly those processes — never by name.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psutil

from common.errors import FederationError

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.5, what: str) -> object:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that.

    Parameters
    ----------
    predicate
        Called without arguments; an exception it raises propagates.
    timeout, interval
        Seconds to keep trying (monotonic clock; ``predicate`` is called at least once), and to sleep between calls.
    what
        What is awaited, for the :class:`TimeoutError` (``"fl-server to listen on 127.0.0.1:9092"``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether ``host:port`` can be bound (nobody listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the servers we start: a port left in TIME_WAIT by a past run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def can_connect(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts a TCP connection to ``host:port`` within ``timeout`` s (closed again at once).

    Parameters
    ----------
    host, port
        Host name or IP address, and TCP port.
    timeout
        Seconds the connection attempt may take; a refusal, timeout or other socket error gives False.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT``; raise :class:`FederationError` with a clear message."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FederationError(f"Expected an address like 127.0.0.1:9092, but got {address!r}")
    return host.strip("[]"), int(port)


def descendants(pid: int) -> list[int]:
    """All live descendant PIDs of ``pid`` (empty when ``pid`` is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead for our purposes)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


@dataclass(frozen=True)
class Usage:
    """One process's resident memory (bytes) and CPU seconds, read by :func:`tree_usage`."""

    pid: int
    name: str
    started: float  # psutil's ``create_time``: ``(pid, started)`` names a process even after its PID is reused
    rss: int  # resident pages, shared ones included (a page mapped by n processes counts in each)
    pss: int | None  # proportional set size: each shared page split between its processes; None unless read
    uss: int | None  # unique set size: the pages only this process maps; None unless read
    cpu_s: float  # user + system CPU seconds of the process itself (not of its children)


def tree_usage(root: int, *, full: bool = False) -> list[Usage]:
    """The memory and CPU of ``root`` (first, when alive) and of every live descendant.

    A process that ends while it is read is left out. ``full`` also reads PSS and USS where the system gives
    them (psutil's ``memory_full_info`` walks the page tables: ~10 ms for a process that imported torch).
    """
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    out: list[Usage] = []
    for proc in procs:
        pss: int | None = None
        uss: int | None = None
        try:
            with proc.oneshot():
                mem, cpu = proc.memory_info(), proc.cpu_times()
                if full:
                    with contextlib.suppress(psutil.AccessDenied):
                        extra = proc.memory_full_info()
                        pss, uss = getattr(extra, "pss", None), getattr(extra, "uss", None)
                out.append(Usage(pid=proc.pid, name=proc.name(), started=proc.create_time(), rss=int(mem.rss),
                                 pss=pss, uss=uss, cpu_s=float(cpu.user + cpu.system)))
        except psutil.Error:
            continue
    return out


def _processes(pids: Sequence[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid))
    return out


def stop_pids(pids: Sequence[int], *, timeout: float = 10.0) -> None:
    """SIGTERM ``pids``, wait up to ``timeout`` s, then SIGKILL the survivors."""
    procs = _processes(pids)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        if _gone(procs, timeout=wait):
            return
    log.warning("Processes %s did not stop", [p.pid for p in procs if alive(p.pid)])


def _gone(procs: Sequence[psutil.Process], *, timeout: float) -> bool:
    """Whether every process ended within ``timeout`` s (zombies count as ended: we never reap
    here, so a ``Popen`` still gets its child's exit status)."""
    try:
        wait_until(lambda: not any(p.is_running() and alive(p.pid) for p in procs), timeout=timeout,
                   interval=0.1, what="processes to stop")
    except TimeoutError:
        return False
    return True


def crash(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every descendant, like a machine dying; the PIDs killed.

    The tree is frozen first (SIGSTOP, repeated until no new member appears), so
    no member can start a process between listing and killing.
    """
    frozen: list[psutil.Process] = []
    todo = _processes([pid])
    while todo:
        for proc in todo:
            with contextlib.suppress(psutil.Error):
                proc.suspend()
        frozen += todo
        seen = {p.pid for p in frozen}
        todo = [p for p in _processes(descendants(pid)) if p.pid not in seen]
    for proc in frozen:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _gone(frozen, timeout=10)
    return [p.pid for p in frozen]


class ManagedProcess:
    """A child process we own, stopped together with all its descendants.

    Parameters
    ----------
    name
        Human-readable name for logs and errors (``"SuperLink"``).
    cmd, env, cwd
        Command line, full environment and working folder of the child.
    log_path
        File that receives the child's stdout and stderr; ``None`` inherits ours.
    """

    def __init__(
        self, name: str, cmd: Sequence[str], *,
        env: Mapping[str, str] | None = None, log_path: Path | None = None, cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log_file: IO[bytes] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(
                self.cmd, env=dict(env) if env is not None else None, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=self._log_file, stderr=subprocess.STDOUT if self._log_file else None,
            )
        except OSError as exc:
            self._close_log()
            raise FederationError(f"Could not start {name} ({self.cmd[0]}): {exc}") from exc
        log.debug("Started %s (pid %s): %s", name, self.popen.pid, " ".join(self.cmd))

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def running(self) -> bool:
        """Whether the child has not exited yet (polling it reaps an exited child)."""
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        """This process (while it runs) and its live descendants."""
        return [self.pid, *descendants(self.pid)] if self.running() else descendants(self.pid)

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the process and every descendant it started."""
        stop_pids(self.tree(), timeout=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL already sent
            self.popen.wait(timeout=1)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class ProcessSet:
    """Processes stopped together, in reverse start order, on exit or on SIGTERM/SIGINT."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []
        self._old_handlers: dict[int, object] = {}

    def start(self, name: str, cmd: Sequence[str], **kwargs: object) -> ManagedProcess:
        """Start a :class:`ManagedProcess` and add it to the set.

        Parameters
        ----------
        name : str
            What logs and errors call the process.
        cmd : Sequence[str]
            The command line.
        **kwargs
            :class:`ManagedProcess`'s ``env``, ``log_path`` and ``cwd``.

        Returns
        -------
        ManagedProcess
            The started process, stopped with the set.
        """
        proc = ManagedProcess(name, cmd, **kwargs)  # type: ignore[arg-type]
        self.processes.append(proc)
        return proc

    def pids(self) -> set[int]:
        """Every live PID of the set: each process and its descendants."""
        return {pid for proc in self.processes for pid in proc.tree()}

    def _on_signal(self, signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"received signal {signum}")

    def __enter__(self) -> Self:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Ignore further signals while stopping, so a second Ctrl-C cannot orphan children.
        for sig in self._old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            for proc in reversed(self.processes):
                proc.stop()
            self.processes.clear()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
