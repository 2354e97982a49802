"""A real federation on loopback: fl-server (SuperLink) and two fl-client (SuperNodes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.processes import free_port
from common.runfolder import RunFolder
from tests.e2e.support import BIN, assert_all_stopped, federation, one_line_error, processes_under, run_cli

pytestmark = pytest.mark.e2e


def _mixed_site(clean: Path, target: Path) -> Path:
    """A copy of ``clean`` with what real exports also hold: junk, non-images, broken files."""
    import shutil

    import pydicom.data

    shutil.copytree(clean, target)
    bundled = Path(pydicom.data.__file__).parent / "test_files"
    for name in ("MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG-lossy.dcm"):
        shutil.copy(bundled / name, target / name)
    valid = min(target.rglob("IM*.dcm")).read_bytes()
    (target / "truncated.dcm").write_bytes(valid[: len(valid) // 2])
    (target / "empty.dcm").write_bytes(b"")
    (target / "README.txt").write_text("export notes")
    return target


def test_check_reports_a_mixed_export_and_exits_zero(tiny_sites: Path, tmp_path: Path) -> None:
    site = _mixed_site(tiny_sites / "B", tmp_path / "B")
    proc = run_cli(
        str(BIN / "fl-client"), "--site", "B", "--data", str(site), "--workdir", str(tmp_path / "w"),
        "--check", "--json", "-c", "image-size=32",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["usable"] and report["files"] == {"seen": 47, "accepted": 40, "rejected": 7}
    assert {g["count"] for g in report["rejections"]} and sum(g["count"] for g in report["rejections"]) == 7
    assert any("truncated" in g["reason"] for g in report["rejections"])
    human = run_cli(str(BIN / "fl-client"), "--site", "B", "--data", str(site), "--workdir", str(tmp_path / "w"), "--check", "-c", "image-size=32")
    assert human.returncode == 0 and "usable" in human.stdout and "40 files decoded now" not in human.stdout


def test_check_of_only_unusable_files_exits_non_zero_with_reasons(tmp_path: Path) -> None:
    site = tmp_path / "junk"
    site.mkdir()
    (site / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3,1\n")
    (site / "a.dcm").write_bytes(b"")
    (site / "b.dcm").write_bytes(b"\x00" * 300)
    proc = run_cli(str(BIN / "fl-client"), "--site", "J", "--data", str(site), "--workdir", str(tmp_path / "w"), "--check")
    line = one_line_error(proc)
    assert proc.returncode == 3
    assert "not usable" in line and "1 × empty file" in line and "not a DICOM file" in line


def _budget_for_rounds(data_dir: Path, work_dir: Path, *, sigma: float, rounds: float, batch_size: int) -> float:
    """A max-epsilon that lets a site with its own σ train ``rounds`` rounds (of 1 epoch) and not one more."""
    from client.data.dataset import load_site_data
    from common.config import PreprocessConfig
    from common.privacy import DPEvent, poisson_sample_rate, sound_epsilon, steps_per_epoch

    data = load_site_data(data_dir=data_dir, work_dir=work_dir, config=PreprocessConfig(image_size=32))
    patients = len({data.patients[i] for i in data.train})
    event = DPEvent(sigma, poisson_sample_rate(num_examples=patients, batch_size=batch_size),
                    steps_per_epoch(num_examples=patients, batch_size=batch_size))
    allowed = sound_epsilon(events=[event] * int(rounds), delta=1e-5)
    one_more = sound_epsilon(events=[event] * (int(rounds) + 1), delta=1e-5)
    return (allowed + one_more) / 2


def test_sites_train_with_dp_and_a_spent_site_declines_while_others_go_on(tiny_sites: Path, tmp_path: Path) -> None:
    # Site B's folder is a messy export: it trains on its accepted files only. B fixes its own σ,
    # and its budget allows 1 round; the coordinator asks for 2. A calibrates σ to its budget.
    site_dirs = {"A": tiny_sites / "A", "B": _mixed_site(tiny_sites / "B", tmp_path / "B")}
    budget_b = _budget_for_rounds(site_dirs["B"], tmp_path / "probe", sigma=1.0, rounds=1, batch_size=8)
    client_args = {"A": ["--max-epsilon", "6"], "B": ["--max-epsilon", repr(budget_b), "--noise-multiplier", "1.0"]}
    with federation(tmp_path / "fed", ["A", "B"], site_dirs, client_args=client_args,
                    server_args=["--rounds", "2", "--image-size", "32", "--local-epochs", "1",
                                 "--run-config", "batch-size=8"]) as fed:
        fed.start().wait(timeout=480)
        fed.check_exit()

    # Every process the test started, and every child they started, is gone.
    assert_all_stopped(fed)

    site_dir = fed.site_dir
    (folder,) = RunFolder.in_workdir(fed.server_dir)
    run_dir, report = folder.path, folder.read_report()
    from client.data.dataset import load_site_data
    from common.config import PreprocessConfig
    from common.ledger import Ledger

    mixed = load_site_data(data_dir=site_dirs["B"], work_dir=site_dir("B"), config=PreprocessConfig(image_size=32))
    assert mixed.report["files"]["rejected"] == 7 and mixed.report["cache"]["decoded"] == 0
    assert report["status"] == "completed"
    assert report["transport"].startswith("tls") and "SecAgg+" in report["transport"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        trained = ["A", "B"] if r["round"] == 1 else ["A"]
        assert sorted(r["train"]["sites"]) == trained, r["train"]
        assert sorted(r["train"]["declined"]) == sorted({"A", "B"} - set(trained))
        assert (run_dir / r["checkpoint"]).is_file()
        pooled = r["evaluate"]["pooled"]
        assert 0.0 <= pooled["auroc"] <= 1.0
        assert pooled["positives"] + pooled["negatives"] > 0
    assert report["rounds"][0]["train"]["sites"]["B"]["num-examples"] == len(mixed.train)
    assert "declines round 2" in report["rounds"][1]["train"]["declined"]["B"]
    # Each site's own budget holds in its ledger, and the coordinator reports what the sites spent.
    expected_rows = {"A": 2, "B": 1}
    for site, budget in (("A", 6.0), ("B", budget_b)):
        rows = Ledger(site_dir(site) / "privacy").rows()
        assert len(rows) == expected_rows[site] and rows[-1].epsilon <= budget
        assert rows[-1].epsilon == pytest.approx(report["sites"][site]["epsilon"])
        assert report["sites"][site]["privacy_unit"] == "patient"
        last = max(r["round"] for r in report["rounds"] if site in r["train"]["sites"])
        assert report["rounds"][last - 1]["train"]["sites"][site]["ledger-hash"] == rows[-1].hash
    assert report["sites"]["B"]["rounds_declined"] == 1
    # The privacy officer's check: each ledger verifies, recomputes and matches what the run saw.
    for site in ("A", "B"):
        privacy = site_dir(site) / "privacy"
        audit = run_cli(str(BIN / "fl-audit"), "--ledger", str(privacy), "--public-key", str(privacy / "site-key.pub"),
                         "--run", str(run_dir), "--json", timeout=300)
        assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr
        assert json.loads(audit.stdout)["verified"] is True
    # Nothing that identifies a patient reaches the coordinator.
    text = folder.report_json.read_text() + (fed.logs / "fl-server.log").read_text()
    assert "SYN-" not in text and "PatientID" not in text


def test_client_with_missing_data_dir_fails_cleanly(tmp_path: Path) -> None:
    proc = run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"))
    assert "does not exist" in one_line_error(proc)


def test_client_with_unreachable_server_fails_cleanly(tiny_sites: Path, tmp_path: Path) -> None:
    proc = run_cli(
        str(BIN / "fl-client"), "--site", "A", "--data", str(tiny_sites / "A"),
        "--server", f"127.0.0.1:{free_port()}", "--workdir", str(tmp_path / "w"), "--insecure",
    )
    assert "Cannot reach the coordinator" in one_line_error(proc)


def test_server_on_a_busy_port_fails_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(str(BIN / "fl-server"), "--port", str(port), "--workdir", str(tmp_path / "s"))
    assert "already in use" in one_line_error(proc)


def test_bad_option_values_fail_cleanly(tmp_path: Path) -> None:
    proc = run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path), "--max-epsilon", "-1")
    assert "max-epsilon" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-server"), "--rounds", "0")
    assert "--rounds" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path), "--privacy-unit", "study")
    assert "privacy-unit" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path), "--noise-multiplier", "-1")
    assert "noise-multiplier" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-client"), "--site", "A", "--data", str(tmp_path))
    assert "--kit" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-client"), "--kit", str(tmp_path / "no-kit"), "--data", str(tmp_path))
    assert "no-kit" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-server"), "--insecure", "--min-sites", "1", "--port", str(free_port()),
                   "--workdir", str(tmp_path / "w"))
    assert "min-sites" in one_line_error(proc) and "secagg=false" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-server"), "--port", str(free_port()), "--workdir", str(tmp_path / "s"))
    assert "fl-server enroll" in one_line_error(proc)
    proc = run_cli(str(BIN / "fl-server"), "--insecure", "--host", "0.0.0.0", "--port", str(free_port()),
                   "--workdir", str(tmp_path / "w"))
    assert "--insecure" in one_line_error(proc)


def test_a_multiclass_run_trains_reports_macro_metrics_and_survives_its_worker_being_killed(
        tiny_sites: Path, tmp_path: Path) -> None:
    # Two rounds; the site's worker is killed (as the kernel's OOM killer would) once it answered its first message:
    # fl-client logs it, starts a new worker, and the new worker serves the rest of the run. (A worker killed while it
    # holds a message costs that message: Flower expires it after ~60 s as "ClientApp stopped responding" and the
    # coordinator tries the round again; tests/e2e/test_faults.py kills a whole site.)
    import csv
    import shutil
    import signal

    site_dir = tmp_path / "A"
    shutil.copytree(tiny_sites / "A", site_dir)
    with (site_dir / "labels.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    rows = [rows[0]] + [[key, ("none", "small", "large")[i % 3]] for i, (key, _) in enumerate(rows[1:])]
    with (site_dir / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with federation(tmp_path / "fed", ["A"], {"A": site_dir}, secure=False,
                    server_args=["--rounds", "2", "--image-size", "32", "--local-epochs", "1",
                                 "--run-config", 'batch-size=8 classes="none,small,large" secagg=false'],
                    client_args=["-c", 'image-size=32 classes="none,small,large"']) as fed:
        fed.start()
        answered = fed.site_dir("A") / "logs" / "worker.jsonl"
        fed.wait(timeout=300, what="site A's first answer", interval=0.1, until=answered.exists)
        (worker,) = processes_under(fed.clients["A"], "client.worker")
        worker.send_signal(signal.SIGKILL)
        fed.wait(timeout=300)
        fed.check_exit()
    assert_all_stopped(fed)
    assert (f"The worker A process (pid {worker.pid}) exited with code -9; starting it again"
            in (fed.logs / "site-A.log").read_text())
    runs = [json.loads(line)["run"] for line in answered.read_text().splitlines()]
    assert len(set(runs)) == 1 and len(runs) >= 3  # the new worker served the same run
    (folder,) = RunFolder.in_workdir(fed.server_dir)
    report = folder.read_report()
    assert [sorted(r["train"]["sites"]) for r in report["rounds"]] == [["A"], ["A"]]
    assert report["transport"].startswith("insecure") and "no secure aggregation" in report["transport"]
    pooled = report["rounds"][0]["evaluate"]["pooled"]
    assert report["status"] == "completed" and pooled["examples"] > 0
    assert 0 <= pooled["accuracy"] <= 1 and 0 <= pooled["f1"] <= 1
