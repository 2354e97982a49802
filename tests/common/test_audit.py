"""``fl-audit``: an honest ledger and run verify; every tampering, mis-recorded ε and breach is named."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from common.audit import SHARED_PATIENTS, memoized_rdp
from common.audit.cli import cli
from common.cli import run_typer
from common.ledger import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Ledger,
    head_message,
    key_fingerprint,
    row_digest,
)
from common.privacy import DPEvent, epsilons
from tests.common.test_ledger import FINGERPRINT, ROUNDS, build_ledger

REPO = Path(__file__).resolve().parents[2]
OTHER = "0b" * 32


@pytest.fixture(scope="module", autouse=True)
def _fast_rdp() -> Iterator[None]:
    """Keep Opacus' per-step RDP memoized across the module (exact; see common.audit.recompute)."""
    with memoized_rdp():
        yield


def audit(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run fl-audit in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        run_typer(cli, [str(a) for a in argv], prog_name="fl-audit")
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def audit_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, dict[str, Any], str]:
    code, out, err = audit(capsys, *argv, "--json")
    return code, json.loads(out), err


@pytest.fixture
def site(honest: Path, tmp_path: Path) -> Path:
    shutil.copytree(honest, tmp_path / "site")
    return tmp_path / "site"


def pinned(work: Path) -> Path:
    return work / "privacy" / PUBLIC_KEY_FILE


def sql(work: Path, statement: str, *args: object) -> None:
    with sqlite3.connect(work / "privacy" / "ledger.sqlite") as conn:
        conn.execute(statement, args)


# -- the ledger ------------------------------------------------------------------------


def test_an_honest_ledger_verifies_and_its_numbers_are_the_accountants(
    capsys: pytest.CaptureFixture[str], honest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opacus.accountants.analysis import rdp

    code, doc, err = audit_json(capsys, "--ledger", honest, "--public-key", pinned(honest))
    assert code == 0 and err == ""
    assert doc["verified"] is True and doc["problems"] == [] and doc["pinned"] is True
    assert doc["key"] == key_fingerprint(pinned(honest).read_bytes())
    # The expected values without the audit's RDP memo: it is exact, so they are equal, not close.
    monkeypatch.setattr(rdp, "_compute_rdp", rdp._compute_rdp.__wrapped__)
    events = [DPEvent(sigma, q, steps) for _, _, sigma, q, steps in ROUNDS]
    for i, row in enumerate(doc["rows"]):
        expected = epsilons(events=events[: i + 1], delta=1e-5)
        assert row["recomputed"] == {"epsilon": expected.sound, "epsilon_rdp": expected.rdp,
                                     "epsilon_prv": expected.prv}
        assert row["matches"] and row["within_budget"] and row["seq"] == i + 1
    (dataset,) = doc["datasets"]
    assert dataset["fingerprint"] == FINGERPRINT and dataset["sites"] == ["A"]
    assert (dataset["rounds"], dataset["runs"], dataset["steps"]) == (3, 1, 15)
    assert dataset["epsilon"] == expected.sound and dataset["epsilon_prv"] == expected.prv
    assert dataset["budget_left"] == pytest.approx(8.0 - expected.sound)
    assert doc["warnings"] == [] and doc["notices"] == []


def test_the_privacy_dir_and_the_file_work_too_and_an_unpinned_key_says_so(
    capsys: pytest.CaptureFixture[str], honest: Path
) -> None:
    code, out, _ = audit(capsys, "--ledger", honest / "privacy")
    assert code == 0
    assert "internally consistent only" in out and "not pinned" in out and "VERIFIED" in out
    assert key_fingerprint(pinned(honest).read_bytes()) in out and "f0f0f0f0f0f0" in out
    code, doc, _ = audit_json(capsys, "--ledger", honest / "privacy" / "ledger.sqlite")
    assert code == 0 and doc["pinned"] is False and doc["notices"]


def _edit(work: Path) -> None:
    sql(work, "UPDATE rounds SET steps = 1 WHERE seq = 2")


def _edit_and_rehash(work: Path) -> None:
    row = Ledger(work / "privacy").rows()[1]
    sql(work, "UPDATE rounds SET steps = 1, hash = ? WHERE seq = 2", row_digest(asdict(replace(row, steps=1))))


def _delete_middle(work: Path) -> None:
    sql(work, "DELETE FROM rounds WHERE seq = 2")


def _delete_last(work: Path) -> None:
    sql(work, "DELETE FROM rounds WHERE seq = 3")


def _reorder(work: Path) -> None:
    sql(work, "UPDATE rounds SET seq = -seq WHERE seq IN (2, 3)")
    sql(work, "UPDATE rounds SET seq = CASE seq WHEN -2 THEN 3 ELSE 2 END WHERE seq < 0")


@pytest.mark.parametrize(
    ("tamper", "named", "what"),
    [
        (_edit, "row 2 (run 17, round 2)", "its contents do not match its hash (the row was edited)"),
        (_edit_and_rehash, "row 2 (run 17, round 2)", "bad signature"),
        (_delete_middle, "row 3 (run 17, round 3)", "expected row 2 here"),
        (_delete_last, "head", "row 3 deleted after it was sealed"),
        (_reorder, "row 2 (run 17, round 3)", "its contents do not match its hash"),
    ],
    ids=["edit", "edit-rehash", "delete-middle", "delete-last", "reorder"],
)
def test_tampering_fails_and_names_the_row(
    capsys: pytest.CaptureFixture[str], site: Path, tamper, named: str, what: str  # type: ignore[no-untyped-def]
) -> None:
    tamper(site)
    code, out, err = audit(capsys, "--ledger", site, "--public-key", pinned(site))
    assert code == 6
    assert any(f"{named}: " in line and what in line for line in out.splitlines())
    assert "FAILED" in out and err.startswith("error: audit failed") and err.count("\n") == 1
    code, doc, _ = audit_json(capsys, "--ledger", site, "--public-key", pinned(site))
    assert code == 6 and doc["verified"] is False
    assert any(p["where"] == named and what in p["what"] for p in doc["problems"])


def test_a_ledger_replaced_with_another_keys_fails_against_the_pinned_key(
    capsys: pytest.CaptureFixture[str], honest: Path, tmp_path: Path
) -> None:
    forged = tmp_path / "forged"
    build_ledger(forged / "privacy")  # the same rounds, honest numbers, another key
    assert audit(capsys, "--ledger", forged)[0] == 0  # consistent in itself (and the notice says so)
    code, doc, _ = audit_json(capsys, "--ledger", forged, "--public-key", pinned(honest))
    assert code == 6
    wheres = [p["where"] for p in doc["problems"]]
    assert wheres[0] == "key" and "another key" in doc["problems"][0]["what"]
    assert {"row 1 (run 17, round 1)", "row 2 (run 17, round 2)", "row 3 (run 17, round 3)", "head"} <= set(wheres)


def test_a_misrecorded_epsilon_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Signed and chained by the site itself, but the last ε was recorded 0.01 too low.
    build_ledger(tmp_path / "privacy", epsilon_offset=-0.01)
    code, out, _ = audit(capsys, "--ledger", tmp_path, "--public-key", pinned(tmp_path))
    assert code == 6
    assert "row 3 (run 17, round 3): its recorded ε does not match the ε recomputed" in out
    assert "row 2 (run 17, round 2)" not in out


def test_a_budget_breach_fails_naming_the_first_row_over_budget(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    events = [DPEvent(sigma, q, steps) for _, _, sigma, q, steps in ROUNDS]
    limit = (epsilons(events=events[:1], delta=1e-5).sound + epsilons(events=events[:2], delta=1e-5).sound) / 2
    build_ledger(tmp_path / "privacy", max_epsilon=limit)  # honest numbers, but the site trained on past its budget
    code, doc, _ = audit_json(capsys, "--ledger", tmp_path, "--public-key", pinned(tmp_path))
    assert code == 6
    breaches = [p["where"] for p in doc["problems"] if p["what"].startswith("budget breach")]
    assert breaches == ["row 2 (run 17, round 2)", "row 3 (run 17, round 3)"]
    assert doc["datasets"][0]["budget_left"] < 0
    assert [r["within_budget"] for r in doc["rows"]] == [True, False, False]


def test_several_datasets_warn_that_budgets_compose_per_dataset(
    capsys: pytest.CaptureFixture[str], site: Path
) -> None:
    build_ledger(site / "privacy", [("18", 1, 1.2, 0.1, 5)], fingerprint=OTHER)
    code, doc, _ = audit_json(capsys, "--ledger", site)
    assert code == 0
    assert [d["short"] for d in doc["datasets"]] == [FINGERPRINT[:12], OTHER[:12]]
    assert doc["datasets"][1]["epsilon"] == epsilons(events=[DPEvent(1.2, 0.1, 5)], delta=1e-5).sound
    assert any(SHARED_PATIENTS in w for w in doc["warnings"])


@pytest.mark.parametrize("kind", ["missing", "folder", "garbage", "not-a-ledger", "bad-key"])
def test_unreadable_inputs_give_one_line_and_a_non_zero_exit(
    capsys: pytest.CaptureFixture[str], honest: Path, tmp_path: Path, kind: str
) -> None:
    target: Path = tmp_path / "ledger.sqlite"
    extra: list[str | Path] = []
    if kind == "missing":
        target = tmp_path / "nowhere"
    elif kind == "folder":
        target = tmp_path
    elif kind == "garbage":
        target.write_bytes(b"\x00garbage" * 512)
    elif kind == "not-a-ledger":
        with sqlite3.connect(target) as conn:
            conn.execute("CREATE TABLE t (x)")
    else:
        target = honest
        (tmp_path / "key.pub").write_text("not a key")
        extra = ["--public-key", tmp_path / "key.pub"]
    code, out, err = audit(capsys, "--ledger", target, *extra)
    assert code == 3 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors(capsys: pytest.CaptureFixture[str], honest: Path) -> None:
    code, _, err = audit(capsys)
    assert code == 2 and "--ledger" in err and "--run" in err
    code, _, err = audit(capsys, "--public-key", pinned(honest))
    assert code == 2 and err.count("\n") == 1


# -- the run report -------------------------------------------------------------------------


def site_metrics(
    events: list[DPEvent], earlier: list[DPEvent], *, max_epsilon: float = 8.0, key: str = "k" * 64
) -> dict[str, Any]:
    """What a site reports for its latest round: cumulative ε over ``earlier + events``, run ε over ``events``."""
    cumulative = epsilons(events=[*earlier, *events], delta=1e-5)
    run = epsilons(events=events, delta=1e-5)
    last = events[-1]
    return {
        "num-examples": 40, "train-loss": 0.69,
        "epsilon": cumulative.sound, "epsilon-rdp": cumulative.rdp, "epsilon-prv": cumulative.prv,
        "run-epsilon": run.sound, "run-epsilon-rdp": run.rdp, "run-epsilon-prv": run.prv,
        "delta": 1e-5, "max-epsilon": max_epsilon, "noise-multiplier": last.noise_multiplier,
        "sample-rate": last.sample_rate, "steps": last.steps, "max-grad-norm": 1.0,
        "privacy-unit": "patient", "ledger-key": key, "ledger-row": 1, "ledger-hash": "0" * 64,
    }


def write_report(run_dir: Path, rounds: list[dict[str, Any]], run_id: int = 17) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    report = {"run_id": run_id, "status": "finished", "transport": "insecure", "config": {}, "rounds": rounds,
              "sites": {}, "final": {}}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    return run_dir


@pytest.fixture(scope="module")
def run_rounds() -> list[dict[str, Any]]:
    """Run 17: site A trains rounds 1–2 (after an earlier run on its data); site B trains round 1 and then
    declines round 2."""
    a_earlier = [DPEvent(1.5, 0.1, 5)]
    a = [DPEvent(1.0, 0.1, 5), DPEvent(1.0, 0.1, 5)]
    b = [DPEvent(1.2, 0.2, 4)]
    return [
        {"round": 1, "train": {"sites": {"A": site_metrics(a[:1], a_earlier), "B": site_metrics(b, [], key="b" * 64)},
                               "declined": {}, "failed": {}}},
        {"round": 2, "train": {"sites": {"A": site_metrics(a, a_earlier)},
                               "declined": {"B": "site B declines round 2: its budget is spent"}, "failed": {}}},
    ]


def test_an_honest_run_report_verifies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_rounds: list[dict[str, Any]]
) -> None:
    run_dir = write_report(tmp_path / "runs" / "17", run_rounds)
    code, doc, _ = audit_json(capsys, "--run", run_dir)
    assert code == 0 and doc["verified"] and doc["run_id"] == "17"
    a, b = doc["sites"]
    expected = epsilons(events=[DPEvent(1.0, 0.1, 5)] * 2, delta=1e-5)
    assert (a["site"], a["rounds_trained"], a["steps"]) == ("A", [1, 2], 10)
    assert (a["epsilon"], a["epsilon_rdp"], a["epsilon_prv"]) == (expected.sound, expected.rdp, expected.prv)
    assert a["reported_epsilon"] > a["epsilon"]  # the earlier run counts in the cumulative ε
    assert b["rounds_declined"] == {"2": "site B declines round 2: its budget is spent"}
    assert b["ledger_key"] == "b" * 64
    code, out, _ = audit(capsys, "--run", run_dir / "report.json")
    assert code == 0 and "its budget is spent" in out and "VERIFIED" in out


def test_a_misreported_run_epsilon_fails_naming_site_and_round(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_rounds: list[dict[str, Any]]
) -> None:
    rounds = json.loads(json.dumps(run_rounds))
    rounds[1]["train"]["sites"]["A"]["run-epsilon-prv"] *= 0.9
    code, out, _ = audit(capsys, "--run", write_report(tmp_path / "run", rounds))
    assert code == 6
    assert "site A round 2 (run 17): the reported ε of this run does not match" in out
    assert "run-epsilon-prv reported" in out and "site A round 1" not in out


def test_a_cumulative_epsilon_over_budget_or_below_the_runs_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, run_rounds: list[dict[str, Any]]
) -> None:
    rounds = json.loads(json.dumps(run_rounds))
    rounds[0]["train"]["sites"]["B"]["max-epsilon"] = rounds[0]["train"]["sites"]["B"]["epsilon"] * 0.99
    rounds[1]["train"]["sites"]["A"]["epsilon"] = rounds[1]["train"]["sites"]["A"]["run-epsilon"] * 0.5
    code, doc, _ = audit_json(capsys, "--run", write_report(tmp_path / "run", rounds))
    assert code == 6
    problems = {(p["where"], p["what"].split(":")[0]) for p in doc["problems"]}
    assert ("site B round 1 (run 17)", "budget breach") in problems
    assert ("site A round 2 (run 17)", "inconsistent") in problems


# -- the ledger and the run together ----------------------------------------------------------


def report_from_ledger(work: Path) -> list[dict[str, Any]]:
    """The rounds the coordinator recorded for the site whose ledger is in ``work`` (run 17)."""
    ledger = Ledger(work / "privacy")
    key = key_fingerprint((work / "privacy" / PUBLIC_KEY_FILE).read_bytes())
    rounds = []
    in_run: list[DPEvent] = []
    for row in ledger.rows():
        in_run.append(row.event)
        run = epsilons(events=in_run, delta=row.delta)
        metrics = {
            "num-examples": 40, "train-loss": 0.69, "epsilon": row.epsilon, "epsilon-rdp": row.epsilon_rdp,
            "epsilon-prv": row.epsilon_prv, "run-epsilon": run.sound, "run-epsilon-rdp": run.rdp,
            "run-epsilon-prv": run.prv, "delta": row.delta, "max-epsilon": row.max_epsilon,
            "noise-multiplier": row.noise_multiplier, "sample-rate": row.sample_rate, "steps": row.steps,
            "max-grad-norm": row.max_grad_norm, "privacy-unit": row.privacy_unit, "ledger-key": key,
            "ledger-row": row.seq, "ledger-hash": row.hash,
        }
        rounds.append({"round": row.server_round, "train": {"sites": {"A": metrics}, "declined": {}, "failed": {}}})
    return rounds


def test_ledger_and_run_cross_check(capsys: pytest.CaptureFixture[str], honest: Path, tmp_path: Path) -> None:
    rounds = report_from_ledger(honest)
    run_dir = write_report(tmp_path / "honest", rounds)
    code, doc, _ = audit_json(capsys, "--ledger", honest, "--public-key", pinned(honest), "--run", run_dir)
    assert code == 0 and doc["verified"] and doc["cross_check"] == {"problems": [], "warnings": []}
    assert doc["run"]["sites"][0]["ledger_key"] == doc["key"]

    # The report holds a hash the ledger does not: the ledger was rolled back or replaced.
    rounds[1]["train"]["sites"]["A"]["ledger-hash"] = "9" * 64
    code, out, _ = audit(capsys, "--ledger", honest, "--run", write_report(tmp_path / "rolled-back", rounds))
    assert code == 6
    assert "site A round 2 (run 17): the report names ledger row 2 with hash 999999999999…" in out
    assert "rolled back or replaced" in out


def test_cross_check_catches_a_ledger_rolled_back_to_fewer_rows(
    capsys: pytest.CaptureFixture[str], site: Path, tmp_path: Path
) -> None:
    run_dir = write_report(tmp_path / "run", report_from_ledger(site))
    # Drop the last row and reseal, as whoever holds the site's private key could.
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    sql(site, "DELETE FROM rounds WHERE seq = 3")
    last = Ledger(site / "privacy").rows()[-1].hash
    key = load_pem_private_key((site / "privacy" / PRIVATE_KEY_FILE).read_bytes(), password=None)
    sql(site, "UPDATE head SET count = 2, hash = ?, signature = ?", last, key.sign(head_message(2, last)).hex())
    assert audit(capsys, "--ledger", site, "--public-key", pinned(site))[0] == 0  # the ledger alone looks fine
    code, doc, _ = audit_json(capsys, "--ledger", site, "--public-key", pinned(site), "--run", run_dir)
    assert code == 6
    assert [(p["where"], "rolled back" in p["what"]) for p in doc["cross_check"]["problems"]] == [
        ("site A round 3 (run 17)", True)
    ]


def test_the_command_runs_as_a_subprocess(honest: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "common.audit.cli", "--ledger", str(honest), "--public-key", str(pinned(honest)),
         "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True
    result = subprocess.run(
        [sys.executable, "-m", "common.audit.cli", "--ledger", str(honest / "missing.sqlite")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.startswith("error: No privacy ledger at") and result.stderr.count("\n") == 1
