"""fl-sim end to end: the real CLI, Flower's Simulation Runtime (Ray), the fedrad ServerApp and ClientApp."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from common.audit import audit_ledger
from common.ledger import Ledger
from server.app.plots import PLOT_FILES, plot_series
from tests.e2e.support import BIN, one_line_error, run_cli

pytestmark = pytest.mark.e2e


def _ray_processes(marker: str = "fedrad-ray-") -> list[int]:
    """PIDs of processes whose command line names an fl-sim Ray folder."""
    return [proc.pid for proc in psutil.process_iter(["cmdline"]) if marker in " ".join(proc.info["cmdline"] or ())]


def _sim(tmp_path: Path, *args: str, timeout: float = 600):  # type: ignore[no-untyped-def]
    return run_cli(
        str(BIN / "fl-sim"), *args, "--quiet", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "runs"),
        timeout=timeout,
    )


def test_a_small_dp_secagg_simulation_leaves_a_report_that_matches_its_ledgers(tmp_path: Path) -> None:
    before = set(_ray_processes())
    proc = _sim(tmp_path, "run", "tiny", "--secagg", "--set", "privacy.epsilon=[4, 6, 8]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    report = json.loads((run_dir / "report.json").read_text())

    assert report["status"] == "completed" and report["kind"] == "simulation"
    assert "SecAgg+" in report["transport"] and report["transport"].startswith("simulation")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert len(r["train"]["sites"]) == 3 and not r["train"]["failed"]
        assert set(r["evaluate"]["sites"]) == set(r["train"]["sites"])
        assert 0.0 <= r["evaluate"]["pooled"]["auroc"] <= 1.0

    # The summary printed, the markdown and the plots all tell the same numbers as report.json.
    final = report["final"]
    assert f"AUROC {final['auroc']:.3f}" in proc.stdout
    md = (run_dir / "report.md").read_text()
    assert f"{final['auroc']:.3f}" in md and "simulation" in md
    assert sorted(report["plots"]) == sorted(PLOT_FILES)
    for name in report["plots"]:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    series = plot_series(report)
    assert series["auroc"]["pooled"] == [[r["round"], r["evaluate"]["pooled"]["auroc"]] for r in report["rounds"]]
    assert series["participation"]["trained"] == [3, 3]

    # Each virtual site kept its own ledger for this run; what the report says it spent is what the ledger says,
    # and within the site's own budget.
    ledgers = tmp_path / "work" / "ledgers" / str(report["run_id"])
    budgets = {}
    for site, facts in report["sites"].items():
        rows = Ledger(ledgers / site, create=False).rows()
        assert [row.server_round for row in rows] == [1, 2]
        assert facts["epsilon"] == pytest.approx(rows[-1].epsilon)
        assert facts["epsilon"] <= facts["max_epsilon"] + 1e-9
        assert audit_ledger(ledgers / site).verified
        budgets[site] = facts["max_epsilon"]
    assert sorted(budgets.values()) == [4.0, 6.0, 8.0]
    for r in report["rounds"]:
        for site, m in r["train"]["sites"].items():
            assert series["epsilon"]["sites"][site][r["round"] - 1] == [r["round"], m["epsilon"]]

    # Ray is gone with fl-sim: nothing left running from this run.
    assert set(_ray_processes()) <= before


def test_compare_puts_each_arm_against_pooled_and_repeats_only_the_dp_arm(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    proc = _sim(tmp_path, "compare", "tiny", "--arms", "pooled,local,fedavg,fedavg-dp", "--no-secagg", "--rounds", "1",
                "--repeats", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("compare-")]
    data = json.loads((folder / "compare.json").read_text())
    assert json.loads(out.read_text()) == data
    arms = {a["arm"]: a for a in data["arms"]}
    assert list(arms) == ["pooled", "local", "fedavg", "fedavg-dp"] and data["repeats"] == 2
    assert arms["pooled"]["ratio_to_pooled"]["auroc"] == pytest.approx(1.0)
    assert arms["pooled"]["draws"] == arms["local"]["draws"] == arms["fedavg"]["draws"] == 1  # no noise: trained once
    for a in arms.values():
        assert set(a["sites"]) == {"site-001", "site-002", "site-003"}
        if a["pooled"]["auroc"] is not None:
            assert a["ratio_to_pooled"]["auroc"] == pytest.approx(a["spread"]["auroc"]["median"] / arms["pooled"]["pooled"]["auroc"])
    # The FedAvg arm is a real simulated run with its own report, trained without DP.
    fed = json.loads((Path(arms["fedavg"]["run_dir"]) / "report.json").read_text())
    assert fed["final"]["auroc"] == pytest.approx(arms["fedavg"]["pooled"]["auroc"])
    assert all(s.get("epsilon") is None for s in fed["sites"].values())
    assert all(s["privacy_unit"].startswith("none") for s in fed["sites"].values())
    # The DP arm: two independent draws, each a real simulated run with its own report and ledgers.
    dp = arms["fedavg-dp"]
    assert dp["draws"] == 2 and len({d["run_dir"] for d in dp["draw_results"]}) == 2
    finals = sorted(d["pooled"]["auroc"] for d in dp["draw_results"])
    spread = dp["spread"]["auroc"]
    assert (spread["min"], spread["max"]) == (finals[0], finals[1])
    assert spread["median"] == pytest.approx(sum(finals) / 2)
    worst = min(dp["draw_results"], key=lambda d: d["pooled"]["auroc"])
    assert dp["ratio_to_pooled_worst"]["auroc"] == pytest.approx(worst["pooled"]["auroc"] / arms["pooled"]["pooled"]["auroc"])
    for d in dp["draw_results"]:
        report = json.loads((Path(d["run_dir"]) / "report.json").read_text())
        assert [r["evaluate"]["pooled"]["auroc"] for r in report["rounds"]] == d["auroc_per_round"]
        assert all(0 < s["epsilon"] <= 8.0 for s in report["sites"].values())
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (folder / "compare.md").read_text()
    assert "pooled (centralised, no DP)" in table and "FedAvg + DP" in table and "0.5" in table
    assert table.count("\n|") >= 5  # header, rule, four arms


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "no-such-scenario"), "scenario name"),
        (("run", "tiny", "--set", "run.num-server-round=2"), "num-server-round"),
        (("run", "tiny", "--set", "sites.count=1"), "min-sites"),
        (("compare", "tiny", "--arms", "pooled,magic"), "--arms"),
        (("compare", "tiny", "--epsilon", "eight"), "--epsilon"),
        (("compare", "tiny", "--repeats", "0"), "--repeats"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    proc = _sim(tmp_path, *args, timeout=120)
    assert expected in one_line_error(proc)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_partitioned_folder_source(tmp_path: Path) -> None:
    """A user's own labelled DICOM folder, split into virtual sites by patient."""
    from simulations.synth import synthesize

    folder = tmp_path / "archive"
    synthesize(folder, sites=["X"], images_per_site=120, seed=5, size=32)
    proc = _sim(
        tmp_path, "run", "tiny", "--no-secagg", "--no-dp", "--rounds", "1",
        "--set", "sites.source=folder", "--set", f"sites.folder={json.dumps(str(folder / 'X'))}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["rounds"][0]["train"]["sites"]) == 3
    examples = sum(m["num-examples"] for m in report["rounds"][0]["train"]["sites"].values())
    assert 0 < examples < 120
