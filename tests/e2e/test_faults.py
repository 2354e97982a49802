"""Runs that survive: faults injected into a real federation on loopback.

Real ``fl-server`` (SuperLink behind its TLS proxy, ServerApp) and ``fl-client``
(SuperNodes with enrollment kits) processes on 127.0.0.1, with ``secagg=false`` so
the coordinator can screen each update. Each test checks what happened to the
run, that the final model is usable (pooled validation AUROC above chance), and
that every site's ledger books exactly the rounds that site trained, no round
twice, with its ε recomputed from them. Faulty sites misbehave through Flower mods
of the test's own app (``tests/e2e/apps.py``), which fl-server submits from a copy
of the project (``tests/e2e/support.py::copy_app``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from common.processes import ManagedProcess, ProcessSet, _alive, descendants, free_port
from tests.e2e.support import BIN, copy_app, fl_server, run_cli, wait_for_server

pytestmark = pytest.mark.e2e

ROUNDS = 4
DEADLINE = 60  # round-timeout (s): the first round, where five sites start up at once, takes ~40 s here
RUN_CONFIG = f"secagg=false batch-size=16 optimizer='adam' learning-rate=0.03 round-timeout={DEADLINE} join-timeout=120 seed=7"
SIZES = {"A": 200, "B": 200, "C": 200, "N": 60, "S": 60}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic hospital's archive split by patient into three sites of 200 slices and two of 60.

    The lesions are large and clearly hyperdense, and the sites share one scanner: one local
    epoch per round reaches a pooled AUROC near 1 within two rounds at ε = 10, so "better
    than chance" tests the faults, not the luck of the DP noise draw.
    """
    from simulations.partition import partition_folder
    from simulations.synth import LesionModel, synthesize

    out = tmp_path_factory.mktemp("fault-sites")
    easy = LesionModel(radius_mm=(28.0, 40.0), contrast_hu=(60.0, 80.0), subtle_fraction=0.0,
                       extra_axial_fraction=0.0)
    synthesize(out / "archive", sites=["P"], images_per_site=sum(SIZES.values()), seed=11, size=48, lesions=easy)
    total = sum(SIZES.values())
    partition_folder(out / "archive" / "P", out / "split", sites=len(SIZES), sizes=[n / total for n in SIZES.values()],
                     seed=11)
    for i, name in enumerate(SIZES, start=1):
        (out / name).symlink_to(out / "split" / f"site-{i:03d}", target_is_directory=True)
    return out


class Federation:
    """One fl-server and its fl-clients, all in one ProcessSet; every PID is remembered."""

    def __init__(self, procs: ProcessSet, tmp: Path, data: Path) -> None:
        self.procs, self.tmp, self.data = procs, tmp, data
        self.port = free_port()
        self.workdir = tmp / "server"
        self.clients: dict[str, ManagedProcess] = {}
        self.pids: set[int] = set()

    def enroll(self, *names: str) -> None:
        for site in names:
            proc = run_cli(str(BIN / "fl-server"), "enroll", "--site", site, "--workdir", str(self.workdir),
                           "--server-address", f"127.0.0.1:{self.port}")
            assert proc.returncode == 0, proc.stderr

    def serve(self, *extra: str, rounds: int = ROUNDS, log: str = "server.log", app: Path | None = None) -> ManagedProcess:
        """Start fl-server; ``app``: a copy of the project with the test app (:func:`copy_app`) to run instead."""
        command, where = fl_server(app)
        server = self.procs.start(
            "fl-server",
            [*command, "--port", str(self.port), "--workdir", str(self.workdir),
             "--rounds", str(rounds), "--min-sites", "2", "--image-size", "32", "--local-epochs", "1",
             "--run-config", RUN_CONFIG, *extra],
            log_path=self.tmp / log, **where,
        )
        wait_for_server(self.port, server)
        return server

    def join(self, site: str) -> ManagedProcess:
        client = self.procs.start(
            f"fl-client {site}",
            [str(BIN / "fl-client"), "--kit", str(self.workdir / "kits" / site), "--data", str(self.data / site),
             "--workdir", str(self.tmp / f"site-{site}"), "--threads", "1",
             "--max-epsilon", "10", "--privacy-unit", "image", "-c", "image-size=32"],
            log_path=self.tmp / f"site-{site}.log",
        )
        self.clients[site] = client
        return client

    def remember(self) -> None:
        for proc in self.procs.processes:
            self.pids.update([proc.pid, *descendants(proc.pid)])

    def run_dir(self) -> Path:
        (run_dir,) = (self.workdir / "runs").iterdir()
        return run_dir

    def wait(self, server: ManagedProcess, timeout: float, until: object = None) -> None:
        deadline = time.monotonic() + timeout
        while server.running() and time.monotonic() < deadline:
            self.remember()
            if until is not None and until():  # type: ignore[operator]
                return
            time.sleep(0.5)
        if until is not None:
            raise AssertionError("the awaited moment never came:\n" + server.tail(60))
        assert not server.running(), "run did not finish in time:\n" + server.tail(60)

    def completed_round(self) -> int:
        try:
            return int(json.loads((self.run_dir() / "state.json").read_text())["completed_round"])
        except (OSError, ValueError, KeyError):
            return 0


def kill_tree(proc: ManagedProcess) -> None:
    """A crash: SIGKILL the process and everything it started, with no chance to clean up."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.popen.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def ledger_rounds(tmp: Path, site: str, run_id: str) -> list[int]:
    """The rounds of ``run_id`` the site's ledger books, after checking the ledger itself.

    ``audit_ledger`` verifies the chain and signatures and recomputes every row's ε from the
    rows before it: the ledger's ε is exactly that of the rounds it books.
    """
    from common.audit import audit_ledger
    from common.ledger import Ledger

    privacy = tmp / f"site-{site}" / "privacy"
    audit = audit_ledger(privacy, public_key=privacy / "site-key.pub")
    assert audit.verified, [str(p) for p in audit.problems]
    rows = Ledger(privacy).rows()
    booked = [row.server_round for row in rows if row.run_id == run_id]
    assert len(booked) == len(set(booked)), f"site {site} was charged twice for a round: {booked}"
    return booked


def booked_rounds(tmp: Path, site: str) -> set[int]:
    """Rounds the site's ledger holds so far (read while the site runs; SQLite allows it)."""
    from common.ledger import Ledger

    if not (tmp / f"site-{site}" / "privacy" / "ledger.sqlite").exists():
        return set()
    return {row.server_round for row in Ledger(tmp / f"site-{site}" / "privacy", create=False).rows()}


def check_usable_and_audited(fed: Federation, report: dict, sites: tuple[str, ...], rounds: int = ROUNDS) -> float:
    """The run completed, its model is better than chance, and every ledger verifies against the report."""
    assert report["status"] == "completed", report["status"]
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    auroc = report["final"]["auroc"]
    assert auroc > 0.5, f"final pooled AUROC {auroc}"
    from common.audit import audit_ledger, audit_run, cross_check

    run = audit_run(fed.run_dir())  # what fl-audit --run does: every reported ε recomputed
    assert not run.problems, [str(p) for p in run.problems]
    for site in sites:
        privacy = fed.tmp / f"site-{site}" / "privacy"
        ledger = audit_ledger(privacy, public_key=privacy / "site-key.pub")
        problems, _ = cross_check(ledger, run)  # ... and fl-audit --ledger --run: the report matches the ledger
        assert ledger.verified and not problems, [str(p) for p in [*ledger.problems, *problems]]
    return float(auroc)


def trained_in(report: dict, site: str, key: str = "sites") -> list[int]:
    return [r["round"] for r in report["rounds"] if site in r.get("train", {}).get(key, {})]


def test_coordinator_killed_after_round_2_resumes_and_no_site_pays_twice(sites: Path, tmp_path: Path) -> None:
    fed = Federation(ProcessSet(), tmp_path, sites)
    fed.enroll("A", "B")
    with fed.procs:
        server = fed.serve()
        for site in ("A", "B"):
            fed.join(site)
        # The worst moment: round 2 is committed and a site has trained (and booked) round 3,
        # but the coordinator dies before it commits round 3.
        fed.wait(server, 600, until=lambda: fed.completed_round() >= 2 and any(
            3 in booked_rounds(tmp_path, site) for site in ("A", "B")))
        run_dir = fed.run_dir()
        kill_tree(server)  # the coordinator's machine dies: SuperLink, ServerApp and fl-server at once
        killed_at = json.loads((run_dir / "state.json").read_text())["completed_round"]
        assert killed_at == 2
        trained_before = {site for site in ("A", "B") if 3 in booked_rounds(tmp_path, site)}

        # The sites keep running (their SuperNodes retry); a new coordinator picks the run up.
        resumed = fed.serve("--resume", str(run_dir), log="server-resumed.log")
        fed.wait(resumed, 900)
        assert resumed.popen.returncode == 0, resumed.tail(60)
        assert all(client.running() for client in fed.clients.values()), "a site did not survive the restart"
    time.sleep(0.5)
    assert fed.pids and not [p for p in fed.pids if _alive(p)]

    report = json.loads((run_dir / "report.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed_round"] == ROUNDS and len(state["segments"]) == 2
    assert [r["from_round"] for r in report["resumes"]] == [killed_at + 1]
    auroc = check_usable_and_audited(fed, report, ("A", "B"))
    run_id = str(report["run_id"])
    for site in ("A", "B"):
        # Every round once in the ledger, including the round the crash interrupted (replayed, not retrained).
        assert sorted(ledger_rounds(tmp_path, site, run_id)) == list(range(1, ROUNDS + 1))
        assert trained_in(report, site) == list(range(1, ROUNDS + 1))
    for site in trained_before:
        log = (tmp_path / f"site-{site}.log").read_text()
        assert "round 3 of run" in log and "the same update is sent again" in log, site
    print(f"resumed run: final pooled AUROC {auroc:.3f}")


def test_dead_nan_and_slow_sites_do_not_stop_or_poison_the_run(sites: Path, tmp_path: Path) -> None:
    """Three sites each fail differently next to two healthy ones (A and B), over two rounds:

    - C is killed mid-round 1 and started again (its node stays "online" at the SuperLink until it misses
      two heartbeats; fl-client waits that out): round 1 goes on without it, and it rejoins;
    - N sends NaN weights every round: each update is rejected, with the reason, by name;
    - S answers 10x later than the round deadline: every round goes on without it.
    """
    rounds = 2
    fed = Federation(ProcessSet(), tmp_path, sites)
    fed.enroll("A", "B", "C", "N", "S")
    # The faults are Flower mods of the test's own app (tests/e2e/apps.py), bundled with its plan.
    app = copy_app(tmp_path / "app", faults={"N": "nan", "S": f"slow:{10 * DEADLINE}"})
    with fed.procs:
        server = fed.serve(rounds=rounds, app=app)
        for site in ("N", "S", "A", "B", "C"):
            fed.join(site)
        # Mid-round 1: C has received its training message and started on it.
        c_log = tmp_path / "site-C.log"
        fed.wait(server, 300, until=lambda: c_log.exists() and "Receiving: train message" in c_log.read_text())
        time.sleep(2)
        kill_tree(fed.clients["C"])
        assert not booked_rounds(tmp_path, "C"), "C finished round 1 before it could be killed"
        fed.join("C")  # the hospital restarts its client
        fed.wait(server, 900)
        assert server.popen.returncode == 0, server.tail(60)
    time.sleep(0.5)
    assert fed.pids and not [p for p in fed.pids if _alive(p)]

    report = json.loads((fed.run_dir() / "report.json").read_text())
    auroc = check_usable_and_audited(fed, report, ("A", "B", "C", "N"), rounds=rounds)
    run_id = str(report["run_id"])
    train = {r["round"]: r["train"] for r in report["rounds"]}
    every = list(range(1, rounds + 1))
    # The healthy sites trained and were aggregated every round, each round booked once.
    for site in ("A", "B"):
        assert trained_in(report, site) == every
        assert ledger_rounds(tmp_path, site, run_id) == every
    # C: killed in round 1 before it booked anything, back for a later try; its ledger holds exactly
    # the rounds it was aggregated in. (On a busy machine round 1 may need its retry: the sites answer
    # the retry with their stored update, so nobody pays for round 1 twice.)
    first_try = report["rounds"][0].get("attempts", [{}])[0].get("failed", train[1]["failed"])
    assert "heartbeats" in first_try.get("C", "") or "deadline" in first_try.get("C", ""), first_try
    booked_c = ledger_rounds(tmp_path, "C", run_id)
    assert booked_c and booked_c == trained_in(report, "C")
    # N: never aggregated; every round it trained is booked in its ledger, and every update it
    # sent in time was rejected for its NaN values, by name (its privacy facts kept for the audit).
    booked_n = ledger_rounds(tmp_path, "N", run_id)
    rejected_n = trained_in(report, "N", "rejected_sites")
    assert "N" not in {s for r in every for s in train[r]["sites"]} and rejected_n
    assert all("NaN/Inf" in train[r]["rejected"]["N"] for r in rejected_n)
    assert set(rejected_n) <= set(booked_n) <= set(every)
    # S: never in time, never aggregated. It trained the first message it got (booked), then held
    # its answer; every later message expired while it was busy, so it never trained another.
    assert "S" not in {s for r in every for s in train[r]["sites"]}
    assert all("deadline" in train[r]["failed"]["S"] for r in every if "S" in train[r]["failed"])
    assert len(ledger_rounds(tmp_path, "S", run_id)) == 1
    server_log = (tmp_path / "server.log").read_text()
    assert "update of site N REJECTED" in server_log and "SYN-" not in server_log
    print(f"faulty sites run: final pooled AUROC {auroc:.3f}")
