from __future__ import annotations

import socket
import sys
import time

import pytest

from common.errors import FederationError
from common.processes import (
    ManagedProcess,
    ProcessSet,
    _alive,
    descendants,
    free_port,
    parse_address,
    port_is_free,
)

# A parent that starts a child in its own session (like flower-superexec) and sleeps.
SPAWNER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
    "time.sleep(120)\n"
)


def _wait_for_child(proc: ManagedProcess) -> list[int]:
    for _ in range(100):
        kids = descendants(proc.pid)
        if kids:
            return kids
        time.sleep(0.05)
    raise AssertionError("child did not start")


def test_stop_also_stops_children_in_other_sessions() -> None:
    proc = ManagedProcess("spawner", [sys.executable, "-c", SPAWNER])
    kids = _wait_for_child(proc)
    proc.stop(timeout=5)
    assert not proc.running()
    assert not any(_alive(pid) for pid in kids)


def test_process_set_stops_everything_on_error() -> None:
    with pytest.raises(RuntimeError), ProcessSet() as procs:
        proc = procs.start("spawner", [sys.executable, "-c", SPAWNER])
        kids = _wait_for_child(proc)
        raise RuntimeError("boom")
    assert not any(_alive(pid) for pid in [proc.pid, *kids])


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
