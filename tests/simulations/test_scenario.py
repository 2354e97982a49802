"""Scenario files and --set overrides (simulations.scenario), and fl-sim's run-config checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from simulations import scenario as sc
from simulations.arms import PUBLIC_SITES, ArmResult, Draw, public_scenario
from simulations.run import checked_run_config, project_run_defaults, run_overrides
from simulations.sites import site_rows
from simulations.table import ratios, render_table


def test_every_bundled_scenario_loads_and_gives_a_valid_run_config(tmp_path: Path) -> None:
    names = sc.available()
    assert {"default", "tiny", "skewed", "scale"} <= set(names)
    for name, description in names.items():
        assert description, name
        s = sc.load(name)
        run = checked_run_config(run_overrides(s, workdir=tmp_path, runs_dir=tmp_path / "runs", table=tmp_path / "t.json"))
        assert run.num_server_rounds >= 1
        assert len(s.epsilons()) == s.sites.count
        assert len(s.sites.site_names()) == s.sites.count == len(s.sites.images_per_site())


def test_overrides_are_toml_values() -> None:
    s = sc.load("tiny", ["run.num-server-rounds=7", "sites.images=[10, 20, 30]", "privacy.epsilon=2", "run.window=bone"])
    assert s.run["num-server-rounds"] == 7
    assert s.sites.images_per_site() == [10, 20, 30]
    assert s.epsilons() == [2.0, 2.0, 2.0]
    assert s.run["window"] == "bone"


def test_data_key_follows_the_data_spec_only() -> None:
    base = sc.load("tiny")
    assert sc.load("tiny", ["run.num-server-rounds=9"]).sites.data_key() == base.sites.data_key()
    assert sc.load("tiny", ["privacy.epsilon=1"]).sites.data_key() == base.sites.data_key()
    assert sc.load("tiny", ["sites.seed=2"]).sites.data_key() != base.sites.data_key()
    assert sc.load("tiny", ["sites.count=4"]).sites.data_key() != base.sites.data_key()


def test_site_rows_are_node_configs(tmp_path: Path) -> None:
    s = sc.load("tiny", ["privacy.epsilon=[1, 2, 3]", "privacy.dp=false"])
    data = {n: tmp_path / n for n in s.sites.site_names()}
    rows = site_rows(s, data, sites_dir=tmp_path / "sites", ledgers_dir=tmp_path / "ledgers")
    assert [r["max-epsilon"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["dp"] is False for r in rows)
    assert rows[0]["ledger-dir"] == str(tmp_path / "ledgers" / rows[0]["site"])


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["sites.count=0"], "sites.count"),
        (["sites.images=[1, 2]"], "sites.images"),
        (["sites.alpha=-1"], "sites.alpha"),
        (["sites.alpha=0.5", "sites.prevalence=0.3"], "not both"),
        (["sites.source=pacs"], "sites.source"),
        (["sites.source=folder"], "sites.folder"),
        (["sites.colour=1"], "known keys in [sites]"),
        (["privacy.epsilon=-1"], "privacy.epsilon"),
        (["privacy.dp=maybe"], "privacy.dp"),
        (["simulation.concurrency=0"], "concurrency"),
        (["run.workdir=/x"], "is set by fedrad"),
        (["nonsense"], "--set section.key=value"),
        (["model.x=1"], "section to be one of"),
        (["sites.names=['A', 'A', 'B']"], "distinct"),
    ],
)
def test_bad_scenarios_say_what_is_wrong(sets: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        sc.load("tiny", sets)
    assert expected in str(info.value)


def test_unknown_run_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    args = {"workdir": tmp_path, "runs_dir": tmp_path, "table": tmp_path / "t.json"}
    with pytest.raises(ConfigError, match="num-server-round"):
        run_overrides(sc.load("tiny", ["run.num-server-round=3"]), **args)
    with pytest.raises(ConfigError, match="learning-rate"):
        checked_run_config(run_overrides(sc.load("tiny", ["run.learning-rate=-1"]), **args))
    assert "sim-sites" in project_run_defaults()


def test_scenario_files_and_names(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\n[sites]\ncount = 2\nimages = 5\n[run]\nsecagg = false\n')
    s = sc.load(str(path))
    assert s.name == "mine" and s.sites.count == 2
    with pytest.raises(ConfigError, match="scenario name"):
        sc.load("no-such-scenario")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sites\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        sc.load(str(bad))
    extra = tmp_path / "extra.toml"
    extra.write_text("[model]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"\[model\]"):
        sc.load(str(extra))


def test_compare_table_ratios_and_many_sites() -> None:
    pooled = ArmResult("pooled", "pooled", {"auroc": 0.9, "sensitivity": 0.8, "specificity": 0.5},
                       {"A": {"auroc": 0.8}, "B": {"auroc": 1.0}}, 1.0)
    fed = ArmResult("fedavg", "FedAvg", {"auroc": 0.81, "sensitivity": 0.0, "specificity": float("nan")},
                    {"A": {"auroc": 0.7}, "B": {"auroc": None}}, 1.0)
    table = render_table([pooled, fed]).splitlines()
    assert table[0].startswith("| arm | draws | auroc |") and "AUROC A" in table[0] and "AUROC B" in table[0]
    # draws, auroc, sensitivity, specificity, threshold and the rates there, ratio (median, worst), site A
    assert table[3].split(" | ")[1:11] == ["1", "0.810", "0.000", "–", "–", "–", "–", "0.900", "0.900", "0.700"]
    many = ArmResult("pooled", "pooled", {"auroc": 0.5}, {f"s{i:02d}": {"auroc": i / 20} for i in range(20)}, 1.0)
    row = render_table([many]).splitlines()[2]
    assert row.endswith("| 0.000 | 0.475 | 0.950 |")


def test_a_dp_arm_of_several_draws_reports_median_worst_and_best() -> None:
    pooled = ArmResult("pooled", "pooled", {"auroc": 0.9, "sensitivity": 0.8, "specificity": 0.5}, {}, 1.0)
    finals = [0.88, 0.45, 0.90, 0.86]
    draws = tuple(
        Draw(pooled={"auroc": v, "sensitivity": v / 2, "specificity": 1 - v / 2, "threshold": 0.3},
             sites={}, auroc_per_round=[0.5, v], seconds=1.0, run_dir=f"run{i}")
        for i, v in enumerate(finals)
    )
    dp = ArmResult("fedavg-dp", "FedAvg + DP", draws[0].pooled, {}, 4.0, draws=draws, epsilon=8.0)
    assert dp.spread("auroc") == {"median": pytest.approx(0.87), "min": 0.45, "max": 0.90}
    assert dp.worst() is draws[1]
    r = ratios(dp, pooled)
    assert r["median"]["auroc"] == pytest.approx(0.87 / 0.9) and r["worst"]["auroc"] == pytest.approx(0.45 / 0.9)
    assert r["worst"]["sensitivity"] == pytest.approx(0.225 / 0.8)  # the worst draw's, not the smallest value
    row = render_table([pooled, dp]).splitlines()[3].split(" | ")
    assert row[1:3] == ["4", "0.870 (0.450–0.900)"]
    assert row[8] == "0.967" and row[9].startswith("0.500")


def test_the_public_dataset_shares_no_site_seed_or_data_with_the_scenario() -> None:
    demo = sc.load("demo")
    public = public_scenario(demo)
    assert public.sites.site_names() == list(PUBLIC_SITES) and not set(PUBLIC_SITES) & set(demo.sites.site_names())
    assert public.sites.seed != demo.sites.seed and public.sites.data_key() != demo.sites.data_key()
    assert public.sites.images_per_site() == [demo.sites.images_per_site()[0]] * 2
    assert public.sites.image_size == demo.sites.image_size
    assert public.run == demo.run and public.privacy == demo.privacy
