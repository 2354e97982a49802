"""``fl-sim compare``: what federation and privacy cost in accuracy, on one scenario.

Every arm (:data:`~simulations.arms.ARMS`) trains the same model with the same optimiser, step size and
number of passes over the data (``num-server-rounds × local-epochs`` epochs): **pooled** (one model on
every site's training split, no DP: the ceiling of data sharing), **local** (each site alone, no DP),
**fedavg** (the federation, no DP), **fedavg-dp** (each site's DP-SGD at the chosen ε) and
**public-pretrain** (pretrained without DP on a synthetic "public" dataset, then the DP federation
from those weights; the public model alone is reported too).

Every arm is scored on every site's validation patients; pooled metrics come from the summed
sufficient statistics, as the ServerApp computes them. DP noise comes from the OS CSPRNG, so each DP
arm is trained ``repeats`` times and reported as its median, worst and best draw. The federated arms
leave their ``runs/<run-id>/``; the table goes to ``runs/compare-<time>/compare.{md,json,png}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, SiteConfig
from common.errors import ConfigError, FederationError
from common.files import write_atomic
from common.metrics import pooled_metrics
from simulations.arms import ARMS, DP_ARMS, PUBLIC_SITES, ArmResult, Draw, fmt, public_scenario
from simulations.run import checked_run_config, run_overrides, simulate
from simulations.scenario import Scenario
from simulations.sites import prepare_data, site_rows, warm_caches
from simulations.table import cell, write_comparison


@dataclass(frozen=True)
class Comparison:
    """What ``fl-sim compare`` leaves: the folder of compare.{md,json,png}, each arm's result, the table."""

    folder: Path
    arms: list[ArmResult]
    markdown_table: str


def compare(sc: Scenario, *, arms: Sequence[str] = ARMS, epsilons: Sequence[float | None] = (None,), repeats: int = 1,
            workdir: Path, runs_dir: Path, progress: bool = True, verbose: bool = False,
            echo: Callable[[str], None] = lambda _t: None) -> Comparison:
    """Run the chosen arms (in the order of :data:`ARMS`) and write the comparison table.

    Parameters
    ----------
    sc
        The scenario every arm runs on.
    arms
        Which of :data:`ARMS` to run, in any order.
    epsilons
        Every site's ε for the DP arms, one result per value and DP arm; None keeps the scenario's budgets.
    repeats
        Independent noise draws of each DP arm (at least 1); the other arms are deterministic and run once.
    workdir
        fl-sim's work folder (data, caches, pretrained weights).
    runs_dir
        Where each federated run leaves ``<run-id>/`` and the comparison its ``compare-<time>-<pid>/``.
    progress, verbose
        Show the live progress display; show Flower's whole console log (else warnings only).
    echo
        Called with each line of progress text.

    Returns
    -------
    Comparison
        The comparison folder, every arm's result (the public model alone included) and the markdown table.

    Raises
    ------
    ConfigError
        When ``repeats`` is below 1, or the scenario's run config or the pretrained weights do not check.
    FederationError
        When a federated run does not complete.
    """
    if repeats < 1:
        raise ConfigError(f"Expected --repeats to be at least 1, but got {repeats}")
    workdir, runs_dir = workdir.resolve(), runs_dir.resolve()
    run = checked_run_config(run_overrides(sc, workdir=workdir, runs_dir=runs_dir, table=workdir / "unused.json"))
    results: list[ArmResult] = []
    pretrained: tuple[Scenario, ArmResult] | None = None
    if "public-pretrain" in arms:  # first: a weights file the federation cannot use fails before any long run
        weights, public_only = _public_pretrain(sc, run, workdir, echo)
        pretrained = replace(sc, run={**sc.run, "init-weights": str(weights)}), public_only
        run_overrides(pretrained[0], workdir=workdir, runs_dir=runs_dir, table=workdir / "unused.json")
    for arm in (a for a in ARMS if a in arms):
        echo(f"--- arm: {arm}")
        if arm in ("pooled", "local"):
            results.append(_baseline(arm, sc, run, workdir))
        else:
            start = sc
            if arm == "public-pretrain" and pretrained is not None:
                start, only = pretrained
                results.append(only)
                echo(f"{only.label}: pooled AUROC {cell(only, 'auroc')} ({only.seconds:.0f} s)")
            for eps in epsilons if arm in DP_ARMS else (None,):  # without DP: one run, no ε
                results.append(_federated(arm, start, epsilon=eps, repeats=repeats, workdir=workdir,
                                          runs_dir=runs_dir, progress=progress, verbose=verbose, echo=echo))
        last = results[-1]
        echo(f"{last.label}: pooled AUROC {cell(last, 'auroc')} ({last.seconds:.0f} s)")
    folder = runs_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    table = write_comparison(folder, sc, run, repeats, results)
    return Comparison(folder=folder, arms=results, markdown_table=table)


def _site_data(sc: Scenario, workdir: Path, run: RunConfig) -> dict[str, Any]:
    """Site name → its data, opened as the site opens it (without DP)."""
    from client.app.site import open_data

    data_dirs = prepare_data(sc.sites, workdir, classes=run.classes)
    sites_dir = workdir / "sites" / sc.sites.data_key()
    warm_caches(data_dirs, sites_dir, run)
    rows = site_rows(sc, data_dirs, sites_dir=sites_dir, ledgers_dir=workdir / "ledgers" / "baselines")
    configs = [SiteConfig.from_flower({**r, "dp": False}) for r in rows]
    return {c.site: open_data(c, run) for c in configs}


def _train_central(run: RunConfig, parts: list[Any], *, seed: int) -> Any:
    """A fresh model (the ServerApp's initial weights) trained without DP on the union of ``parts``' training splits.

    It trains ``num-server-rounds × local-epochs`` epochs, as much as a federated arm.
    """
    import torch

    from client.app.training import patient_groups, train_plain
    from common.models import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes), seed=run.seed)
    images = np.concatenate([d.images(d.train) for d in parts])
    labels = np.concatenate([d.labels[d.train] for d in parts])
    # Patients of different sites are different people, even if their hashed ids collide.
    patients = [f"{i}/{d.patients[j]}" for i, d in enumerate(parts) for j in d.train]
    train_plain(
        model, images=images, labels=labels, groups=patient_groups(patients),
        epochs=run.num_server_rounds * run.local_epochs, batch_size=run.batch_size,
        learning_rate=run.learning_rate, device=torch.device("cpu"), seed=seed, optimizer=run.optimizer,
        momentum=run.momentum, max_grad_norm=run.max_grad_norm, slices_per_patient=run.slices_per_patient,
        augment=run.augment, num_classes=len(run.classes),
    )
    return model


def _statistics(model: Any, data: Any, run: RunConfig) -> dict[str, list[int]]:
    import torch

    from client.app.evaluation import evaluate

    return evaluate(
        model, images=data.images(data.validation), labels=data.labels[data.validation],
        device=torch.device("cpu"), num_classes=len(run.classes),
    ).statistics


def _scored(arm: str, label: str, stats: dict[str, dict[str, list[int]]], run: RunConfig, t0: float) -> ArmResult:
    """An arm scored on each site's validation statistics (pooled: their sum), ``t0`` its start."""
    k, point = len(run.classes), run.operating_point
    return ArmResult(arm=arm, label=label, pooled=pooled_metrics(stats.values(), num_classes=k, operating_point=point),
                     sites={n: pooled_metrics([s], num_classes=k, operating_point=point) for n, s in stats.items()},
                     seconds=time.monotonic() - t0)


def _baseline(arm: str, sc: Scenario, run: RunConfig, workdir: Path) -> ArmResult:
    """The ``pooled`` arm (one model on every site's split) or ``local`` (one per site, scored on its own)."""
    t0 = time.monotonic()
    data = _site_data(sc, workdir, run)
    stats: dict[str, dict[str, list[int]]] = {}
    if arm == "pooled":
        model = _train_central(run, list(data.values()), seed=run.seed)
        stats = {name: _statistics(model, d, run) for name, d in data.items()}
    else:
        for i, (name, d) in enumerate(data.items()):
            stats[name] = _statistics(_train_central(run, [d], seed=run.seed + i), d, run)
    label = "pooled (centralised, no DP)" if arm == "pooled" else "local only (each site alone, no DP)"
    return _scored(arm, label, stats, run, t0)


def _federated(arm: str, sc: Scenario, *, epsilon: float | None, repeats: int, workdir: Path, runs_dir: Path,
               progress: bool, verbose: bool, echo: Callable[[str], None]) -> ArmResult:
    """A federated arm: one fl-sim run, or ``repeats`` noise draws of a DP arm (reported: the median draw)."""
    dp = arm in DP_ARMS
    runs = repeats if dp else 1  # without DP the run is deterministic: one run is the whole distribution
    privacy = replace(sc.privacy, dp=dp, epsilon=(epsilon,) if epsilon is not None else sc.privacy.epsilon)
    scenario = replace(sc, privacy=privacy)
    draws = []
    for i in range(runs):
        if runs > 1:
            echo(f"{arm}: draw {i + 1} of {runs}")
        result = simulate(scenario, workdir=workdir, runs_dir=runs_dir, progress=progress, verbose=verbose, echo=echo)
        if result.report.get("status") != "completed":
            raise FederationError(f"the {arm} arm ended as {result.report.get('status')!r}; see {result.run_dir}")
        evaluated = [r for r in result.report["rounds"] if "evaluate" in r]
        last = evaluated[-1]["evaluate"]
        draws.append(Draw(
            pooled=dict(last["pooled"]), sites=dict(last["sites"]),
            auroc_per_round=[r["evaluate"]["pooled"].get("auroc") for r in evaluated],
            seconds=result.seconds, run_dir=str(result.run_dir),
        ))
        if runs > 1:
            echo(f"{arm}: draw {i + 1}: final pooled AUROC {fmt(draws[-1].pooled.get('auroc'))}")
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

    return sorted(draws, key=key)[(len(draws) - 1) // 2]


def _public_pretrain(sc: Scenario, run: RunConfig, workdir: Path,
                     echo: Callable[[str], None]) -> tuple[Path, ArmResult]:
    """Pretrain without DP on :func:`public_scenario`: the weights file, and that model's own scores on the sites."""
    from safetensors.torch import save

    t0 = time.monotonic()
    public = public_scenario(sc)
    echo(f"public-pretrain: {len(PUBLIC_SITES)} public hospitals × {public.sites.images_per_site()[0]} slices, no DP")
    model = _train_central(run, list(_site_data(public, workdir, run).values()), seed=run.seed)
    epochs = run.num_server_rounds * run.local_epochs
    path = workdir / "pretrained" / f"{public.sites.data_key()}-{run.model}-{epochs}ep.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
    stats = {name: _statistics(model, d, run) for name, d in _site_data(sc, workdir, run).items()}
    return path, _scored("public", "public model only (no DP, no fine-tuning)", stats, run, t0)
