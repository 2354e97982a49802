"""The site's privacy ledger: round trip, keys, and every kind of tampering detected and named."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import stat
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from common.errors import DataError
from common.ledger import (
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Entry,
    Ledger,
    Plan,
    Problem,
    Row,
    key_fingerprint,
    load_public_key,
    row_digest,
    verify,
)
from common.privacy import DPEvent

FINGERPRINT = "f0" * 32
DELTA = 1e-5

# (run, round, σ, q, steps): few, short rounds keep the accountants fast.
ROUNDS = [("17", 1, 1.0, 0.1, 5), ("17", 2, 1.0, 0.1, 5), ("17", 3, 1.0, 0.1, 5)]


def build_ledger(
    privacy_dir: Path,
    rounds: list[tuple[str, int, float, float, int]] = ROUNDS,
    *,
    fingerprint: str = FINGERPRINT,
    site: str = "A",
    max_epsilon: float = 8.0,
    delta: float = DELTA,
    epsilon_offset: float = 0.0,
) -> list[Row]:
    """Append one row per round with the cumulative ε the site would record (via ``epsilons``).

    ``epsilon_offset`` is added to the last row's recorded ε (a site that mis-records).
    """
    from common.audit import memoized_rdp
    from common.privacy import epsilons

    ledger = Ledger(privacy_dir)
    earlier = [row.event for row in ledger.rows() if row.fingerprint == fingerprint]
    written = []
    with memoized_rdp():
        for i, (run_id, server_round, sigma, q, steps) in enumerate(rounds):
            earlier.append(DPEvent(sigma, q, steps))
            eps = epsilons(events=earlier, delta=delta)
            offset = epsilon_offset if i == len(rounds) - 1 else 0.0
            written.append(
                ledger.append(
                    Entry(
                        site=site, run_id=run_id, server_round=server_round, fingerprint=fingerprint,
                        privacy_unit="patient", noise_multiplier=sigma, sample_rate=q, steps=steps,
                        max_grad_norm=1.0, delta=delta, max_epsilon=max_epsilon, epsilon_rdp=eps.rdp + offset,
                        epsilon_prv=None if eps.prv is None else eps.prv + offset, epsilon=eps.sound + offset,
                        opacus="1.6.0",
                    )
                )
            )
    return written


@pytest.fixture
def ledger_copy(honest: Path, tmp_path: Path) -> Ledger:
    shutil.copytree(honest, tmp_path / "site", dirs_exist_ok=True)
    return Ledger(tmp_path / "site" / "privacy")


def problems_of(ledger: Ledger, public_pem: bytes | None = None) -> list[Problem]:
    pem = public_pem or (ledger.dir / PUBLIC_KEY_FILE).read_bytes()
    return verify(ledger.rows(), ledger.head(), load_public_key(pem))


def execute(ledger: Ledger, sql: str, *args: object) -> None:
    with sqlite3.connect(ledger.path) as conn:
        conn.execute(sql, args)


def test_round_trip(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "privacy")
    assert ledger.rows() == [] and ledger.head() is None and not ledger.path.exists()  # nothing written yet
    written = build_ledger(ledger.dir, ROUNDS[:2])
    rows = ledger.rows()
    assert rows == written
    assert [(r.seq, r.run_id, r.server_round) for r in rows] == [(1, "17", 1), (2, "17", 2)]
    assert rows[1].prev_hash == rows[0].hash and rows[1].describe() == "row 2 (run 17, round 2)"
    assert ledger.head() == (2, rows[1].hash, ledger.head()[2])
    assert ledger.events(fingerprint=FINGERPRINT) == [DPEvent(1.0, 0.1, 5)] * 2
    assert ledger.events(fingerprint="other") == []
    meta = ledger.meta()
    assert meta["format"] == "fedrad-ledger-1" and meta["public-key"].encode() == ledger.public_pem()
    assert ledger.snapshot() == (meta, rows, ledger.head())


def test_fields_of_another_numeric_type_still_verify(tmp_path: Path) -> None:
    # SQLite stores 8 (int) in a REAL column as 8.0: the hash must cover what is read back.
    ledger = Ledger(tmp_path)
    entry = Entry(site="A", run_id=17, server_round=1.0, fingerprint=FINGERPRINT, privacy_unit="patient",  # type: ignore[arg-type]
                  noise_multiplier=1, sample_rate=0.1, steps=5.0, max_grad_norm=1, delta=DELTA,  # type: ignore[arg-type]
                  max_epsilon=8, epsilon_rdp=3, epsilon_prv=None, epsilon=3, opacus="1.6.0")
    row = ledger.append(entry)
    assert ledger.rows() == [row] and row.run_id == "17" and row.steps == 5 and isinstance(row.max_epsilon, float)
    assert problems_of(ledger) == []
    with pytest.raises(DataError, match="finite number for ledger field epsilon"):
        ledger.append(replace(entry, epsilon=float("nan")))
    with pytest.raises(DataError, match="integer ledger field steps"):
        ledger.append(replace(entry, steps=2.5))


def test_key_file_is_private_and_reused(tmp_path: Path) -> None:
    privacy = tmp_path / "privacy"
    build_ledger(privacy, ROUNDS[:1])
    key_file = privacy / PRIVATE_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    pem = key_file.read_bytes()
    public = (privacy / PUBLIC_KEY_FILE).read_bytes()
    build_ledger(privacy, ROUNDS[1:2])  # a new Ledger object: same key
    assert key_file.read_bytes() == pem and (privacy / PUBLIC_KEY_FILE).read_bytes() == public
    assert Ledger(privacy).public_pem() == public
    assert [p.name for p in privacy.iterdir() if p.name.endswith(".tmp")] == []
    assert len(key_fingerprint(public)) == 64
    assert problems_of(Ledger(privacy)) == []


def test_an_honest_ledger_verifies(ledger_copy: Ledger) -> None:
    assert len(ledger_copy.rows()) == 3
    assert problems_of(ledger_copy) == []


def _where(problems: list[Problem]) -> list[str]:
    return [p.where for p in problems]


def test_an_edited_field_is_named(ledger_copy: Ledger) -> None:
    execute(ledger_copy, "UPDATE rounds SET steps = 1 WHERE seq = 2")
    problems = problems_of(ledger_copy)
    assert [str(p) for p in problems] == ["row 2 (run 17, round 2): its contents do not match its hash (the row was edited)"]


def test_an_edit_with_a_recomputed_hash_fails_the_signature(ledger_copy: Ledger) -> None:
    row = ledger_copy.rows()[1]
    forged = asdict(replace(row, steps=1))
    execute(ledger_copy, "UPDATE rounds SET steps = 1, hash = ? WHERE seq = 2", row_digest(forged))
    problems = problems_of(ledger_copy)
    assert ("row 2 (run 17, round 2)", "bad signature (not signed by this site's ledger key)") in [
        (p.where, p.what) for p in problems
    ]
    assert any(p.where == "row 3 (run 17, round 3)" and "does not follow" in p.what for p in problems)
    assert all(p.where != "row 1 (run 17, round 1)" for p in problems)


def test_a_deleted_middle_row_is_named(ledger_copy: Ledger) -> None:
    execute(ledger_copy, "DELETE FROM rounds WHERE seq = 2")
    problems = problems_of(ledger_copy)
    assert _where(problems)[:2] == ["row 3 (run 17, round 3)"] * 2
    assert "expected row 2 here" in problems[0].what and "does not follow" in problems[1].what
    assert problems[-1].where == "head" and "ledger has 2 rows" in problems[-1].what


def test_a_deleted_last_row_breaks_the_seal(ledger_copy: Ledger) -> None:
    execute(ledger_copy, "DELETE FROM rounds WHERE seq = 3")
    problems = problems_of(ledger_copy)
    assert len(problems) == 1 and problems[0].where == "head"
    assert "row 3 deleted after it was sealed" in problems[0].what


def test_a_removed_seal_is_named(ledger_copy: Ledger) -> None:
    execute(ledger_copy, "DELETE FROM head")
    assert [str(p) for p in problems_of(ledger_copy)] == ["head: missing: the ledger's seal was removed"]


def test_reordered_rows_are_named(ledger_copy: Ledger) -> None:
    execute(ledger_copy, "UPDATE rounds SET seq = -seq WHERE seq IN (1, 2)")
    execute(ledger_copy, "UPDATE rounds SET seq = CASE seq WHEN -1 THEN 2 ELSE 1 END WHERE seq < 0")
    problems = problems_of(ledger_copy)
    named = set(_where(problems))
    assert {"row 1 (run 17, round 2)", "row 2 (run 17, round 1)"} <= named
    assert any(p.where == "row 3 (run 17, round 3)" and "does not follow" in p.what for p in problems)


def test_a_ledger_signed_by_another_key_fails_against_the_pinned_key(ledger_copy: Ledger, tmp_path: Path) -> None:
    pinned = (ledger_copy.dir / PUBLIC_KEY_FILE).read_bytes()
    forged = Ledger(tmp_path / "forged")
    build_ledger(forged.dir)  # the same rounds, honestly computed, but another key
    assert problems_of(forged) == []  # consistent in itself...
    problems = problems_of(forged, pinned)  # ...but not the site's
    assert _where(problems) == [f"row {i} (run 17, round {i})" for i in (1, 2, 3)] + ["head"]
    assert all("signature" in p.what for p in problems)


def test_save_plan_first_wins(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.plan(run_id="1", fingerprint=FINGERPRINT) is None
    first = Plan(noise_multiplier=1.1, sample_rate=0.1, steps_per_round=5, planned_rounds=3)
    assert ledger.save_plan(run_id="1", fingerprint=FINGERPRINT, plan=first) == first
    second = Plan(noise_multiplier=0.5, sample_rate=0.2, steps_per_round=9, planned_rounds=9)
    assert ledger.save_plan(run_id="1", fingerprint=FINGERPRINT, plan=second) == first
    assert ledger.plan(run_id="1", fingerprint=FINGERPRINT) == first
    assert ledger.save_plan(run_id="2", fingerprint=FINGERPRINT, plan=second) == second
    assert ledger.rows() == [] and ledger.head() is None


def test_a_corrupt_ledger_is_a_clear_data_error(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_bytes(b"this is not SQLite, " * 100)
    ledger = Ledger(tmp_path)
    with pytest.raises(DataError, match="unreadable or corrupt .*restore it from backup"):
        ledger.rows()
    with pytest.raises(DataError, match="unreadable or corrupt"):
        build_ledger(tmp_path, ROUNDS[:1])


def test_an_unreadable_ledger_is_a_clear_data_error(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).mkdir()  # not a file: cannot be opened, as root too
    with pytest.raises(DataError, match="privacy ledger"):
        Ledger(tmp_path).rows()
    with pytest.raises(DataError, match="No privacy ledger"):
        Ledger(tmp_path / "nowhere", create=False)


def _append_rows(privacy_dir: str, site: str, count: int, barrier) -> None:  # type: ignore[no-untyped-def]
    """One process of the concurrency test: wait for the other, then append ``count`` rows.

    The ε values are placeholders: this test is about the chain, not the accounting.
    """
    ledger = Ledger(Path(privacy_dir))
    barrier.wait(timeout=60)
    for i in range(count):
        ledger.append(
            Entry(site=site, run_id="1", server_round=i + 1, fingerprint=FINGERPRINT, privacy_unit="patient",
                  noise_multiplier=1.0, sample_rate=0.1, steps=5, max_grad_norm=1.0, delta=DELTA,
                  max_epsilon=8.0, epsilon_rdp=1.0, epsilon_prv=1.0, epsilon=1.0, opacus="1.6.0")
        )


def test_concurrent_appends_from_two_processes_keep_one_valid_chain(tmp_path: Path) -> None:
    # A fresh folder: both processes also race to create the signing key.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    procs = [
        context.Process(target=_append_rows, args=(str(tmp_path / "privacy"), site, 6, barrier))
        for site in ("A", "B")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    ledger = Ledger(tmp_path / "privacy")
    rows = ledger.rows()
    assert [r.seq for r in rows] == list(range(1, 13))
    assert sorted((r.site, r.server_round) for r in rows) == sorted((s, i) for s in "AB" for i in range(1, 7))
    assert problems_of(ledger) == []
    assert [p.name for p in ledger.dir.iterdir()] and not any(p.name.endswith(".tmp") for p in ledger.dir.iterdir())
    assert stat.S_IMODE((ledger.dir / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    assert os.access(ledger.path, os.R_OK)
