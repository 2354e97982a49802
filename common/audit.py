"""``fl-audit``: check a site's privacy ledger and a run's privacy report, recomputing every ε.

    fl-audit --ledger SITE_WORK_DIR [--public-key PINNED.pub] [--json]
    fl-audit --run WORK_DIR/runs/RUN_ID [--json]
    fl-audit --ledger SITE_WORK_DIR --run WORK_DIR/runs/RUN_ID   (both, and cross-checked)

``--ledger`` verifies the ledger's hash chain, every row's signature and the
sealed head, recomputes the cumulative ε of every row from the raw σ, q, steps
and δ of the rows before it (both Opacus accountants) and checks it against
what the site recorded and against the site's max ε. ``--run`` does the same
for what the sites reported to the coordinator in one run. Together, every
ledger row the run names must be in the ledger, unchanged.

Exit codes: 0 everything verifies; 6 the audit found a problem (each is printed,
naming the row or the site and round); 3 a file cannot be read; 2 usage errors.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from common.cli import run_typer
from common.errors import AuditFailed, DataError
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
from common.privacy import PRV_EPS_ERROR, DPEvent, Epsilons, epsilons, merge_events

cli = typer.Typer(add_completion=False, help=__doc__)

REL_TOL = 1e-6
"""Relative tolerance when a recorded ε is compared with its recomputation."""
ABS_TOL = 1e-9
"""...plus this absolute tolerance."""
BUDGET_TOL = 1e-9
"""Relative tolerance of a budget check (what the sites use too)."""
REPORT_JSON = "report.json"

SHARED_PATIENTS = (
    "budgets compose per dataset; if these datasets share patients, those patients' ε is up to the sum"
)
NOT_PINNED = (
    "no pinned key (--public-key): this proves the ledger is internally consistent only. Anyone who "
    "replaces the ledger and its key files together, and whoever holds the site's private key, could "
    "have rewritten the whole ledger. Pin the site's site-key.pub and compare its fingerprint with the "
    "ledger-key in the coordinator's run reports."
)


# -- helpers ----------------------------------------------------------------------


_memo_lock = threading.Lock()
_memo_depth = 0
_memo_original: Any = None


@contextmanager
def memoized_rdp() -> Iterator[None]:
    """Memoize Opacus' per-step RDP curve ``_compute_rdp(q, σ, α)`` for the duration.

    Both accountants evaluate it (PRV sizes its domain with RDP) for every order α
    of every (q, σ) of every row's history — the same few (q, σ) over and over —
    and for short histories it is most of the cost of :func:`epsilons`. It is a
    pure function of its arguments, so caching it returns the very same floats:
    every ε is bit-for-bit what :func:`epsilons` gives without it. Re-entrant;
    thread-safe (one cache shared by the threads of :func:`recompute`).
    """
    global _memo_depth, _memo_original
    from opacus.accountants.analysis import rdp as rdp_analysis

    with _memo_lock:
        if _memo_depth == 0:
            _memo_original = rdp_analysis._compute_rdp
            rdp_analysis._compute_rdp = functools.lru_cache(maxsize=None)(_memo_original)
        _memo_depth += 1
    try:
        yield
    finally:
        with _memo_lock:
            _memo_depth -= 1
            if _memo_depth == 0:
                rdp_analysis._compute_rdp = _memo_original
                _memo_original = None


def close(recorded: Any, recomputed: float | None) -> bool:
    """Whether a recorded ε equals its recomputation (1e-6 relative + 1e-9 absolute)."""
    if recorded is None or recomputed is None:
        return recorded is None and recomputed is None
    try:
        a, b = float(recorded), float(recomputed)
    except (TypeError, ValueError):
        return False
    if a == b:
        return True
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b)) + ABS_TOL


def exceeds(epsilon: float | None, max_epsilon: Any) -> bool:
    """Whether ``epsilon`` is above ``max_epsilon`` (beyond the 1e-9 relative tolerance)."""
    if epsilon is None:
        return False
    try:
        limit = float(max_epsilon)
    except (TypeError, ValueError):
        return True  # no readable budget: nothing is within it
    return not epsilon <= limit * (1 + BUDGET_TOL)


def _num(value: Any) -> float | None:
    """A finite number as float, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, for JSON."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _span(values: list[float]) -> dict[str, float | None]:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return {"min": min(nums), "max": max(nums)} if nums else {"min": None, "max": None}


def _fmt_span(span: dict[str, float | None]) -> str:
    lo, hi = span["min"], span["max"]
    if lo is None or hi is None:
        return "—"
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}–{hi:.4g}"


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def recompute(tasks: Sequence[tuple[Sequence[DPEvent], Any]]) -> list[Epsilons | Exception]:
    """:func:`common.privacy.epsilons` of every ``(events, δ)`` in ``tasks``, in order.

    Every task is computed in full by the same function the sites use (nothing is
    extrapolated from a neighbouring row), on one thread per CPU core (Opacus' PRV
    numerics run in NumPy/SciPy, which release the GIL), the longest histories
    first; identical tasks are computed once. A task that cannot be computed gives
    its exception instead of a result.
    """
    keys: list[tuple[Any, ...]] = []
    for events, delta in tasks:
        try:
            keys.append((tuple(merge_events(events)), float(delta)))
        except (TypeError, ValueError) as exc:
            keys.append(("error", id(exc), exc))
    unique = list(dict.fromkeys(k for k in keys if k[0] != "error"))
    if not unique:
        return [key[2] for key in keys]

    def one(key: tuple[Any, ...]) -> Epsilons | Exception:
        history, delta = key
        try:
            return epsilons(events=[DPEvent(*entry) for entry in history], delta=delta)
        except (ArithmeticError, TypeError, ValueError, RuntimeError) as exc:
            return exc

    results: dict[tuple[Any, ...], Epsilons | Exception] = {}
    # Opacus warns about loose RDP orders and logs of 0 at q = 1: noise for an auditor, not findings.
    with memoized_rdp(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        order = sorted(unique, key=lambda k: -sum(steps for _, _, steps in k[0]) * len(k[0]))
        workers = min(_workers(), len(order))
        if workers <= 1:
            results = {key: one(key) for key in order}
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = dict(zip(order, pool.map(one, order), strict=True))
    return [key[2] if key[0] == "error" else results[key] for key in keys]


# -- the ledger ---------------------------------------------------------------------


@dataclass
class LedgerAudit:
    """What ``fl-audit --ledger`` found."""

    path: Path
    key: str  # SHA-256 fingerprint of the key the ledger was verified with
    key_source: str
    pinned: bool
    rows: list[Row]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    chain_problems: int = 0
    mismatches: int = 0
    breaches: int = 0
    row_reports: list[dict[str, Any]] = field(default_factory=list)
    datasets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger": str(self.path),
            "key": self.key,
            "key_source": self.key_source,
            "pinned": self.pinned,
            "verified": self.verified,
            "problems": [{"where": p.where, "what": p.what} for p in self.problems],
            "warnings": list(self.warnings),
            "notices": list(self.notices),
            "datasets": self.datasets,
            "rows": self.row_reports,
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


def _open(file: Path) -> Ledger:
    """A read-only view of the ledger ``file`` (nothing is ever created or written)."""
    ledger = Ledger(file.parent, create=False) if file.name == LEDGER_FILE else Ledger(file.parent)
    ledger.path = file  # an auditor's copy may be named otherwise
    return ledger


def audit_ledger(path: Path, *, public_key: Path | None = None) -> LedgerAudit:
    """Verify the ledger at ``path`` and recompute every row's ε; problems are collected, not raised.

    Raises
    ------
    DataError
        When the ledger or the key cannot be read at all.
    """
    file = find_ledger(path)
    meta, rows, head = _open(file).snapshot()
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
    audit = LedgerAudit(path=file, key=fingerprint, key_source=source, pinned=pinned, rows=rows)
    if not pinned:
        audit.notices.append(NOT_PINNED)

    if meta.get("format") != FORMAT:
        audit.problems.append(Problem("meta", f"the ledger's format mark is {meta.get('format')!r}, not {FORMAT!r}"))
    if meta_pem is None:
        audit.problems.append(Problem("key", "the ledger holds no public key of its own (its meta table was edited)"))
    else:
        try:
            meta_fingerprint = key_fingerprint(meta_pem.encode())
        except (TypeError, ValueError):
            meta_fingerprint = "unreadable"
        if meta_fingerprint != fingerprint:
            which = "pinned" if pinned else "given"
            audit.problems.append(
                Problem("key", f"the ledger was created with key {meta_fingerprint[:12]}…, not the {which} key "
                               f"{fingerprint[:12]}…: it was written with another key, or replaced")
            )
    chain = verify(rows, head, key)
    audit.chain_problems = len(chain)
    audit.problems.extend(chain)
    _recompute_rows(audit)
    _summarize(audit)
    return audit


def _recompute_rows(audit: LedgerAudit) -> None:
    """Every row's cumulative ε from the events of all rows up to it on its dataset."""
    events: dict[str, list[DPEvent]] = {}
    tasks: list[tuple[list[DPEvent], Any]] = []
    for row in audit.rows:
        on_dataset = events.setdefault(str(row.fingerprint), [])
        on_dataset.append(row.event)
        tasks.append((list(on_dataset), row.delta))
    for row, eps in zip(audit.rows, recompute(tasks), strict=True):
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
        audit.row_reports.append(report)
        if isinstance(eps, Exception):
            audit.mismatches += 1
            audit.problems.append(Problem(where, f"its ε cannot be recomputed from its σ, q, steps and δ ({eps})"))
            continue
        report["recomputed"] = {"epsilon": eps.sound, "epsilon_rdp": eps.rdp, "epsilon_prv": eps.prv}
        differs = [
            f"{name} recorded {_fmt(recorded, 6)}, recomputed {_fmt(value, 6)}"
            for name, recorded, value in (
                ("ε RDP", row.epsilon_rdp, eps.rdp), ("ε PRV", row.epsilon_prv, eps.prv), ("ε", row.epsilon, eps.sound)
            )
            if not close(recorded, value)
        ]
        report["matches"] = not differs
        if differs:
            audit.mismatches += 1
            audit.problems.append(
                Problem(where, "its recorded ε does not match the ε recomputed from the ledger's rows up to it ("
                               + "; ".join(differs) + ")")
            )
        report["within_budget"] = not exceeds(eps.sound, row.max_epsilon)
        if not report["within_budget"]:
            audit.breaches += 1
            audit.problems.append(
                Problem(where, f"budget breach: ε={eps.sound:.4f} (recomputed) > its max ε "
                               f"{_fmt(row.max_epsilon)} on dataset {str(row.fingerprint)[:12]}")
            )


def _summarize(audit: LedgerAudit) -> None:
    """One entry per dataset fingerprint: what was spent on it, by whom, and what is left."""
    groups: dict[str, list[tuple[Row, dict[str, Any]]]] = {}
    for row, report in zip(audit.rows, audit.row_reports, strict=True):
        groups.setdefault(str(row.fingerprint), []).append((row, report))
    for fingerprint, members in groups.items():
        rows = [row for row, _ in members]
        last_row, last = members[-1]
        recomputed = last["recomputed"] or {}
        sound = recomputed.get("epsilon")
        max_eps = _num(last_row.max_epsilon)
        deltas = sorted({row.delta for row in rows}, key=str)
        budgets = list(dict.fromkeys(row.max_epsilon for row in rows))
        steps = 0
        for row in rows:
            steps += row.steps if isinstance(row.steps, int) else 0
        audit.datasets.append({
            "fingerprint": fingerprint,
            "short": fingerprint[:12],
            "sites": sorted({str(row.site) for row in rows}),
            "privacy_units": sorted({str(row.privacy_unit) for row in rows}),
            "rounds": len(rows),
            "runs": len({row.run_id for row in rows}),
            "run_ids": list(dict.fromkeys(str(row.run_id) for row in rows)),
            "noise_multiplier": _span([row.noise_multiplier for row in rows]),
            "sample_rate": _span([row.sample_rate for row in rows]),
            "steps": steps,
            "delta": _num(last_row.delta),
            "epsilon_prv": recomputed.get("epsilon_prv"),
            "epsilon_rdp": recomputed.get("epsilon_rdp"),
            "epsilon": sound,
            "recorded_epsilon": _num(last_row.epsilon),
            "max_epsilon": max_eps,
            "budget_left": None if sound is None or max_eps is None else max_eps - sound,
            "last_row": last_row.seq,
        })
        if len(deltas) > 1:
            audit.warnings.append(
                f"dataset {fingerprint[:12]}: δ changed between rounds ({', '.join(map(str, deltas))}); "
                "its ε is reported at the latest δ"
            )
        if len(budgets) > 1:
            audit.warnings.append(
                f"dataset {fingerprint[:12]}: the site's max ε changed between rounds "
                f"({' → '.join(map(_fmt, budgets))})"
            )
        if any(row.privacy_unit == "image" for row in rows):
            audit.warnings.append(
                f"dataset {fingerprint[:12]}: rounds with privacy unit 'image' bound one image's ε; a patient "
                "with k images is only protected at up to about k·ε"
            )
    if len(groups) > 1:
        total = sum(d["epsilon"] or 0.0 for d in audit.datasets)
        audit.warnings.append(
            f"the ledger holds {len(groups)} datasets ({', '.join(d['short'] for d in audit.datasets)}): "
            f"{SHARED_PATIENTS} (here ε = {total:.4f})"
        )


# -- the run report -------------------------------------------------------------------


@dataclass
class RunAudit:
    """What ``fl-audit --run`` found."""

    path: Path
    run_id: str
    report: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    trained: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "run": str(self.path),
            "run_id": self.run_id,
            "verified": self.verified,
            "problems": [{"where": p.where, "what": p.what} for p in self.problems],
            "warnings": list(self.warnings),
            "sites": self.sites,
        }


def load_run_report(path: Path) -> tuple[Path, dict[str, Any]]:
    """``(file, report)`` of a run folder (or its report.json), or a one-line error."""
    path = Path(path)
    file = path / REPORT_JSON if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"No run report at {file}; pass a run folder <workdir>/runs/<run-id>")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"Cannot read the run report {file} ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise DataError(f"{file} is not a fedrad run report (it has no list of rounds)")
    return file, data


_EVENT_KEYS = ("noise-multiplier", "sample-rate", "steps", "delta")


def audit_run(path: Path) -> RunAudit:
    """Recompute every site's run ε from the report's per-round events and check its budget claims."""
    file, report = load_run_report(path)
    audit = RunAudit(path=file.parent, run_id=str(report.get("run_id")), report=report)
    declined: dict[str, list[tuple[Any, str]]] = {}
    for entry in report["rounds"]:
        if not isinstance(entry, dict):
            continue
        server_round = entry.get("round")
        train = entry.get("train") if isinstance(entry.get("train"), dict) else {}
        sites = train.get("sites") if isinstance(train.get("sites"), dict) else {}
        # A rejected update was trained all the same: its round counts for the site's ε.
        rejected = train.get("rejected_sites") if isinstance(train.get("rejected_sites"), dict) else {}
        for name, metrics in [*sites.items(), *rejected.items()]:
            if isinstance(metrics, dict):
                audit.trained.setdefault(str(name), []).append((server_round, metrics))
        for name, reason in (train.get("declined") if isinstance(train.get("declined"), dict) else {}).items():
            declined.setdefault(str(name), []).append((server_round, str(reason)))
        for node, reason in (train.get("failed") if isinstance(train.get("failed"), dict) else {}).items():
            audit.warnings.append(f"round {server_round}: {node} failed to train ({reason})")

    # Every trained round's run ε, from the site's reported rounds of this run up to it.
    names = sorted({*audit.trained, *declined})
    tasks: list[tuple[list[DPEvent], Any]] = []
    index: dict[tuple[str, int], int] = {}
    for name in names:
        events: list[DPEvent] = []
        for i, (server_round, m) in enumerate(audit.trained.get(name, [])):
            missing = [k for k in _EVENT_KEYS if _num(m.get(k)) is None]
            if missing:
                audit.problems.append(
                    Problem(_where(audit, name, server_round),
                            f"the report lacks {', '.join(missing)}: this run's ε cannot be recomputed from here on")
                )
                break
            events.append(DPEvent(float(m["noise-multiplier"]), float(m["sample-rate"]), int(m["steps"])))
            index[(name, i)] = len(tasks)
            tasks.append((list(events), m["delta"]))
    results = recompute(tasks)
    for name in names:
        trained = audit.trained.get(name, [])
        eps_by_round = [results[index[(name, i)]] if (name, i) in index else None for i in range(len(trained))]
        audit.sites.append(_audit_site(audit, name, trained, eps_by_round, declined.get(name, [])))
    return audit


def _where(audit: RunAudit, name: str, server_round: Any) -> str:
    return f"site {name} round {server_round} (run {audit.run_id})"


def _audit_site(
    audit: RunAudit,
    name: str,
    trained: list[tuple[Any, dict[str, Any]]],
    eps_by_round: list[Epsilons | Exception | None],
    declined: list[tuple[Any, str]],
) -> dict[str, Any]:
    """Check one site's reported rounds against their recomputation; its summary for the report."""
    eps: Epsilons | None = None
    for (server_round, m), result in zip(trained, eps_by_round, strict=True):
        where = _where(audit, name, server_round)
        if isinstance(result, Exception):
            audit.problems.append(Problem(where, f"its ε cannot be recomputed ({result})"))
        if not isinstance(result, Epsilons):
            eps = None
            break
        eps = result
        differs = [
            f"{key} reported {_fmt(m.get(key), 6)}, recomputed {_fmt(value, 6)}"
            for key, value in (("run-epsilon-rdp", eps.rdp), ("run-epsilon-prv", eps.prv), ("run-epsilon", eps.sound))
            if not close(m.get(key), value)
        ]
        if differs:
            audit.problems.append(
                Problem(where, "the reported ε of this run does not match the ε recomputed from the run's reported "
                               "rounds (" + "; ".join(differs) + "); a round the site trained may be missing from "
                               "the report, or the numbers were altered")
            )
        if exceeds(eps.sound, m.get("max-epsilon")):
            audit.problems.append(
                Problem(where, f"budget breach: this run alone spends ε={eps.sound:.4f} (recomputed) > the site's "
                               f"max ε {_fmt(m.get('max-epsilon'))}")
            )
        cumulative = _num(m.get("epsilon"))
        if cumulative is None:
            audit.problems.append(Problem(where, "the report lacks the site's cumulative ε ('epsilon')"))
            continue
        if exceeds(cumulative, m.get("max-epsilon")):
            audit.problems.append(
                Problem(where, f"budget breach: the site's cumulative ε={cumulative:.4f} > its max ε "
                               f"{_fmt(m.get('max-epsilon'))}")
            )
        # Cumulative ε covers at least this run's rounds: RDP can only grow with more rounds;
        # the PRV upper bounds of the two histories may cross by up to PRV's error interval.
        cumulative_rdp = _num(m.get("epsilon-rdp"))
        low_rdp = cumulative_rdp is not None and eps.rdp > cumulative_rdp * (1 + BUDGET_TOL) + ABS_TOL
        if cumulative < eps.sound - PRV_EPS_ERROR - ABS_TOL or low_rdp:
            audit.problems.append(
                Problem(where, f"inconsistent: the site's cumulative ε ({cumulative:.4f}, RDP "
                               f"{_fmt(cumulative_rdp)}) is below the ε of this run alone "
                               f"({eps.sound:.4f}, RDP {eps.rdp:.4f})")
            )
    keys = list(dict.fromkeys(str(m["ledger-key"]) for _, m in trained if m.get("ledger-key")))
    if len(keys) > 1:
        audit.warnings.append(f"site {name} reported {len(keys)} different ledger keys in run {audit.run_id}")
    last = trained[-1][1] if trained else {}
    return {
        "site": name,
        "rounds_trained": [r for r, _ in trained],
        "rounds_declined": {str(r): reason for r, reason in declined},
        "privacy_unit": last.get("privacy-unit"),
        "noise_multiplier": _span([m.get("noise-multiplier") for _, m in trained]),
        "sample_rate": _span([m.get("sample-rate") for _, m in trained]),
        "steps": sum(int(m["steps"]) for _, m in trained if _num(m.get("steps")) is not None),
        "delta": _num(last.get("delta")),
        "epsilon_prv": eps.prv if eps else None,
        "epsilon_rdp": eps.rdp if eps else None,
        "epsilon": eps.sound if eps else None,
        "reported_run_epsilon": _num(last.get("run-epsilon")),
        "reported_epsilon": _num(last.get("epsilon")),
        "max_epsilon": _num(last.get("max-epsilon")),
        "ledger_key": keys[-1] if keys else None,
        "ledger_keys": keys,
    }


# -- both -------------------------------------------------------------------------------


def cross_check(ledger: LedgerAudit, run: RunAudit) -> tuple[list[Problem], list[str]]:
    """Every round the run report holds for this ledger's key must be the ledger's row, unchanged."""
    problems: list[Problem] = []
    warnings: list[str] = []
    by_seq = {row.seq: row for row in ledger.rows}
    ledger_sites = {str(row.site) for row in ledger.rows}
    named: set[int] = set()
    matched_sites: set[str] = set()
    for name, trained in sorted(run.trained.items()):
        for server_round, m in trained:
            where = f"site {name} round {server_round} (run {run.run_id})"
            key = m.get("ledger-key")
            if key != ledger.key:
                if name in ledger_sites:
                    problems.append(
                        Problem(where, f"the site reported ledger key {str(key)[:12]}…, but this ledger's key is "
                                       f"{ledger.key[:12]}…: the ledger or its key was replaced (or this is "
                                       "another site's ledger)")
                    )
                continue
            matched_sites.add(name)
            seq, digest = m.get("ledger-row"), m.get("ledger-hash")
            row = by_seq.get(seq) if isinstance(seq, int) else None
            if row is None:
                problems.append(
                    Problem(where, f"the report names ledger row {seq} (hash {str(digest)[:12]}…), but the ledger "
                                   f"has no row {seq}: the ledger was rolled back or replaced (or the report altered)")
                )
                continue
            named.add(row.seq)
            if row.hash != digest:
                problems.append(
                    Problem(where, f"the report names ledger row {seq} with hash {str(digest)[:12]}…, but the "
                                   f"ledger's {row.describe()} has hash {row.hash[:12]}…: the ledger was rolled "
                                   "back or replaced (or the report altered)")
                )
                continue
            if str(row.run_id) != run.run_id or row.server_round != server_round:
                problems.append(Problem(where, f"the report names ledger {row.describe()}, another run or round"))
            differs = [
                f"{label} {_fmt(m.get(key))} in the report, {_fmt(value)} in the ledger"
                for label, key, value in (
                    ("σ", "noise-multiplier", row.noise_multiplier), ("q", "sample-rate", row.sample_rate),
                    ("steps", "steps", row.steps), ("δ", "delta", row.delta),
                    ("ε", "epsilon", row.epsilon), ("ε RDP", "epsilon-rdp", row.epsilon_rdp),
                    ("ε PRV", "epsilon-prv", row.epsilon_prv),
                )
                if not close(m.get(key), value)
            ]
            if differs:
                problems.append(
                    Problem(where, f"the report and ledger {row.describe()} disagree: " + "; ".join(differs))
                )
    if not matched_sites:
        problems.append(
            Problem("run", f"no site in run {run.run_id} reported this ledger's key {ledger.key[:12]}…: it is "
                           "another run's or site's ledger, or it was replaced by one with another key")
        )
    for row in ledger.rows:
        if str(row.run_id) == run.run_id and str(row.site) in matched_sites and row.seq not in named:
            warnings.append(
                f"{row.describe()} is not in the run report: the site trained a round the coordinator did not "
                "record (its ε counts anyway)"
            )
    return problems, warnings


# -- output ----------------------------------------------------------------------------


def _console():  # type: ignore[no-untyped-def]
    import sys

    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _print_lines(console, title: str, lines: list[str], style: str) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape

    if not lines:
        return
    console.print(f"[bold {style}]{title}[/]")
    for line in lines:
        console.print(f"  [{style}]•[/] {escape(line)}", soft_wrap=True)


def print_ledger(audit: LedgerAudit, console) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape
    from rich.table import Table

    def status(ok: bool, good: str, bad: str) -> str:
        return f"[green]{good}[/]" if ok else f"[red]{bad}[/]"

    console.print(f"[bold]Ledger[/] {escape(str(audit.path))}", soft_wrap=True)
    console.print(f"[bold]Key[/]    {audit.key}  ({escape(audit.key_source)})", soft_wrap=True)
    for notice in audit.notices:
        console.print(f"[yellow]Notice:[/] {escape(notice)}", soft_wrap=True)
    n = len(audit.rows)
    console.print(
        "Chain, signatures, seal: "
        + status(audit.chain_problems == 0, f"intact ({n} rows)", f"BROKEN ({_count(audit.chain_problems, 'problem')})")
    )
    console.print(
        "ε recomputed per row:    "
        + status(audit.mismatches == 0, f"all {n} match", f"{audit.mismatches} of {n} do NOT match")
    )
    console.print(
        "Budget (max ε):          "
        + status(audit.breaches == 0, "never exceeded", f"EXCEEDED in {_count(audit.breaches, 'row')}")
    )
    if audit.datasets:
        table = Table(title="Privacy spent per dataset (ε recomputed from the ledger)", title_justify="left")
        for column in ("dataset", "site", "rounds", "runs", "σ", "q", "steps", "δ", "ε PRV", "ε RDP",
                       "ε recorded", "max ε", "left"):
            table.add_column(column, justify="left" if column in ("dataset", "site") else "right")
        for d in audit.datasets:
            left = d["budget_left"]
            table.add_row(
                d["short"], escape(", ".join(d["sites"])), str(d["rounds"]), str(d["runs"]),
                _fmt_span(d["noise_multiplier"]), _fmt_span(d["sample_rate"]), str(d["steps"]),
                _fmt(d["delta"]), _fmt(d["epsilon_prv"]), _fmt(d["epsilon_rdp"]), _fmt(d["recorded_epsilon"]),
                _fmt(d["max_epsilon"]), "—" if left is None else (f"[red]{left:.4f}[/]" if left < 0 else f"{left:.4f}"),
            )
        console.print(table)
    else:
        console.print("The ledger holds no rows: no DP round was ever recorded.")


def print_run(audit: RunAudit, console) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]Run[/] {escape(audit.run_id)}  ({escape(str(audit.path))})", soft_wrap=True)
    table = Table(title="Privacy spent per site in this run (ε recomputed from the reported rounds)",
                  title_justify="left")
    for column in ("site", "trained", "declined", "σ", "q", "steps", "δ", "ε PRV", "ε RDP", "ε reported",
                   "cumulative ε", "max ε", "ledger key"):
        table.add_column(column, justify="left" if column in ("site", "ledger key") else "right")
    for s in audit.sites:
        table.add_row(
            escape(s["site"]), str(len(s["rounds_trained"])), str(len(s["rounds_declined"])),
            _fmt_span(s["noise_multiplier"]), _fmt_span(s["sample_rate"]), str(s["steps"]), _fmt(s["delta"]),
            _fmt(s["epsilon_prv"]), _fmt(s["epsilon_rdp"]), _fmt(s["reported_run_epsilon"]),
            _fmt(s["reported_epsilon"]), _fmt(s["max_epsilon"]),
            escape((s["ledger_key"] or "—")[:12]),
        )
    console.print(table)
    _print_lines(
        console, "Declined rounds",
        [f"site {s['site']} round {r}: {reason}" for s in audit.sites for r, reason in s["rounds_declined"].items()],
        "cyan",
    )


# -- the command -------------------------------------------------------------------------


@cli.command()
def audit(
    ledger: Annotated[
        Path | None,
        typer.Option(help="A site's ledger.sqlite, its privacy folder or its work folder."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", help="The site's public key as you pinned it (site-key.pub, PEM)."),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(help="A run folder <workdir>/runs/<run-id> (or its report.json)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> int:
    """Verify a site's privacy ledger and/or a run's privacy report, recomputing every ε.

    --ledger: hash chain, signatures and seal (pin the site's key with --public-key), every row's
    ε recomputed by RDP and PRV and compared with the recorded one, every row within max ε.
    --run: every site's ε of the run recomputed from its reported rounds and checked against its
    budget. Both: every round the run names must be in the ledger, unchanged.

    Exit 0 when everything verifies, 6 on any problem (each printed, naming its row or site and
    round), 3 when a file cannot be read, 2 on usage errors.
    """
    if ledger is None and run is None:
        raise click.UsageError("pass --ledger PATH, --run RUN_DIR or both")
    if public_key is not None and ledger is None:
        raise click.UsageError("--public-key goes with --ledger")
    ledger_audit = audit_ledger(ledger, public_key=public_key) if ledger is not None else None
    run_audit = audit_run(run) if run is not None else None
    cross: tuple[list[Problem], list[str]] = ([], [])
    if ledger_audit is not None and run_audit is not None:
        cross = cross_check(ledger_audit, run_audit)
    problems = [
        *(ledger_audit.problems if ledger_audit else []),
        *(run_audit.problems if run_audit else []),
        *cross[0],
    ]
    warnings = [
        *(ledger_audit.warnings if ledger_audit else []),
        *(run_audit.warnings if run_audit else []),
        *cross[1],
    ]
    if json_output:
        if ledger_audit is None:
            doc: dict[str, Any] = run_audit.to_json() if run_audit else {}
        else:
            doc = ledger_audit.to_json()
            if run_audit is not None:
                doc["run"] = run_audit.to_json()
                doc["cross_check"] = {"problems": [{"where": p.where, "what": p.what} for p in cross[0]],
                                      "warnings": cross[1]}
        doc["verified"] = not problems
        doc["problems"] = [{"where": p.where, "what": p.what} for p in problems]
        doc["warnings"] = warnings
        print(json.dumps(_finite(doc), indent=2, allow_nan=False))
    else:
        console = _console()
        if ledger_audit is not None:
            print_ledger(ledger_audit, console)
        if run_audit is not None:
            if ledger_audit is not None:
                console.print()
            print_run(run_audit, console)
        if ledger_audit is not None and run_audit is not None:
            console.print(
                "Cross-check with the run: "
                + ("[green]every round the run names is in the ledger, unchanged[/]" if not cross[0]
                   else f"[red]{_count(len(cross[0]), 'problem')}[/]")
            )
        _print_lines(console, "Warnings", warnings, "yellow")
        _print_lines(console, "Problems", [str(p) for p in problems], "red")
        console.print("[bold green]VERIFIED[/]" if not problems else f"[bold red]FAILED[/]: {_count(len(problems), 'problem')}")
    if problems:
        raise AuditFailed(f"audit failed with {_count(len(problems), 'problem')}; the first: {problems[0]}")
    return 0


def main() -> None:
    run_typer(cli, prog_name="fl-audit")


if __name__ == "__main__":
    main()
