"""Fixtures shared by the tests of common/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.common.test_ledger import build_ledger


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site work dir whose ledger holds three honest rows of run 17 (read-only: copy it to change it)."""
    work = tmp_path_factory.mktemp("site-A")
    build_ledger(work / "privacy")
    return work
