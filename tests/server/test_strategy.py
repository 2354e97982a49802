from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common.metrics import pooled_metrics, sufficient_statistics
from server.checkpoint import load_checkpoint, save_checkpoint
from server.report import RunReport, load_report
from server.strategy import aggregate_evaluate_metrics, aggregate_train_metrics, site_name


def _eval_reply(name: str, probs: list[float], targets: list[int]) -> RecordDict:
    stats = sufficient_statistics(probs=torch.tensor(probs), targets=torch.tensor(targets))
    return RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(probs), "eval-loss": 0.5, **stats}),
            "site": ConfigRecord({"name": name}),
        }
    )


def test_evaluate_aggregation_pools_counts_not_averages() -> None:
    a = _eval_reply("A", [0.9, 0.8, 0.2], [1, 1, 0])
    b = _eval_reply("B", [0.6, 0.3, 0.4, 0.1], [0, 1, 0, 0])
    pooled = aggregate_evaluate_metrics([a, b], "num-examples")
    expected = pooled_metrics([a["metrics"], b["metrics"]])
    assert pooled["auroc"] == pytest.approx(expected["auroc"])
    assert pooled["positives"] == 3 and pooled["negatives"] == 4
    assert site_name(a, "?") == "A" and site_name(RecordDict({}), "node-1") == "node-1"


def test_train_aggregation_reports_examples_and_max_epsilon_but_no_training_loss() -> None:
    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": 100, "epsilon": 2.0})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 300, "epsilon": 5.0})}),
    ]
    agg = aggregate_train_metrics(replies, "num-examples")
    assert "train-loss" not in agg  # computed without noise: never leaves a site
    assert agg["epsilon-max"] == 5.0 and agg["examples"] == 400


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    path = save_checkpoint(tmp_path / "c" / "round-0001.safetensors", state, metadata={"round": "1"})
    loaded, meta = load_checkpoint(path)
    assert meta["round"] == "1" and all(torch.equal(state[k], loaded[k]) for k in state)
    assert [p.name for p in path.parent.iterdir()] == ["round-0001.safetensors"]  # no temp files left


def test_report_is_valid_json_after_every_round(tmp_path: Path) -> None:
    report = RunReport(run_dir=tmp_path, run_id=1, config={"num-server-rounds": 2}, transport="test")
    report.record_train(1, site_metrics={"A": {"num-examples": 10, "epsilon": 1.5, "delta": 1e-5, "max-epsilon": 8.0}}, declined={"B": "site B declines round 1"}, checkpoint=None)
    report.record_evaluate(1, pooled={"auroc": float("nan"), "sensitivity": 0.5}, per_site={})
    data = load_report(tmp_path)
    assert data["status"] == "running" and data["sites"]["A"]["epsilon"] == 1.5
    assert data["rounds"][0]["evaluate"]["pooled"]["auroc"] is None  # NaN written as null
    report.finish("completed")
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "completed"
    markdown = (tmp_path / "report.md").read_text()
    assert "| A | – | 1.500 | – | – | – | 1e-05 | 8.000 | 1 | 0 |" in markdown
    assert "| B | – | – | – | – | – | – | – | 0 | 1 |" in markdown
