"""The ledger's SQLite store: one transaction per appended, signed, chained row (design: docs/privacy.md)."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import common.ledger.records as rec
from common.errors import DataError
from common.ledger.records import Entry, Plan, Row
from common.privacy import DPEvent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    seq INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    site TEXT NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    privacy_unit TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL,
    delta REAL NOT NULL,
    max_epsilon REAL NOT NULL,
    epsilon_rdp REAL NOT NULL,
    epsilon_prv REAL,
    epsilon REAL NOT NULL,
    opacus TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head (id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL,
                                 hash TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plans (run_id TEXT NOT NULL, fingerprint TEXT NOT NULL, noise_multiplier REAL NOT NULL,
                                  sample_rate REAL NOT NULL, steps_per_round INTEGER NOT NULL,
                                  planned_rounds INTEGER NOT NULL, created REAL NOT NULL,
                                  PRIMARY KEY (run_id, fingerprint));
"""
_PLAN_QUERY = (
    "SELECT noise_multiplier, sample_rate, steps_per_round, planned_rounds FROM plans "
    "WHERE run_id = ? AND fingerprint = ?"
)


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _plan(found: tuple[float, float, int, int]) -> Plan:
    return Plan(float(found[0]), float(found[1]), int(found[2]), int(found[3]))


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Ledger:
    """A site's ledger in ``privacy_dir`` (created with a fresh key on first use)."""

    def __init__(self, privacy_dir: Path, *, create: bool = True) -> None:
        self.dir = Path(privacy_dir)
        self.path = self.dir / rec.LEDGER_FILE
        if not create and not self.path.is_file():
            raise DataError(f"No privacy ledger at {self.path}; pass the site's work dir or its ledger.sqlite")
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._private_key: Ed25519PrivateKey | None = None

    @contextmanager
    def _connect(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        uri = f"file:{self.path}?mode={'rwc' if write else 'ro'}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise DataError(f"Cannot open the privacy ledger {self.path}: {exc}") from exc
        try:
            if write:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN IMMEDIATE")  # one writer at a time, atomically
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        conn.execute(statement)
            yield conn
            if write:
                conn.execute("COMMIT")
        except BaseException as exc:
            if write and conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise DataError(
                    f"The privacy ledger {self.path} is unreadable or corrupt ({exc}); restore it from backup — "
                    "training without it would under-count ε"
                ) from exc
            raise
        finally:
            conn.close()

    # -- keys -----------------------------------------------------------------

    def _key(self) -> Ed25519PrivateKey:
        """The site's Ed25519 signing key, created (0600) on first use."""
        if self._private_key is not None:
            return self._private_key
        key_path = self.dir / rec.PRIVATE_KEY_FILE
        key = rec._load_private_key(key_path) if key_path.exists() else self._create_key(key_path)
        public = _public_pem(key)
        pub_path = self.dir / rec.PUBLIC_KEY_FILE
        if not pub_path.exists() or pub_path.read_bytes() != public:
            from common.files import write_atomic

            write_atomic(pub_path, public)
        self._private_key = key
        return key

    def _create_key(self, key_path: Path) -> Ed25519PrivateKey:
        """A fresh key written to ``key_path`` (0600), or the one another process wrote first.

        The key is written whole to a private temporary file and then hard-linked into
        place, which fails when the name exists: two processes creating the ledger at
        once agree on one key, and none ever reads a half-written key file.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")

        def write_new(path: Path) -> None:  # exclusively: fails when the name exists
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())

        try:
            write_new(tmp)
            try:
                os.link(tmp, key_path)
            except FileExistsError:
                return rec._load_private_key(key_path)  # another process created the key first: use that one
            except OSError:
                write_new(key_path)  # no hard links on this file system: create the key file in place
        finally:
            tmp.unlink(missing_ok=True)
        return key

    def public_pem(self) -> bytes:
        """The PEM public key rows are signed with (created with the key if needed)."""
        return _public_pem(self._key())

    # -- reading ----------------------------------------------------------------

    def rows(self) -> list[Row]:
        """Every row, in chain order (by ``seq``); empty for a new ledger."""
        return self.snapshot()[1]

    def head(self) -> tuple[int, str, str] | None:
        """The signed head ``(count, last hash, signature)``, or None when absent."""
        return self.snapshot()[2]

    def meta(self) -> dict[str, str]:
        """The ``meta`` table (``format``, ``public-key``, ``created``); empty for a new ledger."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[dict[str, str], list[Row], tuple[int, str, str] | None]:
        """``(meta, rows, head)`` read in one transaction, so they agree while a site appends
        (read one after the other, a row appended in between looks like a broken seal)."""
        if not self.path.exists():
            return {}, [], None
        with self._connect(write=False) as conn:
            conn.execute("BEGIN")  # one read transaction: no append can land between the reads
            tables = _tables(conn)
            meta: dict[str, str] = {}
            if "meta" in tables:
                meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            rows: list[Row] = []
            if "rounds" in tables:
                cursor = conn.execute(f"SELECT {', '.join(rec._ROW_FIELDS)} FROM rounds ORDER BY seq")
                rows = [Row(**dict(zip(rec._ROW_FIELDS, values, strict=True))) for values in cursor]
            head = None
            if "head" in tables:
                found = conn.execute("SELECT count, hash, signature FROM head WHERE id = 1").fetchone()
                if found is not None:
                    try:
                        count = int(found[0])
                    except (TypeError, ValueError):
                        count = -1  # an edited seal: verify() reports it
                    head = (count, str(found[1]), str(found[2]))
            conn.execute("COMMIT")
        return meta, rows, head

    def events(self, *, fingerprint: str) -> list[DPEvent]:
        """Every DP event ever recorded on the dataset ``fingerprint``, in order."""
        return [row.event for row in self.rows() if row.fingerprint == fingerprint]

    def plan(self, *, run_id: str, fingerprint: str) -> Plan | None:
        """The plan :meth:`save_plan` fixed for run ``run_id`` on dataset ``fingerprint``; None before that."""
        if not self.path.exists():
            return None
        with self._connect(write=False) as conn:
            if "plans" not in _tables(conn):
                return None
            found = conn.execute(_PLAN_QUERY, (run_id, fingerprint)).fetchone()
        return None if found is None else _plan(found)

    # -- writing ----------------------------------------------------------------

    def save_plan(self, *, run_id: str, fingerprint: str, plan: Plan) -> Plan:
        """Fix the run's plan (creating the ledger and the key if needed); the first saved for (run, dataset) wins.

        Returns ``plan`` when it is the first, else the one an earlier message or a concurrent process
        saved, which the site must train with.

        Parameters
        ----------
        run_id, fingerprint
            The Flower run id, and the dataset fingerprint the plan is for (what the rows' ``fingerprint`` holds).
        plan
            The plan the caller computed for this run (σ, q, steps per round, planned rounds).
        """
        self._key()
        with self._connect(write=True) as conn:
            self._init_meta(conn)
            conn.execute(
                "INSERT OR IGNORE INTO plans VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, fingerprint, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round,
                 plan.planned_rounds, time.time()),
            )
            found = conn.execute(_PLAN_QUERY, (run_id, fingerprint)).fetchone()
        return _plan(found)

    def _init_meta(self, conn: sqlite3.Connection) -> None:
        meta = {"format": rec.FORMAT, "public-key": self.public_pem().decode(), "created": str(time.time())}
        conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", meta.items())

    def append(self, entry: Entry) -> Row:
        """Add one signed, chained row for ``entry`` and reseal the head, in one transaction."""
        key = self._key()
        with self._connect(write=True) as conn:
            self._init_meta(conn)
            last = conn.execute("SELECT seq, hash FROM rounds ORDER BY seq DESC LIMIT 1").fetchone()
            count = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
            seq, prev_hash = (1, rec.GENESIS) if last is None else (int(last[0]) + 1, str(last[1]))
            values = rec._normalized({**asdict(entry), "seq": seq, "created": time.time(), "prev_hash": prev_hash})
            digest = rec.row_digest(values)
            values["hash"] = digest
            values["signature"] = key.sign(digest.encode()).hex()
            conn.execute(
                f"INSERT INTO rounds ({', '.join(rec._ROW_FIELDS)}) VALUES ({', '.join('?' * len(rec._ROW_FIELDS))})",
                [values[k] for k in rec._ROW_FIELDS],
            )
            conn.execute(
                "INSERT OR REPLACE INTO head VALUES (1, ?, ?, ?)",
                (count + 1, digest, key.sign(rec.head_message(count + 1, digest)).hex()),
            )
        return Row(**{k: values[k] for k in rec._ROW_FIELDS})
