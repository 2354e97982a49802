"""Fixtures shared by the client tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import PreprocessConfig, RunConfig, SiteConfig


@pytest.fixture
def site_and_run(tiny_sites: Path, tmp_path: Path) -> tuple[SiteConfig, RunConfig]:
    """Site A of the synthetic sites (σ from the PRNG: secure mode off) and a 3-round run at 32 px."""
    site = SiteConfig(
        site="A", data_dir=tiny_sites / "A", work_dir=tmp_path / "work", max_epsilon=3.0, threads=1, secure_mode=False
    )
    run = RunConfig(num_server_rounds=3, local_epochs=1, batch_size=8, preprocess=PreprocessConfig(image_size=32))
    return site, run
