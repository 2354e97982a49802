"""Verifying a ledger: chain, signatures and sealed head, with the public key only (design: docs/privacy.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from common.ledger.records import GENESIS, Row, head_message, row_digest


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a ledger; ``where`` names the row (or ``head``/``key``)."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def verify(rows: Sequence[Row], head: tuple[int, str, str] | None, public_key) -> list[Problem]:  # type: ignore[no-untyped-def]
    """Check the chain, every signature and the sealed head: one problem per fault, rows' first; empty if intact.

    Parameters
    ----------
    rows, head
        The ledger's rows in chain order (:meth:`Ledger.rows`), and its signed head ``(count, last hash,
        signature)`` (None: a problem unless ``rows`` is empty).
    public_key
        The Ed25519 public key (:func:`load_public_key`) the rows and the head must be signed with.
    """
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
