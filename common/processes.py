"""Starting and stopping the federation processes we own.

fedrad starts Flower's SuperLink and SuperNodes as child processes; those
start ``flower-superexec`` children of their own, which outlive a killed
parent. We therefore keep every PID we start, collect its descendants from
``/proc`` *before* stopping it, and stop exactly those processes — never by
name.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from common.errors import FederationError

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


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
    """Whether a TCP connection to ``host:port`` succeeds."""
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


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces/parens: ppid is the 2nd field after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """All live descendant PIDs of ``pid`` (children first, depth-first)."""
    children = _children_map()
    out: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children.get(child, []))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_pids(pids: Sequence[int], *, timeout: float = 10.0) -> None:
    """SIGTERM ``pids``, wait up to ``timeout`` s, then SIGKILL the survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            return
    survivors = [p for p in pids if _alive(p)]
    if survivors:
        log.warning("Processes %s did not stop", survivors)


class ManagedProcess:
    """A child process we own, stopped together with all its descendants.

    Parameters
    ----------
    name
        Human-readable name for logs and errors (``"SuperLink"``).
    cmd
        Command line.
    env
        Full environment for the child.
    log_path
        File that receives the child's stdout and stderr; ``None`` inherits ours.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
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
                self.cmd,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT if self._log_file else None,
            )
        except OSError as exc:
            self._close_log()
            raise FederationError(f"Could not start {name} ({self.cmd[0]}): {exc}") from exc
        log.debug("Started %s (pid %s): %s", name, self.popen.pid, " ".join(self.cmd))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the process and every descendant it started."""
        pids = [*descendants(self.pid), self.pid] if self.running() else descendants(self.pid)
        if pids:
            stop_pids(pids, timeout=timeout)
        try:
            self.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL already sent
            pass
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
        proc = ManagedProcess(name, cmd, **kwargs)  # type: ignore[arg-type]
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"received signal {signum}")

    def __enter__(self) -> ProcessSet:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Ignore further signals while stopping, so a second Ctrl-C cannot orphan children.
        for sig in self._old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
