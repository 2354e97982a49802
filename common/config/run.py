"""The coordinator's choices for one run (Flower's ``run_config``): what a user sets.

What fedrad's commands set in the same run config is :class:`common.config.launch.Launch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.config.preprocess import AugmentConfig, PreprocessConfig
from common.config.secagg import SecAggConfig
from common.config.values import choice, fraction, non_negative_float, non_negative_int, positive_float, positive_int
from common.errors import ConfigError

AGGREGATIONS = ("fedavg", "trimmed-mean", "median")
OPTIMIZERS = ("sgd", "adam")  # client/app/training.py builds them
YOUDEN = "youden"  # operating-point: the threshold maximising Youden's J (sensitivity + specificity - 1)


def parse_classes(value: Any) -> tuple[str, ...]:
    """``"0,1"`` → ``("0", "1")``: the label values of ``labels.csv``, in class-index order."""
    if not isinstance(value, str):
        raise ConfigError(f"Expected `classes` to be comma-separated class names, but got {value!r}")
    names = tuple(c.strip() for c in value.split(","))
    if len(names) < 2 or any(not c for c in names) or len(set(names)) != len(names):
        raise ConfigError(f"Expected `classes` to be at least two distinct comma-separated names, but got {value!r}")
    return names


def parse_operating_point(value: Any) -> str | float:
    """``"youden"``, or a target sensitivity in (0, 1) (a number, or its text: ``"0.9"``).

    How the coordinator picks each round's decision threshold from the pooled
    validation statistics (:func:`common.metrics.choose_threshold`).
    """
    if value == YOUDEN:
        return YOUDEN
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 < number < 1:
        raise ConfigError(
            f'Expected `operating-point` to be "{YOUDEN}" or a target sensitivity strictly between 0 and 1, '
            f"but got {value!r}"
        )
    return number


@dataclass(frozen=True)
class RoundPolicy:
    """How the coordinator runs a round: deadlines, quorum, retries, update screening, aggregation.

    A message not answered within ``timeout`` expires: the round goes on with the sites that
    answered, and a late site never trains it. A round whose usable answers fall short of
    ``min-sites`` is tried again ``retries`` times before the run stops with the reason.
    """

    timeout: float = 600.0  # seconds to wait for the sites' answers to a round's training (and its evaluation)
    join_timeout: float = 600.0  # seconds to wait at a round's start for ``min-sites`` connected sites
    retries: int = 1
    norm_factor: float = 10.0  # reject an update farther than this × the others' median distance (0: off; plain)
    aggregation: str = "fedavg"  # weighted by examples; or "trimmed-mean"/"median" (coordinate-wise; plain runs)
    trim_fraction: float = 0.2

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RoundPolicy:
        """Build and validate from the round keys of a run config (defaults for missing keys)."""
        d = cls()
        norm_factor = non_negative_float("norm-factor", run_config.get("norm-factor", d.norm_factor))
        if 0 < norm_factor <= 1:
            raise ConfigError(f"Expected `norm-factor` to be 0 (off) or above 1, but got {norm_factor!r}")
        trim = non_negative_float("trim-fraction", run_config.get("trim-fraction", d.trim_fraction))
        if trim >= 0.5:
            raise ConfigError(f"Expected `trim-fraction` to be below 0.5, but got {trim!r}")
        return cls(
            timeout=positive_float("round-timeout", run_config.get("round-timeout", d.timeout)),
            join_timeout=positive_float("join-timeout", run_config.get("join-timeout", d.join_timeout)),
            retries=non_negative_int("round-retries", run_config.get("round-retries", d.retries)),
            norm_factor=norm_factor,
            aggregation=choice("aggregation", run_config.get("aggregation", d.aggregation), AGGREGATIONS),
            trim_fraction=trim,
        )


def _momentum(value: Any) -> float:
    number = non_negative_float("momentum", value)
    if number >= 1:
        raise ConfigError(f"Expected `momentum` to be in [0, 1), but got {value!r}")
    return number


@dataclass(frozen=True)
class RunConfig:
    """The coordinator's choices for one run (Flower ``run_config``), without what fedrad's commands set."""

    num_server_rounds: int = 5
    min_sites: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    local_epochs: int = 3
    batch_size: int = 128  # expected patients per DP step
    learning_rate: float = 1.0
    optimizer: str = "sgd"  # local optimiser: "sgd" (heavy-ball momentum) or "adam"
    momentum: float = 0.9  # sgd only
    max_grad_norm: float = 1.0
    slices_per_patient: int = 16  # images of a sampled patient used per DP step (memory bound)
    model: str = "fedrad-cnn"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    classes: tuple[str, ...] = ("0", "1")
    operating_point: str | float = YOUDEN  # binary: how each round's decision threshold is chosen
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_fraction: float = 0.25
    seed: int = 0
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    rounds: RoundPolicy = RoundPolicy()

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build and validate from Flower's ``context.run_config`` (keys fedrad's commands set are ignored)."""
        from common.models import MODELS

        d = cls()
        value = run_config.get
        seed = value("seed", d.seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"Expected `seed` to be an integer, but got {seed!r}")
        val_fraction = fraction("val-fraction", value("val-fraction", d.val_fraction))
        if val_fraction >= 1:
            raise ConfigError(f"Expected `val-fraction` to be below 1, but got {val_fraction!r}")
        cfg = cls(
            num_server_rounds=positive_int("num-server-rounds", value("num-server-rounds", d.num_server_rounds)),
            min_sites=positive_int("min-sites", value("min-sites", d.min_sites)),
            fraction_train=fraction("fraction-train", value("fraction-train", d.fraction_train)),
            fraction_evaluate=fraction(
                "fraction-evaluate", value("fraction-evaluate", d.fraction_evaluate), allow_zero=True
            ),
            local_epochs=positive_int("local-epochs", value("local-epochs", d.local_epochs)),
            batch_size=positive_int("batch-size", value("batch-size", d.batch_size)),
            learning_rate=positive_float("learning-rate", value("learning-rate", d.learning_rate)),
            optimizer=choice("optimizer", value("optimizer", d.optimizer), OPTIMIZERS),
            momentum=_momentum(value("momentum", d.momentum)),
            max_grad_norm=positive_float("max-grad-norm", value("max-grad-norm", d.max_grad_norm)),
            slices_per_patient=positive_int("slices-per-patient", value("slices-per-patient", d.slices_per_patient)),
            model=choice("model", value("model", d.model), sorted(MODELS)),
            preprocess=PreprocessConfig.from_flower(run_config),
            classes=parse_classes(value("classes", ",".join(d.classes))),
            operating_point=parse_operating_point(value("operating-point", d.operating_point)),
            augment=AugmentConfig.from_flower(run_config),
            val_fraction=val_fraction,
            seed=seed,
            secagg=SecAggConfig.from_flower(run_config),
            rounds=RoundPolicy.from_flower(run_config),
        )
        if cfg.secagg.enabled and cfg.rounds.aggregation != "fedavg":
            raise ConfigError(
                f"Expected `aggregation` to be fedavg with secure aggregation (the coordinator sees only the sum, "
                f"so a coordinate-wise {cfg.rounds.aggregation} cannot be computed), but got "
                f"{cfg.rounds.aggregation!r}; set secagg=false for robust aggregation"
            )
        if cfg.secagg.enabled and cfg.min_sites < 2:
            raise ConfigError(
                f"Expected `min-sites` to be at least 2 with secure aggregation (a sum of one update is that "
                f"update), but got {cfg.min_sites}; add sites, or set secagg=false"
            )
        return cfg
