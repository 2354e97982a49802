"""What the end-to-end tests share: starting, waiting for and checking real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from common.processes import LOOPBACK, ManagedProcess, can_connect, wait_until
from simulations.federation import Federation

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
APP_PACKAGES = ("client", "common", "server", "simulations")
TEST_APP_FILES = ("tests/__init__.py", "tests/e2e/__init__.py", "tests/e2e/apps.py")


def copy_app(dest: Path, *, faults: Mapping[str, str] | None = None, inspect: Path | None = None) -> Path:
    """A copy of the project whose Flower App is ``tests/e2e/apps.py``'s, with the test's plan bundled.

    fl-server submits the project it runs from, so a test that needs the test app
    starts fl-server from the copy (:func:`fl_server`). ``faults`` and ``inspect``
    are the plan described in :mod:`tests.e2e.apps`.
    """
    from tests.e2e.apps import PLAN_FILE, parse_fault

    plan: dict[str, Any] = {}
    if faults:
        for fault in faults.values():
            parse_fault(fault)
        plan["faults"] = dict(faults)
    if inspect is not None:
        plan["inspect"] = str(inspect.resolve())
    dest.mkdir(parents=True)
    for package in APP_PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in TEST_APP_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, dest / name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    flwr_app["components"] = {"serverapp": "tests.e2e.apps:server", "clientapp": "tests.e2e.apps:client"}
    for key in ("fab-include", "fab-exclude"):  # the copy holds only what its bundle needs, tests/e2e/apps.py included
        flwr_app.pop(key, None)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(project))
    (dest / "tests" / "e2e" / PLAN_FILE).write_text(json.dumps(plan))
    return dest


def fl_server(app: Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """How to start fl-server: its command and ``ProcessSet.start`` keywords.

    From the installed project, or from a copy made by :func:`copy_app` (its
    packages come first on ``sys.path``, so fl-server submits the copy).
    """
    if app is None:
        return [str(BIN / "fl-server")], {}
    return [sys.executable, "-c", "from server.cli import main; main()"], {"cwd": app}


def federation(root: Path, sites: Sequence[str], data: Path | Mapping[str, Path], *, app: Path | None = None,
               **kwargs: Any) -> Federation:
    """:class:`simulations.federation.Federation` whose fl-server runs from ``app`` (a :func:`copy_app`) if given."""
    cmd, where = fl_server(app)
    return Federation(root, sites, data, server_cmd=cmd if app else None, server_cwd=where.get("cwd"), **kwargs)


def wait_for_server(port: int, server: ManagedProcess, timeout: float = 60) -> None:
    """Until the SuperLink accepts connections (fl-client refuses an unreachable coordinator)."""

    def listening() -> bool:
        assert server.running(), server.tail(40)
        return can_connect(LOOPBACK, port, timeout=1)

    wait_until(listening, timeout=timeout, what=f"the SuperLink on port {port}")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDRAD_DEBUG": ""}
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]
