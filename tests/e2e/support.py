"""What the end-to-end tests share: starting, waiting for and checking real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def wait_for_server(port: int, server: object, timeout: float = 60) -> None:
    """Until the SuperLink accepts connections (fl-client refuses an unreachable coordinator)."""
    from common.processes import can_connect

    deadline = time.monotonic() + timeout
    while not can_connect("127.0.0.1", port, timeout=1):
        assert server.running() and time.monotonic() < deadline, server.tail(40)  # type: ignore[attr-defined]
        time.sleep(0.5)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDRAD_DEBUG": ""}
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]
