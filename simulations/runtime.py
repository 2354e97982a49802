"""Run the fedrad Flower App on Flower's Simulation Runtime (Ray backend), as ``flwr-simulation`` does.

The very ServerApp and ClientApp named in ``pyproject.toml`` run, minus the SuperLink round trip; every
virtual SuperNode runs the ClientApp inside a Ray actor, and only ``concurrency`` actors exist at a time
(memory grows with the sites training at once, not with the number of sites). Flower's public
``run_simulation`` cannot pass a run config, hence :func:`common.adapters.flower.run_simulation`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def project_dir() -> Path:
    """The folder holding fedrad's ``pyproject.toml`` (the Flower App)."""
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise ConfigError(
            f"Expected fedrad's pyproject.toml in {PROJECT_ROOT} (fl-sim loads the Flower App from it), "
            "but it is missing; install fedrad from its source folder (`make install`)"
        )
    return PROJECT_ROOT


@dataclass
class SimulationMetrics:
    """Thread-safe counters the Simulation Runtime updates as each ClientApp message is processed."""

    messages: int = 0
    clientapp_seconds: float = 0.0
    finished: list[tuple[float, float]] = field(default_factory=list)  # (time.time() at its end, seconds) each
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def new_run_id() -> int:
    """A random positive 63-bit run id, like Flower's own."""
    return secrets.randbits(63) or 1


def run_app(*, run_id: int, num_sites: int, run_config: dict[str, Any], concurrency: int, threads_per_site: int = 1,
            metrics: SimulationMetrics | None = None, verbose: bool = False) -> None:
    """Run the fedrad ServerApp with ``num_sites`` virtual SuperNodes until the ServerApp returns.

    Parameters
    ----------
    run_id
        The run's id; the ServerApp writes its report to ``runs-dir/<run_id>``.
    num_sites
        Virtual SuperNodes; node ``i`` gets ``partition-id = i`` and reads its site config from row ``i``
        of the ``sim-sites`` table in ``run_config``.
    run_config
        Overrides of the project's ``[tool.flwr.app.config]`` defaults.
    concurrency, threads_per_site
        Ray actors (sites training at the same time), and CPU cores Ray reserves per actor.
    metrics
        Counters of the ClientApp messages and their compute seconds, updated as the run goes.
    verbose
        Forward Ray's worker logs and Flower's whole output.
    """
    for flag in ("FLWR_TELEMETRY_ENABLED", "RAY_DEDUP_LOGS", "RAY_USAGE_STATS_ENABLED",
                 "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"):
        os.environ.setdefault(flag, "0")
    from common.adapters.flower import clientapp_metrics, run_simulation
    from common.processes import descendants, stop_pids

    counters = metrics or SimulationMetrics()

    def count(runtime: float) -> None:
        with counters.lock:
            counters.messages += 1
            counters.clientapp_seconds += runtime
            counters.finished.append((time.time(), runtime))

    app_dir = project_dir()
    ray_dir = Path(tempfile.mkdtemp(prefix="fedrad-ray-"))  # short: Ray's socket paths must fit 107 bytes
    before = set(descendants(os.getpid()))
    backend_config = {
        "client_resources": {"num_cpus": threads_per_site, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": concurrency * threads_per_site, "num_gpus": 0, "include_dashboard": False,
            "object_store_memory": 80 * 1024 * 1024, "logging_level": "warning", "log_to_driver": verbose,
            "_temp_dir": str(ray_dir),
        },
    }
    try:
        run_simulation(
            app_dir=app_dir, server_app_attr="server.app:app", client_app_attr="client.app:app",
            run_id=run_id, task_id=new_run_id(), run_config=run_config, num_supernodes=num_sites,
            backend_config=backend_config, metrics=clientapp_metrics(count), verbose=verbose,
        )
    finally:
        # Flower shuts Ray down; whatever Ray process is still running is ours to stop (by PID).
        stop_pids([pid for pid in descendants(os.getpid()) if pid not in before])
        shutil.rmtree(ray_dir, ignore_errors=True)
