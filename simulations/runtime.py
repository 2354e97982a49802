"""Run the fedrad Flower App on Flower's Simulation Runtime (Ray backend).

This is what ``flwr-simulation`` does for ``flwr run`` on a simulation
federation, minus the SuperLink round trip: the very ServerApp and ClientApp
named in ``pyproject.toml`` (``server.app:app``, ``client.app:app``) are loaded
from the project folder, the run config is the project's defaults fused with
the overrides, and every virtual SuperNode runs the ClientApp inside a Ray
actor. Only ``concurrency`` actors exist at any time, so memory grows with the
sites that train at once, not with the number of sites.

Flower's public ``run_simulation`` cannot pass a run config, so this goes
through :func:`common.adapters.flower.run_simulation` (what ``flwr-simulation`` calls).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _vce_metrics(counters: SimulationMetrics) -> Any:
    from common.adapters.flower import clientapp_metrics

    def count(runtime: float) -> None:
        with counters.lock:
            counters.messages += 1
            counters.clientapp_seconds += runtime

    return clientapp_metrics(count)


def new_run_id() -> int:
    """A random positive 63-bit run id, like Flower's own."""
    return secrets.randbits(63) or 1


def run_app(
    *,
    run_id: int,
    num_sites: int,
    run_config: dict[str, Any],
    concurrency: int,
    threads_per_site: int = 1,
    metrics: SimulationMetrics | None = None,
    verbose: bool = False,
) -> None:
    """Run the fedrad ServerApp with ``num_sites`` virtual SuperNodes until the ServerApp returns.

    Parameters
    ----------
    run_id
        The run's id; the ServerApp writes its report to ``runs-dir/<run_id>``.
    num_sites
        Virtual SuperNodes; node ``i`` gets ``partition-id = i`` and reads its
        site config from row ``i`` of the ``sim-sites`` table in ``run_config``.
    run_config
        Overrides of the project's ``[tool.flwr.app.config]`` defaults.
    concurrency
        Ray actors, i.e. sites training at the same time.
    threads_per_site
        CPU cores Ray reserves per actor.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from common.adapters.flower import run_simulation
    from common.processes import descendants, stop_pids

    app_dir = project_dir()
    ray_dir = Path(tempfile.mkdtemp(prefix="fedrad-ray-"))  # short: Ray's socket paths must fit 107 bytes
    before = set(descendants(os.getpid()))
    backend_config = {
        "client_resources": {"num_cpus": threads_per_site, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": concurrency * threads_per_site,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 80 * 1024 * 1024,
            "logging_level": "warning",
            "log_to_driver": verbose,
            "_temp_dir": str(ray_dir),
        },
    }
    try:
        run_simulation(
            app_dir=app_dir, server_app_attr="server.app:app", client_app_attr="client.app:app",
            run_id=run_id, task_id=new_run_id(), run_config=run_config, num_supernodes=num_sites,
            backend_config=backend_config, metrics=_vce_metrics(metrics or SimulationMetrics()), verbose=verbose,
        )
    finally:
        # Flower shuts Ray down; whatever Ray process is still running is ours to stop (by PID).
        stop_pids([pid for pid in descendants(os.getpid()) if pid not in before])
        shutil.rmtree(ray_dir, ignore_errors=True)
