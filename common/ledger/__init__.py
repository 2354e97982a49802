"""The site's privacy ledger: hash-chained, signed and sealed SQLite rows, one per DP round (docs/privacy.md)."""

from common.ledger.records import (
    FORMAT,
    GENESIS,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Entry,
    Plan,
    Row,
    head_message,
    key_fingerprint,
    load_public_key,
    row_digest,
)
from common.ledger.store import Ledger
from common.ledger.verify import Problem, verify

__all__ = [
    "FORMAT", "GENESIS", "LEDGER_FILE", "PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "Entry", "Ledger", "Plan", "Problem",
    "Row", "head_message", "key_fingerprint", "load_public_key", "row_digest", "verify",
]
