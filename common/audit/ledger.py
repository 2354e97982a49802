"""A site's ledger audited: chain, signatures and seal verified, every row's ε recomputed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.audit.recompute import close, exceeds, fmt, number, recompute, span
from common.errors import DataError
from common.ledger import (
    FORMAT,
    LEDGER_FILE,
    PUBLIC_KEY_FILE,
    Ledger,
    Problem,
    Row,
    key_fingerprint,
    load_public_key,
    verify,
)
from common.privacy import DPEvent

SHARED_PATIENTS = "budgets compose per dataset; if these datasets share patients, those patients' ε is up to the sum"
NOT_PINNED = (
    "no pinned key (--public-key): this proves the ledger is internally consistent only. Anyone who "
    "replaces the ledger and its key files together, and whoever holds the site's private key, could "
    "have rewritten the whole ledger. Pin the site's site-key.pub and compare its fingerprint with the "
    "ledger-key in the coordinator's run reports."
)


@dataclass(frozen=True)
class LedgerAudit:
    """What ``fl-audit --ledger`` found."""

    path: Path
    key: str  # SHA-256 fingerprint of the key the ledger was verified with
    key_source: str
    pinned: bool
    rows: tuple[Row, ...]
    problems: tuple[Problem, ...]
    warnings: tuple[str, ...]
    notices: tuple[str, ...]
    chain_problems: int
    row_reports: tuple[dict[str, Any], ...]
    datasets: tuple[dict[str, Any], ...]

    @property
    def verified(self) -> bool:
        """Whether the audit found no problem."""
        return not self.problems

    @property
    def mismatches(self) -> int:
        """Rows whose recorded ε does not match (or cannot be) recomputed."""
        return sum(not r["matches"] for r in self.row_reports)

    @property
    def breaches(self) -> int:
        """Rows whose recomputed ε exceeds the site's max ε."""
        return sum(r["recomputed"] is not None and not r["within_budget"] for r in self.row_reports)

    def to_json(self) -> dict[str, Any]:
        """The audit as ``fl-audit --ledger --json`` prints it."""
        return {
            "ledger": str(self.path), "key": self.key, "key_source": self.key_source, "pinned": self.pinned,
            "verified": self.verified, "problems": [asdict(p) for p in self.problems],
            "warnings": list(self.warnings), "notices": list(self.notices),
            "datasets": list(self.datasets), "rows": list(self.row_reports),
        }


def find_ledger(path: Path) -> Path:
    """The ledger file ``path`` names: the file itself, ``path/ledger.sqlite`` or ``path/privacy/ledger.sqlite``."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / LEDGER_FILE, path / "privacy" / LEDGER_FILE):
            if candidate.is_file():
                return candidate
        raise DataError(
            f"No privacy ledger in {path}: expected {path / LEDGER_FILE} or {path / 'privacy' / LEDGER_FILE}"
        )
    if path.is_file():
        return path
    raise DataError(f"No privacy ledger at {path}: no such file or folder")


def _read_pem(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read the public key {path}: {exc.strerror or exc}") from exc


def audit_ledger(path: Path, *, public_key: Path | None = None) -> LedgerAudit:
    """Verify the ledger at ``path`` (see :func:`find_ledger`) and recompute every row's ε.

    Problems are collected, not raised; a :class:`DataError` when the ledger or the key cannot be read at all.
    ``public_key`` is the site's key as the auditor pinned it; without it the ledger's own key is used.
    """
    file = find_ledger(path)
    # snapshot() only reads; an auditor's copy may be named otherwise.
    ledger = Ledger(file.parent, create=False) if file.name == LEDGER_FILE else Ledger(file.parent)
    ledger.path = file
    meta, rows, head = ledger.snapshot()
    if meta.get("format") != FORMAT and not rows and head is None:
        raise DataError(f"{file} is not a fedrad privacy ledger (it has no {FORMAT!r} mark and no rows)")

    meta_pem = meta.get("public-key")
    next_to = file.parent / PUBLIC_KEY_FILE
    if public_key is not None:
        pem, source, pinned = _read_pem(public_key), f"pinned: {public_key}", True
    elif next_to.is_file():
        pem, source, pinned = _read_pem(next_to), f"{next_to} (next to the ledger; not pinned)", False
    elif meta_pem:
        pem, source, pinned = meta_pem.encode(), "the ledger's own copy (not pinned)", False
    else:
        raise DataError(f"No public key to verify {file} with: pass the site's key with --public-key")
    key = load_public_key(pem)
    fingerprint = key_fingerprint(pem)

    problems: list[Problem] = []
    if meta.get("format") != FORMAT:
        problems.append(Problem("meta", f"the ledger's format mark is {meta.get('format')!r}, not {FORMAT!r}"))
    if meta_pem is None:
        problems.append(Problem("key", "the ledger holds no public key of its own (its meta table was edited)"))
    else:
        try:
            meta_fingerprint = key_fingerprint(meta_pem.encode())
        except (TypeError, ValueError):
            meta_fingerprint = "unreadable"
        if meta_fingerprint != fingerprint:
            problems.append(
                Problem("key", f"the ledger was created with key {meta_fingerprint[:12]}…, not the "
                               f"{'pinned' if pinned else 'given'} key {fingerprint[:12]}…: it was written with "
                               "another key, or replaced")
            )
    chain = verify(rows, head, key)
    reports, row_problems = _check_rows(rows)
    datasets, warnings = _datasets(rows, reports)
    return LedgerAudit(
        path=file, key=fingerprint, key_source=source, pinned=pinned, rows=tuple(rows),
        problems=(*problems, *chain, *row_problems), warnings=tuple(warnings),
        notices=() if pinned else (NOT_PINNED,), chain_problems=len(chain),
        row_reports=tuple(reports), datasets=tuple(datasets),
    )


def _check_rows(rows: Sequence[Row]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Every row's cumulative ε recomputed from the events of all rows up to it on its dataset."""
    events: dict[str, list[DPEvent]] = {}
    tasks: list[tuple[list[DPEvent], Any]] = []
    for row in rows:
        on_dataset = events.setdefault(str(row.fingerprint), [])
        on_dataset.append(row.event)
        tasks.append((list(on_dataset), row.delta))
    reports: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for row, eps in zip(rows, recompute(tasks), strict=True):
        where = row.describe()
        report: dict[str, Any] = {
            "seq": row.seq, "run_id": row.run_id, "round": row.server_round, "site": row.site,
            "fingerprint": row.fingerprint, "privacy_unit": row.privacy_unit,
            "noise_multiplier": row.noise_multiplier, "sample_rate": row.sample_rate, "steps": row.steps,
            "max_grad_norm": row.max_grad_norm, "delta": row.delta, "max_epsilon": row.max_epsilon,
            "epsilon": row.epsilon, "epsilon_rdp": row.epsilon_rdp, "epsilon_prv": row.epsilon_prv,
            "recomputed": None, "matches": False, "within_budget": False,
            "hash": row.hash, "created": row.created, "opacus": row.opacus,
        }
        reports.append(report)
        if isinstance(eps, Exception):
            problems.append(Problem(where, f"its ε cannot be recomputed from its σ, q, steps and δ ({eps})"))
            continue
        report["recomputed"] = {"epsilon": eps.sound, "epsilon_rdp": eps.rdp, "epsilon_prv": eps.prv}
        differs = [
            f"{name} recorded {fmt(recorded, 6)}, recomputed {fmt(value, 6)}"
            for name, recorded, value in (
                ("ε RDP", row.epsilon_rdp, eps.rdp), ("ε PRV", row.epsilon_prv, eps.prv), ("ε", row.epsilon, eps.sound)
            )
            if not close(recorded, value)
        ]
        report["matches"] = not differs
        if differs:
            problems.append(
                Problem(where, "its recorded ε does not match the ε recomputed from the ledger's rows up to it ("
                               + "; ".join(differs) + ")")
            )
        report["within_budget"] = not exceeds(eps.sound, row.max_epsilon)
        if not report["within_budget"]:
            problems.append(
                Problem(where, f"budget breach: ε={eps.sound:.4f} (recomputed) > its max ε "
                               f"{fmt(row.max_epsilon)} on dataset {str(row.fingerprint)[:12]}")
            )
    return reports, problems


def _datasets(rows: Sequence[Row], reports: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One entry per dataset fingerprint (what was spent on it, by whom, what is left), and warnings."""
    groups: dict[str, list[tuple[Row, dict[str, Any]]]] = {}
    for row, report in zip(rows, reports, strict=True):
        groups.setdefault(str(row.fingerprint), []).append((row, report))
    datasets: list[dict[str, Any]] = []
    warnings: list[str] = []
    for fingerprint, members in groups.items():
        on_dataset = [row for row, _ in members]
        last_row, last = members[-1]
        recomputed = last["recomputed"] or {}
        sound = recomputed.get("epsilon")
        max_eps = number(last_row.max_epsilon)
        deltas = sorted({row.delta for row in on_dataset}, key=str)
        budgets = list(dict.fromkeys(row.max_epsilon for row in on_dataset))
        datasets.append({
            "fingerprint": fingerprint, "short": fingerprint[:12],
            "sites": sorted({str(row.site) for row in on_dataset}),
            "privacy_units": sorted({str(row.privacy_unit) for row in on_dataset}),
            "rounds": len(on_dataset), "runs": len({row.run_id for row in on_dataset}),
            "run_ids": list(dict.fromkeys(str(row.run_id) for row in on_dataset)),
            "noise_multiplier": span([row.noise_multiplier for row in on_dataset]),
            "sample_rate": span([row.sample_rate for row in on_dataset]),
            "steps": sum(row.steps for row in on_dataset if isinstance(row.steps, int)),
            "delta": number(last_row.delta), "epsilon_prv": recomputed.get("epsilon_prv"),
            "epsilon_rdp": recomputed.get("epsilon_rdp"), "epsilon": sound,
            "recorded_epsilon": number(last_row.epsilon), "max_epsilon": max_eps,
            "budget_left": None if sound is None or max_eps is None else max_eps - sound, "last_row": last_row.seq,
        })
        if len(deltas) > 1:
            warnings.append(
                f"dataset {fingerprint[:12]}: δ changed between rounds ({', '.join(map(str, deltas))}); "
                "its ε is reported at the latest δ"
            )
        if len(budgets) > 1:
            warnings.append(
                f"dataset {fingerprint[:12]}: the site's max ε changed between rounds "
                f"({' → '.join(map(fmt, budgets))})"
            )
        if any(row.privacy_unit == "image" for row in on_dataset):
            warnings.append(
                f"dataset {fingerprint[:12]}: rounds with privacy unit 'image' bound one image's ε; a patient "
                "with k images is only protected at up to about k·ε"
            )
    if len(groups) > 1:
        total = sum(d["epsilon"] or 0.0 for d in datasets)
        warnings.append(
            f"the ledger holds {len(groups)} datasets ({', '.join(d['short'] for d in datasets)}): "
            f"{SHARED_PATIENTS} (here ε = {total:.4f})"
        )
    return datasets, warnings
