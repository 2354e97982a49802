"""The run report: ``runs/<run-id>/report.json`` plus a readable ``report.md``.

Rewritten atomically after every round, so a crashed run still leaves a valid report of the rounds it
finished: pooled and per-site metrics and each site's ε — numbers only, never an image, a label or a patient
id. Binary runs also hold, per round, the threshold chosen on the pooled statistics (with the rates there)
and whether the run is learning (:mod:`server.app.learning`); a flag becomes a ``warnings`` entry and a line
atop ``report.md``. When the run ends, :meth:`RunReport.finish` draws the PNG plots (:mod:`server.app.plots`)
and lists them under ``"plots"``; a plot that cannot be drawn costs a warning, never the run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import YOUDEN, parse_operating_point
from common.errors import ConfigError
from common.files import json_safe, write_atomic
from common.metrics import SENSITIVITY_AT_THRESHOLD, SPECIFICITY_AT_THRESHOLD, THRESHOLD, describe_operating_point
from common.runfolder import RunFolder
from server.app.learning import FLAGGED
from server.app.plots import PLOT_TITLES, write_plots

log = logging.getLogger(__name__)

#: What ``sites`` holds of each site's latest round (its metric key; ``-`` becomes ``_`` in the report).
_SITE_KEYS = ("epsilon", "epsilon-rdp", "epsilon-prv", "run-epsilon", "delta", "max-epsilon", "privacy-unit",
              "ledger-key")


@dataclass
class RunReport:
    """Everything the coordinator learns in a run, round by round."""

    run_dir: Path
    run_id: int
    config: dict[str, Any]
    transport: str
    started: float = field(default_factory=time.time)
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "running"
    finished: float | None = None
    kind: str = "deployment"
    """"deployment" (fl-server) or "simulation" (fl-sim); shown in the report."""
    plots: list[str] = field(default_factory=list)
    """PNG files :meth:`finish` drew next to the report (names relative to ``run_dir``)."""
    resumes: list[dict[str, Any]] = field(default_factory=list)
    """One entry per ``fl-server --resume``: when, from which round, and what was discarded."""

    @classmethod
    def load(cls, run_dir: Path, *, keep_rounds: int) -> RunReport:
        """The report of an interrupted run, with the rounds up to ``keep_rounds`` (later ones are redone)."""
        data = load_report(run_dir)
        rounds = {int(r["round"]): r for r in data.get("rounds", [])}
        report = cls(
            run_dir=run_dir, run_id=data["run_id"], config=dict(data.get("config", {})),
            transport=str(data.get("transport", "")), started=float(data.get("started") or time.time()),
            rounds={r: v for r, v in rounds.items() if r <= keep_rounds}, kind=str(data.get("kind", "deployment")),
            resumes=list(data.get("resumes", [])),
        )
        for r in sorted(report.rounds):  # per-site totals, from the rounds kept
            train = report.rounds[r].get("train", {})
            report._count_sites(train.get("sites", {}), train.get("declined", {}), train.get("rejected_sites", {}))
        discarded = sorted(r for r in rounds if r > keep_rounds)
        report.resumes.append({"at": time.time(), "from_round": keep_rounds + 1,
                               "discarded_rounds": discarded, "previous_status": data.get("status")})
        return report

    def round(self, server_round: int) -> dict[str, Any]:
        """The entry of round ``server_round`` in :attr:`rounds`, created as ``{"round": server_round}`` if new."""
        return self.rounds.setdefault(server_round, {"round": server_round})

    def record_train(
        self, server_round: int, *, site_metrics: dict[str, dict[str, Any]], declined: dict[str, str],
        checkpoint: Path | None, failed: dict[str, str] | None = None, rejected: dict[str, str] | None = None,
        rejected_metrics: dict[str, dict[str, Any]] | None = None, aggregation: str | None = None,
    ) -> None:
        """Book a round's training (its ``train`` entry, replacing any earlier one), update the per-site totals, save.

        Parameters
        ----------
        server_round
            The round trained.
        site_metrics
            Site name → example count and privacy facts (ε, δ, σ, ledger row...) of each site in the aggregate
            (:attr:`server.app.strategy.RoundBook.site_metrics`); empty when no aggregate was made.
        declined, failed, rejected
            Site name → why it declined (its budget), did not train (deadline, lost connection, SecAgg+
            dropout) or had its update rejected by screening; ``None``: none.
        checkpoint
            The round's checkpoint inside :attr:`run_dir` (stored relative to it); ``None``: no new weights.
        rejected_metrics
            The privacy facts of rejected sites that trained (they spent ε all the same); ``None``: none.
        aggregation
            ``fedavg``, ``trimmed-mean`` or ``median``; ``None`` leaves it out (no aggregate, or SecAgg+).
        """
        entry = self.round(server_round)
        entry["train"] = {"sites": site_metrics, "declined": declined, "failed": failed or {},
                          "rejected": rejected or {}, "rejected_sites": rejected_metrics or {}}
        if aggregation:
            entry["train"]["aggregation"] = aggregation
        entry["trained_at"] = time.time()  # wall clock (s since the epoch) when the round's aggregate was ready
        if checkpoint is not None:
            entry["checkpoint"] = str(checkpoint.relative_to(self.run_dir))
        self._count_sites(site_metrics, declined, rejected_metrics or {})
        self.save()

    def record_attempt(self, server_round: int, *, reason: str, failed: dict[str, str], rejected: dict[str, str],
                       declined: dict[str, str], trained: list[str]) -> None:
        """Append a try of a round that fell short of ``min-sites`` (retried, or the run stopped) to its ``attempts``.

        Parameters
        ----------
        server_round
            The round tried.
        reason
            Why the try fell short, one line with the counts and each failed or rejected site.
        failed, rejected, declined
            Site name → why it did not answer, had its update rejected, or declined (its privacy budget).
        trained
            Names of the sites whose update passed screening (stored sorted).
        """
        entry = self.round(server_round)
        entry.setdefault("attempts", []).append({
            "at": time.time(), "reason": reason, "trained": sorted(trained), "failed": failed,
            "rejected": rejected, "declined": declined,
        })
        self.save()

    def _count_sites(self, site_metrics: dict[str, dict[str, Any]], declined: dict[str, str],
                     rejected: dict[str, dict[str, Any]]) -> None:
        for name, metrics in [*site_metrics.items(), *rejected.items()]:
            site = self.sites.setdefault(name, {})
            site.update({k.replace("-", "_"): metrics.get(k) for k in _SITE_KEYS},
                        rounds_trained=site.get("rounds_trained", 0) + (name in site_metrics))
            if name in rejected:
                site["rounds_rejected"] = site.get("rounds_rejected", 0) + 1
        for name in declined:
            site = self.sites.setdefault(name, {})
            site["rounds_declined"] = site.get("rounds_declined", 0) + 1

    def record_evaluate(self, server_round: int, *, pooled: dict[str, float], per_site: dict[str, dict[str, float]]) -> None:
        """Book a round's federated evaluation (its ``evaluate`` entry, with the wall-clock time) and save.

        Parameters
        ----------
        server_round
            The round whose global weights were evaluated.
        pooled
            Metrics of the answering sites' summed statistics (:func:`common.metrics.pooled_metrics`, ``eval-loss``).
        per_site
            Site name → the same metrics from that site's statistics alone.
        """
        entry = self.round(server_round)
        entry["evaluate"] = {"pooled": pooled, "sites": per_site}
        entry["evaluated_at"] = time.time()
        self.save()

    def record_learning(self, server_round: int, verdict: dict[str, Any]) -> None:
        """Book :mod:`server.app.learning`'s verdict on an evaluated round."""
        self.round(server_round)["learning"] = verdict
        self.save()

    def finish(self, status: str) -> None:
        """Set the final status, save, draw the plots and save again with their names.

        The report is complete before any plot is drawn; a plot that fails costs one warning and leaves
        ``"plots"`` empty (and no PNG half-written).
        """
        self.status = status
        self.finished = time.time()
        self.save()
        try:
            self.plots = write_plots(self.run_dir, self.to_json())
        except Exception as exc:  # plots are a convenience: the run's outcome is not theirs
            self.plots = []
            log.warning("Could not draw the run's plots (%s: %s); report.json and report.md are complete",
                        type(exc).__name__, exc)
            log.debug("Plot failure", exc_info=True)
        self.save()

    def to_json(self) -> dict[str, Any]:
        """The report as ``report.json`` holds it (strict JSON: NaN and ±inf become null)."""
        return json_safe({
            "run_id": self.run_id, "kind": self.kind, "status": self.status, "transport": self.transport,
            "started": self.started, "finished": self.finished,
            "wall_seconds": (self.finished or time.time()) - self.started, "config": self.config,
            "rounds": [self.rounds[r] for r in sorted(self.rounds)], "sites": self.sites,
            "final": self.final_metrics(), "learning": self.learning(), "warnings": learning_warnings(self.rounds),
            "plots": list(self.plots), "resumes": list(self.resumes),
        })

    def final_metrics(self) -> dict[str, Any]:
        """The pooled metrics of the last evaluated round, with its ``round``; ``{}`` before the first evaluation."""
        last = max((r for r in self.rounds if "evaluate" in self.rounds[r]), default=None)
        return {} if last is None else {"round": last, **self.rounds[last]["evaluate"]["pooled"]}

    def learning(self) -> dict[str, Any]:
        """The latest verdict on whether the run is learning (``{}`` before the first)."""
        judged = [r for r in sorted(self.rounds) if "learning" in self.rounds[r]]
        return dict(self.rounds[judged[-1]]["learning"]) if judged else {}

    def save(self) -> None:
        """Rewrite ``report.json`` and ``report.md`` in :attr:`run_dir`, each atomically."""
        data, folder = self.to_json(), RunFolder(self.run_dir)
        write_atomic(folder.report_json, json.dumps(data, indent=2))
        write_atomic(folder.report_md, render_markdown(data))


def learning_warnings(rounds: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per round where the learning verdict turned to a flag (``not-learning``, ``below-chance``)."""
    out: list[dict[str, Any]] = []
    previous = None
    for r in sorted(rounds):
        verdict = rounds[r].get("learning")
        if not verdict:
            continue
        status = verdict.get("status")
        if status in FLAGGED and status != previous:
            out.append({"round": r, "status": status, "message": verdict.get("message", "")})
        previous = status
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:{spec}}"
    return str(value)


def _row(*cells: Any) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def render_markdown(report: dict[str, Any]) -> str:
    """A short human-readable report from ``report.json`` data."""
    lines = [
        f"# fedrad run {report['run_id']}",
        "",
        f"- kind: {report.get('kind', 'deployment')}",
        f"- status: **{report['status']}**",
        f"- transport: {report['transport']}",
        f"- wall time: {report['wall_seconds']:.0f} s",
        *_final_line(report),
        *_warning_lines(report),
        "",
        "## Pooled validation metrics per round",
        "",
        (
            "Sensitivity, specificity, precision, F1 and accuracy at threshold 0.5 (more than two classes: of the "
            "most probable class, macro-averaged); for two classes also the threshold the coordinator chose on the "
            f"pooled validation statistics ({_method(report)}) and the sensitivity and specificity there."
        ),
        "",
        "| round | AUROC | sensitivity | specificity | threshold | sensitivity @ threshold | specificity @ threshold "
        "| precision | F1 | accuracy | sites trained | declined |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    pooled = ("auroc", "sensitivity", "specificity", THRESHOLD, SENSITIVITY_AT_THRESHOLD, SPECIFICITY_AT_THRESHOLD,
              "precision", "f1", "accuracy")
    for r in report["rounds"]:
        p, t = r.get("evaluate", {}).get("pooled", {}), r.get("train", {})
        lines.append(_row(r["round"], *(_fmt(p.get(k)) for k in pooled), len(t.get("sites", {})),
                          ", ".join(sorted(t.get("declined", {}))) or "–"))
    lines += _per_site_validation(report)
    lines += [
        "",
        "## Privacy spent per site (as reported by each site; verify with `fl-audit`)",
        "",
        (
            "ε is cumulative over every run on the site's dataset (min of the RDP and PRV bounds); "
            "the run's share is what this run alone spent."
        ),
        "",
        "| site | unit | ε | ε RDP | ε PRV | this run | δ | max ε | rounds trained | declined |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in sorted(report["sites"].items()):
        lines.append(_row(name, s.get("privacy_unit") or "–",
                          *(_fmt(s.get(k)) for k in ("epsilon", "epsilon_rdp", "epsilon_prv", "run_epsilon")),
                          _fmt(s.get("delta"), "g"), _fmt(s.get("max_epsilon")), s.get("rounds_trained", 0),
                          s.get("rounds_declined", 0)))
    if report.get("plots"):
        lines += ["", "## Plots", ""]
        for name in report["plots"]:
            lines += [f"![{PLOT_TITLES.get(name, name)}]({name})", ""]
        lines.pop()
    return "\n".join(lines) + "\n"


def _method(report: dict[str, Any]) -> str:
    """The run's ``operating-point`` in words (Youden's J by default)."""
    try:
        return describe_operating_point(parse_operating_point(report.get("config", {}).get("operating-point", YOUDEN)))
    except ConfigError:
        return f"operating-point {report['config']['operating-point']!r}"


def _final_line(report: dict[str, Any]) -> list[str]:
    """The last evaluated round in one line: AUROC, the rates at 0.5 and at the chosen threshold."""
    final = report.get("final") or {}
    if not final:
        return []
    line = (f"- final (round {final['round']}): AUROC {_fmt(final.get('auroc'))}; at threshold 0.5 sensitivity "
            f"{_fmt(final.get('sensitivity'))}, specificity {_fmt(final.get('specificity'))}")
    if final.get(THRESHOLD) is not None:
        line += (f"; at threshold {final[THRESHOLD]:g} ({_method(report)}) sensitivity "
                 f"{_fmt(final.get(SENSITIVITY_AT_THRESHOLD))}, specificity {_fmt(final.get(SPECIFICITY_AT_THRESHOLD))}")
    return [line]


def _warning_lines(report: dict[str, Any]) -> list[str]:
    """A visible line per learning warning, and whether the run has recovered since."""
    warnings = report.get("warnings") or []
    if not warnings:
        return []
    lines = [line for w in warnings for line in ("", f"> **Warning:** {w['message']}")]  # one quote block each
    latest = report.get("learning") or {}
    if latest.get("status") not in FLAGGED:
        lines += ["", f"> Since then: {latest.get('message', '')}"]
    return lines


def _examples(metrics: dict[str, Any]) -> Any:
    """Validation examples of a site: ``examples`` (multi-class) or positives + negatives (binary)."""
    if metrics.get("examples") is not None:
        return int(metrics["examples"])
    if metrics.get("positives") is not None and metrics.get("negatives") is not None:
        return int(metrics["positives"]) + int(metrics["negatives"])
    return None


def _per_site_validation(report: dict[str, Any]) -> list[str]:
    """The "Per-site validation metrics" section: each site's metrics in the last evaluated round."""
    lines = ["", "## Per-site validation metrics (last evaluated round)", ""]
    evaluated = [r for r in report["rounds"] if "evaluate" in r]
    if not evaluated:
        return [*lines, "No round evaluated yet."]
    last = evaluated[-1]
    sites = last["evaluate"].get("sites") or {}
    if not sites:
        return [*lines, f"Round {last['round']}: no per-site metrics."]
    examples = {name: _examples(m or {}) for name, m in sites.items()}
    with_examples = any(v is not None for v in examples.values())
    lines += [
        f"Round {last['round']}.",
        "",
        "| site | AUROC | sensitivity | specificity |" + (" examples |" if with_examples else ""),
        "| --- | --- | --- | --- |" + (" --- |" if with_examples else ""),
    ]
    for name, m in sorted(sites.items()):
        cells = [_fmt((m or {}).get(k)) for k in ("auroc", "sensitivity", "specificity")]
        lines.append(_row(name, *cells, *([_fmt(examples[name])] if with_examples else [])))
    return lines


def load_report(run_dir: Path) -> dict[str, Any]:
    """Read ``report.json`` of a finished or running run."""
    return RunFolder(run_dir).read_report()
