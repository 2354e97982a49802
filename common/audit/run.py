"""A run report audited: every site's ε of the run recomputed, and checked against a site's ledger."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import records as rec
from common.audit.ledger import LedgerAudit
from common.audit.recompute import ABS_TOL, BUDGET_TOL, close, exceeds, fmt, number, recompute, span
from common.errors import DataError
from common.ledger import Problem
from common.privacy import PRV_EPS_ERROR, DPEvent, Epsilons
from common.runfolder import RunFolder

_EVENT_KEYS = (rec.NOISE_MULTIPLIER, rec.SAMPLE_RATE, rec.STEPS, rec.DELTA)


@dataclass(frozen=True)
class RunAudit:
    """What ``fl-audit --run`` found."""

    path: Path
    run_id: str
    report: dict[str, Any]
    problems: tuple[Problem, ...]
    warnings: tuple[str, ...]
    sites: tuple[dict[str, Any], ...]
    trained: dict[str, list[tuple[Any, dict[str, Any]]]]  # site → (round, metrics) of every round it trained

    @property
    def verified(self) -> bool:
        """Whether the audit found no problem."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The audit as ``fl-audit --run --json`` prints it."""
        return {
            "run": str(self.path), "run_id": self.run_id, "verified": self.verified,
            "problems": [asdict(p) for p in self.problems], "warnings": list(self.warnings),
            "sites": list(self.sites),
        }


def load_run_report(path: Path) -> tuple[Path, dict[str, Any]]:
    """``(file, report)`` of a run folder (or its report.json), or a one-line error."""
    path = Path(path)
    file = RunFolder(path).report_json if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"No run report at {file}; pass a run folder <workdir>/runs/<run-id>")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"Cannot read the run report {file} ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise DataError(f"{file} is not a fedrad run report (it has no list of rounds)")
    return file, data


def _where(run_id: str, name: str, server_round: Any) -> str:
    return f"site {name} round {server_round} (run {run_id})"


def _dict(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def audit_run(path: Path) -> RunAudit:
    """Recompute every site's run ε from the report's per-round events and check its budget claims."""
    file, report = load_run_report(path)
    run_id = str(report.get("run_id"))
    problems: list[Problem] = []
    warnings: list[str] = []
    trained: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    declined: dict[str, list[tuple[Any, str]]] = {}
    for entry in report["rounds"]:
        if not isinstance(entry, dict):
            continue
        server_round = entry.get("round")
        train = _dict(entry.get("train"))
        # A rejected update was trained all the same: its round counts for the site's ε.
        for name, metrics in [*_dict(train.get("sites")).items(), *_dict(train.get("rejected_sites")).items()]:
            if isinstance(metrics, dict):
                trained.setdefault(str(name), []).append((server_round, metrics))
        for name, reason in _dict(train.get("declined")).items():
            declined.setdefault(str(name), []).append((server_round, str(reason)))
        for node, reason in _dict(train.get("failed")).items():
            warnings.append(f"round {server_round}: {node} failed to train ({reason})")

    # Every trained round's run ε, from the site's reported rounds of this run up to it.
    names = sorted({*trained, *declined})
    tasks: list[tuple[list[DPEvent], Any]] = []
    index: dict[tuple[str, int], int] = {}
    for name in names:
        events: list[DPEvent] = []
        for i, (server_round, m) in enumerate(trained.get(name, [])):
            missing = [k for k in _EVENT_KEYS if number(m.get(k)) is None]
            if missing:
                problems.append(
                    Problem(_where(run_id, name, server_round),
                            f"the report lacks {', '.join(missing)}: this run's ε cannot be recomputed from here on")
                )
                break
            events.append(DPEvent(float(m[rec.NOISE_MULTIPLIER]), float(m[rec.SAMPLE_RATE]), int(m[rec.STEPS])))
            index[(name, i)] = len(tasks)
            tasks.append((list(events), m[rec.DELTA]))
    results = recompute(tasks)
    sites = []
    for name in names:
        rounds = trained.get(name, [])
        eps_by_round = [results[index[(name, i)]] if (name, i) in index else None for i in range(len(rounds))]
        site = _audit_site(run_id, name, rounds, eps_by_round, declined.get(name, []), problems)
        if len(site["ledger_keys"]) > 1:
            warnings.append(f"site {name} reported {len(site['ledger_keys'])} different ledger keys in run {run_id}")
        sites.append(site)
    return RunAudit(path=file.parent, run_id=run_id, report=report, problems=tuple(problems),
                    warnings=tuple(warnings), sites=tuple(sites), trained=trained)


def _audit_site(
    run_id: str, name: str, trained: list[tuple[Any, dict[str, Any]]], eps_by_round: list[Epsilons | Exception | None],
    declined: list[tuple[Any, str]], problems: list[Problem],
) -> dict[str, Any]:
    """Check one site's reported rounds against their recomputation (adding to ``problems``); its summary."""
    eps: Epsilons | None = None
    for (server_round, m), result in zip(trained, eps_by_round, strict=True):
        where = _where(run_id, name, server_round)
        if isinstance(result, Exception):
            problems.append(Problem(where, f"its ε cannot be recomputed ({result})"))
        if not isinstance(result, Epsilons):
            eps = None
            break
        eps = result
        differs = [
            f"{key} reported {fmt(m.get(key), 6)}, recomputed {fmt(value, 6)}"
            for key, value in (
                (rec.RUN_EPSILON_RDP, eps.rdp), (rec.RUN_EPSILON_PRV, eps.prv), (rec.RUN_EPSILON, eps.sound)
            )
            if not close(m.get(key), value)
        ]
        if differs:
            problems.append(
                Problem(where, "the reported ε of this run does not match the ε recomputed from the run's reported "
                               "rounds (" + "; ".join(differs) + "); a round the site trained may be missing from "
                               "the report, or the numbers were altered")
            )
        if exceeds(eps.sound, m.get(rec.MAX_EPSILON)):
            problems.append(
                Problem(where, f"budget breach: this run alone spends ε={eps.sound:.4f} (recomputed) > the site's "
                               f"max ε {fmt(m.get(rec.MAX_EPSILON))}")
            )
        cumulative = number(m.get(rec.EPSILON))
        if cumulative is None:
            problems.append(Problem(where, "the report lacks the site's cumulative ε ('epsilon')"))
            continue
        if exceeds(cumulative, m.get(rec.MAX_EPSILON)):
            problems.append(
                Problem(where, f"budget breach: the site's cumulative ε={cumulative:.4f} > its max ε "
                               f"{fmt(m.get(rec.MAX_EPSILON))}")
            )
        # Cumulative ε covers at least this run's rounds: RDP can only grow with more rounds;
        # the PRV upper bounds of the two histories may cross by up to PRV's error interval.
        cumulative_rdp = number(m.get(rec.EPSILON_RDP))
        low_rdp = cumulative_rdp is not None and eps.rdp > cumulative_rdp * (1 + BUDGET_TOL) + ABS_TOL
        if cumulative < eps.sound - PRV_EPS_ERROR - ABS_TOL or low_rdp:
            problems.append(
                Problem(where, f"inconsistent: the site's cumulative ε ({cumulative:.4f}, RDP "
                               f"{fmt(cumulative_rdp)}) is below the ε of this run alone "
                               f"({eps.sound:.4f}, RDP {eps.rdp:.4f})")
            )
    keys = list(dict.fromkeys(str(m[rec.LEDGER_KEY]) for _, m in trained if m.get(rec.LEDGER_KEY)))
    last = trained[-1][1] if trained else {}
    return {
        "site": name, "rounds_trained": [r for r, _ in trained],
        "rounds_declined": {str(r): reason for r, reason in declined}, "privacy_unit": last.get(rec.PRIVACY_UNIT),
        "noise_multiplier": span([m.get(rec.NOISE_MULTIPLIER) for _, m in trained]),
        "sample_rate": span([m.get(rec.SAMPLE_RATE) for _, m in trained]),
        "steps": sum(int(m[rec.STEPS]) for _, m in trained if number(m.get(rec.STEPS)) is not None),
        "delta": number(last.get(rec.DELTA)), "epsilon_prv": eps.prv if eps else None,
        "epsilon_rdp": eps.rdp if eps else None, "epsilon": eps.sound if eps else None,
        "reported_run_epsilon": number(last.get(rec.RUN_EPSILON)), "reported_epsilon": number(last.get(rec.EPSILON)),
        "max_epsilon": number(last.get(rec.MAX_EPSILON)), "ledger_key": keys[-1] if keys else None, "ledger_keys": keys,
    }


def cross_check(ledger: LedgerAudit, run: RunAudit) -> tuple[list[Problem], list[str]]:
    """Every round the run report holds for this ledger's key must be the ledger's row, unchanged.

    ``(problems, warnings)``: the warnings name ledger rows of the run that the report lacks.
    """
    problems: list[Problem] = []
    warnings: list[str] = []
    by_seq = {row.seq: row for row in ledger.rows}
    ledger_sites = {str(row.site) for row in ledger.rows}
    named: set[int] = set()
    matched_sites: set[str] = set()
    for name, trained in sorted(run.trained.items()):
        for server_round, m in trained:
            where = _where(run.run_id, name, server_round)
            key = m.get(rec.LEDGER_KEY)
            if key != ledger.key:
                if name in ledger_sites:
                    problems.append(
                        Problem(where, f"the site reported ledger key {str(key)[:12]}…, but this ledger's key is "
                                       f"{ledger.key[:12]}…: the ledger or its key was replaced (or this is "
                                       "another site's ledger)")
                    )
                continue
            matched_sites.add(name)
            seq, digest = m.get(rec.LEDGER_ROW), m.get(rec.LEDGER_HASH)
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
                f"{label} {fmt(m.get(key))} in the report, {fmt(value)} in the ledger"
                for label, key, value in (
                    ("σ", rec.NOISE_MULTIPLIER, row.noise_multiplier), ("q", rec.SAMPLE_RATE, row.sample_rate),
                    ("steps", rec.STEPS, row.steps), ("δ", rec.DELTA, row.delta), ("ε", rec.EPSILON, row.epsilon),
                    ("ε RDP", rec.EPSILON_RDP, row.epsilon_rdp), ("ε PRV", rec.EPSILON_PRV, row.epsilon_prv),
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
