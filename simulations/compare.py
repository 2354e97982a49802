"""``fl-sim compare``: what federation and privacy cost in accuracy, on one scenario.

Four arms on the same virtual sites, the same model, optimiser, step size and
number of passes over the data (``num-server-rounds × local-epochs`` epochs):

- **pooled**: one model trained centrally on every site's training split (the
  ceiling a data-sharing agreement would buy; no DP);
- **local**: each site trains its own model on its own data only (no DP);
- **fedavg**: the federation, no DP (``fl-sim run`` with ``dp = false``);
- **fedavg-dp**: the federation with each site's DP-SGD at the chosen ε;
- **public-pretrain**: a model first trained without DP on a separate synthetic
  "public" dataset (fl-synth hospitals with other scanners, as much data as the
  scenario's first site, each), then the same DP federation starting from those
  weights (``--init-weights``). The public model alone is reported too.

Every arm is evaluated on every site's own validation split (patients never
seen in training). DP noise comes from the OS CSPRNG, so a private arm's result
is one draw from a distribution: with ``repeats`` > 1 each DP arm is trained
that many times with independent noise and reported as the median, worst and
best draw (the non-private arms are deterministic and run once). Pooled metrics come from the sum of the sites' sufficient
statistics, exactly as the ServerApp computes them; for **local** each site's
split is scored by that site's own model. Each ratio is the arm's metric over
the pooled arm's. The federated arms leave their usual ``runs/<run-id>/``; the
table goes to ``runs/compare-<time>/compare.{md,json,png}``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, SiteConfig
from common.files import write_atomic
from common.metrics import (
    SENSITIVITY_AT_THRESHOLD,
    SPECIFICITY_AT_THRESHOLD,
    THRESHOLD,
    pooled_metrics,
)
from simulations.scenario import Scenario
from simulations.sim import (
    checked_run_config,
    prepare_data,
    run_overrides,
    simulate,
    site_rows,
    warm_caches,
    with_privacy,
)

ARMS = ("pooled", "local", "fedavg", "fedavg-dp", "public-pretrain")
DP_ARMS = ("fedavg-dp", "public-pretrain")
PUBLIC_SITES = ("public-1", "public-2")
"""The "public" dataset of the public-pretrain arm: fl-synth hospitals whose scanner profiles
(derived from these names) differ from the scenario's, with their own seed; no patient in common."""
METRICS = ("auroc", "sensitivity", "specificity")
OPERATING_POINT = (THRESHOLD, SENSITIVITY_AT_THRESHOLD, SPECIFICITY_AT_THRESHOLD)
"""The operating point chosen on pooled validation (run config ``operating-point``), beside 0.5."""


@dataclass(frozen=True)
class Draw:
    """One training of a DP arm: its final pooled metrics and pooled AUROC per round."""

    pooled: dict[str, float]
    sites: dict[str, dict[str, float]]
    auroc_per_round: list[float | None]
    seconds: float
    run_dir: str


@dataclass(frozen=True)
class ArmResult:
    arm: str
    label: str
    pooled: dict[str, float]
    """Final pooled metrics; for an arm of several draws, the draw with the median AUROC."""
    sites: dict[str, dict[str, float]]
    seconds: float
    run_dir: str = ""
    epsilon: float | None = None
    draws: tuple[Draw, ...] = ()
    """Every draw of a DP arm (one entry per independent noise draw); empty for the others."""
    curve: tuple[float | None, ...] = ()
    """Pooled AUROC per round of a federated arm without draws (FedAvg); empty for the baselines."""

    def spread(self, metric: str) -> dict[str, float | None]:
        """Median, minimum and maximum of ``metric`` over the draws (or the single result)."""
        values = [d.pooled.get(metric) for d in self.draws] if self.draws else [self.pooled.get(metric)]
        finite = sorted(float(v) for v in values if v is not None and np.isfinite(v))
        if not finite:
            return {"median": None, "min": None, "max": None}
        return {"median": float(np.median(finite)), "min": finite[0], "max": finite[-1]}

    def worst(self) -> Draw | None:
        """The draw with the lowest final pooled AUROC."""
        scored = [d for d in self.draws if d.pooled.get("auroc") is not None and np.isfinite(d.pooled["auroc"])]
        return min(scored, key=lambda d: d.pooled["auroc"]) if scored else None


@dataclass(frozen=True)
class Comparison:
    folder: Path
    arms: list[ArmResult]
    markdown_table: str


def _site_configs(sc: Scenario, workdir: Path, run: RunConfig) -> list[SiteConfig]:
    data_dirs = prepare_data(sc.sites, workdir, classes=run.classes)
    sites_dir = workdir / "sites" / sc.sites.data_key()
    warm_caches(data_dirs, sites_dir, run)
    rows = site_rows(sc, data_dirs, sites_dir=sites_dir, ledgers_dir=workdir / "ledgers" / "baselines")
    return [SiteConfig.from_flower({**r, "dp": False}) for r in rows]


def _train_central(run: RunConfig, parts: list[Any], *, epochs: int, seed: int) -> Any:
    """Train one fresh model (the ServerApp's initial weights) on the union of ``parts``' training splits."""
    import torch

    from client.training import patient_groups, train_plain
    from common.models import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes), seed=run.seed)
    images = np.concatenate([d.images(d.train) for d in parts])
    labels = np.concatenate([d.labels[d.train] for d in parts])
    # Patients of different sites are different people, even if their hashed ids collide.
    patients = [f"{i}/{d.patients[j]}" for i, d in enumerate(parts) for j in d.train]
    train_plain(
        model, images=images, labels=labels, groups=patient_groups(patients), epochs=epochs,
        batch_size=run.batch_size, learning_rate=run.learning_rate, device=torch.device("cpu"), seed=seed,
        optimizer=run.optimizer, momentum=run.momentum, max_grad_norm=run.max_grad_norm,
        slices_per_patient=run.slices_per_patient, augment=run.augment, num_classes=len(run.classes),
    )
    return model


def _statistics(model: Any, data: Any, run: RunConfig) -> dict[str, list[int]]:
    import torch

    from client.evaluation import evaluate

    outcome = evaluate(
        model, images=data.images(data.validation), labels=data.labels[data.validation],
        device=torch.device("cpu"), num_classes=len(run.classes),
    )
    return outcome.statistics


def _baseline(arm: str, sc: Scenario, run: RunConfig, workdir: Path) -> ArmResult:
    from client.site import open_data

    t0 = time.monotonic()
    configs = _site_configs(sc, workdir, run)
    data = [open_data(c, run) for c in configs]
    epochs = run.num_server_rounds * run.local_epochs
    stats: dict[str, dict[str, list[int]]] = {}
    if arm == "pooled":
        model = _train_central(run, data, epochs=epochs, seed=run.seed)
        stats = {c.site: _statistics(model, d, run) for c, d in zip(configs, data, strict=True)}
    else:
        for i, (c, d) in enumerate(zip(configs, data, strict=True)):
            model = _train_central(run, [d], epochs=epochs, seed=run.seed + i)
            stats[c.site] = _statistics(model, d, run)
    k = len(run.classes)
    return ArmResult(
        arm=arm,
        label="pooled (centralised, no DP)" if arm == "pooled" else "local only (each site alone, no DP)",
        pooled=pooled_metrics(stats.values(), num_classes=k, operating_point=run.operating_point),
        sites={name: pooled_metrics([s], num_classes=k, operating_point=run.operating_point) for name, s in stats.items()},
        seconds=time.monotonic() - t0,
    )


def _one_run(arm: str, sc: Scenario, *, workdir: Path, runs_dir: Path, progress: bool, verbose: bool,
             echo: Callable[[str], None]) -> Draw:
    """One simulated federation (a real fl-sim run with its own report)."""
    result = simulate(sc, workdir=workdir, runs_dir=runs_dir, progress=progress, verbose=verbose, echo=echo)
    report = result.report
    if report.get("status") != "completed":
        from common.errors import FederationError

        raise FederationError(f"the {arm} arm ended as {report.get('status')!r}; see {result.run_dir}")
    evaluated = [r for r in report["rounds"] if "evaluate" in r]
    last = evaluated[-1]["evaluate"]
    return Draw(
        pooled=dict(last["pooled"]), sites=dict(last["sites"]),
        auroc_per_round=[r["evaluate"]["pooled"].get("auroc") for r in evaluated],
        seconds=result.seconds, run_dir=str(result.run_dir),
    )


def _federated(arm: str, sc: Scenario, *, epsilon: float | None, repeats: int, workdir: Path, runs_dir: Path,
               progress: bool, verbose: bool, echo: Callable[[str], None]) -> ArmResult:
    dp = arm in DP_ARMS
    runs = repeats if dp else 1  # without DP the run is deterministic: one run is the whole distribution
    scenario = with_privacy(sc, dp=dp, epsilon=epsilon)
    draws = []
    for i in range(runs):
        if runs > 1:
            echo(f"{arm}: draw {i + 1} of {runs}")
        draws.append(_one_run(arm, scenario, workdir=workdir, runs_dir=runs_dir, progress=progress,
                              verbose=verbose, echo=echo))
        if runs > 1:
            echo(f"{arm}: draw {i + 1}: final pooled AUROC {_fmt(draws[-1].pooled.get('auroc'))}")
    eps = epsilon if epsilon is not None else max(scenario.epsilons())
    label = f"FedAvg + DP (ε = {eps:g} per site)" if dp else "FedAvg (no DP)"
    if arm == "public-pretrain":
        label = f"public pretrain + FedAvg + DP (ε = {eps:g} per site)"
    median = _median_draw(draws)
    return ArmResult(
        arm=arm, label=label, pooled=median.pooled, sites=median.sites, seconds=sum(d.seconds for d in draws),
        run_dir=median.run_dir, epsilon=eps if dp else None, draws=tuple(draws) if dp else (),
        curve=() if dp else tuple(median.auroc_per_round),
    )


def _median_draw(draws: list[Draw]) -> Draw:
    """The draw whose final pooled AUROC is the median (the lower middle one for an even count)."""
    def key(d: Draw) -> float:
        v = d.pooled.get("auroc")
        return float(v) if v is not None and np.isfinite(v) else -1.0

    ordered = sorted(draws, key=key)
    return ordered[(len(ordered) - 1) // 2]


def public_scenario(sc: Scenario) -> Scenario:
    """The public dataset: :data:`PUBLIC_SITES` with the scenario's first site's size, another seed."""
    sites = replace(
        sc.sites, source="synth", count=len(PUBLIC_SITES), names=PUBLIC_SITES, images=(sc.sites.images_per_site()[0],),
        prevalence=(), scanners=(), alpha=0.0, folder="", sizes=(), seed=sc.sites.seed + 1000,
    )
    return replace(sc, name=f"{sc.name}-public", sites=sites)


def _public_pretrain(sc: Scenario, run: RunConfig, workdir: Path, echo: Callable[[str], None]) -> tuple[Path, ArmResult]:
    """Pretrain without DP on the public dataset; the weights file and how that model alone scores on the sites."""
    from safetensors.torch import save

    from client.site import open_data

    t0 = time.monotonic()
    public = public_scenario(sc)
    echo(f"public-pretrain: {len(PUBLIC_SITES)} public hospitals × {public.sites.images_per_site()[0]} slices, no DP")
    parts = [open_data(c, run) for c in _site_configs(public, workdir, run)]
    epochs = run.num_server_rounds * run.local_epochs
    model = _train_central(run, parts, epochs=epochs, seed=run.seed)
    path = workdir / "pretrained" / f"{public.sites.data_key()}-{run.model}-{epochs}ep.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
    configs = _site_configs(sc, workdir, run)
    stats = {c.site: _statistics(model, open_data(c, run), run) for c in configs}
    k = len(run.classes)
    only = ArmResult(
        arm="public", label="public model only (no DP, no fine-tuning)",
        pooled=pooled_metrics(stats.values(), num_classes=k, operating_point=run.operating_point),
        sites={n: pooled_metrics([v], num_classes=k, operating_point=run.operating_point) for n, v in stats.items()},
        seconds=time.monotonic() - t0,
    )
    return path, only


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or not np.isfinite(value) or not np.isfinite(ref) or ref == 0:
        return None
    return value / ref


def _fmt(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _cell(arm: ArmResult, metric: str) -> str:
    """``median (worst–best)`` over an arm's draws; the value alone for a single result."""
    spread = arm.spread(metric)
    if len(arm.draws) < 2 or spread["median"] is None:
        return _fmt(arm.pooled.get(metric))
    return f"{_fmt(spread['median'])} ({_fmt(spread['min'])}–{_fmt(spread['max'])})"


def ratios(arm: ArmResult, ref: ArmResult | None) -> dict[str, dict[str, float | None]]:
    """Each metric over the pooled arm's: for the median draw and for the worst draw (lowest AUROC)."""
    worst = arm.worst()
    return {
        "median": {m: _ratio(arm.spread(m)["median"], ref.pooled.get(m) if ref else None) for m in METRICS},
        "worst": {m: _ratio((worst.pooled if worst else arm.pooled).get(m), ref.pooled.get(m) if ref else None)
                  for m in METRICS},
    }


def render_table(arms: list[ArmResult]) -> str:
    """Markdown: one row per arm; pooled metrics (median and range over draws), ratios to pooled, per-site AUROC."""
    ref = next((a for a in arms if a.arm == "pooled"), None)
    names = sorted({n for a in arms for n in a.sites})
    per_site = len(names) <= 8
    head = ["arm", "draws", *METRICS, *OPERATING_POINT, "AUROC / pooled (median)", "AUROC / pooled (worst)"]
    head += [f"AUROC {n}" for n in names] if per_site else ["site AUROC min", "median", "max"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in arms:
        r = ratios(a, ref)
        row = [a.label, str(max(1, len(a.draws))), *(_cell(a, m) for m in (*METRICS, *OPERATING_POINT))]
        row += [_fmt(r["median"]["auroc"]), _fmt(r["worst"]["auroc"])]
        if per_site:
            row += [_fmt(a.sites.get(n, {}).get("auroc")) for n in names]
        else:
            values = np.array([a.sites[n].get("auroc") for n in a.sites if a.sites[n].get("auroc") is not None], float)
            values = values[np.isfinite(values)]
            row += [_fmt(float(f(values))) if len(values) else "–" for f in (np.min, np.median, np.max)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plot(folder: Path, arms: list[ArmResult]) -> None:
    """Left: pooled AUROC per round (a band from the worst to the best draw, the median as a line);
    right: final pooled AUROC per arm (bar: median draw, whisker: worst–best, dots: sites)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    rounds_ax, final_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    for i, a in enumerate(arms):
        colour = colours[i % len(colours)]
        short = a.label.split(" (")[0] + (f" ε={a.epsilon:g}" if a.epsilon else "")
        curves = [d.auroc_per_round for d in a.draws] or ([list(a.curve)] if a.curve else [])
        if curves:
            grid = np.array([[np.nan if v is None else v for v in c] for c in curves if len(c) == len(curves[0])], float)
            x = np.arange(1, grid.shape[1] + 1)
            rounds_ax.plot(x, np.nanmedian(grid, axis=0), color=colour, marker="o", ms=3,
                           label=short + (f" (median of {len(grid)})" if len(grid) > 1 else ""))
            if len(grid) > 1:
                rounds_ax.fill_between(x, np.nanmin(grid, axis=0), np.nanmax(grid, axis=0), color=colour, alpha=0.2)
        elif a.pooled.get("auroc") is not None:
            rounds_ax.axhline(a.pooled["auroc"], color=colour, ls="--", lw=1, label=f"{short} (final)")
        spread = a.spread("auroc")
        final_ax.bar(i, spread["median"] or 0.0, color=colour, alpha=0.8)
        if len(a.draws) > 1 and spread["median"] is not None:
            final_ax.errorbar(i, spread["median"], yerr=[[spread["median"] - spread["min"]], [spread["max"] - spread["median"]]],
                              color="black", capsize=4)
        site_values = [v.get("auroc") for v in a.sites.values() if v.get("auroc") is not None]
        final_ax.scatter([i] * len(site_values), site_values, color="black", s=10, zorder=3)
    rounds_ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    rounds_ax.set_xlabel("round")
    rounds_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rounds_ax.set_ylabel("pooled AUROC (band: worst–best draw)")
    rounds_ax.set_ylim(0.3, 1)
    rounds_ax.legend(fontsize=7, loc="lower right")
    final_ax.set_xticks(range(len(arms)), [a.label.split(" (")[0] + (f"\nε={a.epsilon:g}" if a.epsilon else "") for a in arms],
                        fontsize=8)
    final_ax.set_ylabel("final AUROC (bar: pooled median, dots: sites)")
    final_ax.set_ylim(0, 1)
    fig.tight_layout()
    tmp = folder / ".compare.png.tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, folder / "compare.png")


def compare(
    sc: Scenario,
    *,
    arms: Sequence[str] = ARMS,
    epsilons: Sequence[float | None] = (None,),
    repeats: int = 1,
    workdir: Path,
    runs_dir: Path,
    progress: bool = True,
    verbose: bool = False,
    echo: Callable[[str], None] = lambda _t: None,
) -> Comparison:
    """Run the chosen arms (in the order of :data:`ARMS`) and write the comparison table.

    Each DP arm is trained ``repeats`` times with independent noise; the others once.
    """
    if repeats < 1:
        from common.errors import ConfigError

        raise ConfigError(f"Expected --repeats to be at least 1, but got {repeats}")
    workdir, runs_dir = workdir.resolve(), runs_dir.resolve()
    run = checked_run_config(run_overrides(sc, workdir=workdir, runs_dir=runs_dir, table=workdir / "unused.json"))
    results: list[ArmResult] = []
    pretrained: tuple[Path, ArmResult] | None = None
    if "public-pretrain" in arms:  # first: a weights file the federation cannot use fails before any long run
        pretrained = _public_pretrain(sc, run, workdir, echo)
        run_overrides(replace(sc, run={**sc.run, "init-weights": str(pretrained[0])}), workdir=workdir,
                      runs_dir=runs_dir, table=workdir / "unused.json")
    for arm in ARMS:
        if arm not in arms:
            continue
        echo(f"--- arm: {arm}")
        if arm in ("pooled", "local"):
            results.append(_baseline(arm, sc, run, workdir))
        elif arm == "fedavg":
            results.append(_federated(arm, sc, epsilon=None, repeats=1, workdir=workdir, runs_dir=runs_dir,
                                      progress=progress, verbose=verbose, echo=echo))
        else:
            start = sc
            if arm == "public-pretrain" and pretrained is not None:
                weights, only = pretrained
                results.append(only)
                echo(f"{only.label}: pooled AUROC {_cell(only, 'auroc')} ({only.seconds:.0f} s)")
                start = replace(sc, run={**sc.run, "init-weights": str(weights)})
            for eps in epsilons:
                results.append(_federated(arm, start, epsilon=eps, repeats=repeats, workdir=workdir, runs_dir=runs_dir,
                                          progress=progress, verbose=verbose, echo=echo))
        last = results[-1]
        echo(f"{last.label}: pooled AUROC {_cell(last, 'auroc')} ({last.seconds:.0f} s)")
    folder = runs_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    table = render_table(results)
    ref = next((a for a in results if a.arm == "pooled"), None)
    data = {
        "scenario": sc.to_dict(),
        "epochs": run.num_server_rounds * run.local_epochs,
        "repeats": repeats,
        "arms": [_arm_json(a, ref) for a in results],
    }
    write_atomic(folder / "compare.json", json.dumps(_clean(data), indent=2))
    md = [
        f"# fl-sim compare: {sc.name}",
        "",
        sc.description,
        "",
        (f"Every arm: {run.num_server_rounds} × {run.local_epochs} epochs, model {run.model}, "
        f"{run.preprocess.image_size}px, {run.optimizer} lr {run.learning_rate:g}, {run.batch_size} patients per step. "
        "Metrics on each site's validation patients; pooled = summed sufficient statistics; "
        "sensitivity/specificity at 0.5 and at the threshold chosen on pooled validation "
        f"({run.operating_point}). DP arms: median (worst–best) over {repeats} independent noise draw(s)."),
        "",
        table,
        "",
        "![pooled and per-site AUROC per arm](compare.png)",
        "",
        *(f"- {a.label}: `{a.run_dir}`" for a in results if a.run_dir),
    ]
    write_atomic(folder / "compare.md", "\n".join(md) + "\n")
    _plot(folder, results)
    return Comparison(folder=folder, arms=results, markdown_table=table)


def _arm_json(a: ArmResult, ref: ArmResult | None) -> dict[str, Any]:
    r = ratios(a, ref)
    return {
        "arm": a.arm, "label": a.label, "epsilon": a.epsilon, "pooled": a.pooled, "sites": a.sites,
        "seconds": a.seconds, "run_dir": a.run_dir,
        "draws": len(a.draws) or 1,
        "spread": {m: a.spread(m) for m in (*METRICS, *OPERATING_POINT)},
        "ratio_to_pooled": r["median"],
        "ratio_to_pooled_worst": r["worst"],
        "auroc_per_round": [list(d.auroc_per_round) for d in a.draws] or ([list(a.curve)] if a.curve else []),
        "draw_results": [
            {"pooled": d.pooled, "auroc_per_round": d.auroc_per_round, "seconds": d.seconds, "run_dir": d.run_dir}
            for d in a.draws
        ],
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
