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
