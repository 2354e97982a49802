"""fl-sim end to end: the real CLI, Flower's Simulation Runtime (Ray), the fedrad ServerApp and ClientApp."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SecAggSim:
    """A finished ``fl-sim run tiny --secagg`` with per-site budgets of 4, 6 and 8."""

    tmp: Path
    proc: subprocess.CompletedProcess[str]
    left_running: set[int]  # Ray processes started by the run and still running after fl-sim exited


@pytest.fixture(scope="module")
def secagg_sim(tmp_path_factory: pytest.TempPathFactory) -> SecAggSim:
    tmp = tmp_path_factory.mktemp("secagg-sim")
    before = set(_ray_processes())
    proc = _sim(tmp, "run", "tiny", "--secagg", "--set", "privacy.epsilon=[4, 6, 8]")
    return SecAggSim(tmp, proc, set(_ray_processes()) - before)


def test_a_small_dp_secagg_simulation_leaves_a_report_that_matches_its_ledgers(secagg_sim: SecAggSim) -> None:
    proc, tmp_path = secagg_sim.proc, secagg_sim.tmp
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
    assert not secagg_sim.left_running


def test_a_secagg_run_rewound_to_round_1_resumes_round_2_without_charging_it_twice(secagg_sim: SecAggSim) -> None:
    """Resuming a SecAgg+ run from its state.json, on Flower's Simulation Runtime (the run above, rewound).

    The fault tests (tests/e2e/test_resume_identity.py) resume a plain run over real processes;
    this one checks the secure-aggregation path of the same ServerApp: the SecAgg+ workflow
    starts at the round after the last committed one, and the sites answer the repeated round
    with the masked replay of their stored update, so no ledger books it twice.
    """
    assert secagg_sim.proc.returncode == 0
    (run_dir,) = [p for p in (secagg_sim.tmp / "runs").iterdir() if p.is_dir()]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed_round"] == 2 and state["strategy"]["secagg"] is True
    first = json.loads((run_dir / "report.json").read_text())

    # The coordinator "crashed" after every site trained round 2 but before round 2 was committed.
    state.update(completed_round=1, checkpoint="checkpoints/round-0001.safetensors")
    (run_dir / "state.json").write_text(json.dumps(state))
    config = {**state["run_config"], "resume-run-id": state["run_id"]}
    script = (
        "import json, sys; from simulations.runtime import run_app, new_run_id; "
        "run_app(run_id=new_run_id(), num_sites=3, run_config=json.loads(sys.argv[1]), concurrency=2)"
    )
    resumed = subprocess.run([sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True,
                             timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["resumes"][-1]["from_round"] == 2 and report["resumes"][-1]["discarded_rounds"] == [2]
    assert json.loads((run_dir / "state.json").read_text())["completed_round"] == 2
    assert "SecAgg+" in report["transport"]
    # Every site answered round 2 again with its stored update: the same ledger row, not a new one,
    # so the secure sum, and the global model, are those of the first run's round 2.
    table = json.loads(Path(config["sim-sites"]).read_text())
    for row in table:
        site = row["site"]
        rows = Ledger(Path(row["ledger-dir"])).rows()
        assert [r.server_round for r in rows] == [1, 2], site
        again = report["rounds"][1]["train"]["sites"][site]
        assert again["ledger-row"] == rows[1].seq and again["ledger-hash"] == rows[1].hash
        assert first["rounds"][1]["train"]["sites"][site]["ledger-hash"] == rows[1].hash
    # Same updates, so the same sum up to SecAgg+'s stochastic quantization: the same model.
    assert report["rounds"][1]["evaluate"]["pooled"]["auroc"] == pytest.approx(
        first["rounds"][1]["evaluate"]["pooled"]["auroc"], abs=0.02)


def test_compare_puts_each_arm_against_pooled_and_repeats_only_the_dp_arm(tmp_path: Path) -> None:
    """``fl-sim compare`` on a user's own labelled DICOM folder, split into three virtual sites by patient."""
    from simulations.synth import synthesize

    archive = tmp_path / "archive"
    synthesize(archive, sites=["X"], images_per_site=120, seed=5, size=32)
    out = tmp_path / "compare.json"
    proc = _sim(tmp_path, "compare", "tiny", "--arms", "pooled,local,fedavg,fedavg-dp", "--no-secagg", "--rounds", "1",
                "--repeats", "2", "--json", str(out),
                "--set", "sites.source=folder", "--set", f"sites.folder={json.dumps(str(archive / 'X'))}")
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
    # The FedAvg arm is a real simulated run with its own report, trained without DP, on the folder's patients.
    fed = json.loads((Path(arms["fedavg"]["run_dir"]) / "report.json").read_text())
    assert fed["final"]["auroc"] == pytest.approx(arms["fedavg"]["pooled"]["auroc"])
    assert len(fed["rounds"][0]["train"]["sites"]) == 3
    examples = sum(m["num-examples"] for m in fed["rounds"][0]["train"]["sites"].values())
    assert 0 < examples < 120  # each site's training split of its share of the folder
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
