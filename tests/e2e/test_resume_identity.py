"""A run resumed after a coordinator crash is the uninterrupted run with the same seed, bit for bit.

Two real federations on loopback at once (fl-server and two fl-client each, ``secagg=false``,
``--no-secure-mode``), on the same data with the same settings: one ``--insecure``, the other over
TLS with enrolled sites behind the nginx proxy, as a hospital runs it. The coordinator of the TLS one
is crashed (its whole process tree, nginx included, frozen and SIGKILLed) after round 1 while a site
has already trained and booked round 2, then ``fl-server --resume`` continues the run on the same
port: the SuperLink keeps its state and the enrolled sites' node ids, so their SuperNodes reconnect.

Why the final weights must match exactly: with ``--no-secure-mode`` each site seeds DP sampling
and noise from the run seed and the round; the initial model and the data split come from the
run seed; each site trains on one thread; a site asked again for a round it booked answers with
its stored update (``client/app/replay.py``). With two sites FedAvg's float64 sum has two terms,
so even the reply order cannot change a bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.audit import audit_ledger, audit_run, cross_check
from common.processes import alive
from server.app.checkpoint import load_checkpoint
from simulations.federation import Federation

pytestmark = pytest.mark.e2e

ROUNDS, KILL_AFTER, SITES = 2, 1, ("A", "B")
SERVER_ARGS = ["--rounds", str(ROUNDS), "--image-size", "32", "--local-epochs", "1",
               "--run-config", "secagg=false batch-size=8 seed=7 round-timeout=120 fraction-evaluate=0"]
CLIENT_ARGS = ["--privacy-unit", "image", "--max-epsilon", "10", "--no-secure-mode", "-c", "image-size=32"]


def test_a_run_resumed_after_a_coordinator_crash_equals_the_uninterrupted_run(tiny_sites: Path,
                                                                                 tmp_path: Path) -> None:
    plain, crashed = (Federation(tmp_path / label, SITES, tiny_sites, secure=secure, server_args=SERVER_ARGS,
                                 client_args=CLIENT_ARGS) for label, secure in (("uninterrupted", False), ("resumed", True)))
    with plain, crashed:  # both at once: most of a round is Flower's polling, not CPU
        plain.start()
        crashed.start()
        crash = crashed.crash_and_resume(KILL_AFTER, timeout=600)
        assert crash["completed_round"] == KILL_AFTER
        booked_lost = {site for site, rounds in crash["booked"].items() if KILL_AFTER + 1 in rounds}
        assert booked_lost, "the coordinator was crashed before a site booked the round it lost"
        for fed in (plain, crashed):
            fed.wait(timeout=600)
            fed.check_exit()
            assert all(client.running() for client in fed.clients.values()), "a site did not survive the run"

    time.sleep(0.5)  # every process started, the killed coordinator's tree and its successor's included, is gone
    assert crashed.pids and not [pid for pid in plain.pids | crashed.pids if alive(pid)]
    plain_folder, folder = plain.run_folder(), crashed.run_folder()
    assert plain_folder is not None and folder is not None
    runs, report = {"uninterrupted": plain_folder, "resumed": folder}, folder.read_report()
    assert report["status"] == "completed" and [r["from_round"] for r in report["resumes"]] == [KILL_AFTER + 1]
    assert plain_folder.read_report()["status"] == "completed"
    for r in range(1, ROUNDS + 1):
        (a, _), (b, _) = (load_checkpoint(run.checkpoint(r)) for run in runs.values())
        assert a.keys() == b.keys(), f"round {r}: the checkpoints hold other tensors"
        differing = [name for name in a if a[name].dtype != b[name].dtype or not a[name].equal(b[name])]
        assert not differing, f"round {r}: the resumed run's weights differ in {differing}"

    run_audit = audit_run(folder.path)  # fl-audit --run: every ε the resumed run reports, recomputed
    assert not run_audit.problems, [str(p) for p in run_audit.problems]
    for site in SITES:
        final_epsilon = {}
        for label, fed in (("uninterrupted", plain), ("resumed", crashed)):
            audit = audit_ledger(fed.site_dir(site))  # chain, signatures and every row's ε recomputed
            assert audit.verified, [str(p) for p in audit.problems]
            run_id = runs[label].path.name
            booked = [row.server_round for row in audit.rows if row.run_id == run_id]
            assert booked == list(range(1, ROUNDS + 1)), f"site {site}, {label} run: ledger books rounds {booked}"
            final_epsilon[label] = audit.rows[-1].epsilon
        problems, _ = cross_check(audit, run_audit)  # fl-audit --ledger --run: the resumed report matches the ledger
        assert not problems, [str(p) for p in problems]
        assert final_epsilon["resumed"] == final_epsilon["uninterrupted"], f"site {site} paid more for the crash"
        log = (crashed.logs / f"site-{site}.log").read_text(errors="replace")
        # A site that booked the lost round before the crash answers it with its stored update; none trains again.
        replayed = f"round {KILL_AFTER + 1} of run {folder.path.name} was already trained and booked" in log
        assert replayed or site not in booked_lost, f"site {site} booked the lost round but did not replay it"
        assert "training it again" not in log
