"""Shared fixtures: a private FLWR_HOME, tiny synthetic sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.synth import synthesize


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The federation tests (``tests/e2e/``) first, all in one pytest-xdist group (``-n 2 --dist loadgroup``).

    They start real federations, one at a time on one worker (free loopback ports, deadlines that assume
    one federation on the machine), and spend most of their time waiting on Flower's polling; the other
    worker runs every other test meanwhile.
    """
    del config

    def federation(item: pytest.Item) -> bool:
        return item.nodeid.startswith("tests/e2e/")

    items.sort(key=lambda item: not federation(item))  # stable: federations first, each in its order
    for item in items:
        if federation(item):
            item.add_marker(pytest.mark.xdist_group("federations"))


@pytest.fixture(autouse=True)
def _private_flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic sites (A, B) of 40 small CT slices each; read-only for tests."""
    out = tmp_path_factory.mktemp("sites")
    synthesize(out, sites=["A", "B"], images_per_site=40, seed=3, size=48)
    return out
