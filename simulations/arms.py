"""The arms of ``fl-sim compare``: their result records, and how each arm is trained and scored."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, SiteConfig
from common.errors import FederationError
from common.files import write_atomic
from common.metrics import (
    SENSITIVITY_AT_THRESHOLD,
    SPECIFICITY_AT_THRESHOLD,
    THRESHOLD,
    pooled_metrics,
)
from simulations.run import simulate, with_privacy
from simulations.scenario import Scenario
from simulations.sites import prepare_data, site_rows, warm_caches

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


def fmt(v: float | None) -> str:
    """``v`` to three decimals; a dash for a missing or non-finite value."""
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _site_configs(sc: Scenario, workdir: Path, run: RunConfig) -> list[SiteConfig]:
    data_dirs = prepare_data(sc.sites, workdir, classes=run.classes)
    sites_dir = workdir / "sites" / sc.sites.data_key()
    warm_caches(data_dirs, sites_dir, run)
    rows = site_rows(sc, data_dirs, sites_dir=sites_dir, ledgers_dir=workdir / "ledgers" / "baselines")
    return [SiteConfig.from_flower({**r, "dp": False}) for r in rows]


def _train_central(run: RunConfig, parts: list[Any], *, epochs: int, seed: int) -> Any:
    """Train one fresh model (the ServerApp's initial weights) on the union of ``parts``' training splits."""
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
        model, images=images, labels=labels, groups=patient_groups(patients), epochs=epochs,
        batch_size=run.batch_size, learning_rate=run.learning_rate, device=torch.device("cpu"), seed=seed,
        optimizer=run.optimizer, momentum=run.momentum, max_grad_norm=run.max_grad_norm,
        slices_per_patient=run.slices_per_patient, augment=run.augment, num_classes=len(run.classes),
    )
    return model


def _statistics(model: Any, data: Any, run: RunConfig) -> dict[str, list[int]]:
    import torch

    from client.app.evaluation import evaluate

    outcome = evaluate(
        model, images=data.images(data.validation), labels=data.labels[data.validation],
        device=torch.device("cpu"), num_classes=len(run.classes),
    )
    return outcome.statistics


def _scored(arm: str, label: str, stats: dict[str, dict[str, list[int]]], run: RunConfig, t0: float) -> ArmResult:
    """An arm scored on each site's validation statistics (pooled: their sum), ``t0`` its start."""
    k, point = len(run.classes), run.operating_point
    return ArmResult(arm=arm, label=label, pooled=pooled_metrics(stats.values(), num_classes=k, operating_point=point),
                     sites={n: pooled_metrics([s], num_classes=k, operating_point=point) for n, s in stats.items()},
                     seconds=time.monotonic() - t0)


def baseline(arm: str, sc: Scenario, run: RunConfig, workdir: Path) -> ArmResult:
    """The ``pooled`` or ``local`` arm: trained centrally (no DP, no federation), scored on every site.

    Parameters
    ----------
    arm
        ``pooled`` (one model on every site's training split) or ``local`` (one model per site, on its
        own split, scored on that site only).
    sc
        The scenario; its sites' data is generated (or partitioned) once under ``workdir``.
    run
        The checked run config; the model trains ``num-server-rounds × local-epochs`` epochs, as much as a
        federated arm.
    workdir
        fl-sim's work folder (data, caches, the baselines' ledgers).

    Returns
    -------
    ArmResult
        Pooled metrics (from the summed statistics of every site's validation split), per-site metrics
        and the seconds taken.
    """
    from client.app.site import open_data

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
    label = "pooled (centralised, no DP)" if arm == "pooled" else "local only (each site alone, no DP)"
    return _scored(arm, label, stats, run, t0)


def _one_run(arm: str, sc: Scenario, *, workdir: Path, runs_dir: Path, progress: bool, verbose: bool,
             echo: Callable[[str], None]) -> Draw:
    """One simulated federation (a real fl-sim run with its own report)."""
    result = simulate(sc, workdir=workdir, runs_dir=runs_dir, progress=progress, verbose=verbose, echo=echo)
    report = result.report
    if report.get("status") != "completed":
        raise FederationError(f"the {arm} arm ended as {report.get('status')!r}; see {result.run_dir}")
    evaluated = [r for r in report["rounds"] if "evaluate" in r]
    last = evaluated[-1]["evaluate"]
    return Draw(
        pooled=dict(last["pooled"]), sites=dict(last["sites"]),
        auroc_per_round=[r["evaluate"]["pooled"].get("auroc") for r in evaluated],
        seconds=result.seconds, run_dir=str(result.run_dir),
    )


def federated(arm: str, sc: Scenario, *, epsilon: float | None, repeats: int, workdir: Path, runs_dir: Path,
              progress: bool, verbose: bool, echo: Callable[[str], None]) -> ArmResult:
    """A federated arm: one fl-sim run, or ``repeats`` independent noise draws of a DP arm.

    Parameters
    ----------
    arm
        ``fedavg`` (no DP), or ``fedavg-dp`` or ``public-pretrain`` (with DP: :data:`DP_ARMS`).
    sc
        The scenario; for ``public-pretrain`` its ``run.init-weights`` already names the pretrained weights.
    epsilon
        Every site's ε for a DP arm; None keeps the scenario's own budgets.
    repeats
        Independent noise draws of a DP arm; an arm without DP runs once (it is deterministic).
    workdir, runs_dir
        fl-sim's work folder, and where each run leaves its ``<run-id>/``.
    progress, verbose
        Show the live progress display; show Flower's whole console log (else warnings only).
    echo
        Called with each line of progress text.

    Returns
    -------
    ArmResult
        The draw with the median final pooled AUROC, with every draw (DP arms) or the pooled AUROC per
        round (FedAvg), the seconds of all draws and the ε (DP arms).

    Raises
    ------
    FederationError
        When a run does not complete.
    """
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

    ordered = sorted(draws, key=key)
    return ordered[(len(ordered) - 1) // 2]


def public_scenario(sc: Scenario) -> Scenario:
    """The public dataset: :data:`PUBLIC_SITES` with the scenario's first site's size, another seed."""
    sites = replace(
        sc.sites, source="synth", count=len(PUBLIC_SITES), names=PUBLIC_SITES, images=(sc.sites.images_per_site()[0],),
        prevalence=(), scanners=(), alpha=0.0, folder="", sizes=(), seed=sc.sites.seed + 1000,
    )
    return replace(sc, name=f"{sc.name}-public", sites=sites)


def public_pretrain(sc: Scenario, run: RunConfig, workdir: Path, echo: Callable[[str], None]) -> tuple[Path, ArmResult]:
    """Pretrain without DP on the public dataset; the weights file and how that model alone scores on the sites.

    Parameters
    ----------
    sc
        The scenario; the public dataset is derived from it (:func:`public_scenario`).
    run
        The checked run config; the model trains ``num-server-rounds × local-epochs`` epochs, without DP.
    workdir
        fl-sim's work folder; the weights go to its ``pretrained/`` folder.
    echo
        Called with each line of progress text.

    Returns
    -------
    tuple[Path, ArmResult]
        The safetensors weights file (the DP arm's initial weights), and the public model's own scores on
        the scenario's sites (arm ``public``, no fine-tuning).
    """
    from safetensors.torch import save

    from client.app.site import open_data

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
    return path, _scored("public", "public model only (no DP, no fine-tuning)", stats, run, t0)
