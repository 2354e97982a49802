"""What a site does for each Flower message, as plain functions.

``client/app.py`` only converts Flower records to and from these calls. Each
function opens the site's on-disk cache (never decodes DICOM when the cache is
fresh), enforces the site's own privacy budget and returns numbers only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common import records
from common.config import RunConfig, SiteConfig
from common.errors import PrivacyBudgetExceeded
from common.privacy import (
    AccountantStore,
    DPEvent,
    calibrate_noise,
    epsilon_spent,
    poisson_sample_rate,
    steps_per_epoch,
)

if TYPE_CHECKING:
    import torch

    from client.data.dataset import SiteData

    StateDict = OrderedDict[str, torch.Tensor]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SitePlan:
    """The DP plan of a site for a run: fixed by its data size, its budget and the run's length."""

    sample_rate: float
    steps_per_round: int
    planned_steps: int
    noise_multiplier: float


def plan_privacy(*, site: SiteConfig, run: RunConfig, num_train: int) -> SitePlan:
    """Calibrate σ so that the run's planned rounds end at or below the site's budget."""
    q = poisson_sample_rate(num_examples=num_train, batch_size=run.batch_size)
    per_round = run.local_epochs * steps_per_epoch(num_examples=num_train, batch_size=run.batch_size)
    planned = per_round * run.num_server_rounds
    sigma = calibrate_noise(target_epsilon=site.max_epsilon, delta=site.delta, sample_rate=q, steps=planned)
    return SitePlan(sample_rate=q, steps_per_round=per_round, planned_steps=planned, noise_multiplier=sigma)


def open_data(site: SiteConfig, run: RunConfig) -> SiteData:
    """The site's data for this run, from its cache (updated first if files changed)."""
    from client.data.dataset import load_site_data

    return load_site_data(
        data_dir=site.data_dir,
        work_dir=site.work_dir,
        config=run.preprocess,
        classes=run.classes,
        val_fraction=run.val_fraction,
        seed=run.seed,
    )


def _setup_torch(site: SiteConfig) -> torch.device:
    import torch

    from client.training import resolve_device

    if site.threads:
        torch.set_num_threads(site.threads)
    return resolve_device(site.device)


def train_round(
    *, site: SiteConfig, run: RunConfig, run_id: int, server_round: int, weights: StateDict
) -> tuple[StateDict, dict[str, float | int]]:
    """Train the global weights with DP-SGD on the site's training split.

    Raises
    ------
    PrivacyBudgetExceeded
        When this round would take the site's cumulative ε above its ``max-epsilon``.
    """
    from client.training import train_dp
    from common.models import build_model

    data = open_data(site, run)
    plan = plan_privacy(site=site, run=run, num_train=len(data.train))
    store = AccountantStore.for_run(site.work_dir, run_id)
    earlier = {r: e for r, e in store.load().items() if r != server_round}
    planned_event = DPEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    projected = epsilon_spent(events=[*(earlier[r] for r in sorted(earlier)), planned_event], delta=site.delta)
    if projected > site.max_epsilon * (1 + 1e-9):
        raise PrivacyBudgetExceeded(
            f"site {site.site} declines round {server_round}: it would reach ε={projected:.3f} "
            f"> its max-epsilon {site.max_epsilon:g} (δ={site.delta:g})"
        )
    device = _setup_torch(site)
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes))
    model.load_state_dict(weights)
    outcome = train_dp(
        model,
        images=data.images(data.train),
        labels=data.labels[data.train],
        augment=run.augment,
        num_classes=len(run.classes),
        epochs=run.local_epochs,
        batch_size=run.batch_size,
        learning_rate=run.learning_rate,
        max_grad_norm=run.max_grad_norm,
        noise_multiplier=plan.noise_multiplier,
        device=device,
        secure_mode=site.secure_mode,
        seed=run.seed * 100_003 + server_round,
    )
    epsilon = store.record(server_round, outcome.event, delta=site.delta)
    log.info(
        "Site %s round %d: trained on %d images, loss %.4f, σ=%.3f, ε=%.3f of %.3g",
        site.site, server_round, outcome.num_examples, outcome.loss,
        outcome.event.noise_multiplier, epsilon, site.max_epsilon,
    )
    metrics: dict[str, float | int] = {
        records.NUM_EXAMPLES: outcome.num_examples,
        records.TRAIN_LOSS: outcome.loss,
        records.EPSILON: epsilon,
        records.DELTA: site.delta,
        records.MAX_EPSILON: site.max_epsilon,
        records.NOISE_MULTIPLIER: outcome.event.noise_multiplier,
        records.SAMPLE_RATE: outcome.event.sample_rate,
        records.STEPS: outcome.event.steps,
    }
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    return state, metrics


def evaluate_round(*, site: SiteConfig, run: RunConfig, weights: StateDict) -> dict[str, float | int | list[int]]:
    """Evaluate the global weights on the site's validation split; summable statistics only."""
    from client.evaluation import evaluate
    from common.models import build_model

    data = open_data(site, run)
    device = _setup_torch(site)
    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes))
    model.load_state_dict(weights)
    outcome = evaluate(
        model, images=data.images(data.validation), labels=data.labels[data.validation], device=device,
        num_classes=len(run.classes),
    )
    return {
        records.NUM_EXAMPLES: outcome.num_examples,
        records.EVAL_LOSS: outcome.loss,
        **outcome.statistics,
    }
