"""What a site does for each Flower message, as plain functions.

``client/app/handlers.py`` only converts Flower records to and from these calls. Each
function opens the site's on-disk cache (never decodes DICOM when the cache is
fresh), enforces the site's own privacy budget and returns numbers only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from client.app.replay import UpdateStore, weights_digest
from common import records
from common.config import RunConfig, SiteConfig
from common.errors import DataError, PrivacyBudgetExceeded
from common.ledger import Entry, Ledger, Plan, Row, key_fingerprint, load_public_key, verify
from common.privacy import DPEvent, Epsilons, calibrate_noise, epsilons, poisson_sample_rate, steps_per_epoch

if TYPE_CHECKING:
    import numpy as np
    import torch

    from client.data.dataset import SiteData

    StateDict = OrderedDict[str, torch.Tensor]

log = logging.getLogger(__name__)


def plan_privacy(*, site: SiteConfig, run: RunConfig, num_units: int, earlier: list[DPEvent] | None = None) -> Plan:
    """The site's DP plan for a run: q and steps from its data, σ from its budget.

    σ is the site's own ``noise-multiplier`` when it set one; otherwise it is
    calibrated so that everything already spent on this dataset (``earlier``)
    plus the run's announced rounds ends at or below the site's ``max-epsilon``.

    Parameters
    ----------
    site, run
        The site's ``noise-multiplier`` (0 = calibrate), ``max-epsilon`` and ``delta``; the run's
        ``batch-size``, ``local-epochs`` and ``num-server-rounds``.
    num_units
        Privacy units (patients, or images with ``privacy-unit = image``) in the training split.
    earlier
        The DP events already booked on this dataset (every run, every round); None when nothing is spent.

    Raises
    ------
    PrivacyBudgetExceeded
        When ``earlier`` already spends the whole budget.
    """
    q = poisson_sample_rate(num_examples=num_units, batch_size=run.batch_size)
    per_round = run.local_epochs * steps_per_epoch(num_examples=num_units, batch_size=run.batch_size)
    if site.noise_multiplier > 0:
        sigma = site.noise_multiplier
    else:
        try:
            sigma = calibrate_noise(
                target_epsilon=site.max_epsilon, delta=site.delta, sample_rate=q,
                steps=per_round * run.num_server_rounds, earlier=earlier or [],
            )
        except ValueError as exc:
            raise PrivacyBudgetExceeded(
                f"site {site.site} declines the run: its privacy budget on this dataset is spent ({exc})"
            ) from exc
    return Plan(noise_multiplier=sigma, sample_rate=q, steps_per_round=per_round, planned_rounds=run.num_server_rounds)


def _verified_rows(site: SiteConfig, ledger: Ledger) -> list[Row]:
    """The ledger's rows; refuse to train on a ledger that fails verification: it could under-count ε."""
    _, rows, head = ledger.snapshot()  # rows and seal read together, so a concurrent append cannot break the seal
    problems = verify(rows, head, load_public_key(ledger.public_pem()))
    if problems:
        raise DataError(
            f"site {site.site}'s privacy ledger {ledger.path} fails verification ({problems[0]}); "
            "run `fl-audit --ledger` and restore the ledger from backup before training again"
        )
    return rows


def open_data(site: SiteConfig, run: RunConfig, *, workers: int = 0, require_usable: bool = True) -> SiteData:
    """The site's data for this run, from its cache (updated first if files changed).

    In the site worker the first message of a run opens it and later messages of the run reuse it
    (:mod:`client.app.warm`).

    Parameters
    ----------
    site
        The site's config: its data and work folders.
    run
        The run config: preprocessing, classes, validation share and seed.
    workers
        Processes decoding DICOM when the cache is updated (0 = one per CPU core).
    require_usable
        Raise when nothing is left to train on; ``False`` (``fl-client --check``) returns the data with
        ``usable`` false and the reason in its report.

    Returns
    -------
    SiteData
        As :func:`client.data.dataset.load_site_data` returns it.
    """
    from client.data.dataset import load_site_data

    def load() -> SiteData:
        return load_site_data(data_dir=site.data_dir, work_dir=site.work_dir, config=run.preprocess,
                              classes=run.classes, val_fraction=run.val_fraction, seed=run.seed, workers=workers,
                              require_usable=require_usable)

    if not require_usable:  # fl-client --check: always a fresh look at the folder
        return load()
    from client.app.warm import kept

    key = (site.data_dir, site.work_dir, run.preprocess, run.classes, run.val_fraction, run.seed)
    return kept(key, load)


def _setup_torch(site: SiteConfig) -> torch.device:
    import torch

    from client.app.training import resolve_device

    if site.threads:
        torch.set_num_threads(site.threads)
    return resolve_device(site.device)


def _model(run: RunConfig, weights: StateDict) -> torch.nn.Module:
    from common.models import build_model

    model = build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes))
    model.load_state_dict(weights)
    return model


def _training_args(
    site: SiteConfig, run: RunConfig, data: SiteData, groups: np.ndarray | None, server_round: int
) -> dict[str, Any]:
    """What DP and plain training take alike: the training split and its privacy units, the run's recipe, a seed."""
    return {
        "images": data.images(data.train), "labels": data.labels[data.train], "groups": groups,
        "slices_per_patient": run.slices_per_patient, "augment": run.augment, "num_classes": len(run.classes),
        "epochs": run.local_epochs, "batch_size": run.batch_size, "learning_rate": run.learning_rate,
        "optimizer": run.optimizer, "momentum": run.momentum, "max_grad_norm": run.max_grad_norm,
        "device": _setup_torch(site), "seed": run.seed * 100_003 + server_round,
    }


def train_groups(site: SiteConfig, data: SiteData) -> tuple[np.ndarray | None, int]:
    """The patient index of each training image (None when ``site``'s privacy unit is the image), and the units."""
    from client.app.training import patient_groups

    if site.privacy_unit == "image":
        return None, len(data.train)
    groups = patient_groups([data.patients[i] for i in data.train])
    return groups, int(groups.max()) + 1 if len(groups) else 0


def _epsilon_metrics(prefix: str, eps: Epsilons) -> dict[str, float]:
    out = {f"{prefix}epsilon": eps.sound, f"{prefix}epsilon-rdp": eps.rdp}
    if eps.prv is not None:
        out[f"{prefix}epsilon-prv"] = eps.prv
    return out


def train_round(
    *, site: SiteConfig, run: RunConfig, run_id: int | str, server_round: int, weights: StateDict
) -> tuple[StateDict, dict[str, float | int], dict[str, str | int]]:
    """Train the global weights with DP-SGD on the site's training split, inside its budget.

    A round this site already trained and booked in this run, asked for again with
    the same weights (the coordinator resumed after losing it), is answered with the
    stored update: no new training, no new ledger row (:mod:`client.app.replay`).

    Parameters
    ----------
    site, run
        The site's config (data, work folder, ledger, budget, ``dp`` switch, device) and the run's.
    run_id
        The run's id as the ledger books it (a resumed run keeps the id of the run it continues).
    server_round, weights
        The coordinator's round number and the global weights to start from.

    Returns
    -------
    tuple
        The new weights (on CPU); the numbers for the coordinator (``num-examples`` and this round's
        DP facts: cumulative and in-run ε, δ, ``max-epsilon``, σ, q, steps, clipping norm; no training
        loss, which is outside the DP guarantee); and the site's non-numeric facts (privacy unit, ledger
        key, and the number and hash of the ledger row this round added). With ``dp = false`` (fl-sim's
        baseline): ``num-examples`` and the privacy unit only, and no ledger row.

    Raises
    ------
    PrivacyBudgetExceeded
        When this round would take the site's cumulative ε on this dataset above its ``max-epsilon``;
        nothing is trained or recorded.
    DataError
        When the ledger fails verification, or the data is unusable (:func:`client.data.dataset.load_site_data`).
    ConfigError
        When the site asks for ``device = cuda`` and has no GPU.
    """
    import opacus

    from client.app.training import train_dp

    data = open_data(site, run)
    if not site.dp:
        return _train_without_dp(site=site, run=run, server_round=server_round, weights=weights, data=data)
    ledger = Ledger(site.privacy_dir)
    on_dataset = [row for row in _verified_rows(site, ledger) if row.fingerprint == data.fingerprint]
    store = UpdateStore(site.work_dir)
    started_from = weights_digest(weights)
    booked = [row for row in on_dataset if row.run_id == str(run_id) and row.server_round == server_round]
    if booked:
        stored = store.load(run_id=str(run_id), server_round=server_round, started_from=started_from)
        if stored is not None:
            log.warning(
                "Site %s: round %d of run %s was already trained and booked (ledger row %d); the coordinator lost it, "
                "so the same update is sent again: no new training, no new privacy cost",
                site.site, server_round, run_id, booked[-1].seq,
            )
            return stored
        log.warning(
            "Site %s: round %d of run %s was already trained (ledger row %d) from other weights or without a stored "
            "update; training it again is booked again",
            site.site, server_round, run_id, booked[-1].seq,
        )
    earlier = [row.event for row in on_dataset]
    groups, num_units = train_groups(site, data)
    plan = ledger.plan(run_id=str(run_id), fingerprint=data.fingerprint)
    if plan is None:
        plan = ledger.save_plan(
            run_id=str(run_id), fingerprint=data.fingerprint,
            plan=plan_privacy(site=site, run=run, num_units=num_units, earlier=earlier),
        )
    planned = DPEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    projected = epsilons(events=[*earlier, planned], delta=site.delta)
    if projected.sound > site.max_epsilon * (1 + 1e-9):
        spent = epsilons(events=earlier, delta=site.delta).sound if earlier else 0.0
        raise PrivacyBudgetExceeded(
            f"site {site.site} declines round {server_round}: it would reach ε={projected.sound:.3f} "
            f"> its max-epsilon {site.max_epsilon:g} (δ={site.delta:g}; {spent:.3f} spent on this dataset "
            f"in {len(earlier)} earlier rounds)",
            spent=spent,
        )
    model = _model(run, weights)
    outcome = train_dp(
        model, **_training_args(site, run, data, groups, server_round), noise_multiplier=plan.noise_multiplier,
        secure_mode=site.secure_mode,
    )
    event = outcome.event
    cumulative = projected if event == planned else epsilons(events=[*earlier, event], delta=site.delta)
    in_run = [row.event for row in on_dataset if row.run_id == str(run_id)]
    same = len(in_run) == len(on_dataset)  # nothing else was ever trained on this dataset
    run_eps = cumulative if same else epsilons(events=[*in_run, event], delta=site.delta)
    row = ledger.append(
        Entry(
            site=site.site, run_id=str(run_id), server_round=server_round, fingerprint=data.fingerprint,
            privacy_unit=site.privacy_unit, noise_multiplier=event.noise_multiplier,
            sample_rate=event.sample_rate, steps=event.steps, max_grad_norm=run.max_grad_norm,
            delta=site.delta, max_epsilon=site.max_epsilon, epsilon_rdp=cumulative.rdp,
            epsilon_prv=cumulative.prv, epsilon=cumulative.sound, opacus=opacus.__version__,
        )
    )
    log.info(
        "Site %s round %d: trained on %d images (%d %ss), loss %.4f, σ=%.3f, ε=%.3f of %.3g (ledger row %d)",
        site.site, server_round, outcome.num_examples, num_units, site.privacy_unit, outcome.loss,
        event.noise_multiplier, cumulative.sound, site.max_epsilon, row.seq,
    )
    # No training loss: it is a function of the training data without noise (outside the DP guarantee).
    metrics: dict[str, float | int] = {
        records.NUM_EXAMPLES: outcome.num_examples,
        **_epsilon_metrics("", cumulative),
        **_epsilon_metrics("run-", run_eps),
        records.DELTA: site.delta,
        records.MAX_EPSILON: site.max_epsilon,
        records.NOISE_MULTIPLIER: event.noise_multiplier,
        records.SAMPLE_RATE: event.sample_rate,
        records.STEPS: event.steps,
        records.MAX_GRAD_NORM: run.max_grad_norm,
    }
    facts: dict[str, str | int] = {
        records.PRIVACY_UNIT: site.privacy_unit,
        records.LEDGER_KEY: key_fingerprint(ledger.public_pem()),
        records.LEDGER_ROW: row.seq,
        records.LEDGER_HASH: row.hash,
    }
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    store.save(run_id=str(run_id), server_round=server_round, started_from=started_from, weights=state,
               metrics=metrics, facts=facts)
    return state, metrics, facts


NO_DP_WARNING = "site %s trains WITHOUT differential privacy (dp=false): a simulation baseline, no privacy guarantee"


def _train_without_dp(
    *, site: SiteConfig, run: RunConfig, server_round: int, weights: StateDict, data: SiteData
) -> tuple[StateDict, dict[str, float | int], dict[str, str | int]]:
    """fl-sim's non-private baseline: same data, steps and optimiser, no clipping, noise or ledger row."""
    from client.app.training import train_plain

    log.warning(NO_DP_WARNING, site.site)
    model = _model(run, weights)
    outcome = train_plain(model, **_training_args(site, run, data, train_groups(site, data)[0], server_round))
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    return state, {records.NUM_EXAMPLES: outcome.num_examples}, {records.PRIVACY_UNIT: "none (no DP)"}


def evaluate_round(*, site: SiteConfig, run: RunConfig, weights: StateDict) -> dict[str, float | int | list[int]]:
    """Evaluate the global weights on the site's validation split; summable statistics only.

    Parameters
    ----------
    site
        The site's config: data and work folders, device, threads.
    run
        The coordinator's run config: model, classes, preprocessing and split.
    weights
        The global weights to evaluate.

    Returns
    -------
    dict[str, float | int | list[int]]
        ``num-examples`` (validation images), the mean validation loss and the sufficient statistics of
        :func:`common.metrics.sufficient_statistics`; never a per-image value.

    Raises
    ------
    DataError
        When the site's data is unusable (:func:`client.data.dataset.load_site_data`).
    ConfigError
        When the site asks for ``device = cuda`` and has no GPU.
    """
    from client.app.evaluation import evaluate

    data = open_data(site, run)
    device = _setup_torch(site)
    outcome = evaluate(
        _model(run, weights), images=data.images(data.validation), labels=data.labels[data.validation],
        device=device, num_classes=len(run.classes),
    )
    return {records.NUM_EXAMPLES: outcome.num_examples, records.EVAL_LOSS: outcome.loss, **outcome.statistics}
