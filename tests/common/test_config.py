from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from common.config import PreprocessConfig, RunConfig, SiteConfig
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_build_a_valid_run_config() -> None:
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_flower(defaults)
    assert cfg.num_server_rounds == defaults["num-server-rounds"]
    assert cfg.preprocess == PreprocessConfig(image_size=defaults["image-size"], window=defaults["window"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num-server-rounds", 0, "Expected `num-server-rounds` to be a positive integer, but got 0"),
        ("learning-rate", -1, "Expected `learning-rate` to be a positive number, but got -1"),
        ("fraction-train", 1.5, "Expected `fraction-train` to be a number in (0, 1], but got 1.5"),
        ("window", "liver", "Expected `window` to be one of"),
        ("model", "resnet-9000", "Expected `model` to be one of"),
        ("image-size", 8, "Expected `image-size` to be an integer in [16, 1024], but got 8"),
        ("optimizer", "rmsprop", "Expected `optimizer` to be one of sgd, adam, but got 'rmsprop'"),
        ("momentum", 1.0, "Expected `momentum` to be in [0, 1), but got 1.0"),
        ("momentum", -0.1, "Expected `momentum` to be a non-negative number, but got -0.1"),
    ],
)
def test_run_config_rejects_bad_values(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({key: value})
    assert message in str(err.value)


def test_site_config_round_trips_through_flower_node_config(tmp_path: Path) -> None:
    site = SiteConfig(site="A", data_dir=tmp_path / "data dir", work_dir=tmp_path / "work", max_epsilon=3.5, threads=1)
    parsed = parse_config_args([site.to_flower()])
    assert SiteConfig.from_flower(parsed) == site


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max-epsilon": -1}, "Expected `max-epsilon` to be a positive number, but got -1"),
        ({"device": "tpu"}, "Expected `device` to be one of auto, cpu, cuda, but got 'tpu'"),
        ({"site": "A B"}, "Expected `site` to be a name"),
        ({"delta": 2.0}, "Expected `delta` to be below 1"),
    ],
)
def test_site_config_rejects_bad_values(override: dict[str, object], message: str) -> None:
    node_config = {"site": "A", "data-dir": "/d", "work-dir": "/w", **override}
    with pytest.raises(ConfigError) as err:
        SiteConfig.from_flower(node_config)
    assert message in str(err.value)


def test_site_config_requires_site_data_and_work_dir() -> None:
    with pytest.raises(ConfigError, match="Expected `data-dir` in the node config"):
        SiteConfig.from_flower({"site": "A", "work-dir": "/w"})


def test_preprocessing_and_label_keys_of_the_run_config() -> None:
    from common.config import PreprocessConfig, RunConfig

    run = RunConfig.from_flower(
        {"window": "voi", "multiframe": "reject", "color": "grey", "enhance": "denoise", "classes": "a, b ,c"}
    )
    assert run.preprocess == PreprocessConfig(window="voi", multiframe="reject", color="grey", enhance="denoise")
    assert run.classes == ("a", "b", "c")
    assert run.preprocess.key() != PreprocessConfig().key()
    for key, value in (("window", "abdomen"), ("multiframe", "x"), ("color", "rgb"), ("enhance", "clahe"), ("classes", "a,a"), ("classes", "a")):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flower({key: value})
