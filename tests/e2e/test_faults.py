"""Runs that survive: faults injected into a real federation on loopback.

Real ``fl-server`` (SuperLink behind its TLS proxy, ServerApp) and ``fl-client``
(SuperNodes with enrollment kits) processes on 127.0.0.1, with ``secagg=false`` so
the coordinator can screen each update. The test checks what happened to the
run, that the final model is usable (pooled validation AUROC above chance), and
that every site's ledger books exactly the rounds that site trained, no round
twice, with its ε recomputed from them. Faulty sites misbehave through Flower mods
of the test's own app (``tests/e2e/apps.py``), which fl-server submits from a copy
of the project (``tests/e2e/support.py::copy_app``). A coordinator that crashes and
resumes: ``tests/e2e/test_resume_identity.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from simulations.federation import Federation
from tests.e2e.support import assert_all_stopped, copy_app, crash_site, federation

pytestmark = pytest.mark.e2e

DEADLINE = 30  # round-timeout (s): slow site S never answers in time, so each round lasts this long
RUN_CONFIG = (f"secagg=false batch-size=16 optimizer='adam' learning-rate=0.03 round-timeout={DEADLINE} "
              "join-timeout=120 seed=7")
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


def fault_federation(root: Path, names: Sequence[str], data: Path, *, rounds: int,
                     app: Path | None = None) -> Federation:
    """Enrolled sites at ε ≤ 10 per image, ``secagg=false``; ``app``: a :func:`copy_app` with the test's faults.

    Two sites suffice for a round whatever the number of sites (the last ``--min-sites`` wins).
    """
    return federation(
        root, names, data, app=app,
        server_args=["--rounds", str(rounds), "--min-sites", "2", "--image-size", "32", "--local-epochs", "1",
                     "--run-config", RUN_CONFIG],
        client_args=["--max-epsilon", "10", "--privacy-unit", "image", "-c", "image-size=32"],
    )


def ledger_rounds(fed: Federation, site: str, run_id: str) -> list[int]:
    """The rounds of ``run_id`` the site's ledger books, after checking the ledger itself.

    ``audit_ledger`` verifies the chain and signatures and recomputes every row's ε from the
    rows before it: the ledger's ε is exactly that of the rounds it books.
    """
    from common.audit import audit_ledger

    privacy = fed.site_dir(site) / "privacy"
    audit = audit_ledger(privacy, public_key=privacy / "site-key.pub")
    assert audit.verified, [str(p) for p in audit.problems]
    booked = [row.server_round for row in audit.rows if row.run_id == run_id]
    assert len(booked) == len(set(booked)), f"site {site} was charged twice for a round: {booked}"
    return booked


def check_usable_and_audited(fed: Federation, report: dict, sites: tuple[str, ...], rounds: int) -> float:
    """The run completed, its model is better than chance, and every ledger verifies against the report."""
    assert report["status"] == "completed", report["status"]
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    auroc = report["final"]["auroc"]
    assert auroc > 0.5, f"final pooled AUROC {auroc}"
    from common.audit import audit_ledger, audit_run, cross_check

    folder = fed.run_folder()
    assert folder is not None
    run = audit_run(folder.path)  # what fl-audit --run does: every reported ε recomputed
    assert not run.problems, [str(p) for p in run.problems]
    for site in sites:
        privacy = fed.site_dir(site) / "privacy"
        ledger = audit_ledger(privacy, public_key=privacy / "site-key.pub")
        problems, _ = cross_check(ledger, run)  # ... and fl-audit --ledger --run: the report matches the ledger
        assert ledger.verified and not problems, [str(p) for p in [*ledger.problems, *problems]]
    return float(auroc)


def trained_in(report: dict, site: str, key: str = "sites") -> list[int]:
    return [r["round"] for r in report["rounds"] if site in r.get("train", {}).get(key, {})]


def test_dead_nan_and_slow_sites_do_not_stop_or_poison_the_run(sites: Path, tmp_path: Path) -> None:
    """Three sites each fail differently next to two healthy ones (A and B), over two rounds:

    - C is killed mid-round 1 and started again: its restarted fl-client tells the coordinator its old node is
      gone (else the SuperLink would count it online until it missed two heartbeats, about 60 s), so round 1
      goes on without it at once, and it rejoins for round 2;
    - N sends NaN weights every round: each update is rejected, with the reason, by name;
    - S answers 10x later than the round deadline: every round goes on without it.
    """
    rounds = 2
    names = ("N", "S", "A", "B", "C")
    # The faults are Flower mods of the test's own app (tests/e2e/apps.py), bundled with its plan; its ServerApp
    # starts round 1 once all five sites are connected, so that each of them gets round 1's message.
    app = copy_app(tmp_path / "app", faults={"N": "nan", "S": f"slow:{10 * DEADLINE}"}, sites=len(names))
    with fault_federation(tmp_path / "fed", names, sites, rounds=rounds, app=app) as fed:
        fed.start()
        # Mid-round 1: C's worker has taken its training message and started on it.
        c_log = fed.logs / "site-C.log"
        fed.wait(timeout=300, what="site C to start on its round-1 training message",
                 until=lambda: "Site C: train message of run" in c_log.read_text())
        crash_site(fed, "C")
        assert not fed.booked("C"), "C finished round 1 before it could be killed"
        fed.join("C")  # the hospital restarts its client
        fed.wait(timeout=900)
        fed.check_exit()
    assert_all_stopped(fed)

    folder = fed.run_folder()
    assert folder is not None
    report = folder.read_report()
    auroc = check_usable_and_audited(fed, report, ("A", "B", "C", "N"), rounds=rounds)
    run_id = str(report["run_id"])
    train = {r["round"]: r["train"] for r in report["rounds"]}
    every = list(range(1, rounds + 1))
    # The healthy sites trained and were aggregated every round, each round booked once.
    for site in ("A", "B"):
        assert trained_in(report, site) == every
        assert ledger_rounds(fed, site, run_id) == every
    # C: killed in round 1 before it booked anything, back for a later try; its ledger holds exactly
    # the rounds it was aggregated in. (On a busy machine round 1 may need its retry: the sites answer
    # the retry with their stored update, so nobody pays for round 1 twice.)
    first_try = report["rounds"][0].get("attempts", [{}])[0].get("failed", train[1]["failed"])
    assert "heartbeats" in first_try.get("C", ""), first_try
    assert "did not leave cleanly; told the coordinator it is gone" in c_log.read_text()
    booked_c = ledger_rounds(fed, "C", run_id)
    assert booked_c and booked_c == trained_in(report, "C")
    # N: never aggregated; every round it trained is booked in its ledger, and every update it
    # sent in time was rejected for its NaN values, by name (its privacy facts kept for the audit).
    booked_n = ledger_rounds(fed, "N", run_id)
    rejected_n = trained_in(report, "N", "rejected_sites")
    assert "N" not in {s for r in every for s in train[r]["sites"]} and rejected_n
    assert all("NaN/Inf" in train[r]["rejected"]["N"] for r in rejected_n)
    assert set(rejected_n) <= set(booked_n) <= set(every)
    # S: never in time, never aggregated. It trained the first message it got (booked), then held
    # its answer; every later message expired while it was busy, so it never trained another.
    assert "S" not in {s for r in every for s in train[r]["sites"]}
    assert all("deadline" in train[r]["failed"]["S"] for r in every if "S" in train[r]["failed"])
    assert len(ledger_rounds(fed, "S", run_id)) == 1
    server_log = (fed.logs / "fl-server.log").read_text()
    assert "update of site N REJECTED" in server_log and "SYN-" not in server_log
    print(f"faulty sites run: final pooled AUROC {auroc:.3f}")
