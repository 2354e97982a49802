"""Shared fixtures: a private FLWR_HOME, tiny synthetic sites; the longest test files first.

``make test`` runs the suite on two pytest-xdist workers, one test file per worker at a
time (``--dist loadfile``, in collection order: ``--no-loadscope-reorder``). The real
federations and simulations take most of the time, so they start first and the many
short tests fill the gaps: the two workers then finish at about the same time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.synth import synthesize

#: Test files in the order they start (longest first, as measured on 2 cores); every other file follows, as collected.
LONGEST_FIRST = (
    "tests/simulations/test_sim_e2e.py",  # Ray simulations: together, so one Ray runs at a time
    "tests/e2e/test_faults.py",
    "tests/e2e/test_federation.py",
    "tests/e2e/test_secure_federation.py",
    "tests/e2e/test_resume_identity.py",
    "tests/e2e/test_site_worker.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _private_flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic sites (A, B) of 40 small CT slices each; read-only for tests."""
    out = tmp_path_factory.mktemp("sites")
    synthesize(out, sites=["A", "B"], images_per_site=40, seed=3, size=48)
    return out
