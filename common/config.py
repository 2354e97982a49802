"""Typed configuration for each side, validated once.

``RunConfig`` holds the coordinator's choices (Flower's ``run_config``);
``SiteConfig`` holds a site's own choices (Flower's ``node_config``): its data,
its work directory, its privacy budget and its device. Anything a site must
control comes from the node config only, whatever the run config says.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # name: (center, width) in Hounsfield units
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "bone": (600.0, 2800.0),
    "lung": (-600.0, 1500.0),
    "soft-tissue": (50.0, 400.0),
}

# `voi` uses each file's own VOI LUT or window (any modality); the presets need CT (HU).
WINDOWS = (*WINDOW_PRESETS, "voi")
MULTIFRAME = ("slices", "reject")  # frames as separate images, or reject the file
COLOR = ("reject", "grey")  # reject RGB/YBR/palette images, or convert them to luminance
ENHANCE = ("none", "equalize", "denoise")  # optional step after windowing

DEVICES = ("auto", "cpu", "cuda")
PRIVACY_UNITS = ("patient", "image")  # what one DP "record" is: all of a patient's images, or one image
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _get(source: Mapping[str, Any], key: str, default: Any) -> Any:
    return source[key] if key in source else default


def positive_float(key: str, value: Any) -> float:
    """Return ``value`` as a finite float > 0 or raise :class:`ConfigError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"Expected `{key}` to be a positive number, but got {value!r}")
    return number


def positive_int(key: str, value: Any) -> int:
    """Return ``value`` as an int >= 1 or raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"Expected `{key}` to be a positive integer, but got {value!r}")
    if value < 1:
        raise ConfigError(f"Expected `{key}` to be a positive integer, but got {value!r}")
    return int(value)


def _non_negative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"Expected `{key}` to be a non-negative integer, but got {value!r}")
    return value


def _non_negative_float(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ConfigError(f"Expected `{key}` to be a non-negative number, but got {value!r}")
    return number


def fraction(key: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float in (0, 1] (or [0, 1]) or raise :class:`ConfigError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    low_ok = number >= 0 if allow_zero else number > 0
    if isinstance(value, bool) or not (low_ok and number <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"Expected `{key}` to be a number in {interval}, but got {value!r}")
    return number


def choice(key: str, value: Any, options: tuple[str, ...] | list[str]) -> str:
    """Return ``value`` if it is one of ``options`` or raise :class:`ConfigError`."""
    if value not in options:
        raise ConfigError(f"Expected `{key}` to be one of {', '.join(options)}, but got {value!r}")
    return str(value)


def site_name(value: Any) -> str:
    """Validate a site name (letters, digits, ``_`` and ``-``; at most 64 characters)."""
    if not isinstance(value, str) or not SITE_NAME_RE.match(value):
        raise ConfigError(
            "Expected `site` to be a name of letters, digits, '_' or '-' "
            f"(at most 64 characters), but got {value!r}"
        )
    return value


@dataclass(frozen=True)
class PreprocessConfig:
    """How a DICOM file becomes model inputs; part of the site's cache key."""

    image_size: int = 64
    window: str = "brain"
    multiframe: str = "slices"
    color: str = "reject"
    enhance: str = "none"

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size > 1024:
            raise ConfigError(
                f"Expected `image-size` to be an integer in [16, 1024], but got {self.image_size!r}"
            )
        choice("window", self.window, WINDOWS)
        choice("multiframe", self.multiframe, MULTIFRAME)
        choice("color", self.color, COLOR)
        choice("enhance", self.enhance, ENHANCE)

    def key(self) -> str:
        """Stable text form, hashed into cache keys."""
        return (
            f"v2|size={self.image_size}|window={self.window}|multiframe={self.multiframe}"
            f"|color={self.color}|enhance={self.enhance}"
        )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> PreprocessConfig:
        """Build from the preprocessing keys of a run config (defaults for missing keys)."""
        d = cls()
        image_size = _get(run_config, "image-size", d.image_size)
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise ConfigError(f"Expected `image-size` to be an integer, but got {image_size!r}")
        return cls(
            image_size=image_size,
            window=choice("window", _get(run_config, "window", d.window), WINDOWS),
            multiframe=choice("multiframe", _get(run_config, "multiframe", d.multiframe), MULTIFRAME),
            color=choice("color", _get(run_config, "color", d.color), COLOR),
            enhance=choice("enhance", _get(run_config, "enhance", d.enhance), ENHANCE),
        )


def parse_classes(value: Any) -> tuple[str, ...]:
    """``"0,1"`` → ``("0", "1")``: the label values of ``labels.csv``, in class-index order."""
    if not isinstance(value, str):
        raise ConfigError(f"Expected `classes` to be comma-separated class names, but got {value!r}")
    names = tuple(c.strip() for c in value.split(","))
    if len(names) < 2 or any(not c for c in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"Expected `classes` to be at least two distinct comma-separated names, but got {value!r}"
        )
    return names


YOUDEN = "youden"  # operating-point: the threshold maximising Youden's J (sensitivity + specificity - 1)


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
class AugmentConfig:
    """Training-time augmentation; all zero (the default) means none. Never used for evaluation."""

    flip: float = 0.0  # probability of a left-right flip
    rotate: float = 0.0  # maximum rotation, degrees (uniform in ±rotate)
    shift: float = 0.0  # maximum translation, fraction of the image size
    intensity: float = 0.0  # maximum relative contrast/brightness jitter

    @property
    def enabled(self) -> bool:
        return any((self.flip, self.rotate, self.shift, self.intensity))

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> AugmentConfig:
        def bounded(key: str, default: float, high: float) -> float:
            value = _get(run_config, key, default)
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(value, bool) or not 0 <= number <= high:
                raise ConfigError(f"Expected `{key}` to be a number in [0, {high:g}], but got {value!r}")
            return number

        d = cls()
        return cls(
            flip=bounded("augment-flip", d.flip, 1.0),
            rotate=bounded("augment-rotate", d.rotate, 180.0),
            shift=bounded("augment-shift", d.shift, 0.5),
            intensity=bounded("augment-intensity", d.intensity, 1.0),
        )


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+) settings from the run config.

    ``shares`` and ``threshold`` are fractions: of the sites sampled in a round,
    and of the shares (Flower rounds them; at least 2 shares are needed to
    reconstruct). Sites send ``num-examples / max-weight × weights``, clipped to
    ±``clipping-range`` and quantized to ``quantization-range`` levels; a site
    refuses to mask an update that would be clipped (see :mod:`client.app.secure`).
    """

    enabled: bool = True
    shares: float = 1.0
    threshold: float = 0.6
    timeout: float = 600.0  # seconds per protocol stage; the stage that trains included
    max_weight: int = 10_000
    clipping_range: float = 8.0
    quantization_range: int = 1 << 22
    modulus_range: int = 1 << 32

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> SecAggConfig:
        """Build and validate from Flower's ``context.run_config`` (keys ``secagg*``)."""
        d = cls()
        enabled = _get(run_config, "secagg", d.enabled)
        if not isinstance(enabled, bool):
            raise ConfigError(f"Expected `secagg` to be true or false, but got {enabled!r}")
        quantization = positive_int("secagg-quantization-range", _get(run_config, "secagg-quantization-range", d.quantization_range))
        if quantization & (quantization - 1) or quantization > 1 << 24:
            raise ConfigError(
                "Expected `secagg-quantization-range` to be a power of 2 up to 2**24 "
                f"(sums of up to 256 sites stay below the 2**32 modulus), but got {quantization!r}"
            )
        cfg = cls(
            enabled=enabled,
            shares=fraction("secagg-shares", _get(run_config, "secagg-shares", d.shares)),
            threshold=fraction("secagg-threshold", _get(run_config, "secagg-threshold", d.threshold)),
            timeout=positive_float("secagg-timeout", _get(run_config, "secagg-timeout", d.timeout)),
            max_weight=positive_int("secagg-max-weight", _get(run_config, "secagg-max-weight", d.max_weight)),
            clipping_range=positive_float("secagg-clipping-range", _get(run_config, "secagg-clipping-range", d.clipping_range)),
            quantization_range=quantization,
        )
        return cfg

    def tolerance(self, *, sites: int, total_examples: int) -> float:
        """Largest per-weight difference between the secure aggregate and plaintext FedAvg.

        Each site's stochastic rounding errs by less than one quantization step,
        ``2 · clipping-range / quantization-range``, on its weighted update
        (``num-examples / max-weight × weights``); dividing the sum by the total
        weight gives this bound, plus a little for float32 rounding.
        """
        step = 2 * self.clipping_range / self.quantization_range
        return sites * step * self.max_weight / max(total_examples, 1) + 1e-6


AGGREGATIONS = ("fedavg", "trimmed-mean", "median")
OPTIMIZERS = ("sgd", "adam")  # client/app/training.py builds them


def _momentum(value: Any) -> float:
    number = _non_negative_float("momentum", value)
    if number >= 1:
        raise ConfigError(f"Expected `momentum` to be in [0, 1), but got {value!r}")
    return number


def _run_id(value: Any) -> str:
    text = str(value)
    if not isinstance(value, str | int) or isinstance(value, bool) or (text and not re.fullmatch(r"[0-9]+", text)):
        raise ConfigError(f"Expected `resume-run-id` to be a run id (digits) or empty, but got {value!r}")
    return text


@dataclass(frozen=True)
class RoundPolicy:
    """How the coordinator runs a round: deadlines, quorum, retries, update screening, aggregation.

    - ``timeout``: seconds the coordinator waits for the sites' answers to one round's
      training (and again for its evaluation). A message not answered by then expires:
      the round goes on with the sites that answered, and a late site never trains it.
    - ``join_timeout``: seconds to wait, at the start of a round, for ``min-sites`` sites to be
      connected before the round is given up.
    - ``retries``: a round whose usable answers fall short of ``min-sites`` is tried again this
      many times (with the sites connected then) before the run stops with the reason.
    - ``norm_factor``: an update whose distance from the global model is more than this many
      times the median of the other sites' is rejected (0 turns the check off; plain runs only).
    - ``aggregation``: ``fedavg`` (weighted by examples), or the robust ``trimmed-mean`` /
      ``median`` (coordinate-wise, unweighted; plain runs only), with ``trim_fraction``.
    """

    timeout: float = 600.0
    join_timeout: float = 600.0
    retries: int = 1
    norm_factor: float = 10.0
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RoundPolicy:
        d = cls()
        norm_factor = _non_negative_float("norm-factor", _get(run_config, "norm-factor", d.norm_factor))
        if 0 < norm_factor <= 1:
            raise ConfigError(f"Expected `norm-factor` to be 0 (off) or above 1, but got {norm_factor!r}")
        trim = _non_negative_float("trim-fraction", _get(run_config, "trim-fraction", d.trim_fraction))
        if trim >= 0.5:
            raise ConfigError(f"Expected `trim-fraction` to be below 0.5, but got {trim!r}")
        return cls(
            timeout=positive_float("round-timeout", _get(run_config, "round-timeout", d.timeout)),
            join_timeout=positive_float("join-timeout", _get(run_config, "join-timeout", d.join_timeout)),
            retries=_non_negative_int("round-retries", _get(run_config, "round-retries", d.retries)),
            norm_factor=norm_factor,
            aggregation=choice("aggregation", _get(run_config, "aggregation", d.aggregation), AGGREGATIONS),
            trim_fraction=trim,
        )


@dataclass(frozen=True)
class InitWeightsConfig:
    """The file a run starts from instead of seeded random weights (``--init-weights FILE``).

    ``path`` is absolute and ``sha256`` the hash fl-server/fl-sim computed when they
    checked the file against the run's model (:mod:`common.weights`); the ServerApp
    refuses the file if its hash changed since. Both empty: seeded random weights.
    """

    path: str = ""
    sha256: str = ""

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> InitWeightsConfig:
        """Build and validate from Flower's ``context.run_config`` (keys ``init-weights*``)."""
        path, sha256 = (_get(run_config, k, "") for k in ("init-weights", "init-weights-sha256"))
        if not isinstance(path, str) or (path and not Path(path).is_absolute()):
            raise ConfigError(f"Expected `init-weights` to be an absolute path or empty, but got {path!r}")
        if not isinstance(sha256, str) or (sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256)):
            raise ConfigError(f"Expected `init-weights-sha256` to be a SHA-256 in hex or empty, but got {sha256!r}")
        if bool(path) != bool(sha256):
            raise ConfigError(
                f"Expected `init-weights` and `init-weights-sha256` together, but got only "
                f"`{'init-weights' if path else 'init-weights-sha256'}`; give the file with `--init-weights FILE` "
                "(fl-server, fl-sim run), which checks it and sets both"
            )
        return cls(path=path, sha256=sha256)


@dataclass(frozen=True)
class RunConfig:
    """The coordinator's choices for one run (Flower ``run_config``)."""

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
    preprocess: PreprocessConfig = PreprocessConfig()
    classes: tuple[str, ...] = ("0", "1")
    operating_point: str | float = YOUDEN  # binary: how each round's decision threshold is chosen
    augment: AugmentConfig = AugmentConfig()
    val_fraction: float = 0.25
    seed: int = 0
    workdir: str = ""
    secagg: SecAggConfig = SecAggConfig()
    rounds: RoundPolicy = RoundPolicy()
    init_weights: InitWeightsConfig = InitWeightsConfig()
    resume_run_id: str = ""
    """fl-server --resume: the id of the run being continued ("" for a fresh run). Sites book
    the resumed rounds under this id, so their DP plan and ledger rows stay those of one run."""

    def run_id(self, flower_run_id: int) -> str:
        """The run's id for reports and ledgers: the resumed run's id, else Flower's."""
        return self.resume_run_id or str(flower_run_id)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build and validate from Flower's ``context.run_config``."""
        from common.models import MODELS

        d = cls()
        seed = _get(run_config, "seed", d.seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"Expected `seed` to be an integer, but got {seed!r}")
        val_fraction = fraction("val-fraction", _get(run_config, "val-fraction", d.val_fraction))
        if val_fraction >= 1:
            raise ConfigError(f"Expected `val-fraction` to be below 1, but got {val_fraction!r}")
        cfg = cls(
            num_server_rounds=positive_int(
                "num-server-rounds", _get(run_config, "num-server-rounds", d.num_server_rounds)
            ),
            min_sites=positive_int("min-sites", _get(run_config, "min-sites", d.min_sites)),
            fraction_train=fraction(
                "fraction-train", _get(run_config, "fraction-train", d.fraction_train)
            ),
            fraction_evaluate=fraction(
                "fraction-evaluate",
                _get(run_config, "fraction-evaluate", d.fraction_evaluate),
                allow_zero=True,
            ),
            local_epochs=positive_int(
                "local-epochs", _get(run_config, "local-epochs", d.local_epochs)
            ),
            batch_size=positive_int("batch-size", _get(run_config, "batch-size", d.batch_size)),
            learning_rate=positive_float(
                "learning-rate", _get(run_config, "learning-rate", d.learning_rate)
            ),
            optimizer=choice("optimizer", _get(run_config, "optimizer", d.optimizer), OPTIMIZERS),
            momentum=_momentum(_get(run_config, "momentum", d.momentum)),
            max_grad_norm=positive_float(
                "max-grad-norm", _get(run_config, "max-grad-norm", d.max_grad_norm)
            ),
            slices_per_patient=positive_int(
                "slices-per-patient", _get(run_config, "slices-per-patient", d.slices_per_patient)
            ),
            model=choice("model", _get(run_config, "model", d.model), sorted(MODELS)),
            preprocess=PreprocessConfig.from_flower(run_config),
            classes=parse_classes(_get(run_config, "classes", ",".join(d.classes))),
            operating_point=parse_operating_point(_get(run_config, "operating-point", d.operating_point)),
            augment=AugmentConfig.from_flower(run_config),
            val_fraction=val_fraction,
            seed=seed,
            workdir=str(_get(run_config, "workdir", d.workdir)),
            secagg=SecAggConfig.from_flower(run_config),
            rounds=RoundPolicy.from_flower(run_config),
            resume_run_id=_run_id(_get(run_config, "resume-run-id", "")),
            init_weights=InitWeightsConfig.from_flower(run_config),
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


SIM_SITES_KEY = "sim-sites"  # run config: fl-sim's table of virtual sites (JSON list of node configs)
PARTITION_ID_KEY = "partition-id"  # node config key Flower's simulation runtime sets


def simulated_node_config(table: Path, partition_id: int) -> dict[str, Any]:
    """Row ``partition_id`` of fl-sim's site table (a JSON list of node-config dicts)."""
    import json

    try:
        rows = json.loads(table.read_text())
        return dict(rows[partition_id])
    except (OSError, ValueError, IndexError, TypeError) as exc:
        raise ConfigError(
            f"Expected fl-sim's site table {table} to hold a node config for partition {partition_id}, "
            f"but it could not be read ({exc}); rerun fl-sim"
        ) from exc


@dataclass(frozen=True)
class SiteConfig:
    """A site's own choices (Flower ``node_config``); the coordinator cannot override them."""

    site: str
    data_dir: Path
    work_dir: Path
    max_epsilon: float = 8.0
    delta: float = 1e-5
    device: str = "auto"
    secure_mode: bool = True  # DP sampling/noise from the OS CSPRNG; off only in tests
    threads: int = 0  # torch CPU threads; 0 = torch's default
    privacy_unit: str = "patient"
    noise_multiplier: float = 0.0  # the site's own fixed σ; 0 = calibrate σ to the run's plan
    dp: bool = True  # False only for fl-sim's non-private baselines; fl-client always trains with DP
    ledger_dir: Path | None = None  # fl-sim: one fresh ledger per simulated run; default work_dir/privacy

    @property
    def privacy_dir(self) -> Path:
        """Where the site's ledger and its signing key live."""
        return self.ledger_dir if self.ledger_dir is not None else self.work_dir / "privacy"

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """Build and validate from Flower's ``context.node_config``."""
        for key in ("site", "data-dir", "work-dir"):
            if key not in node_config:
                raise ConfigError(
                    f"Expected `{key}` in the node config, but it is missing; "
                    "start the SuperNode with `fl-client`"
                )
        delta = positive_float("delta", _get(node_config, "delta", 1e-5))
        if delta >= 1:
            raise ConfigError(f"Expected `delta` to be below 1, but got {delta!r}")
        secure_mode = _get(node_config, "secure-mode", True)
        if not isinstance(secure_mode, bool):
            raise ConfigError(f"Expected `secure-mode` to be true or false, but got {secure_mode!r}")
        dp = _get(node_config, "dp", True)
        if not isinstance(dp, bool):
            raise ConfigError(f"Expected `dp` to be true or false, but got {dp!r}")
        return cls(
            site=site_name(node_config["site"]),
            data_dir=Path(str(node_config["data-dir"])),
            work_dir=Path(str(node_config["work-dir"])),
            max_epsilon=positive_float("max-epsilon", _get(node_config, "max-epsilon", 8.0)),
            delta=delta,
            device=choice("device", _get(node_config, "device", "auto"), DEVICES),
            secure_mode=secure_mode,
            threads=_non_negative_int("threads", _get(node_config, "threads", 0)),
            privacy_unit=choice("privacy-unit", _get(node_config, "privacy-unit", "patient"), PRIVACY_UNITS),
            noise_multiplier=_non_negative_float("noise-multiplier", _get(node_config, "noise-multiplier", 0.0)),
            dp=dp,
            ledger_dir=Path(str(node_config["ledger-dir"])) if node_config.get("ledger-dir") else None,
        )

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteConfig:
        """The site's config for a message: its node config, or its row of fl-sim's site table.

        Flower's simulation runtime gives every virtual SuperNode only a
        ``partition-id``; fl-sim writes one node config per partition into the
        JSON file named by the run config's ``sim-sites``. A real SuperNode
        (started by fl-client) never has a ``partition-id``, so a coordinator
        cannot use ``sim-sites`` to change a real site's settings.
        """
        table = str(run_config.get(SIM_SITES_KEY, "") or "")
        if PARTITION_ID_KEY not in node_config or not table:
            return cls.from_flower(node_config)
        return cls.from_flower(simulated_node_config(Path(table), int(node_config[PARTITION_ID_KEY])))

    def to_flower(self) -> str:
        """Render as a ``--node-config`` string for ``flower-supernode``."""
        items = {
            "site": self.site,
            "data-dir": str(self.data_dir),
            "work-dir": str(self.work_dir),
            "max-epsilon": float(self.max_epsilon),
            "delta": float(self.delta),
            "device": self.device,
            "secure-mode": self.secure_mode,
            "threads": self.threads,
            "privacy-unit": self.privacy_unit,
            "noise-multiplier": float(self.noise_multiplier),
        }
        parts = []
        for key, value in items.items():
            if isinstance(value, bool):
                parts.append(f"{key}={'true' if value else 'false'}")
            elif isinstance(value, str):
                if '"' in value or "\\" in value:
                    raise ConfigError(f"Expected `{key}` without quotes or backslashes, but got {value!r}")
                parts.append(f'{key}="{value}"')
            else:
                parts.append(f"{key}={value!r}")
        return " ".join(parts)
