"""The site's privacy ledger: every DP training round ever run on its data, tamper-evident.

One SQLite database per site, ``<work-dir>/privacy/ledger.sqlite``, with one
row per DP training round (run, round, dataset fingerprint, σ, q, steps, C, δ,
and the cumulative ε by RDP and by PRV after that round). Rows are

* **hash-chained**: each row's SHA-256 covers its own fields and the previous
  row's hash, so editing, deleting or reordering a row breaks the chain;
* **signed**: each row's hash is signed with the site's Ed25519 key, so a
  chain rebuilt by someone without the key does not verify;
* **sealed**: a signed ``head`` (row count + last hash) is rewritten in the
  same transaction as each append, so dropping the newest rows is detected too.

Writes are SQLite transactions: a crash leaves the ledger before or after a
row, never half of one. The private key (``site-key.pem``, mode 0600) never
leaves the site; its public key (``site-key.pub``) is what an auditor pins.
Verification (:func:`verify`) needs only the public key; ε is recomputed from
the raw rows by :mod:`common.audit`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import DataError
from common.privacy import DPEvent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

LEDGER_FILE = "ledger.sqlite"
PRIVATE_KEY_FILE = "site-key.pem"
PUBLIC_KEY_FILE = "site-key.pub"
GENESIS = "0" * 64
FORMAT = "fedrad-ledger-1"

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


@dataclass(frozen=True)
class Entry:
    """What a site records for one DP training round (all but the chain fields)."""

    site: str
    run_id: str
    server_round: int
    fingerprint: str
    privacy_unit: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    max_epsilon: float
    epsilon_rdp: float
    epsilon_prv: float | None
    epsilon: float  # the decision value: min(RDP, PRV), cumulative over the fingerprint
    opacus: str

    @property
    def event(self) -> DPEvent:
        return DPEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


@dataclass(frozen=True)
class Row(Entry):
    """A ledger row: an :class:`Entry` plus its place in the chain."""

    seq: int = 0
    created: float = 0.0
    prev_hash: str = GENESIS
    hash: str = ""
    signature: str = ""

    def describe(self) -> str:
        """How a report names this row: ``row 3 (run 17, round 2)``."""
        return f"row {self.seq} (run {self.run_id}, round {self.server_round})"


@dataclass(frozen=True)
class Plan:
    """The σ a site fixed for a run on a dataset (the first time it trained in that run)."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int


_PLAN_QUERY = (
    "SELECT noise_multiplier, sample_rate, steps_per_round, planned_rounds FROM plans "
    "WHERE run_id = ? AND fingerprint = ?"
)
_ROW_FIELDS = [f.name for f in fields(Row)]
_HASHED = [name for name in _ROW_FIELDS if name not in ("hash", "signature")]


_INT_FIELDS = ("server_round", "steps", "seq")
_FLOAT_FIELDS = ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "max_epsilon", "epsilon_rdp",
                 "epsilon_prv", "epsilon", "created")
_TEXT_FIELDS = ("site", "run_id", "fingerprint", "privacy_unit", "opacus", "prev_hash")


def _normalized(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every field of the type its column stores, so the hash of what is
    written equals the hash of what is read back (SQLite stores an ``int`` given for a
    REAL column as ``1.0``, a ``3.0`` given for an INTEGER column as ``3``)."""
    out = dict(values)
    for name in _INT_FIELDS:
        value: Any = out[name]
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or value != math.floor(value)):
            raise DataError(f"Expected an integer ledger field {name}, but got {value!r}")
        out[name] = math.floor(value)
    for name in _FLOAT_FIELDS:
        value = out[name]
        if value is None and name == "epsilon_prv":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise DataError(f"Expected a finite number for ledger field {name}, but got {value!r}")
        out[name] = float(value)
    for name in _TEXT_FIELDS:
        out[name] = str(out[name])
    return out


def row_digest(values: dict[str, object]) -> str:
    """SHA-256 of a row's fields (everything but its hash and signature), canonical JSON."""
    payload = json.dumps({k: values[k] for k in _HASHED}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def head_message(count: int, last_hash: str) -> bytes:
    """What the head signature covers."""
    return f"{FORMAT}|head|{count}|{last_hash}".encode()


def key_fingerprint(public_pem: bytes) -> str:
    """SHA-256 of the raw Ed25519 public key: how the site's ledger key is named in reports."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(pem: bytes):  # type: ignore[no-untyped-def]
    """An Ed25519 public key from PEM, or a one-line error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise DataError(f"Expected an Ed25519 public key in PEM format, but could not read it ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise DataError(f"Expected an Ed25519 public key, but got a {type(key).__name__}")
    return key


def _load_private_key(key_path: Path) -> Ed25519PrivateKey:
    """The site's Ed25519 signing key from ``key_path``, or a one-line error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read the ledger signing key {key_path} ({exc}); restore it from backup") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise DataError(f"Expected an Ed25519 key in {key_path}, but got a {type(key).__name__}")
    return key


class Ledger:
    """A site's ledger in ``privacy_dir`` (created with a fresh key on first use)."""

    def __init__(self, privacy_dir: Path, *, create: bool = True) -> None:
        self.dir = Path(privacy_dir)
        self.path = self.dir / LEDGER_FILE
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
        from cryptography.hazmat.primitives import serialization

        if self._private_key is not None:
            return self._private_key
        key_path = self.dir / PRIVATE_KEY_FILE
        key = _load_private_key(key_path) if key_path.exists() else self._create_key(key_path)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pub_path = self.dir / PUBLIC_KEY_FILE
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
                return _load_private_key(key_path)  # another process created the key first: use that one
            except OSError:
                write_new(key_path)  # no hard links on this file system: create the key file in place
        finally:
            tmp.unlink(missing_ok=True)
        return key

    def public_pem(self) -> bytes:
        """The PEM public key rows are signed with (created with the key if needed)."""
        from cryptography.hazmat.primitives import serialization

        return self._key().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -- reading ----------------------------------------------------------------

    def rows(self) -> list[Row]:
        """Every row, in chain order (by ``seq``); empty for a new ledger."""
        return self.snapshot()[1]

    def head(self) -> tuple[int, str, str] | None:
        """The signed head ``(count, last hash, signature)``, or None when absent."""
        return self.snapshot()[2]

    def meta(self) -> dict[str, str]:
        return self.snapshot()[0]

    def snapshot(self) -> tuple[dict[str, str], list[Row], tuple[int, str, str] | None]:
        """``(meta, rows, head)`` read in one transaction, so they agree while a site appends
        (read one after the other, a row appended in between looks like a broken seal)."""
        if not self.path.exists():
            return {}, [], None
        with self._connect(write=False) as conn:
            conn.execute("BEGIN")  # one read transaction: no append can land between the reads
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            meta: dict[str, str] = {}
            if "meta" in tables:
                meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            rows: list[Row] = []
            if "rounds" in tables:
                cursor = conn.execute(f"SELECT {', '.join(_ROW_FIELDS)} FROM rounds ORDER BY seq")
                rows = [Row(**dict(zip(_ROW_FIELDS, values, strict=True))) for values in cursor]
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
        if not self.path.exists():
            return None
        with self._connect(write=False) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "plans" not in tables:
                return None
            found = conn.execute(_PLAN_QUERY, (run_id, fingerprint)).fetchone()
        return None if found is None else Plan(float(found[0]), float(found[1]), int(found[2]), int(found[3]))

    # -- writing ----------------------------------------------------------------

    def save_plan(self, *, run_id: str, fingerprint: str, plan: Plan) -> Plan:
        """Fix the run's plan; the first plan saved for (run, dataset) wins and is returned."""
        self._key()
        with self._connect(write=True) as conn:
            self._init_meta(conn)
            conn.execute(
                "INSERT OR IGNORE INTO plans VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, fingerprint, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round,
                 plan.planned_rounds, time.time()),
            )
            found = conn.execute(_PLAN_QUERY, (run_id, fingerprint)).fetchone()
        return Plan(float(found[0]), float(found[1]), int(found[2]), int(found[3]))

    def _init_meta(self, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('public-key', ?)", (self.public_pem().decode(),))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (str(time.time()),))

    def append(self, entry: Entry) -> Row:
        """Add one signed, chained row for ``entry`` and reseal the head, in one transaction."""
        key = self._key()
        with self._connect(write=True) as conn:
            self._init_meta(conn)
            last = conn.execute("SELECT seq, hash FROM rounds ORDER BY seq DESC LIMIT 1").fetchone()
            count = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
            seq, prev_hash = (1, GENESIS) if last is None else (int(last[0]) + 1, str(last[1]))
            values = _normalized({**asdict(entry), "seq": seq, "created": time.time(), "prev_hash": prev_hash})
            digest = row_digest(values)
            values["hash"] = digest
            values["signature"] = key.sign(digest.encode()).hex()
            conn.execute(
                f"INSERT INTO rounds ({', '.join(_ROW_FIELDS)}) VALUES ({', '.join('?' * len(_ROW_FIELDS))})",
                [values[k] for k in _ROW_FIELDS],
            )
            conn.execute(
                "INSERT OR REPLACE INTO head VALUES (1, ?, ?, ?)",
                (count + 1, digest, key.sign(head_message(count + 1, digest)).hex()),
            )
        return Row(**{k: values[k] for k in _ROW_FIELDS})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a ledger; ``where`` names the row (or ``head``/``key``)."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def verify(rows: Sequence[Row], head: tuple[int, str, str] | None, public_key) -> list[Problem]:  # type: ignore[no-untyped-def]
    """Check the chain, every signature and the sealed head; empty when the ledger is intact."""
    from cryptography.exceptions import InvalidSignature

    problems: list[Problem] = []
    prev_hash = GENESIS
    for i, row in enumerate(rows):
        where = row.describe()
        values = asdict(row)
        if row.seq != i + 1:
            problems.append(Problem(where, f"out of sequence: expected row {i + 1} here (a row was deleted or moved)"))
        if row.prev_hash != prev_hash:
            problems.append(
                Problem(where, "does not follow the row before it (a row before it was deleted, inserted or reordered)")
            )
        try:
            digest = row_digest(values)
        except (TypeError, ValueError):  # a field edited to something JSON cannot hold (NaN, bytes)
            digest = ""
        if digest != row.hash:
            problems.append(Problem(where, "its contents do not match its hash (the row was edited)"))
        try:
            public_key.verify(bytes.fromhex(row.signature), row.hash.encode())
        except (InvalidSignature, ValueError, TypeError, AttributeError):  # AttributeError: not text
            problems.append(Problem(where, "bad signature (not signed by this site's ledger key)"))
        prev_hash = row.hash
    if head is None:
        if rows:
            problems.append(Problem("head", "missing: the ledger's seal was removed"))
        return problems
    count, last_hash, signature = head
    try:
        public_key.verify(bytes.fromhex(signature), head_message(count, last_hash))
    except (InvalidSignature, ValueError, TypeError):
        problems.append(Problem("head", "bad signature on the ledger's seal"))
    if count != len(rows) or last_hash != (rows[-1].hash if rows else GENESIS):
        if count > len(rows):
            missing = f"row {count}" if count == len(rows) + 1 else f"rows {len(rows) + 1}–{count}"
            detail = f"{missing} deleted after it was sealed (or the ledger rolled back)"
        elif count < len(rows):
            detail = f"row {count + 1} onwards added after it was sealed"
        else:
            detail = f"row {count} replaced after it was sealed"
        problems.append(
            Problem("head", f"the seal covers {count} rows ending in {last_hash[:12]}…, but the ledger has "
                            f"{len(rows)} rows: {detail}")
        )
    return problems
