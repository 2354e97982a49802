"""Coordinator state (server.app.resume), the resumed report (RunReport.load) and the round/resume config."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from common.config import Launch, RoundPolicy, RunConfig
from common.errors import ConfigError
from common.runfolder import STATE
from server.app.checkpoint import checkpoint_path, save_checkpoint
from server.app.report import RunReport, load_report
from server.app.resume import (
    FORMAT,
    CoordinatorState,
    load_state,
    load_weights,
    participation,
    save_state,
)


def _tensors() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "fc.bias": torch.tensor([0.5, -1.0])}


def _state(run_dir: Path, *, completed: int = 2, checkpoint_round: int | None = None) -> CoordinatorState:
    """A run folder whose round ``completed`` is committed; its checkpoint says ``checkpoint_round``."""
    path = checkpoint_path(run_dir, completed)
    save_checkpoint(path, _tensors(), metadata={"run-id": "17", "round": str(checkpoint_round or completed)})
    state = CoordinatorState(
        run_id="17", completed_round=completed, num_rounds=5, checkpoint=str(path.relative_to(run_dir)),
        run_config={"num-server-rounds": 5, "min-sites": 2, "secagg": False},
        strategy={"aggregation": "median", "names": {"11": "A"}},
        participation={"A": {"trained": [1, 2]}}, segments=[{"flower-run-id": 99, "first-round": 1, "started": 1.0}],
    )
    save_state(run_dir, state)
    return state


def _one_line_config_error(call: Callable[[], Any], match: str) -> str:
    with pytest.raises(ConfigError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


# -- state.json ---------------------------------------------------------------------------------


def test_state_round_trip_and_weights(tmp_path: Path) -> None:
    saved = _state(tmp_path)
    assert (tmp_path / STATE).is_file() and saved.saved > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temp file left
    loaded = load_state(tmp_path)
    assert asdict(loaded) == asdict(saved)
    assert loaded.format == FORMAT and not loaded.finished
    weights = load_weights(tmp_path, loaded)
    assert weights is not None and list(weights) == ["conv.weight", "fc.bias"]
    assert all(torch.equal(weights[k], v) for k, v in _tensors().items())


def test_a_state_before_any_checkpoint_has_no_weights_and_a_finished_state_says_so(tmp_path: Path) -> None:
    state = CoordinatorState(run_id="3", completed_round=0, num_rounds=2, checkpoint=None, run_config={})
    save_state(tmp_path, state)
    assert load_weights(tmp_path, load_state(tmp_path)) is None
    assert CoordinatorState(run_id="3", completed_round=2, num_rounds=2, checkpoint=None, run_config={}).finished


def _rewrite(run_dir: Path, **changes: Any) -> None:
    data = json.loads((run_dir / STATE).read_text())
    data.update(changes)
    (run_dir / STATE).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / STATE).write_text("{not json"), "Cannot read .*state.json"),
        (lambda d: (d / STATE).write_text(""), "Cannot read .*state.json"),
        (lambda d: _rewrite(d, format="fedrad-coordinator-0"), "format 'fedrad-coordinator-0', expected"),
        (lambda d: _rewrite(d, format=None), "format None"),
        (lambda d: _rewrite(d, run_id="seventeen"), "Cannot read"),
        (lambda d: _rewrite(d, surprise=1), "Cannot read .*surprise"),
        (lambda d: (d / "checkpoints" / "round-0002.safetensors").unlink(), "names checkpoint .* missing"),
    ],
    ids=["corrupt-json", "empty", "wrong-format", "no-format", "run-id", "unknown-key", "missing-checkpoint"],
)
def test_a_state_that_cannot_be_resumed_is_one_config_error(
    tmp_path: Path, damage: Callable[[Path], Any], match: str
) -> None:
    _state(tmp_path)
    damage(tmp_path)
    _one_line_config_error(lambda: load_state(tmp_path), match)


def test_no_run_folder_or_no_state_file_is_a_config_error(tmp_path: Path) -> None:
    _one_line_config_error(lambda: load_state(tmp_path / "missing"), "does not exist")
    _one_line_config_error(lambda: load_state(tmp_path), "has no state.json")


def test_a_checkpoint_of_another_round_is_refused(tmp_path: Path) -> None:
    _state(tmp_path, completed=2, checkpoint_round=1)
    state = load_state(tmp_path)
    _one_line_config_error(lambda: load_weights(tmp_path, state), "is of round 1, but state.json says round 2")


def test_a_state_file_that_is_not_an_object_is_a_config_error(tmp_path: Path) -> None:
    _state(tmp_path)
    (tmp_path / STATE).write_text("[]")
    _one_line_config_error(lambda: load_state(tmp_path), "Cannot read")


def test_a_corrupt_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    _state(tmp_path)
    (tmp_path / "checkpoints" / "round-0002.safetensors").write_bytes(b"not a safetensors file")
    state = load_state(tmp_path)
    _one_line_config_error(lambda: load_weights(tmp_path, state), "checkpoint")


# -- participation and the resumed report -----------------------------------------------------------


def _site(epsilon: float, n: int = 10) -> dict[str, Any]:
    return {"num-examples": n, "epsilon": epsilon, "delta": 1e-5, "max-epsilon": 8.0, "privacy-unit": "patient"}


def _three_rounds(run_dir: Path) -> RunReport:
    report = RunReport(run_dir=run_dir, run_id=17, config={"num-server-rounds": 5}, transport="test", kind="simulation")
    report.record_train(1, site_metrics={"A": _site(1.0), "B": _site(1.1)}, declined={"C": "spent"}, checkpoint=None)
    report.record_train(2, site_metrics={"A": _site(2.0)}, declined={}, failed={"B": "no answer"},
                        rejected={"C": "NaN"}, rejected_metrics={"C": _site(2.2)}, checkpoint=None)
    report.record_evaluate(2, pooled={"auroc": 0.7}, per_site={})
    report.record_train(3, site_metrics={"A": _site(3.0), "B": _site(3.3)}, declined={"C": "spent"}, checkpoint=None)
    report.record_attempt(4, reason="too few", failed={"B": "gone"}, rejected={}, declined={}, trained=["A"])
    report.status = "failed"
    report.save()
    return report


def test_participation_lists_each_sites_rounds_by_outcome(tmp_path: Path) -> None:
    report = _three_rounds(tmp_path)
    assert participation(report) == {
        "A": {"trained": [1, 2, 3]},
        "B": {"trained": [1, 3], "failed": [2]},
        "C": {"declined": [1, 3], "rejected": [2]},
    }


def test_the_resumed_report_keeps_the_committed_rounds_and_recounts_the_sites(tmp_path: Path) -> None:
    original = _three_rounds(tmp_path)
    report = RunReport.load(tmp_path, keep_rounds=2)

    assert sorted(report.rounds) == [1, 2]
    assert report.run_id == 17 and report.kind == "simulation" and report.started == original.started
    assert report.config == {"num-server-rounds": 5}
    assert report.rounds[2]["evaluate"]["pooled"] == {"auroc": 0.7}
    assert report.sites["A"]["rounds_trained"] == 2 and report.sites["A"]["epsilon"] == 2.0
    assert report.sites["B"]["rounds_trained"] == 1 and report.sites["B"]["epsilon"] == 1.1
    assert report.sites["C"]["rounds_declined"] == 1 and report.sites["C"]["rounds_rejected"] == 1
    assert report.sites["C"]["rounds_trained"] == 0 and report.sites["C"]["epsilon"] == 2.2
    assert participation(report) == {"A": {"trained": [1, 2]}, "B": {"trained": [1], "failed": [2]},
                                     "C": {"declined": [1], "rejected": [2]}}
    (resume,) = report.resumes
    assert resume["from_round"] == 3 and resume["discarded_rounds"] == [3, 4] and resume["previous_status"] == "failed"

    # The resumed run goes on; a second resume adds a second entry.
    report.record_train(3, site_metrics={"A": _site(3.5)}, declined={}, checkpoint=None)
    again = RunReport.load(tmp_path, keep_rounds=3)
    assert [r["from_round"] for r in again.resumes] == [3, 4] and again.resumes[1]["discarded_rounds"] == []
    assert again.sites["A"]["rounds_trained"] == 3 and again.sites["A"]["epsilon"] == 3.5
    assert "attempts" not in again.rounds.get(3, {})
    assert [r["round"] for r in load_report(tmp_path)["rounds"]] == [1, 2, 3]


def test_resuming_before_the_first_round_keeps_nothing(tmp_path: Path) -> None:
    _three_rounds(tmp_path)
    report = RunReport.load(tmp_path, keep_rounds=0)
    assert report.rounds == {} and report.sites == {}
    assert report.resumes[-1]["discarded_rounds"] == [1, 2, 3, 4]


# -- round policy and run config ---------------------------------------------------------------------


def test_round_policy_defaults_and_values() -> None:
    assert RoundPolicy.from_flower({}) == RoundPolicy()
    policy = RoundPolicy.from_flower({"round-timeout": 30, "join-timeout": 2.5, "round-retries": 0,
                                      "norm-factor": 0, "aggregation": "trimmed-mean", "trim-fraction": 0.1})
    assert policy == RoundPolicy(timeout=30.0, join_timeout=2.5, retries=0, norm_factor=0.0,
                                 aggregation="trimmed-mean", trim_fraction=0.1)
    assert RoundPolicy.from_flower({"norm-factor": 1.5, "trim-fraction": 0}).norm_factor == 1.5


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("round-timeout", 0), ("round-timeout", -5), ("round-timeout", "soon"), ("round-timeout", True),
        ("round-timeout", float("inf")), ("join-timeout", 0), ("join-timeout", float("nan")),
        ("round-retries", -1), ("round-retries", 1.5), ("round-retries", True),
        ("norm-factor", 0.5), ("norm-factor", 1), ("norm-factor", -1),
        ("aggregation", "mean"), ("aggregation", ""),
        ("trim-fraction", 0.5), ("trim-fraction", -0.1),
    ],
)
def test_bad_round_policy_values_are_config_errors(key: str, value: Any) -> None:
    message = _one_line_config_error(lambda: RoundPolicy.from_flower({key: value}), key)
    assert f"`{key}`" in message
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flower({"secagg": False, key: value})


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_aggregation_needs_secagg_off(aggregation: str) -> None:
    _one_line_config_error(lambda: RunConfig.from_flower({"aggregation": aggregation}), "secagg=false")
    _one_line_config_error(lambda: RunConfig.from_flower({"aggregation": aggregation, "secagg": True}), aggregation)
    run = RunConfig.from_flower({"aggregation": aggregation, "secagg": False, "round-timeout": 9})
    assert run.rounds.aggregation == aggregation and run.rounds.timeout == 9.0


@pytest.mark.parametrize("value", ["abc", "-3", "1.5", "1e3", " 4", True, 1.5, None])
def test_resume_run_id_must_be_digits(value: Any) -> None:
    _one_line_config_error(lambda: Launch.from_flower({"resume-run-id": value}), "resume-run-id")


def test_run_id_is_the_resumed_runs_id_else_flowers() -> None:
    assert Launch.from_flower({}).run_id(7) == "7"
    assert Launch.from_flower({"resume-run-id": ""}).run_id(7) == "7"
    assert Launch.from_flower({"resume-run-id": "1234"}).run_id(7) == "1234"
    assert Launch.from_flower({"resume-run-id": 1234}).run_id(7) == "1234"
