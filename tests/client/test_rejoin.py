"""A site whose client died without leaving tells the coordinator at once, instead of waiting out two heartbeats."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import connection as cli
from common.adapters.supernode import deactivate_node
from common.config import SiteConfig
from common.errors import FederationError
from common.processes import free_port
from server.enroll import Consortium


@pytest.fixture
def site(tmp_path: Path) -> tuple[SiteConfig, object]:
    kit = Consortium(tmp_path / "coordinator").enroll("A", server_address="127.0.0.1:9092")
    from common.kit import load_kit

    return SiteConfig(site="A", data_dir=tmp_path, work_dir=tmp_path / "work"), load_kit(kit)


@pytest.fixture
def told(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The node ids the site would tell the coordinator are gone."""
    calls: list[int] = []

    def record(address: str, *, ca_cert: Path, private_key: Path, node_id: int, timeout: float = 5.0) -> None:
        assert address == "127.0.0.1:9092" and ca_cert.exists() and private_key.exists()
        calls.append(node_id)

    monkeypatch.setattr("common.adapters.supernode.deactivate_node", record)
    return calls


@pytest.fixture
def supernode_lookalike() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line is that of a site's SuperNode."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "common.adapters.supernode"])
    time.sleep(0.2)
    yield proc
    proc.kill()
    proc.wait()


def _marker(path: Path, **fields: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))
    return path


def test_a_site_that_left_cleanly_has_nothing_to_tell(site: tuple, told: list[int], tmp_path: Path) -> None:
    cfg, kit = site
    assert not cli._rejoin_after_crash(cfg, kit, tmp_path / "work" / cli.CONNECTED_MARKER, address="127.0.0.1:9092")
    assert told == []


def test_the_node_of_a_client_that_died_is_told_gone(site: tuple, told: list[int], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    cfg, kit = site
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = _marker(tmp_path / "work" / cli.CONNECTED_MARKER, pid=dead.pid, since=time.time() - 5, node_id=123456789)
    with caplog.at_level("INFO"):
        assert cli._rejoin_after_crash(cfg, kit, marker, address="127.0.0.1:9092")
    assert told == [123456789]
    assert "did not leave cleanly; told the coordinator it is gone" in caplog.text


def test_a_marker_cut_short_is_a_crash_without_a_node_to_tell(site: tuple, told: list[int], tmp_path: Path) -> None:
    cfg, kit = site
    marker = tmp_path / "work" / cli.CONNECTED_MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text('{"pid": 12')
    assert cli._rejoin_after_crash(cfg, kit, marker, address="127.0.0.1:9092")
    assert told == []


def test_a_second_client_of_a_connected_site_is_refused_and_the_first_keeps_its_node(
    site: tuple, told: list[int], tmp_path: Path, supernode_lookalike: subprocess.Popen[bytes],
) -> None:
    cfg, kit = site
    marker = _marker(tmp_path / "work" / cli.CONNECTED_MARKER, pid=supernode_lookalike.pid, since=time.time(),
                     node_id=42)
    with pytest.raises(FederationError, match="Another fl-client of site A is connected"):
        cli._rejoin_after_crash(cfg, kit, marker, address="127.0.0.1:9092")
    assert told == [] and marker.exists()


def test_a_reused_pid_is_not_the_supernode(site: tuple, told: list[int], tmp_path: Path,
                                           supernode_lookalike: subprocess.Popen[bytes]) -> None:
    """The marker's SuperNode connected before the process now holding its PID was started."""
    cfg, kit = site
    marker = _marker(tmp_path / "work" / cli.CONNECTED_MARKER, pid=supernode_lookalike.pid,
                     since=time.time() - 3600, node_id=7)
    assert cli._rejoin_after_crash(cfg, kit, marker, address="127.0.0.1:9092")
    assert told == [7]


def test_telling_an_unreachable_coordinator_gives_a_reason_not_an_exception(site: tuple) -> None:
    _, kit = site
    why = deactivate_node(f"127.0.0.1:{free_port()}", ca_cert=kit.ca_cert, private_key=kit.private_key, node_id=1,
                          timeout=1.0)
    assert why and isinstance(why, str)
