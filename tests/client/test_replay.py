"""A round the coordinator lost is answered from the site's stored update, not trained (and paid for) twice."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from client.app.replay import UPDATES_DIR, UpdateStore, weights_digest
from client.app.site import train_round
from common.config import RunConfig, SiteConfig
from common.ledger import Ledger
from common.models import build_model

StateDict = OrderedDict[str, torch.Tensor]


def _state() -> StateDict:
    return OrderedDict([("w", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.tensor([0.5, -0.5]))])


# -- weights_digest -------------------------------------------------------------------------------


def test_digest_is_stable_for_equal_weights() -> None:
    a, b = _state(), OrderedDict((k, v.clone()) for k, v in _state().items())
    assert weights_digest(a) == weights_digest(b) == weights_digest(dict(a))
    assert len(weights_digest(a)) == 64
    # Same values in another memory layout: the digest is of the values, not the storage.
    strided = torch.empty(3, 2).t()
    strided.copy_(a["w"])
    assert not strided.is_contiguous()
    assert weights_digest(OrderedDict([("w", strided), ("b", a["b"])])) == weights_digest(a)


def test_digest_changes_with_one_value_the_dtype_a_name_or_a_shape() -> None:
    base = weights_digest(_state())

    one = _state()
    one["w"][1, 2] = torch.nextafter(one["w"][1, 2], torch.tensor(100.0))  # the smallest possible change
    assert weights_digest(one) != base

    double = OrderedDict((k, v.double()) for k, v in _state().items())
    assert weights_digest(double) != base

    renamed = OrderedDict(("bias" if k == "b" else k, v) for k, v in _state().items())
    assert weights_digest(renamed) != base

    reshaped = _state()
    reshaped["w"] = reshaped["w"].reshape(3, 2)  # same bytes, other shape
    assert weights_digest(reshaped) != base


# -- UpdateStore ------------------------------------------------------------------------------------


def test_store_round_trip_keeps_weights_order_metrics_and_facts(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path)
    weights = OrderedDict([("z", torch.ones(2)), ("a", torch.zeros(3, dtype=torch.float64))])
    path = store.save(run_id="7", server_round=3, started_from="abc", weights=weights,
                      metrics={"num-examples": 40, "epsilon": 1.25}, facts={"ledger-row": 2, "privacy-unit": "patient"})
    assert path == tmp_path / UPDATES_DIR / "7-round-0003.safetensors" and path.is_file()
    loaded = store.load(run_id="7", server_round=3, started_from="abc")
    assert loaded is not None
    got, metrics, facts = loaded
    assert list(got) == ["z", "a"] and all(torch.equal(got[k], weights[k]) and got[k].dtype == weights[k].dtype
                                           for k in weights)
    assert metrics == {"num-examples": 40, "epsilon": 1.25} and facts == {"ledger-row": 2, "privacy-unit": "patient"}


def test_store_answers_only_the_same_run_round_and_starting_weights(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path)
    assert store.load(run_id="7", server_round=1, started_from="abc") is None  # nothing stored yet
    store.save(run_id="7", server_round=1, started_from="abc", weights=_state(), metrics={}, facts={})
    assert store.load(run_id="7", server_round=1, started_from="abd") is None
    assert store.load(run_id="8", server_round=1, started_from="abc") is None
    assert store.load(run_id="7", server_round=2, started_from="abc") is None
    assert store.load(run_id="7", server_round=1, started_from="abc") is not None


def test_store_keeps_only_the_latest_round_of_each_run(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path)
    for r in (1, 2):
        store.save(run_id="7", server_round=r, started_from=f"d{r}", weights=_state(), metrics={}, facts={})
    store.save(run_id="70", server_round=1, started_from="x", weights=_state(), metrics={}, facts={})
    store.save(run_id="7", server_round=3, started_from="d3", weights=_state(), metrics={}, facts={})
    assert sorted(p.name for p in (tmp_path / UPDATES_DIR).iterdir()) == [
        "7-round-0003.safetensors", "70-round-0001.safetensors",  # run 70 is not run 7
    ]
    assert store.load(run_id="7", server_round=2, started_from="d2") is None
    assert store.load(run_id="7", server_round=3, started_from="d3") is not None
    assert store.load(run_id="70", server_round=1, started_from="x") is not None


@pytest.mark.parametrize("content", [b"", b"garbage, not a safetensors file", b"\x08" + b"\x00" * 7 + b"{}"])
def test_an_unreadable_stored_update_means_training_again(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store = UpdateStore(tmp_path)
    path = store.save(run_id="7", server_round=1, started_from="abc", weights=_state(), metrics={}, facts={})
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="client.app.replay"):
        assert store.load(run_id="7", server_round=1, started_from="abc") is None
    assert "unreadable" in caplog.text


# -- train_round on a real (tiny) site ------------------------------------------------------------------


def _weights(seed: int = 0) -> StateDict:
    return OrderedDict(build_model("fedrad-cnn", image_size=32, seed=seed).state_dict())


def test_a_lost_round_asked_again_is_replayed_without_a_new_ledger_row(
    site_and_run: tuple[SiteConfig, RunConfig],
) -> None:
    site, run = site_and_run
    ledger = Ledger(site.privacy_dir)

    first, metrics, facts = train_round(site=site, run=run, run_id=7, server_round=1, weights=_weights())
    assert [(r.run_id, r.server_round) for r in ledger.rows()] == [("7", 1)]
    assert (site.work_dir / UPDATES_DIR / "7-round-0001.safetensors").is_file()

    # The coordinator lost round 1 and asks again with the same global weights (run id as text this time).
    again, metrics_again, facts_again = train_round(site=site, run=run, run_id="7", server_round=1, weights=_weights())
    assert list(again) == list(first) and all(torch.equal(again[k], first[k]) for k in first)
    assert metrics_again == metrics and facts_again == facts
    assert len(ledger.rows()) == 1

    # Other weights: a new release of the data, trained and booked again.
    other = _weights()
    other["6.bias"] = other["6.bias"] + 1e-3
    retrained, metrics_other, facts_other = train_round(site=site, run=run, run_id=7, server_round=1, weights=other)
    assert any(not torch.equal(retrained[k], first[k]) for k in first)
    assert [(r.run_id, r.server_round) for r in ledger.rows()] == [("7", 1), ("7", 1)]
    assert metrics_other["epsilon"] > metrics["epsilon"] and metrics_other["run-epsilon"] > metrics["run-epsilon"]
    assert facts_other["ledger-row"] == 2 and facts_other["ledger-hash"] != facts["ledger-hash"]

    # The store now holds the update trained from `other`: asked again with it, it is replayed...
    replayed, _, facts_replayed = train_round(site=site, run=run, run_id=7, server_round=1, weights=other)
    assert all(torch.equal(replayed[k], retrained[k]) for k in retrained) and facts_replayed["ledger-row"] == 2
    assert len(ledger.rows()) == 2


def test_the_same_round_of_another_run_is_trained_not_replayed(site_and_run: tuple[SiteConfig, RunConfig]) -> None:
    site, run = site_and_run
    train_round(site=site, run=run, run_id=7, server_round=1, weights=_weights())
    _, _, facts = train_round(site=site, run=run, run_id=8, server_round=1, weights=_weights())
    assert facts["ledger-row"] == 2
    assert [(r.run_id, r.server_round) for r in Ledger(site.privacy_dir).rows()] == [("7", 1), ("8", 1)]
