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


def test_pyproject_lists_every_key_fedrad_sets_and_its_defaults_leave_them_empty() -> None:
    from common.config import LAUNCH_KEYS, Launch

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(LAUNCH_KEYS) <= set(defaults)
    assert Launch.from_flower(defaults) == Launch()
    assert not set(LAUNCH_KEYS) & {f.replace("_", "-") for f in RunConfig.__dataclass_fields__}


def test_launch_reads_what_fedrad_sets_and_renders_it_back() -> None:
    from common.config import InitWeightsConfig, Launch

    launch = Launch(workdir="/w", transport="tls (x)", site_nodes={12: "B", 34: "A"}, resume_run_id="99",
                    init_weights=InitWeightsConfig(path="/i.pt", sha256="a" * 64))
    assert Launch.from_flower(launch.to_flower()) == launch
    assert launch.to_flower()["site-nodes"] == "34:A,12:B"
    assert Launch.from_flower({"site-nodes": "12:A, 34:B,bad,:C"}).site_nodes == {12: "A", 34: "B"}
    assert launch.run_id(7) == "99" and Launch().run_id(7) == "7"
    assert launch.run_folder(7).path == Path("/w/runs/99")
    assert Launch(workdir="/w", runs_dir="/r").run_folder(7).path == Path("/r/7")
    with pytest.raises(ConfigError, match="Expected `workdir` in the run config"):
        Launch().run_folder(7)
    with pytest.raises(ConfigError, match="resume-run-id"):
        Launch.from_flower({"resume-run-id": "1.5"})


def test_a_key_fedrad_sets_is_refused_naming_the_option_that_sets_it() -> None:
    from common.config import refuse_launch_keys

    refuse_launch_keys(["batch-size", "init-weights"], option="--set run.KEY", allowed=("init-weights",))
    with pytest.raises(ConfigError) as err:
        refuse_launch_keys(["batch-size", "init-weights"], option="--run-config")
    assert str(err.value) == "`init-weights` is set by fedrad, not with --run-config: use --init-weights FILE"


def test_fl_sim_refuses_a_key_fedrad_sets_in_a_scenario(tmp_path: Path) -> None:
    from simulations import scenario
    from simulations.run import run_overrides

    args = {"workdir": tmp_path, "runs_dir": tmp_path / "runs", "table": tmp_path / "t.json"}
    with pytest.raises(ConfigError, match=r"`resume-run-id` is set by fedrad, .*--set run.KEY.*fl-server --resume"):
        run_overrides(scenario.load("tiny", ["run.resume-run-id=\"3\""]), **args)
    overrides = run_overrides(scenario.load("tiny", ["run.secagg=true"]), **args)
    assert (overrides["secagg-clipping-range"], overrides["secagg-quantization-range"]) == (8.0, 1 << 22)
    assert overrides["sim-sites"] == str(tmp_path / "t.json") and overrides["runs-dir"] == str(tmp_path / "runs")


@pytest.mark.parametrize(
    ("largest", "sites", "given", "expected"),
    [
        (1.0, None, {}, (8.0, 1 << 22)),  # the seeded models: today's encoding
        (0.0, None, {}, (8.0, 1 << 22)),
        (2.0, None, {}, (8.0, 1 << 22)),
        (2.01, None, {}, (16.0, 1 << 23)),  # the step 2 x range / levels stays 2**-18
        (8.3, None, {}, (64.0, 1 << 24)),  # levels capped: 256 sites x 2**24 = 2**32
        (8.3, 3, {}, (64.0, 1 << 24)),
        (1.0, 1000, {}, (8.0, 1 << 22)),  # 1000 x 2**22 < 2**32
        (1.0, 2000, {}, (8.0, 1 << 21)),  # 2000 x 2**22 would wrap the modulus
        (8.3, None, {"secagg-clipping-range": 12.0}, (12.0, 1 << 23)),  # the user's range wins
        (8.3, None, {"secagg-quantization-range": 1 << 20}, (64.0, 1 << 20)),  # the user's levels win
        (1.0, None, {"secagg-clipping-range": 0, "secagg-quantization-range": 0}, (8.0, 1 << 22)),
    ],
)
def test_the_secagg_encoding_is_sized_from_the_model_unless_given(
    largest: float, sites: int | None, given: dict[str, object], expected: tuple[float, int]
) -> None:
    from common.config import sized_secagg

    encoding = sized_secagg(given, largest_weight=lambda: largest, sites=sites)
    assert (encoding["secagg-clipping-range"], encoding["secagg-quantization-range"]) == expected
    clipping, levels = expected
    if not given:  # sized: 4x headroom, no sum wraps the modulus, a step no coarser than 2**-18 unless capped
        assert clipping >= 4 * largest and levels * (sites or 256) <= 1 << 32
        assert 2 * clipping / levels <= 2**-18 or 2 * levels * (sites or 256) > 1 << 32 or levels == 1 << 24


def test_an_explicit_range_is_not_sized_and_bad_values_are_one_line() -> None:
    from common.config import SecAggConfig, sized_secagg

    def never() -> float:
        raise AssertionError("the model is not needed when the range is given")

    assert sized_secagg({"secagg-clipping-range": 5.0}, largest_weight=never)["secagg-clipping-range"] == 5.0
    for given, message in (
        ({"secagg-clipping-range": -1.0}, "Expected `secagg-clipping-range` to be a positive number"),
        ({"secagg-quantization-range": 1000}, "to be a power of 2 up to 2**24 (sums of up to 256 sites"),
        ({"secagg-quantization-range": 1 << 25}, "to be a power of 2 up to 2**24"),
    ):
        with pytest.raises(ConfigError) as err:
            sized_secagg({"secagg-clipping-range": 8.0, **given}, largest_weight=never)
        assert message in str(err.value)
    with pytest.raises(ConfigError) as err:
        sized_secagg({"secagg-clipping-range": 8.0, "secagg-quantization-range": 1 << 23}, largest_weight=never,
                     sites=1000)
    assert "up to 2**22 (sums of up to 1000 sites stay below the 2**32 modulus)" in str(err.value)
    # Unsized (no launcher): the encoding of a model within ±2, the same at the ServerApp and every site.
    assert SecAggConfig.from_flower({"secagg-clipping-range": 0.0, "secagg-quantization-range": 0}) == SecAggConfig()


@pytest.mark.parametrize("name", ["A\n", "", "-A", "A B", "a" * 65, "é"])
def test_one_site_name_rule(name: str) -> None:
    from common.config import SITE_NAME_RE, site_name

    assert site_name("site_A-1") == "site_A-1" and SITE_NAME_RE.match("a" * 64)
    with pytest.raises(ConfigError, match="Expected `site` to be a name"):
        site_name(name)
    assert not SITE_NAME_RE.match(name)
