"""Ledger rows and keys: what one row holds, its canonical hash, the site's Ed25519 keys (design: docs/privacy.md)."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, fields
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
        """This round as a :class:`DPEvent` (σ, q, steps): what the accountants compose."""
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
