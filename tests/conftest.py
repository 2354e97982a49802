"""Shared fixtures: a private FLWR_HOME, tiny synthetic sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.synth import synthesize


@pytest.fixture(autouse=True)
def _private_flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic sites (A, B) of 40 small CT slices each; read-only for tests."""
    out = tmp_path_factory.mktemp("sites")
    synthesize(out, sites=["A", "B"], images_per_site=40, seed=3, size=48)
    return out
