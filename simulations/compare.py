"""``fl-sim compare``: what federation and privacy cost in accuracy, on one scenario.

Four arms on the same virtual sites, the same model, optimiser, step size and
number of passes over the data (``num-server-rounds × local-epochs`` epochs):

- **pooled**: one model trained centrally on every site's training split (the
  ceiling a data-sharing agreement would buy; no DP);
- **local**: each site trains its own model on its own data only (no DP);
- **fedavg**: the federation, no DP (``fl-sim run`` with ``dp = false``);
- **fedavg-dp**: the federation with each site's DP-SGD at the chosen ε.

Every arm is evaluated on every site's own validation split (patients never
seen in training). Pooled metrics come from the sum of the sites' sufficient
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, SiteConfig
from common.files import write_atomic
from common.metrics import pooled_metrics
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

ARMS = ("pooled", "local", "fedavg", "fedavg-dp")
METRICS = ("auroc", "sensitivity", "specificity")


@dataclass(frozen=True)
class ArmResult:
    arm: str
    label: str
    pooled: dict[str, float]
    sites: dict[str, dict[str, float]]
    seconds: float
    run_dir: str = ""
    epsilon: float | None = None


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
        pooled=pooled_metrics(stats.values(), num_classes=k),
        sites={name: pooled_metrics([s], num_classes=k) for name, s in stats.items()},
        seconds=time.monotonic() - t0,
    )


def _federated(arm: str, sc: Scenario, *, epsilon: float | None, workdir: Path, runs_dir: Path, progress: bool,
               verbose: bool, echo: Callable[[str], None]) -> ArmResult:
    dp = arm == "fedavg-dp"
    result = simulate(
        with_privacy(sc, dp=dp, epsilon=epsilon), workdir=workdir, runs_dir=runs_dir, progress=progress,
        verbose=verbose, echo=echo,
    )
    report = result.report
    if report.get("status") != "completed":
        from common.errors import FederationError

        raise FederationError(f"the {arm} arm ended as {report.get('status')!r}; see {result.run_dir}")
    last = [r for r in report["rounds"] if "evaluate" in r][-1]["evaluate"]
    eps = epsilon if epsilon is not None else max(with_privacy(sc, dp=dp).epsilons())
    label = f"FedAvg + DP (ε = {eps:g} per site)" if dp else "FedAvg (no DP)"
    return ArmResult(
        arm=arm, label=label, pooled=dict(last["pooled"]), sites=dict(last["sites"]), seconds=result.seconds,
        run_dir=str(result.run_dir), epsilon=eps if dp else None,
    )


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or not np.isfinite(value) or not np.isfinite(ref) or ref == 0:
        return None
    return value / ref


def _fmt(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def render_table(arms: list[ArmResult]) -> str:
    """Markdown: one row per arm; pooled metrics, ratios to the pooled arm and per-site AUROC."""
    ref = next((a for a in arms if a.arm == "pooled"), None)
    names = sorted({n for a in arms for n in a.sites})
    per_site = len(names) <= 8
    head = ["arm", *METRICS, *(f"{m} / pooled" for m in METRICS)]
    head += [f"AUROC {n}" for n in names] if per_site else ["site AUROC min", "median", "max"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in arms:
        row = [a.label, *(_fmt(a.pooled.get(m)) for m in METRICS)]
        row += [_fmt(_ratio(a.pooled.get(m), ref.pooled.get(m) if ref else None)) for m in METRICS]
        if per_site:
            row += [_fmt(a.sites.get(n, {}).get("auroc")) for n in names]
        else:
            values = np.array([a.sites[n].get("auroc") for n in a.sites if a.sites[n].get("auroc") is not None], float)
            values = values[np.isfinite(values)]
            row += [_fmt(float(f(values))) if len(values) else "–" for f in (np.min, np.median, np.max)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plot(folder: Path, arms: list[ArmResult]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, a in enumerate(arms):
        ax.bar(i, a.pooled.get("auroc") or 0.0, color="#4c72b0", alpha=0.8)
        site_values = [v.get("auroc") for v in a.sites.values() if v.get("auroc") is not None]
        ax.scatter([i] * len(site_values), site_values, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(arms)), [a.label.split(" (")[0] + (f"\nε={a.epsilon:g}" if a.epsilon else "") for a in arms])
    ax.set_ylabel("AUROC (bar: pooled, dots: sites)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    tmp = folder / ".compare.png.tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, folder / "compare.png")


def compare(
    sc: Scenario,
    *,
    arms: Sequence[str] = ARMS,
    epsilons: Sequence[float | None] = (None,),
    workdir: Path,
    runs_dir: Path,
    progress: bool = True,
    verbose: bool = False,
    echo: Callable[[str], None] = lambda _t: None,
) -> Comparison:
    """Run the chosen arms (in the order of :data:`ARMS`) and write the comparison table."""
    workdir, runs_dir = workdir.resolve(), runs_dir.resolve()
    run = checked_run_config(run_overrides(sc, workdir=workdir, runs_dir=runs_dir, table=workdir / "unused.json"))
    results: list[ArmResult] = []
    for arm in ARMS:
        if arm not in arms:
            continue
        echo(f"--- arm: {arm}")
        if arm in ("pooled", "local"):
            results.append(_baseline(arm, sc, run, workdir))
        elif arm == "fedavg":
            results.append(_federated(arm, sc, epsilon=None, workdir=workdir, runs_dir=runs_dir, progress=progress,
                                      verbose=verbose, echo=echo))
        else:
            for eps in epsilons:
                results.append(_federated(arm, sc, epsilon=eps, workdir=workdir, runs_dir=runs_dir,
                                          progress=progress, verbose=verbose, echo=echo))
        last = results[-1]
        echo(f"{last.label}: pooled AUROC {_fmt(last.pooled.get('auroc'))} ({last.seconds:.0f} s)")
    folder = runs_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    table = render_table(results)
    data = {
        "scenario": sc.to_dict(),
        "epochs": run.num_server_rounds * run.local_epochs,
        "arms": [
            {
                "arm": a.arm, "label": a.label, "epsilon": a.epsilon, "pooled": a.pooled, "sites": a.sites,
                "seconds": a.seconds, "run_dir": a.run_dir,
                "ratio_to_pooled": {
                    m: _ratio(a.pooled.get(m), results[0].pooled.get(m)) if results[0].arm == "pooled" else None
                    for m in METRICS
                },
            }
            for a in results
        ],
    }
    write_atomic(folder / "compare.json", json.dumps(_clean(data), indent=2))
    md = [
        f"# fl-sim compare: {sc.name}",
        "",
        sc.description,
        "",
        (f"Every arm: {run.num_server_rounds} × {run.local_epochs} epochs, model {run.model}, "
        f"{run.preprocess.image_size}px, lr {run.learning_rate:g}, {run.batch_size} patients per step. "
        "Metrics on each site's validation patients; pooled = summed sufficient statistics."),
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


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
