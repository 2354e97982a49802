"""Resuming a SecAgg+ run from its state.json, on Flower's Simulation Runtime.

The fault tests (tests/e2e/test_faults.py) resume a plain run over real processes;
this one checks the secure-aggregation path of the same ServerApp: the SecAgg+
workflow starts at the round after the last committed one, and the sites answer
the repeated round with the masked replay of their stored update, so no ledger
books it twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.ledger import Ledger
from tests.e2e.support import BIN, run_cli

pytestmark = pytest.mark.e2e


def test_a_secagg_run_rewound_to_round_1_resumes_round_2_without_charging_it_twice(tmp_path: Path) -> None:
    proc = run_cli(str(BIN / "fl-sim"), "run", "tiny", "--secagg", "--quiet", "--workdir", str(tmp_path / "work"),
                   "--out", str(tmp_path / "runs"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
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
