"""Typed configuration, validated once: a user's run config, what fedrad's commands set, a site's own."""

from common.config.launch import (
    INIT_WEIGHTS_KEY,
    INIT_WEIGHTS_SHA256_KEY,
    LAUNCH_KEYS,
    RESUME_RUN_ID_KEY,
    RUNS_DIR_KEY,
    SIM_SITES_KEY,
    SITE_NODES_KEY,
    TRANSPORT_KEY,
    WORKDIR_KEY,
    InitWeightsConfig,
    Launch,
    refuse_launch_keys,
)
from common.config.preprocess import (
    COLOR,
    ENHANCE,
    MULTIFRAME,
    WINDOW_PRESETS,
    WINDOWS,
    AugmentConfig,
    PreprocessConfig,
)
from common.config.run import (
    AGGREGATIONS,
    OPTIMIZERS,
    YOUDEN,
    RoundPolicy,
    RunConfig,
    parse_classes,
    parse_operating_point,
)
from common.config.secagg import SecAggConfig, check_model_fits, largest_magnitude, sized_secagg
from common.config.site import DEVICES, PARTITION_ID_KEY, PRIVACY_UNITS, SiteConfig
from common.config.values import SITE_NAME_RE, choice, fraction, positive_float, positive_int, site_name

__all__ = [
    "AGGREGATIONS", "COLOR", "DEVICES", "ENHANCE", "INIT_WEIGHTS_KEY", "INIT_WEIGHTS_SHA256_KEY", "LAUNCH_KEYS",
    "MULTIFRAME", "OPTIMIZERS", "PARTITION_ID_KEY", "PRIVACY_UNITS", "RESUME_RUN_ID_KEY", "RUNS_DIR_KEY",
    "SIM_SITES_KEY", "SITE_NAME_RE", "SITE_NODES_KEY", "TRANSPORT_KEY", "WINDOWS", "WINDOW_PRESETS", "WORKDIR_KEY",
    "YOUDEN", "AugmentConfig", "InitWeightsConfig", "Launch", "PreprocessConfig", "RoundPolicy", "RunConfig",
    "SecAggConfig", "SiteConfig", "check_model_fits", "choice", "fraction", "largest_magnitude", "parse_classes",
    "parse_operating_point", "positive_float", "positive_int", "refuse_launch_keys", "site_name", "sized_secagg",
]
