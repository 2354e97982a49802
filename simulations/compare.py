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

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import ConfigError
from simulations.arms import ARMS, DP_ARMS, ArmResult, baseline, federated, public_pretrain
from simulations.run import checked_run_config, run_overrides
from simulations.scenario import Scenario
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

    Each DP arm is trained ``repeats`` times with independent noise; the others once.

    Parameters
    ----------
    sc
        The scenario every arm runs on.
    arms
        Which of :data:`ARMS` to run, in any order.
    epsilons
        Every site's ε for the DP arms, one result per value and DP arm; None keeps the scenario's budgets.
    repeats
        Independent noise draws of each DP arm (at least 1).
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
    pretrained: tuple[Path, ArmResult] | None = None
    if "public-pretrain" in arms:  # first: a weights file the federation cannot use fails before any long run
        pretrained = public_pretrain(sc, run, workdir, echo)
        run_overrides(replace(sc, run={**sc.run, "init-weights": str(pretrained[0])}), workdir=workdir,
                      runs_dir=runs_dir, table=workdir / "unused.json")
    for arm in ARMS:
        if arm not in arms:
            continue
        echo(f"--- arm: {arm}")
        if arm in ("pooled", "local"):
            results.append(baseline(arm, sc, run, workdir))
        else:
            start = sc
            if arm == "public-pretrain" and pretrained is not None:
                weights, only = pretrained
                results.append(only)
                echo(f"{only.label}: pooled AUROC {cell(only, 'auroc')} ({only.seconds:.0f} s)")
                start = replace(sc, run={**sc.run, "init-weights": str(weights)})
            for eps in epsilons if arm in DP_ARMS else (None,):  # without DP: one run, no ε
                results.append(federated(arm, start, epsilon=eps, repeats=repeats, workdir=workdir, runs_dir=runs_dir,
                                          progress=progress, verbose=verbose, echo=echo))
        last = results[-1]
        echo(f"{last.label}: pooled AUROC {cell(last, 'auroc')} ({last.seconds:.0f} s)")
    folder = runs_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    table = write_comparison(folder, sc, run, repeats, results)
    return Comparison(folder=folder, arms=results, markdown_table=table)
