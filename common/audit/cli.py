"""``fl-audit``, the privacy officer's command: a site's ledger and a run's report audited, as tables or JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.audit.ledger import LedgerAudit, audit_ledger
from common.audit.recompute import fmt
from common.audit.run import RunAudit, audit_run, cross_check
from common.cli import run_typer
from common.errors import AuditFailed
from common.files import json_safe
from common.ledger import Problem

cli = typer.Typer(add_completion=False)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt_span(span: dict[str, float | None]) -> str:
    lo, hi = span["min"], span["max"]
    if lo is None or hi is None:
        return "—"
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}–{hi:.4g}"


def _print_lines(console: Console, title: str, lines: list[str], style: str) -> None:
    if not lines:
        return
    console.print(f"[bold {style}]{title}[/]")
    for line in lines:
        console.print(f"  [{style}]•[/] {escape(line)}", soft_wrap=True)


def _table(title: str, columns: tuple[str, ...], left: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table


def print_ledger(audit: LedgerAudit, console: Console) -> None:
    """What ``fl-audit --ledger`` prints: the key, the three verdicts and ε spent per dataset."""
    console.print(f"[bold]Ledger[/] {escape(str(audit.path))}", soft_wrap=True)
    console.print(f"[bold]Key[/]    {audit.key}  ({escape(audit.key_source)})", soft_wrap=True)
    for notice in audit.notices:
        console.print(f"[yellow]Notice:[/] {escape(notice)}", soft_wrap=True)
    n = len(audit.rows)
    for label, ok, good, bad in (
        ("Chain, signatures, seal: ", audit.chain_problems == 0, f"intact ({n} rows)",
         f"BROKEN ({_count(audit.chain_problems, 'problem')})"),
        ("ε recomputed per row:    ", audit.mismatches == 0, f"all {n} match", f"{audit.mismatches} of {n} do NOT match"),
        ("Budget (max ε):          ", audit.breaches == 0, "never exceeded", f"EXCEEDED in {_count(audit.breaches, 'row')}"),
    ):
        console.print(label + (f"[green]{good}[/]" if ok else f"[red]{bad}[/]"))
    if not audit.datasets:
        console.print("The ledger holds no rows: no DP round was ever recorded.")
        return
    table = _table("Privacy spent per dataset (ε recomputed from the ledger)",
                   ("dataset", "site", "rounds", "runs", "σ", "q", "steps", "δ", "ε PRV", "ε RDP", "ε recorded",
                    "max ε", "left"), ("dataset", "site"))
    for d in audit.datasets:
        left = d["budget_left"]
        table.add_row(
            d["short"], escape(", ".join(d["sites"])), str(d["rounds"]), str(d["runs"]),
            _fmt_span(d["noise_multiplier"]), _fmt_span(d["sample_rate"]), str(d["steps"]),
            fmt(d["delta"]), fmt(d["epsilon_prv"]), fmt(d["epsilon_rdp"]), fmt(d["recorded_epsilon"]),
            fmt(d["max_epsilon"]), "—" if left is None else (f"[red]{left:.4f}[/]" if left < 0 else f"{left:.4f}"),
        )
    console.print(table)


def print_run(audit: RunAudit, console: Console) -> None:
    """What ``fl-audit --run`` prints: ε spent per site in the run, and the rounds sites declined."""
    console.print(f"[bold]Run[/] {escape(audit.run_id)}  ({escape(str(audit.path))})", soft_wrap=True)
    table = _table("Privacy spent per site in this run (ε recomputed from the reported rounds)",
                   ("site", "trained", "declined", "σ", "q", "steps", "δ", "ε PRV", "ε RDP", "ε reported",
                    "cumulative ε", "max ε", "ledger key"), ("site", "ledger key"))
    for s in audit.sites:
        table.add_row(
            escape(s["site"]), str(len(s["rounds_trained"])), str(len(s["rounds_declined"])),
            _fmt_span(s["noise_multiplier"]), _fmt_span(s["sample_rate"]), str(s["steps"]), fmt(s["delta"]),
            fmt(s["epsilon_prv"]), fmt(s["epsilon_rdp"]), fmt(s["reported_run_epsilon"]),
            fmt(s["reported_epsilon"]), fmt(s["max_epsilon"]), escape((s["ledger_key"] or "—")[:12]),
        )
    console.print(table)
    _print_lines(
        console, "Declined rounds",
        [f"site {s['site']} round {r}: {reason}" for s in audit.sites for r, reason in s["rounds_declined"].items()],
        "cyan",
    )


@cli.command()
def audit(
    ledger: Annotated[Path | None, typer.Option(help="A site's ledger.sqlite, its privacy folder or its work folder.")] = None,
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", help="The site's public key as you pinned it (site-key.pub, PEM).")] = None,
    run: Annotated[Path | None, typer.Option(help="A run folder <workdir>/runs/<run-id> (or its report.json).")] = None,
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
    audits: list[LedgerAudit | RunAudit] = [a for a in (ledger_audit, run_audit) if a is not None]
    cross: tuple[list[Problem], list[str]] = ([], [])
    if ledger_audit is not None and run_audit is not None:
        cross = cross_check(ledger_audit, run_audit)
    problems = [*(p for a in audits for p in a.problems), *cross[0]]
    warnings = [*(w for a in audits for w in a.warnings), *cross[1]]
    if json_output:
        doc = audits[0].to_json()
        if ledger_audit is not None and run_audit is not None:
            doc["run"] = run_audit.to_json()
            doc["cross_check"] = {"problems": [asdict(p) for p in cross[0]], "warnings": cross[1]}
        doc["verified"] = not problems
        doc["problems"] = [asdict(p) for p in problems]
        doc["warnings"] = warnings
        print(json.dumps(json_safe(doc), indent=2, allow_nan=False))
    else:
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
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
    """Run ``fl-audit`` (the console script)."""
    run_typer(cli, prog_name="fl-audit")


if __name__ == "__main__":
    main()
