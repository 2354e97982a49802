"""The coordinator's side of SecAgg+ rounds: bookkeeping on what the unmasked sum brings in."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from common import records
from common.config import RunConfig, SecAggConfig, check_model_fits
from common.errors import ConfigError, FederationError
from server.app.report import RunReport
from server.app.secure import SecureFedAvg
from server.app.strategy import BudgetsSpent

KEYS = ["w", "b"]


def _strategy(tmp_path: Path) -> SecureFedAvg:
    report = RunReport(run_dir=tmp_path / "run", run_id=1, config={}, transport="tls; SecAgg+")
    return SecureFedAvg(report=report, keys=KEYS, run=RunConfig())


def _fitres(weights: list[np.ndarray], n: int, **metrics: object) -> FitRes:
    return FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters(weights), n, dict(metrics))


def _trained(site: str, aggregate: list[np.ndarray], n: int) -> tuple[object, FitRes]:
    metrics = {records.SITE_NAME: site, records.EPSILON: 1.5, records.DELTA: 1e-5, records.NUM_EXAMPLES: n,
               records.PRIVACY_UNIT: "patient", records.LEDGER_ROW: 1, records.LEDGER_HASH: "ab" * 32}
    return SimpleNamespace(node_id=hash(site) % 1000), _fitres(aggregate, n, **metrics)


def test_the_unmasked_sum_is_checkpointed_and_each_site_reported(tmp_path: Path) -> None:
    aggregate = [np.full((2, 2), 0.25, np.float32), np.array([0.5], np.float32)]
    strategy = _strategy(tmp_path)
    strategy.dropped = {"C": "no answer within 600 s at SecAgg+ stage 'collect masked vectors'"}
    params, metrics = strategy.aggregate_fit(1, [_trained("A", aggregate, 30), _trained("B", aggregate, 10)], [])
    assert params is not None and metrics == {"examples": 40}
    assert all(np.array_equal(a, b) for a, b in zip(parameters_to_ndarrays(params), aggregate, strict=True))
    train = strategy.report.rounds[1]["train"]
    assert sorted(train["sites"]) == ["A", "B"] and train["sites"]["A"]["num-examples"] == 30
    assert train["sites"]["A"][records.PRIVACY_UNIT] == "patient" and "C" in train["failed"]
    assert (tmp_path / "run" / strategy.report.rounds[1]["checkpoint"]).is_file()


def test_a_zero_weight_decline_is_booked_as_a_decline_and_all_declines_stop_the_run(tmp_path: Path) -> None:
    zeros = [np.zeros((2, 2), np.float32), np.zeros(1, np.float32)]
    declined = (SimpleNamespace(node_id=7), _fitres(zeros, 0, **{records.SITE_NAME: "B", records.DECLINED: "budget spent",
                                                                   records.MAX_EPSILON: 8.0}))
    strategy = _strategy(tmp_path)
    strategy.aggregate_fit(1, [_trained("A", zeros, 5), declined], [])
    assert strategy.report.rounds[1]["train"]["declined"] == {"B": "budget spent"}
    with pytest.raises(BudgetsSpent, match="budget spent"):
        _strategy(tmp_path).aggregate_fit(2, [declined], [])


def test_nobody_trained_because_of_failures_is_a_federation_error(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    strategy.dropped = {"A": "failed at SecAgg+ stage 'setup': boom"}
    with pytest.raises(FederationError, match="boom") as info:
        strategy.aggregate_fit(1, [], [])
    assert not isinstance(info.value, BudgetsSpent)


def test_a_clipping_range_without_headroom_for_the_model_is_refused() -> None:
    state = OrderedDict(w=torch.tensor([0.5, -3.0]), b=torch.zeros(1))
    check_model_fits(state, SecAggConfig(clipping_range=8.0))
    with pytest.raises(ConfigError, match="secagg-clipping-range"):
        check_model_fits(state, SecAggConfig(clipping_range=5.0))


def test_secagg_config_validates_and_its_tolerance_scales_with_max_weight() -> None:
    cfg = SecAggConfig.from_flower({"secagg-threshold": 0.5, "secagg-max-weight": 5000})
    assert cfg.enabled and cfg.threshold == 0.5 and cfg.max_weight == 5000
    assert cfg.tolerance(sites=3, total_examples=1000) < SecAggConfig().tolerance(sites=3, total_examples=1000)
    for bad in ({"secagg": "yes"}, {"secagg-threshold": 0}, {"secagg-quantization-range": 1000},
                {"secagg-quantization-range": 1 << 26}, {"secagg-max-weight": 0}, {"secagg-clipping-range": -1.0}):
        with pytest.raises(ConfigError):
            SecAggConfig.from_flower(bad)
    with pytest.raises(ConfigError, match="min-sites"):
        RunConfig.from_flower({"min-sites": 1})
    assert RunConfig.from_flower({"min-sites": 1, "secagg": False}).min_sites == 1


def test_a_reply_the_superlink_sends_for_an_unreachable_site_names_that_site() -> None:
    """The SuperLink answers for a node that stopped sending heartbeats: go by the message a reply answers."""
    from flwr.app import Error, Message, RecordDict

    from common.adapters.flower import serverapp_identity
    from server.app.secure import _TrackingGrid

    def to(node: int, message_id: str) -> Message:
        msg = Message(RecordDict(), dst_node_id=node, message_type="train")
        msg.metadata.__dict__["_message_id"] = message_id  # set by the grid when it pushes a message
        return msg

    class Grid:
        def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
            ok = Message(RecordDict(), reply_to=messages[0])
            lost = Message(Error(code=0, reason="Node Unavailable"), reply_to=messages[1])
            lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id, not node 3's
            return [ok, lost]

    grid = _TrackingGrid(Grid(), {2: "B", 3: "C"}, server_round=1)  # type: ignore[arg-type]
    with serverapp_identity(run_id=1, task_id=1):
        grid.send_and_receive([to(2, "m2"), to(3, "m3")], timeout=5)
    assert grid.dropped == {"C": "failed at SecAgg+ stage 'setup': Node Unavailable"}
