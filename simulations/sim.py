"""``fl-sim``: many virtual hospitals on one machine, on the same ServerApp/ClientApp as production.

``fl-sim run SCENARIO`` generates (once) and caches each virtual site's data,
writes one node config per site (its data, its own ε budget and ledger), and
runs the fedrad Flower App on Flower's Simulation Runtime (:mod:`simulations.runtime`).
The ServerApp writes ``runs/<run-id>/`` (report.json, report.md, plots) exactly
as it does under ``fl-server``. ``fl-sim compare SCENARIO`` adds the pooled and
local-only baselines (:mod:`simulations.compare`).

Folders (``--workdir``, default ``.fedrad-sim``):

- ``data/<key>/<site>/``: DICOM files and labels.csv, one copy per data spec;
- ``sites/<key>/<site>/``: each site's preprocessing cache (built once);
- ``ledgers/<run-id>/<site>/``: each site's privacy ledger for that run (a
  simulated run starts every site with a fresh budget; ``fl-audit --ledger`` works on it);
- ``tables/<run-id>.json``: the node config of every virtual site.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Self

import typer

from common.cli import run_typer
from common.config import RunConfig
from common.errors import ConfigError, FederationError
from common.files import write_atomic
from common.runfolder import RunFolder
from simulations import scenario as scenarios
from simulations.runtime import SimulationMetrics, new_run_id, project_dir, run_app
from simulations.scenario import Scenario

log = logging.getLogger(__name__)

DATA_MARKER = ".fedrad-sim-data.json"
SIM_TRANSPORT = "simulation (Flower Simulation Runtime, Ray, one process)"


@dataclass(frozen=True)
class SimResult:
    """One finished simulated run."""

    run_id: int
    run_dir: Path
    report: dict[str, Any]
    seconds: float
    messages: int
    clientapp_seconds: float


# ----------------------------------------------------------------------------- data


def _synthesize(spec: scenarios.SitesSpec, out: Path) -> None:
    from simulations.synth import SiteSpec, synthesize_sites

    names, images = spec.site_names(), spec.images_per_site()
    if spec.alpha:
        from simulations.partition import dirichlet_prevalences

        prevalence: list[float | None] = list(dirichlet_prevalences(spec.count, alpha=spec.alpha, seed=spec.seed))
    elif spec.prevalence:
        prevalence = list(spec.prevalence) * spec.count if len(spec.prevalence) == 1 else list(spec.prevalence)
    else:
        prevalence = [None] * spec.count
    scanners: list[str | None] = (
        list(spec.scanners) * spec.count if len(spec.scanners) == 1 else list(spec.scanners)
    ) if spec.scanners else [None] * spec.count
    specs = [
        SiteSpec(name=n, images=i, prevalence=p, scanner=s)
        for n, i, p, s in zip(names, images, prevalence, scanners, strict=True)
    ]
    synthesize_sites(out, specs, seed=spec.seed, size=spec.image_size, workers=os.cpu_count() or 1)


def _partition(spec: scenarios.SitesSpec, out: Path, classes: tuple[str, ...]) -> None:
    from simulations.partition import partition_folder

    partition_folder(
        Path(spec.folder).expanduser().resolve(), out, sites=spec.count, alpha=spec.alpha or None,
        sizes=list(spec.sizes) or None, seed=spec.seed, classes=classes,
    )


def prepare_data(spec: scenarios.SitesSpec, workdir: Path, *, classes: tuple[str, ...] = ("0", "1")) -> dict[str, Path]:
    """Each virtual site's data folder; generated (or partitioned) once per data spec, then reused.

    The folder appears complete or not at all: it is built under a temporary
    name and renamed when done.
    """
    root = workdir / "data" / spec.data_key()
    if not (root / DATA_MARKER).is_file():
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if spec.source == "synth":
                _synthesize(spec, tmp)
            else:
                _partition(spec, tmp / "sites", classes)
                for child in (tmp / "sites").iterdir():
                    child.rename(tmp / child.name)
                (tmp / "sites").rmdir()
            sites = sorted(p.name for p in tmp.iterdir() if p.is_dir())
            write_atomic(tmp / DATA_MARKER, json.dumps({"sites": sites, "spec": spec.__dict__}, default=str))
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sites = json.loads((root / DATA_MARKER).read_text())["sites"]
    return {name: root / name for name in sites}


def warm_caches(
    data_dirs: dict[str, Path], sites_dir: Path, run: RunConfig
) -> None:
    """Build every site's preprocessing cache now (what each site would do on its first message)."""
    from client.data.dataset import load_site_data

    for name, data_dir in data_dirs.items():
        load_site_data(
            data_dir=data_dir, work_dir=sites_dir / name, config=run.preprocess, classes=run.classes,
            val_fraction=run.val_fraction, seed=run.seed, workers=1,
        )


# ----------------------------------------------------------------------------- run config


def project_run_defaults() -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` defaults of the project."""
    import tomllib

    with (project_dir() / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def run_overrides(sc: Scenario, *, workdir: Path, runs_dir: Path, table: Path) -> dict[str, Any]:
    """The scenario's ``[run]`` values plus what fl-sim sets itself; unknown keys are errors."""
    defaults = project_run_defaults()
    unknown = sorted(set(sc.run) - set(defaults))
    if unknown:
        raise ConfigError(
            f"Expected [run] keys of the project's run config, but got {', '.join(unknown)} "
            f"(known: {', '.join(sorted(k for k in defaults if k not in scenarios.RESERVED_RUN_KEYS))})"
        )
    overrides = dict(sc.run)
    overrides.setdefault("min-sites", min(sc.sites.count, max(2, int(defaults.get("min-sites", 2)))))
    overrides.update(
        {"workdir": str(workdir), "runs-dir": str(runs_dir), "sim-sites": str(table), "transport": SIM_TRANSPORT}
    )
    if overrides.get("init-weights"):
        overrides.update(checked_init_weights(overrides))
    return overrides


def checked_init_weights(overrides: dict[str, Any]) -> dict[str, str]:
    """The scenario's ``run.init-weights`` file (``fl-sim run --init-weights FILE``), checked against the run's model.

    A relative path is taken from the current folder. A scenario may pin the file's
    hash with ``run.init-weights-sha256``; otherwise it is computed here.

    Returns
    -------
    dict
        ``init-weights`` (the absolute path) and ``init-weights-sha256``, for the run config.
    """
    from common.weights import INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY, init_weights_config

    path, pinned = overrides[INIT_WEIGHTS_KEY], overrides.get(INIT_WEIGHTS_SHA256_KEY) or None
    if not isinstance(path, str) or (pinned is not None and not isinstance(pinned, str)):
        raise ConfigError(
            f"Expected `run.init-weights` to be a file path (and `run.init-weights-sha256` a hex string), "
            f"but got {path!r}"
        )
    from common.weights import load_init_weights, model_for_run
    from server.secure import check_model_fits

    rest = {k: v for k, v in overrides.items() if k not in (INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY)}
    run = checked_run_config(rest)
    entries = init_weights_config(Path(path), run=run, expected_sha256=pinned)
    if run.secagg.enabled:  # as fl-server does: refuse a range the sites would refuse to mask, before anything runs
        weights, _ = load_init_weights(Path(entries[INIT_WEIGHTS_KEY]), model=model_for_run(run),
                                       expected_sha256=entries[INIT_WEIGHTS_SHA256_KEY])
        check_model_fits(weights, run.secagg)
    return entries


def checked_run_config(overrides: dict[str, Any]) -> RunConfig:
    return RunConfig.from_flower({**project_run_defaults(), **overrides})


def site_rows(
    sc: Scenario, data_dirs: dict[str, Path], *, sites_dir: Path, ledgers_dir: Path
) -> list[dict[str, Any]]:
    """One node config per virtual site (what ``fl-client`` would pass a real SuperNode)."""
    epsilons = sc.epsilons() if len(data_dirs) == sc.sites.count else [sc.privacy.epsilon[0]] * len(data_dirs)
    return [
        {
            "site": name,
            "data-dir": str(path),
            "work-dir": str(sites_dir / name),
            "ledger-dir": str(ledgers_dir / name),
            "max-epsilon": float(eps),
            "delta": float(sc.privacy.delta),
            "privacy-unit": sc.privacy.unit,
            "dp": sc.privacy.dp,
            "secure-mode": sc.privacy.secure_mode,
            "threads": sc.simulation.threads_per_site,
            "device": "auto",
        }
        for (name, path), eps in zip(data_dirs.items(), epsilons, strict=True)
    ]


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A live rich display of rounds and site messages, fed from report.json and the runtime's counters."""

    def __init__(self, *, run_dir: Path, rounds: int, sites: int, metrics: SimulationMetrics, enabled: bool) -> None:
        self.folder, self.rounds, self.sites, self.metrics = RunFolder(run_dir), rounds, sites, metrics
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="fl-sim-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _read(self) -> dict[str, Any]:
        try:
            return self.folder.read_report()
        except (OSError, ValueError):
            return {}

    def _loop(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            transient=False,
        ) as bar:
            rounds = bar.add_task("rounds", total=self.rounds)
            messages = bar.add_task(f"site messages ({self.sites} sites)", total=None)
            while not self._stop.wait(0.5):
                report = self._read()
                done = [r for r in report.get("rounds", []) if "evaluate" in r or "train" in r]
                last = next((r for r in reversed(report.get("rounds", [])) if "evaluate" in r), None)
                auroc = (last or {}).get("evaluate", {}).get("pooled", {}).get("auroc")
                spent = [s.get("epsilon") for s in report.get("sites", {}).values() if s.get("epsilon") is not None]
                text = "rounds"
                if auroc is not None:
                    text += f"  AUROC {auroc:.3f}"
                if spent:
                    text += f"  ε ≤ {max(spent):.2f}"
                bar.update(rounds, completed=len(done), description=text)
                with self.metrics.lock:
                    n, secs = self.metrics.messages, self.metrics.clientapp_seconds
                bar.update(messages, completed=n, description=f"site messages ({self.sites} sites, {secs:.0f} s compute)")
            report = self._read()
            bar.update(rounds, completed=len([r for r in report.get("rounds", []) if "train" in r]))


@contextlib.contextmanager
def _flower_logs(log_file: Path, verbose: bool) -> Iterator[None]:
    """Flower's console shows warnings only; everything (ours included) goes to ``log_file`` for the run."""
    from flwr.common.logger import update_console_handler

    if not verbose:
        update_console_handler(level=logging.WARNING, timestamps=False, colored=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    flwr_logger.propagate = False
    try:
        yield
    finally:
        flwr_logger.removeHandler(handler)
        for name in ("server", "common", "client"):  # use_flower_log_handlers copied it onto ours
            logging.getLogger(name).removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------- simulate


def simulate(
    sc: Scenario,
    *,
    workdir: Path,
    runs_dir: Path,
    progress: bool = True,
    verbose: bool = False,
    echo: Any = None,
) -> SimResult:
    """Run one scenario end to end; returns the run's report (``runs_dir/<run-id>/report.json``)."""
    say = echo or (lambda _text: None)
    workdir, runs_dir = workdir.resolve(), runs_dir.resolve()
    run_id = new_run_id()
    table = workdir / "tables" / f"{run_id}.json"
    overrides = run_overrides(sc, workdir=workdir, runs_dir=runs_dir, table=table)
    run = checked_run_config(overrides)
    t0 = time.monotonic()
    data_dirs = prepare_data(sc.sites, workdir, classes=run.classes)
    sites_dir = workdir / "sites" / sc.sites.data_key()
    warm_caches(data_dirs, sites_dir, run)
    say(f"{len(data_dirs)} sites ready ({time.monotonic() - t0:.1f} s: data and preprocessing caches)")
    if len(data_dirs) < run.min_sites:
        raise ConfigError(f"Expected at least min-sites={run.min_sites} sites, but the scenario has {len(data_dirs)}")
    rows = site_rows(sc, data_dirs, sites_dir=sites_dir, ledgers_dir=workdir / "ledgers" / str(run_id))
    write_atomic(table, json.dumps(rows, indent=1))
    run_dir = runs_dir / str(run_id)
    metrics = SimulationMetrics()
    budgets = ", ".join(sorted({f"{r['max-epsilon']:g}" for r in rows}))
    say(
        f"run {run_id}: {len(rows)} sites, {run.num_server_rounds} rounds, "
        f"DP {f'on (max ε {budgets})' if sc.privacy.dp else 'OFF'}, "
        f"SecAgg+ {'on' if run.secagg.enabled else 'off'}, {sc.simulation.concurrency} sites at a time"
    )
    t1 = time.monotonic()
    with _flower_logs(workdir / "logs" / f"{run_id}.log", verbose), _Progress(
        run_dir=run_dir, rounds=run.num_server_rounds, sites=len(rows), metrics=metrics, enabled=progress
    ):
        try:
            run_app(
                run_id=run_id, num_sites=len(rows), run_config=overrides, concurrency=sc.simulation.concurrency,
                threads_per_site=sc.simulation.threads_per_site, metrics=metrics, verbose=verbose,
            )
        except RuntimeError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, Exception) and not isinstance(cause, RuntimeError):
                raise cause from None
            raise FederationError(f"the simulation stopped: {exc} (log: {workdir / 'logs' / f'{run_id}.log'})") from exc
    seconds = time.monotonic() - t1
    try:
        report = RunFolder(run_dir).read_report()
    except (OSError, ValueError) as exc:
        raise FederationError(f"the simulation left no report in {run_dir} ({exc})") from exc
    return SimResult(
        run_id=run_id, run_dir=run_dir, report=report, seconds=seconds,
        messages=metrics.messages, clientapp_seconds=metrics.clientapp_seconds,
    )


def with_privacy(sc: Scenario, *, dp: bool, epsilon: float | None = None) -> Scenario:
    """The same scenario with DP switched on/off (and one ε for every site)."""
    privacy = replace(sc.privacy, dp=dp, epsilon=(epsilon,) if epsilon is not None else sc.privacy.epsilon)
    return replace(sc, privacy=privacy)


# ----------------------------------------------------------------------------- CLI

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Simulate a federation of many virtual hospitals on one machine (same ServerApp/ClientApp as production).",
)

ScenarioArg = Annotated[str, typer.Argument(metavar="SCENARIO", help="A name under simulations/scenarios/ or a .toml file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override a scenario value (TOML), e.g. run.num-server-rounds=3."),
]
SitesOpt = Annotated[int | None, typer.Option("--sites", help="Number of virtual sites (sites.count).")]
RoundsOpt = Annotated[int | None, typer.Option("--rounds", help="Federated rounds (run.num-server-rounds).")]
SecaggOpt = Annotated[bool | None, typer.Option("--secagg/--no-secagg", help="Secure aggregation (run.secagg).")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Generated data, site caches, ledgers and logs.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run reports go to OUT/<run-id>/.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No live display; final summary only (for CI).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")]


def _scenario(name: str, sets: list[str] | None, sites: int | None, rounds: int | None, secagg: bool | None,
              extra: Sequence[str] = ()) -> Scenario:
    overrides = list(sets or [])
    if sites is not None:
        overrides.append(f"sites.count={sites}")
    if rounds is not None:
        overrides.append(f"run.num-server-rounds={rounds}")
    if secagg is not None:
        overrides.append(f"run.secagg={'true' if secagg else 'false'}")
    return scenarios.load(name, [*overrides, *extra])


def _summary(result: SimResult) -> list[str]:
    report = result.report
    final = report.get("final", {})
    lines = [
        (f"run {result.run_id}: {report.get('status')} in {result.seconds:.0f} s "
        f"({result.messages} site messages, {result.clientapp_seconds:.0f} s of site compute)")
    ]

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

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
    scenario: ScenarioArg = scenarios.DEFAULT_SCENARIO,
    set_: SetOpt = None,
    sites: SitesOpt = None,
    rounds: RoundsOpt = None,
    epsilon: Annotated[float | None, typer.Option("--epsilon", help="ε budget of every site (privacy.epsilon).")] = None,
    dp: Annotated[bool | None, typer.Option("--dp/--no-dp", help="Train with DP-SGD (privacy.dp).")] = None,
    secagg: SecaggOpt = None,
    init_weights: Annotated[Path | None, typer.Option(
        "--init-weights", metavar="FILE",
        help="Start from these weights instead of random ones (run.init-weights): a safetensors file or a "
             "torch.save'd state_dict of the run's model; its SHA-256 goes into the report.")] = None,
    workdir: WorkdirOpt = Path(".fedrad-sim"),
    out: OutOpt = Path("runs"),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run one simulated federation and write runs/<run-id>/ (report.json, report.md, plots)."""
    extra = []
    if epsilon is not None:
        extra.append(f"privacy.epsilon={epsilon}")
    if dp is not None:
        extra.append(f"privacy.dp={'true' if dp else 'false'}")
    if init_weights is not None:
        extra.append(f"run.init-weights={json.dumps(str(init_weights.expanduser().resolve()), ensure_ascii=False)}")
    sc = _scenario(scenario, set_, sites, rounds, secagg, extra)
    result = simulate(sc, workdir=workdir, runs_dir=out, progress=not quiet, verbose=verbose, echo=typer.echo)
    for line in _summary(result):
        typer.echo(line)
    if result.report.get("status") != "completed":
        raise FederationError(f"run {result.run_id} ended as {result.report.get('status')!r}; see {result.run_dir}")


@app.command("compare")
def compare_cmd(
    scenario: ScenarioArg = scenarios.DEFAULT_SCENARIO,
    set_: SetOpt = None,
    sites: SitesOpt = None,
    rounds: RoundsOpt = None,
    epsilon: Annotated[
        str | None, typer.Option("--epsilon", metavar="E[,E...]", help="ε of the FedAvg+DP arm(s); default: the scenario's.")
    ] = None,
    arms: Annotated[
        str, typer.Option("--arms", help="Comma-separated subset of pooled,local,fedavg,fedavg-dp,public-pretrain.")
    ] = "pooled,local,fedavg,fedavg-dp",
    secagg: SecaggOpt = None,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Train each DP arm this many times with independent noise (median, worst, best).")
    ] = 1,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the comparison (every draw) as JSON here.")] = None,
    workdir: WorkdirOpt = Path(".fedrad-sim"),
    out: OutOpt = Path("runs"),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Pooled vs local-only vs FedAvg vs FedAvg+DP: one table of AUROC/sensitivity/specificity and ratios to pooled."""
    from simulations.compare import ARMS, compare

    sc = _scenario(scenario, set_, sites, rounds, secagg)
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
    if repeats < 1:
        raise ConfigError(f"Expected --repeats to be at least 1, but got {repeats}")
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
