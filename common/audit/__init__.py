"""Privacy audit engine: ledgers and run reports verified, every ε recomputed (``fl-audit`` is in ``cli``)."""

from common.audit.ledger import SHARED_PATIENTS, LedgerAudit, audit_ledger, find_ledger
from common.audit.recompute import memoized_rdp, recompute
from common.audit.run import RunAudit, audit_run, cross_check, load_run_report

__all__ = [
    "SHARED_PATIENTS", "LedgerAudit", "RunAudit", "audit_ledger", "audit_run", "cross_check", "find_ledger",
    "load_run_report", "memoized_rdp", "recompute",
]
