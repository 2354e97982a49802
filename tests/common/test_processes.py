from __future__ import annotations

import socket
import sys
import time

import pytest

from common.errors import FederationError
from common.processes import (
    ManagedProcess,
    ProcessSet,
    alive,
    crash,
    descendants,
    free_port,
    parse_address,
    port_is_free,
    wait_until,
)

# A parent that starts a child in its own session (like flower-superexec) and sleeps.
SPAWNER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
    "time.sleep(120)\n"
)


def _wait_for_child(proc: ManagedProcess) -> list[int]:
    return wait_until(lambda: descendants(proc.pid), timeout=5, interval=0.05, what="the child")  # type: ignore[return-value]


def test_stop_also_stops_children_in_other_sessions() -> None:
    proc = ManagedProcess("spawner", [sys.executable, "-c", SPAWNER])
    kids = _wait_for_child(proc)
    proc.stop(timeout=5)
    assert not proc.running()
    assert not any(alive(pid) for pid in kids)


def test_process_set_stops_everything_on_error() -> None:
    with pytest.raises(RuntimeError), ProcessSet() as procs:
        proc = procs.start("spawner", [sys.executable, "-c", SPAWNER])
        kids = _wait_for_child(proc)
        raise RuntimeError("boom")
    assert not any(alive(pid) for pid in [proc.pid, *kids])


def test_port_helpers() -> None:
    port = free_port()
    assert port_is_free(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_is_free(port)


@pytest.mark.parametrize("bad", ["localhost", "host:", ":80", "host:99999", "host:http"])
def test_parse_address_rejects_bad_addresses(bad: str) -> None:
    with pytest.raises(FederationError, match="Expected an address like"):
        parse_address(bad)


def test_parse_address() -> None:
    assert parse_address("coordinator.example:9092") == ("coordinator.example", 9092)


def test_wait_until_returns_the_first_truthy_value_and_names_what_timed_out() -> None:
    calls = iter([0, [], [7]])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.01, what="x") == [7]
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="after 0.2 s waiting for the moon"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="the moon")
    assert 0.2 <= time.monotonic() - started < 2


def test_crash_kills_the_whole_tree_and_alive_ignores_zombies() -> None:
    proc = ManagedProcess("spawner", [sys.executable, "-c", SPAWNER])
    kids = _wait_for_child(proc)
    killed = crash(proc.pid)
    assert set(killed) == {proc.pid, *kids}
    assert not alive(proc.pid)  # a zombie until reaped: dead for our purposes
    assert proc.popen.wait(timeout=5) == -9
    assert not any(alive(pid) for pid in kids)
