"""What the end-to-end tests share: the federation harness (with the test app), CLIs, process checks."""

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

import psutil
import tomli_w

from common.processes import ManagedProcess, alive, crash, wait_until
from simulations.federation import Federation

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
APP_PACKAGES = ("client", "common", "server", "simulations")
TEST_APP_FILES = ("tests/__init__.py", "tests/e2e/__init__.py", "tests/e2e/apps.py")


def copy_app(dest: Path, *, faults: Mapping[str, str] | None = None, inspect: Path | None = None,
             sites: int = 0, marker: Path | None = None, client: str = "tests.e2e.apps:client") -> Path:
    """A copy of the project whose Flower App is ``tests/e2e/apps.py``'s, with the test's plan bundled.

    fl-server submits the project it runs from, so a test that needs the test app
    starts fl-server from the copy (``federation(..., app=copy)``). ``faults``,
    ``inspect``, ``sites`` and ``marker`` are the plan described in :mod:`tests.e2e.apps`;
    ``client`` is the copy's ClientApp (``"tests.e2e.apps:foreign"``: one that abuses the sites).
    """
    from tests.e2e.apps import PLAN_FILE, parse_fault

    plan: dict[str, Any] = {}
    if faults:
        for fault in faults.values():
            parse_fault(fault)
        plan["faults"] = dict(faults)
    if inspect is not None:
        plan["inspect"] = str(inspect.resolve())
    if sites:
        plan["sites"] = sites
    if marker is not None:
        plan["marker"] = str(marker.resolve())
    dest.mkdir(parents=True)
    for package in APP_PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in TEST_APP_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, dest / name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    flwr_app["components"] = {"serverapp": "tests.e2e.apps:server", "clientapp": client}
    for key in ("fab-include", "fab-exclude"):  # the copy holds only what its bundle needs, tests/e2e/apps.py included
        flwr_app.pop(key, None)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(project))
    (dest / "tests" / "e2e" / PLAN_FILE).write_text(json.dumps(plan))
    return dest


def federation(root: Path, sites: Sequence[str], data: Path | Mapping[str, Path], *, app: Path | None = None,
               sites_run_app: bool = True, **kwargs: Any) -> Federation:
    """:class:`simulations.federation.Federation`, whose fl-server runs from ``app`` (a :func:`copy_app`) if given.

    fl-server submits the project it runs from: started in the copy (its packages first on
    ``sys.path``), it submits the test app. Every site runs the same copy (``fl-client --app-dir``),
    so its app is the one each site approves, unless ``sites_run_app`` is false: the sites then
    run fedrad's own app and refuse the copy's.
    """
    if app is None:
        return Federation(root, sites, data, **kwargs)
    return Federation(root, sites, data, server_cmd=[sys.executable, "-c", "from server.cli import main; main()"],
                      server_cwd=app, site_app=app if sites_run_app else None, **kwargs)


def crash_site(fed: Federation, site: str) -> list[int]:
    """SIGKILL the site's fl-client and everything it started (frozen first), as if its machine died.

    The site leaves ``fed.clients`` (so :meth:`Federation.wait` does not count it as a failure) until
    it joins again; its PIDs stay in ``fed.pids``.
    """
    client = fed.clients.pop(site)
    fed.remember()
    killed = crash(client.pid)
    client.popen.wait(timeout=10)
    return killed


def processes_under(proc: ManagedProcess, needle: str) -> list[psutil.Process]:
    """The live processes under ``proc`` whose command line has a part ending in ``needle``."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if any(part.endswith(needle) for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def assert_all_stopped(fed: Federation) -> None:
    """Every process the federation started, and every child they started, is gone (within 0.5 s)."""
    assert fed.pids, "the federation never saw a process"
    try:
        wait_until(lambda: not any(alive(p) for p in fed.pids), timeout=0.5, interval=0.05, what="every process to end")
    except TimeoutError:
        raise AssertionError(f"still running: {sorted(p for p in fed.pids if alive(p))}") from None


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDRAD_DEBUG": ""}
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]
