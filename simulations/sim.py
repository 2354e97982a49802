"""``fl-sim``: many virtual hospitals on one machine, on the same ServerApp/ClientApp as production.

``fl-sim run SCENARIO`` (:func:`simulations.run.simulate`) generates and caches each virtual site's data
once, writes one node config per site (its data, its own ε budget and ledger) and runs the fedrad
Flower App on Flower's Simulation Runtime (:mod:`simulations.runtime`); the ServerApp writes
``runs/<run-id>/`` exactly as under ``fl-server``. ``fl-sim compare SCENARIO`` adds the pooled and
local-only baselines (:mod:`simulations.compare`).

Folders (``--workdir``, default ``.fedrad-sim``):

- ``data/<key>/<site>/``: DICOM files and labels.csv, one copy per data spec;
- ``sites/<key>/<site>/``: each site's preprocessing cache (built once);
- ``ledgers/<run-id>/<site>/``: each site's privacy ledger for that run (a simulated run starts every
  site with a fresh budget; ``fl-audit --ledger`` works on it);
- ``tables/<run-id>.json``: the node config of every virtual site.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from common.cli import run_typer
from common.errors import ConfigError, FederationError
from common.files import write_atomic
from common.runfolder import RunFolder
from simulations import scenario as scenarios
from simulations.run import SimResult, simulate
from simulations.scenario import Scenario

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Simulate a federation of many virtual hospitals on one machine (same ServerApp/ClientApp as production).",
)

ScenarioArg = Annotated[
    str, typer.Argument(metavar="SCENARIO", help="A name under simulations/scenarios/ or a .toml file.")
]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="SECTION.KEY=VALUE", help="Override a scenario value (TOML), e.g. run.num-server-rounds=3.")]
SitesOpt = Annotated[int | None, typer.Option("--sites", help="Number of virtual sites (sites.count).")]
RoundsOpt = Annotated[int | None, typer.Option("--rounds", help="Federated rounds (run.num-server-rounds).")]
SecaggOpt = Annotated[bool | None, typer.Option("--secagg/--no-secagg", help="Secure aggregation (run.secagg).")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Generated data, site caches, ledgers and logs.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run reports go to OUT/<run-id>/.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No live display; final summary only (for CI).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")]


def _scenario(name: str, sets: list[str] | None, options: dict[str, Any]) -> Scenario:
    """The scenario with the ``--set`` overrides, then those of the options given (``section.key`` → value)."""
    def toml(value: Any) -> str:
        if isinstance(value, Path):
            return json.dumps(str(value.expanduser().resolve()), ensure_ascii=False)
        return str(value).lower() if isinstance(value, bool) else str(value)

    return scenarios.load(name, [*(sets or []), *(f"{k}={toml(v)}" for k, v in options.items() if v is not None)])


def _summary(result: SimResult) -> list[str]:
    from simulations.arms import fmt

    report = result.report
    final = report.get("final", {})
    lines = [
        (f"run {result.run_id}: {report.get('status')} in {result.seconds:.0f} s "
        f"({result.messages} site messages, {result.clientapp_seconds:.0f} s of site compute)")
    ]
    if final:
        lines.append(
            f"pooled: AUROC {fmt(final.get('auroc'))}, sensitivity {fmt(final.get('sensitivity'))}, "
            f"specificity {fmt(final.get('specificity'))} (round {final.get('round')})"
        )
    spent = [s.get("epsilon") for s in report.get("sites", {}).values() if s.get("epsilon") is not None]
    if spent:
        lines.append(f"ε spent per site: {min(spent):.2f}–{max(spent):.2f}")
    lines.append(f"report: {RunFolder(result.run_dir).report_md}")
    return lines


@app.command("run")
def run_cmd(
    scenario: ScenarioArg = scenarios.DEFAULT_SCENARIO, set_: SetOpt = None, sites: SitesOpt = None,
    rounds: RoundsOpt = None,
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="ε budget of every site (privacy.epsilon).")
    ] = None,
    dp: Annotated[bool | None, typer.Option("--dp/--no-dp", help="Train with DP-SGD (privacy.dp).")] = None,
    secagg: SecaggOpt = None,
    init_weights: Annotated[Path | None, typer.Option(
        "--init-weights", metavar="FILE",
        help="Start from these weights instead of random ones (run.init-weights): a safetensors file or a "
             "torch.save'd state_dict of the run's model; its SHA-256 goes into the report.")] = None,
    workdir: WorkdirOpt = Path(".fedrad-sim"), out: OutOpt = Path("runs"), quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run one simulated federation and write runs/<run-id>/ (report.json, report.md, plots)."""
    sc = _scenario(scenario, set_, {"sites.count": sites, "run.num-server-rounds": rounds, "run.secagg": secagg,
                                    "privacy.epsilon": epsilon, "privacy.dp": dp, "run.init-weights": init_weights})
    result = simulate(sc, workdir=workdir, runs_dir=out, progress=not quiet, verbose=verbose, echo=typer.echo)
    for line in _summary(result):
        typer.echo(line)
    if result.report.get("status") != "completed":
        raise FederationError(f"run {result.run_id} ended as {result.report.get('status')!r}; see {result.run_dir}")


@app.command("compare")
def compare_cmd(
    scenario: ScenarioArg = scenarios.DEFAULT_SCENARIO, set_: SetOpt = None, sites: SitesOpt = None,
    rounds: RoundsOpt = None,
    epsilon: Annotated[str | None, typer.Option(
        "--epsilon", metavar="E[,E...]", help="ε of the FedAvg+DP arm(s); default: the scenario's.")] = None,
    arms: Annotated[str, typer.Option(
        "--arms", help="Comma-separated subset of pooled,local,fedavg,fedavg-dp,public-pretrain.")
    ] = "pooled,local,fedavg,fedavg-dp",
    secagg: SecaggOpt = None,
    repeats: Annotated[int, typer.Option(
        "--repeats", help="Train each DP arm this many times with independent noise (median, worst, best).")] = 1,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write the comparison (every draw) as JSON here.")] = None,
    workdir: WorkdirOpt = Path(".fedrad-sim"), out: OutOpt = Path("runs"), quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Pooled vs local-only vs FedAvg vs FedAvg+DP: one table of AUROC/sensitivity/specificity and ratios to pooled."""
    from simulations.arms import ARMS
    from simulations.compare import compare

    sc = _scenario(scenario, set_, {"sites.count": sites, "run.num-server-rounds": rounds, "run.secagg": secagg})
    chosen = [a.strip() for a in arms.split(",") if a.strip()]
    bad = [a for a in chosen if a not in ARMS]
    if bad or not chosen:
        raise ConfigError(f"Expected --arms from {', '.join(ARMS)}, but got {arms!r}")
    try:
        epsilons = [float(e) for e in epsilon.split(",")] if epsilon else [None]
    except ValueError as exc:
        raise ConfigError(f"Expected --epsilon to be numbers separated by commas, but got {epsilon!r}") from exc
    if any(e is not None and e <= 0 for e in epsilons):
        raise ConfigError(f"Expected positive ε values, but got {epsilon!r}")
    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        raise ConfigError(f"Expected --json to be a file in an existing folder, but got {json_path}")
    result = compare(
        sc, arms=chosen, epsilons=epsilons, repeats=repeats, workdir=workdir, runs_dir=out, progress=not quiet,
        verbose=verbose, echo=typer.echo,
    )
    if json_path is not None:
        write_atomic(json_path, (result.folder / "compare.json").read_text())
    typer.echo(result.markdown_table)
    typer.echo(f"comparison: {result.folder / 'compare.md'}")


@app.command("scenarios")
def scenarios_cmd() -> None:
    """List the bundled scenarios."""
    for name, description in scenarios.available().items():
        typer.echo(f"{name:<16} {description}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``fl-sim``)."""
    run_typer(app, argv, prog_name="fl-sim")


if __name__ == "__main__":
    main()
