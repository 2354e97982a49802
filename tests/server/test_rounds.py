"""The plain round loop (server.app.rounds.PlainRounds) against a fake Flower grid.

The grid answers each message through one fake site per node, with real Flower
``Message`` replies built the way ``client/app/handlers.py`` builds them, so everything
from message construction (TTL, server round) to screening, aggregation,
checkpoint, report and evaluation runs as in a deployment; only the network is
faked.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common import records
from common.adapters.flower import serverapp_identity
from common.config import RunConfig
from common.metrics import sufficient_statistics
from common.models import build_model
from server.app.checkpoint import load_checkpoint
from server.app.report import RunReport, load_report
from server.app.rounds import PlainRounds, RunStopped, _expires, wait_for_sites
from server.app.strategy import BudgetsSpent, FedradFedAvg, Names

StateDict = OrderedDict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _serverapp_identity() -> Iterator[None]:
    """Flower stamps instruction messages with the running task's identity (set by the ServerApp runtime)."""
    with serverapp_identity(run_id=1, task_id=1):
        yield


# -- fake sites and grid ------------------------------------------------------------------------


@dataclass
class Site:
    """One fake site: answers train and evaluate messages like client/app/handlers.py does.

    ``mode`` (or ``modes[round]``) says how it answers a training message: ``ok``, ``silent``
    (no reply before the deadline), ``error`` (a Flower error reply), ``nan`` (an update with
    NaN values), ``decline`` (its budget is spent), ``no-arrays`` (a reply without weights) or
    ``no-metrics`` (weights without a MetricRecord). ``script`` overrides both, one entry per
    training message. An ``ok`` update is the received weights plus ``shift`` everywhere.
    """

    name: str
    examples: int
    shift: float = 0.0
    mode: str = "ok"
    modes: dict[int, str] = field(default_factory=dict)
    script: list[str] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    evaluated: list[int] = field(default_factory=list)

    def __call__(self, msg: Message) -> Message | None:
        server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
        if msg.metadata.message_type == MessageType.EVALUATE:
            self.evaluated.append(server_round)
            return self._evaluate_reply(msg)
        assert msg.metadata.message_type == MessageType.TRAIN
        self.trained.append(server_round)
        mode = self.script.pop(0) if self.script else self.modes.get(server_round, self.mode)
        if mode == "silent":
            return None
        if mode == "error":
            return Message(Error(code=0, reason=f"{self.name} ran out of memory"), reply_to=msg)
        if mode == "decline":
            reason = f"site {self.name} declines round {server_round}: budget spent"
            content = RecordDict({
                records.SITE: ConfigRecord({records.SITE_NAME: self.name, records.DECLINED: reason}),
                records.METRICS: MetricRecord({records.MAX_EPSILON: 8.0, records.DELTA: 1e-5}),
            })
            return Message(content=content, reply_to=msg)
        weights = msg.content[records.ARRAYS].to_torch_state_dict()
        new = OrderedDict((k, v + self.shift) for k, v in weights.items())
        if mode == "nan":
            first = next(iter(new))
            new[first].view(-1)[:3] = math.nan
        content = RecordDict({
            records.SITE: ConfigRecord({
                records.SITE_NAME: self.name, records.PRIVACY_UNIT: "patient", records.LEDGER_ROW: server_round,
            }),
        })
        if mode != "no-metrics":
            content[records.METRICS] = MetricRecord(self.metrics(server_round))
        if mode != "no-arrays":
            content[records.ARRAYS] = ArrayRecord(new)
        return Message(content=content, reply_to=msg)

    def metrics(self, server_round: int) -> dict[str, float | int]:
        return {
            records.NUM_EXAMPLES: self.examples, records.EPSILON: 0.5 * server_round, records.EPSILON_RDP: 0.6,
            records.DELTA: 1e-5, records.MAX_EPSILON: 8.0, records.NOISE_MULTIPLIER: 1.1,
            records.SAMPLE_RATE: 0.1, records.STEPS: 5, records.MAX_GRAD_NORM: 1.0,
        }

    def _evaluate_reply(self, msg: Message) -> Message:
        stats = sufficient_statistics(probs=torch.tensor([0.9, 0.7, 0.4, 0.1]), targets=torch.tensor([1, 0, 1, 0]))
        content = RecordDict({
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 4, records.EVAL_LOSS: 0.5, **stats}),
            records.SITE: ConfigRecord({records.SITE_NAME: self.name}),
        })
        return Message(content=content, reply_to=msg)


class FakeGrid:
    """Flower's Grid as far as the round loop uses it: connected nodes, send and receive."""

    def __init__(self, sites: dict[int, Site], connected: Iterable[int] | None = None) -> None:
        self.sites = sites
        self.connected = list(sites if connected is None else connected)
        self.batches: list[list[Message]] = []
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return list(self.connected)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        batch = list(messages)
        self.batches.append(batch)
        self.timeouts.append(timeout)
        replies = [self.sites[m.metadata.dst_node_id](m) for m in batch]
        return [r for r in replies if r is not None]

    def sent(self, message_type: str) -> list[list[Message]]:
        return [b for b in self.batches if b and b[0].metadata.message_type == message_type]


def _weights() -> StateDict:
    return OrderedDict(build_model("fedrad-cnn", image_size=32, num_classes=2, seed=0).state_dict())


def _mean(weights: StateDict, sites: list[Site]) -> StateDict:
    """FedAvg of sites that each sent ``weights + shift``."""
    total = sum(s.examples for s in sites)
    return OrderedDict(
        (k, sum((v + s.shift).double() * (s.examples / total) for s in sites).to(v.dtype)) for k, v in weights.items()
    )


@dataclass
class Harness:
    grid: FakeGrid
    rounds: PlainRounds
    report: RunReport
    done: list[tuple[int, StateDict]]

    def run(self, weights: StateDict, first: int = 1) -> StateDict:
        return self.rounds.run_rounds(first, weights)


def _harness(tmp_path: Path, sites: dict[int, Site], *, names: Names | None = None,
             connected: Iterable[int] | None = None, **config: Any) -> Harness:
    run = RunConfig.from_flower({
        "secagg": False, "round-timeout": 5, "join-timeout": 0.5, "num-server-rounds": 1, "min-sites": 2,
        "local-epochs": 1, "image-size": 32, **config,
    })
    report = RunReport(run_dir=tmp_path / "run", run_id=17, config={"num-server-rounds": run.num_server_rounds},
                       transport="test")
    names = names if names is not None else Names()
    strategy = FedradFedAvg(report=report, names=names, num_classes=2, fraction_train=1.0, fraction_evaluate=1.0,
                            min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    grid = FakeGrid(sites, connected)
    done: list[tuple[int, StateDict]] = []
    rounds = PlainRounds(grid, run=run, strategy=strategy, names=names,  # type: ignore[arg-type]
                         on_round_done=lambda r, w: done.append((r, w)))
    return Harness(grid, rounds, report, done)


def _three(**modes: str) -> dict[int, Site]:
    """Sites A, B, C on nodes 11, 12, 13 with 10, 20, 30 examples; ``modes`` by site name."""
    return {
        11: Site("A", 10, shift=0.01, mode=modes.get("A", "ok")),
        12: Site("B", 20, shift=0.02, mode=modes.get("B", "ok")),
        13: Site("C", 30, shift=0.03, mode=modes.get("C", "ok")),
    }


def _assert_state_close(actual: StateDict, expected: StateDict) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k])


# -- all sites answer ---------------------------------------------------------------------------


def test_every_site_answers_the_aggregate_is_the_weighted_mean_and_each_round_is_committed(tmp_path: Path) -> None:
    sites = _three()
    h = _harness(tmp_path, sites, **{"num-server-rounds": 2})
    start = _weights()
    final = h.run(start)

    one = _mean(start, list(sites.values()))
    _assert_state_close(h.done[0][1], one)
    _assert_state_close(final, _mean(one, list(sites.values())))
    assert [r for r, _ in h.done] == [1, 2]
    assert h.done[-1][1] is final

    data = load_report(h.report.run_dir)
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    first = data["rounds"][0]
    train = first["train"]
    assert set(train["sites"]) == {"A", "B", "C"} and train["failed"] == {} and train["rejected"] == {}
    assert train["sites"]["C"]["num-examples"] == 30 and train["sites"]["C"]["privacy-unit"] == "patient"
    assert train["aggregation"] == "fedavg"
    assert first["checkpoint"] == "checkpoints/round-0001.safetensors"
    tensors, meta = load_checkpoint(h.report.run_dir / first["checkpoint"])
    assert meta["round"] == "1" and meta["run-id"] == "17"
    _assert_state_close(OrderedDict((k, tensors[k]) for k in start), one)
    assert set(first["evaluate"]["sites"]) == {"A", "B", "C"} and "auroc" in first["evaluate"]["pooled"]
    assert data["sites"]["A"]["rounds_trained"] == 2
    assert all(s.trained == [1, 2] and s.evaluated == [1, 2] for s in sites.values())


def test_messages_expire_at_the_round_deadline_and_carry_the_round(tmp_path: Path) -> None:
    h = _harness(tmp_path, _three(), **{"round-timeout": 7.5, "local-epochs": 2})
    h.run(_weights())
    assert h.grid.timeouts == [7.5, 7.5]  # training, then evaluation
    for batch in h.grid.batches:
        assert sorted(m.metadata.dst_node_id for m in batch) == [11, 12, 13]
        assert all(m.metadata.ttl == 7.5 for m in batch)
        assert all(m.content[records.CONFIG][records.SERVER_ROUND] == 1 for m in batch)
    train = h.grid.sent(MessageType.TRAIN)[0]
    assert all(m.content[records.CONFIG]["local-epochs"] == 2 for m in train)


def test_expires_keeps_destination_type_and_content() -> None:
    content = RecordDict({records.CONFIG: ConfigRecord({"x": 1})})
    msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN, group_id="g")
    (out,) = _expires([msg], 3.0)
    assert out.metadata.ttl == 3.0 and out.metadata.dst_node_id == 5 and out.metadata.group_id == "g"
    assert out.metadata.message_type == MessageType.TRAIN and out.content is content


def test_a_resumed_run_sends_the_server_rounds_from_its_first_round(tmp_path: Path) -> None:
    sites = _three()
    h = _harness(tmp_path, sites, **{"num-server-rounds": 4})
    h.run(_weights(), first=3)
    rounds = [[m.content[records.CONFIG][records.SERVER_ROUND] for m in b] for b in h.grid.sent(MessageType.TRAIN)]
    assert rounds == [[3, 3, 3], [4, 4, 4]]
    assert [r for r, _ in h.done] == [3, 4]
    data = load_report(h.report.run_dir)
    assert [r["round"] for r in data["rounds"]] == [3, 4]
    assert data["rounds"][0]["checkpoint"] == "checkpoints/round-0003.safetensors"
    assert all(s.trained == [3, 4] and s.evaluated == [3, 4] for s in sites.values())


# -- deadline -------------------------------------------------------------------------------------


def test_a_silent_site_misses_the_deadline_and_is_not_asked_to_evaluate(tmp_path: Path) -> None:
    sites = _three()
    sites[13].modes = {2: "silent"}  # C answers round 1, so the coordinator has learned its name
    h = _harness(tmp_path, sites, **{"num-server-rounds": 2})
    final = h.run(_weights())

    _assert_state_close(final, _mean(h.done[0][1], [sites[11], sites[12]]))
    assert [r for r, _ in h.done] == [1, 2]
    train = load_report(h.report.run_dir)["rounds"][1]["train"]
    assert set(train["sites"]) == {"A", "B"}
    assert list(train["failed"]) == ["C"]
    assert "deadline" in train["failed"]["C"] and "5 s" in train["failed"]["C"]
    evaluate = h.grid.sent(MessageType.EVALUATE)
    assert sorted(m.metadata.dst_node_id for m in evaluate[0]) == [11, 12, 13]
    assert sorted(m.metadata.dst_node_id for m in evaluate[1]) == [11, 12]  # C missed round 2
    assert sites[13].evaluated == [1]


def test_a_site_never_heard_from_is_reported_by_node_id(tmp_path: Path) -> None:
    h = _harness(tmp_path, _three(C="silent"))
    h.run(_weights())
    failed = load_report(h.report.run_dir)["rounds"][0]["train"]["failed"]
    assert list(failed) == ["node-13"] and "deadline" in failed["node-13"]


# -- screening --------------------------------------------------------------------------------------


def test_a_nan_update_is_rejected_and_left_out_of_the_aggregate(tmp_path: Path) -> None:
    sites = _three(B="nan")
    h = _harness(tmp_path, sites)
    start = _weights()
    final = h.run(start)

    _assert_state_close(final, _mean(start, [sites[11], sites[13]]))
    data = load_report(h.report.run_dir)
    train = data["rounds"][0]["train"]
    assert set(train["sites"]) == {"A", "C"}
    assert list(train["rejected"]) == ["B"] and "NaN/Inf" in train["rejected"]["B"]
    assert "'2.weight' has 3 NaN/Inf values" == train["rejected"]["B"]
    # B trained (and spent ε): its privacy facts stay in the report for the audit.
    assert train["rejected_sites"]["B"]["num-examples"] == 20 and train["rejected_sites"]["B"]["epsilon"] == 0.5
    assert data["sites"]["B"]["rounds_rejected"] == 1 and data["sites"]["B"]["rounds_trained"] == 0


def test_a_reply_without_weights_is_rejected_as_unreadable(tmp_path: Path) -> None:
    h = _harness(tmp_path, _three(A="no-arrays"))
    h.run(_weights())
    rejected = load_report(h.report.run_dir)["rounds"][0]["train"]["rejected"]
    assert rejected == {"A": "unreadable weights (KeyError)"}


def test_a_huge_update_is_rejected_by_the_norm_check(tmp_path: Path) -> None:
    sites = _three()
    sites[13].shift = 1e4
    h = _harness(tmp_path, sites)
    start = _weights()
    final = h.run(start)
    _assert_state_close(final, _mean(start, [sites[11], sites[12]]))
    rejected = load_report(h.report.run_dir)["rounds"][0]["train"]["rejected"]
    assert list(rejected) == ["C"] and "median" in rejected["C"] and "limit 10x" in rejected["C"]


def test_median_aggregation_bounds_a_poisoned_site_the_screening_let_through(tmp_path: Path) -> None:
    sites = _three()
    sites[13].shift = 1e4  # huge but finite; norm-factor 0 turns the norm check off
    h = _harness(tmp_path, sites, aggregation="median", **{"norm-factor": 0})
    start = _weights()
    final = h.run(start)
    train = load_report(h.report.run_dir)["rounds"][0]["train"]
    assert train["rejected"] == {} and set(train["sites"]) == {"A", "B", "C"}
    assert train["aggregation"] == "median"
    honest = OrderedDict((k, v + 0.02) for k, v in start.items())  # the median of +0.01, +0.02, +1e4
    _assert_state_close(final, honest)
    assert max(float((final[k] - start[k]).abs().max()) for k in start) < 0.03


# -- quorum, retries, join ---------------------------------------------------------------------------


def test_too_few_usable_answers_are_retried_then_the_run_stops(tmp_path: Path) -> None:
    names = Names({11: "A", 12: "B", 13: "C"})  # enrolled sites: the error reply is named too
    sites = _three(B="error", C="nan")
    h = _harness(tmp_path, sites, names=names, **{"round-retries": 1})
    with pytest.raises(RunStopped) as caught:
        h.run(_weights())

    message = str(caught.value)
    assert "min-sites" in message and "round-retries=1" in message and "after 2 tries" in message
    assert "1 usable update(s)" in message and "B: B ran out of memory" in message and "C: '2.weight'" in message
    assert len(h.grid.sent(MessageType.TRAIN)) == 2  # tried again
    assert h.grid.sent(MessageType.EVALUATE) == [] and h.done == []
    assert all(s.trained == [1, 1] for s in sites.values())
    entry = load_report(h.report.run_dir)["rounds"][0]
    assert "train" not in entry and "checkpoint" not in entry
    assert len(entry["attempts"]) == 2
    for attempt in entry["attempts"]:
        assert attempt["trained"] == ["A"] and list(attempt["failed"]) == ["B"] and list(attempt["rejected"]) == ["C"]
        assert "min-sites" in attempt["reason"]
    assert not (h.report.run_dir / "checkpoints").exists()


def test_a_round_that_falls_short_once_succeeds_on_the_retry(tmp_path: Path) -> None:
    sites = _three(C="silent")
    sites[12].script = ["error", "ok"]  # B fails its first training message only
    h = _harness(tmp_path, sites)
    start = _weights()
    final = h.run(start)
    _assert_state_close(final, _mean(start, [sites[11], sites[12]]))
    entry = load_report(h.report.run_dir)["rounds"][0]
    assert len(entry["attempts"]) == 1 and "node-12: B ran out of memory" in entry["attempts"][0]["reason"]
    assert set(entry["train"]["sites"]) == {"A", "B"} and list(entry["train"]["failed"]) == ["node-13"]
    assert len(h.grid.sent(MessageType.TRAIN)) == 2 and [r for r, _ in h.done] == [1]


def test_declines_count_towards_the_quorum(tmp_path: Path) -> None:
    sites = _three(B="decline", C="silent")
    h = _harness(tmp_path, sites)
    start = _weights()
    final = h.run(start)
    _assert_state_close(final, _mean(start, [sites[11]]))
    train = load_report(h.report.run_dir)["rounds"][0]["train"]
    assert set(train["sites"]) == {"A"} and "budget spent" in train["declined"]["B"]


def test_every_site_declining_ends_the_run_as_budgets_spent(tmp_path: Path) -> None:
    h = _harness(tmp_path, _three(A="decline", B="decline", C="decline"))
    with pytest.raises(BudgetsSpent, match="Every site declined round 1"):
        h.run(_weights())
    assert set(load_report(h.report.run_dir)["rounds"][0]["train"]["declined"]) == {"A", "B", "C"}


def test_fewer_connected_sites_than_min_sites_stops_after_the_join_timeout(tmp_path: Path) -> None:
    h = _harness(tmp_path, _three(), connected=[11], **{"join-timeout": 0.2})
    with pytest.raises(RunStopped, match=r"only 1 of the 2 sites .*join-timeout"):
        h.run(_weights())
    assert h.grid.batches == [] and h.done == []


def test_wait_for_sites_returns_once_enough_sites_have_connected() -> None:
    grid = FakeGrid({})
    arrivals = iter([[], [3], [3, 1], [3, 1, 2]])
    grid.get_node_ids = lambda: next(arrivals)  # type: ignore[method-assign]
    assert wait_for_sites(grid, min_sites=2, timeout=5, server_round=1, poll=0.001) == [1, 3]  # type: ignore[arg-type]
    with pytest.raises(RunStopped, match="Round 4: only 0 of the 3"):
        wait_for_sites(FakeGrid({}), min_sites=3, timeout=0.01, server_round=4, poll=0.001)  # type: ignore[arg-type]


# -- malformed input ------------------------------------------------------------------------------


def test_a_reply_without_metrics_is_rejected_not_fatal(tmp_path: Path) -> None:
    h = _harness(tmp_path, _three(A="no-metrics"))
    h.run(_weights())
    assert "A" in load_report(h.report.run_dir)["rounds"][0]["train"]["rejected"]


def test_names_come_from_keys_when_enrolled_and_from_the_first_reply_otherwise() -> None:
    from server.app.strategy import Names

    names = Names({7: "E"})
    claim = RecordDict({records.SITE: ConfigRecord({records.SITE_NAME: "A"})})
    assert names.of(1, claim) == "A" and names.of(2, claim) == "A"  # a restarted client: same site
    renamed = RecordDict({records.SITE: ConfigRecord({records.SITE_NAME: "Z"})})
    assert names.of(1, renamed) == "A"  # a node keeps the name it first gave
    forged = RecordDict({records.SITE: ConfigRecord({records.SITE_NAME: "X"})})
    assert names.of(7, forged) == "E"  # an enrolled node's name comes from its key, not its reply
    assert names.of(9) == "node-9"


def test_a_restarted_site_answers_from_a_new_node_and_is_not_failed_for_its_old_one(tmp_path: Path) -> None:
    sites = {**_three(), 14: Site("C", 30, shift=0.03, modes={1: "silent"})}
    sites[13].modes = {2: "silent"}  # C's first node answers round 1, then is killed; C restarts as node 14
    h = _harness(tmp_path, sites, **{"num-server-rounds": 2})
    h.run(_weights())
    second = load_report(h.report.run_dir)["rounds"][1]["train"]
    assert sorted(second["sites"]) == ["A", "B", "C"] and second["failed"] == {}


def test_two_live_nodes_claiming_one_name_are_booked_apart(tmp_path: Path) -> None:
    sites = {**_three(), 14: Site("C", 40, shift=0.04)}
    h = _harness(tmp_path, sites)
    h.run(_weights())
    train = load_report(h.report.run_dir)["rounds"][0]["train"]
    claims = sorted(name for name in train["sites"] if name.startswith("C"))
    assert claims[0] == "C" and claims[1] in ("C@node-13", "C@node-14")
    assert sorted(train["sites"][n]["num-examples"] for n in claims) == [30, 40]
