from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.adapters.flower import serverapp_identity
from common.metrics import pooled_metrics, sufficient_statistics
from server.app.checkpoint import load_checkpoint, save_checkpoint
from server.app.report import RunReport, load_report
from server.app.strategy import (
    FedradFedAvg,
    RoundBook,
    aggregate_evaluate_metrics,
    aggregate_train_metrics,
    site_name,
)


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


# ---------------------------------------------------------------- operating point and learning check


@pytest.fixture
def _serverapp_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity (set by the ServerApp runtime)."""
    
    with serverapp_identity(run_id=1, task_id=1):
        yield


def _replies(sites: dict[int, RecordDict]) -> list[Message]:
    """Evaluation replies from the nodes in ``sites``."""
    out = []
    for node, content in sites.items():
        asked = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        out.append(Message(content=content, reply_to=asked))
    return out


def _train_round(report: RunReport, server_round: int, *, sigma: float = 3.0) -> None:
    book = RoundBook(server_round)
    book.reply("A", {"num-examples": 40, "noise-multiplier": sigma, "sample-rate": 0.5, "steps": 4}, {})
    book.close(report, {"w": torch.full((2,), float(server_round))})


@pytest.mark.usefixtures("_serverapp_identity")
def test_chosen_threshold_is_logged_reported_and_stored_with_the_rounds_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = RunReport(run_dir=tmp_path, run_id=3, config={"operating-point": 0.75}, transport="test")
    strategy = FedradFedAvg(report=report)
    assert strategy.operating_point == 0.75  # from the run config the report holds
    _train_round(report, 1)
    a = _eval_reply("A", [0.9, 0.8, 0.35, 0.3, 0.2], [1, 1, 1, 0, 0])
    b = _eval_reply("B", [0.6, 0.42, 0.4, 0.1], [1, 1, 0, 0])
    with caplog.at_level(logging.INFO, logger="server.app.strategy"):
        strategy.aggregate_evaluate(1, _replies({11: a, 12: b}))
    pooled = load_report(tmp_path)["rounds"][0]["evaluate"]["pooled"]
    expected = pooled_metrics([a["metrics"], b["metrics"]], operating_point=0.75)
    # positives score 0.9, 0.8, 0.6, 0.42, 0.35: sensitivity >= 0.75 needs 4 of 5, so 0.42 is the highest threshold
    assert pooled["threshold"] == expected["threshold"] == 0.42
    assert (pooled["sensitivity-at-threshold"], pooled["specificity-at-threshold"]) == (0.8, 1.0)
    weights, metadata = load_checkpoint(tmp_path / "checkpoints" / "round-0001.safetensors")
    assert torch.equal(weights["w"], torch.full((2,), 1.0))  # the weights are untouched
    assert (metadata["threshold"], metadata["operating-point"], metadata["round"]) == ("0.42", "0.75", "1")
    line = next(r.getMessage() for r in caplog.records if "pooled AUROC" in r.getMessage())
    assert "at threshold 0.5 sensitivity" in line and "at threshold 0.420 (target sensitivity 0.75) sensitivity 0.800" in line
    markdown = (tmp_path / "report.md").read_text()
    assert "| threshold | sensitivity @ threshold | specificity @ threshold |" in markdown
    assert "| 1 | " in markdown and "| 0.420 | 0.800 | 1.000 |" in markdown
    assert "at threshold 0.42 (target sensitivity 0.75) sensitivity 0.800" in markdown  # the final line


@pytest.mark.usefixtures("_serverapp_identity")
def test_a_run_not_learning_warns_once_and_the_report_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    report = RunReport(run_dir=tmp_path, run_id=4, config={"batch-size": 32, "learning-rate": 0.1}, transport="test")
    strategy = FedradFedAvg(report=report)
    flat = _eval_reply("A", [0.5] * 8, [0, 1] * 4)  # AUROC 0.5 on 8 images: within noise
    with caplog.at_level(logging.INFO, logger="server.app.strategy"):
        for r in range(1, 5):
            _train_round(report, r)
            strategy.aggregate_evaluate(r, _replies({11: flat}))
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # round 3 flags it; round 4 says nothing new
    assert warnings[0].startswith("Round 3: pooled AUROC has not risen above chance (0.50–0.50, ±")
    assert "site A: noise multiplier σ=3.00, sample rate 0.5, about 64 patients, 4 steps per round" in warnings[0]
    data = load_report(tmp_path)
    assert [w["round"] for w in data["warnings"]] == [3] and data["warnings"][0]["message"] == warnings[0]
    assert data["learning"]["status"] == "not-learning" and data["learning"]["round"] == 4
    assert [r.get("learning", {}).get("status") for r in data["rounds"]] == ["unclear", "unclear", "not-learning",
                                                                            "not-learning"]
    markdown = (tmp_path / "report.md").read_text()
    head = markdown.split("## Pooled validation metrics per round")[0]
    assert f"> **Warning:** {warnings[0]}" in head  # near the top, before the tables

    learning = _eval_reply("A", [0.9, 0.1] * 4, [1, 0] * 4)  # perfect ranking: above chance
    with caplog.at_level(logging.INFO, logger="server.app.strategy"):
        _train_round(report, 5)
        strategy.aggregate_evaluate(5, _replies({11: learning}))
    assert any("Round 5: pooled AUROC 1.00 is above chance" in rec.getMessage() for rec in caplog.records)
    assert "> Since then: Round 5: pooled AUROC 1.00 is above chance" in (tmp_path / "report.md").read_text()
