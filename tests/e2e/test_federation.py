"""A real federation on loopback: fl-server (SuperLink) and two fl-client (SuperNodes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.processes import ProcessSet, _alive, descendants, free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def test_two_sites_train_two_rounds_with_dp(tiny_sites: Path, tmp_path: Path) -> None:
    port = free_port()
    workdir = tmp_path / "server"
    all_pids: list[int] = []
    with ProcessSet() as procs:
        server = procs.start(
            "fl-server",
            [str(BIN / "fl-server"), "--rounds", "2", "--min-sites", "2", "--port", str(port),
             "--workdir", str(workdir), "--image-size", "32", "--local-epochs", "1",
             "--run-config", "batch-size=8"],
            log_path=tmp_path / "server.log",
        )
        time.sleep(2)
        for site, budget in (("A", 6.0), ("B", 3.0)):
            procs.start(
                f"fl-client {site}",
                [str(BIN / "fl-client"), "--site", site, "--data", str(tiny_sites / site),
                 "--server", f"127.0.0.1:{port}", "--workdir", str(tmp_path / f"site-{site}"),
                 "--max-epsilon", str(budget), "--threads", "1"],
                log_path=tmp_path / f"site-{site}.log",
            )
        deadline = time.monotonic() + 480
        while server.running() and time.monotonic() < deadline:
            all_pids = sorted({*all_pids, *(p for proc in procs.processes for p in [proc.pid, *descendants(proc.pid)])})
            time.sleep(1)
        assert not server.running(), "run did not finish in time:\n" + server.tail(40)
        assert server.popen.returncode == 0, server.tail(40)

    # Every process the test started, and every child they started, is gone.
    time.sleep(0.5)
    assert all_pids and not [p for p in all_pids if _alive(p)]

    (run_dir,) = (workdir / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert sorted(r["train"]["sites"]) == ["A", "B"] and r["train"]["declined"] == []
        assert (run_dir / r["checkpoint"]).is_file()
        pooled = r["evaluate"]["pooled"]
        assert 0.0 <= pooled["auroc"] <= 1.0
        assert pooled["positives"] + pooled["negatives"] > 0
    # Each site's own budget holds, and the coordinator reports what the sites spent.
    assert 0 < report["sites"]["A"]["epsilon"] <= 6.0
    assert 0 < report["sites"]["B"]["epsilon"] <= 3.0
    for site in ("A", "B"):
        (ledger,) = (tmp_path / f"site-{site}" / "privacy").glob("run-*.json")
        assert json.loads(ledger.read_text())["epsilon"] == pytest.approx(report["sites"][site]["epsilon"])
    # Nothing that identifies a patient reaches the coordinator.
    text = (run_dir / "report.json").read_text() + (tmp_path / "server.log").read_text()
    assert "SYN-" not in text and "PatientID" not in text


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDRAD_DEBUG": ""}
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_client_with_missing_data_dir_fails_cleanly(tmp_path: Path) -> None:
    proc = _run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"))
    assert "does not exist" in _one_line_error(proc)


def test_client_with_unreachable_server_fails_cleanly(tiny_sites: Path, tmp_path: Path) -> None:
    proc = _run_cli(
        str(BIN / "fl-client"), "--site", "A", "--data", str(tiny_sites / "A"),
        "--server", f"127.0.0.1:{free_port()}", "--workdir", str(tmp_path / "w"),
    )
    assert "Cannot reach the coordinator" in _one_line_error(proc)


def test_server_on_a_busy_port_fails_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run_cli(str(BIN / "fl-server"), "--port", str(port), "--workdir", str(tmp_path / "s"))
    assert "already in use" in _one_line_error(proc)


def test_bad_option_values_fail_cleanly(tmp_path: Path) -> None:
    proc = _run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path), "--max-epsilon", "-1")
    assert "max-epsilon" in _one_line_error(proc)
    proc = _run_cli(str(BIN / "fl-server"), "--rounds", "0")
    assert "--rounds" in _one_line_error(proc)
    proc = _run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path), "--secure-mode")
    assert "torchcsprng" in _one_line_error(proc)
