from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.models import build_model
from server.app.validation import (
    AGGREGATIONS,
    Screening,
    aggregate,
    check_update,
    norm_outliers,
    screen,
    update_norm,
)

State = OrderedDict[str, torch.Tensor]


def _reference() -> State:
    torch.manual_seed(0)
    return OrderedDict(build_model("fedrad-cnn", image_size=32, num_classes=2).state_dict())


def _moved(reference: State, scale: float, seed: int) -> State:
    """``reference`` plus a random direction of L2 norm exactly ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in reference.items()
    }
    norm = torch.sqrt(sum(torch.sum(d * d) for d in deltas.values()))
    return OrderedDict(
        (k, (v.double() + deltas[k] * (scale / norm)).to(v.dtype)) for k, v in reference.items()
    )


def _small() -> State:
    return OrderedDict(
        [
            ("fc.weight", torch.zeros(2, 4)),
            ("fc.bias", torch.zeros(2)),
            ("steps", torch.tensor(10, dtype=torch.int64)),
        ]
    )


# ------------------------------------------------------------------ check_update


def test_identical_and_model_updates_pass() -> None:
    ref = _reference()
    assert check_update(ref, ref) is None
    assert check_update(_moved(ref, 1.0, seed=1), ref) is None
    assert check_update(_small(), _small()) is None


def test_missing_key_is_named() -> None:
    ref = _reference()
    update = OrderedDict(ref)
    name = next(iter(ref))
    del update[name]
    assert check_update(update, ref) == f"missing {name!r}"


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("x", torch.zeros(1), "unexpected 'x'"),
        ("fc.weight", torch.zeros(3, 4), "'fc.weight' has shape (3, 4), expected (2, 4)"),
        ("fc.weight", torch.zeros(2, 4, dtype=torch.float64), "'fc.weight' is float64, expected float32"),
        ("steps", torch.tensor(10.0), "'steps' is float32, expected int64"),  # integer buffers too
        ("fc.bias", [0.0, 0.0], "'fc.bias' is a list, not a tensor"),
    ],
    ids=["unexpected-key", "wrong-shape", "float64", "integer-buffer-dtype", "non-tensor"],
)
def test_a_malformed_tensor_is_named(name: str, value: object, reason: str) -> None:
    update = _small()
    update[name] = value
    assert check_update(update, _small()) == reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_counted(bad: float) -> None:
    update = _small()
    update["fc.bias"] = torch.tensor([bad, 0.0])
    update["fc.weight"] = torch.full((2, 4), bad)
    update["fc.weight"][0, 0] = 1.0
    assert check_update(update, _small()) == "'fc.weight' has 7 NaN/Inf values"  # first in order
    update["fc.weight"] = torch.zeros(2, 4)
    assert check_update(update, _small()) == "'fc.bias' has 1 NaN/Inf value"


def test_model_with_nan_is_rejected() -> None:
    ref = _reference()
    update = _moved(ref, 1.0, seed=2)
    name = list(ref)[-1]
    update[name] = update[name].clone()
    update[name].view(-1)[0] = float("nan")
    assert check_update(update, ref) == f"{name!r} has 1 NaN/Inf value"


# ------------------------------------------------------------------ update_norm


def test_update_norm_is_l2_over_float_tensors_only() -> None:
    ref = _small()
    update = _small()
    update["fc.weight"] = torch.full((2, 4), 1.0)  # 8 ones: squared sum 8
    update["fc.bias"] = torch.tensor([0.0, 1.0])  # squared sum 1
    update["steps"] = torch.tensor(1000)  # integer buffer: ignored
    assert update_norm(update, ref) == pytest.approx(3.0)
    assert update_norm(ref, ref) == 0.0
    assert update_norm(_moved(_reference(), 2.5, seed=3), _reference()) == pytest.approx(
        2.5, rel=1e-5
    )


# ------------------------------------------------------------------ norm_outliers


def test_one_huge_update_among_three_is_flagged() -> None:
    flagged = norm_outliers({"A": 1.0, "B": 1.2, "C": 100.0}, factor=10)
    assert list(flagged) == ["C"]
    assert flagged["C"] == "update norm 100 is 90.9x the median 1.1 of the other sites (limit 10x)"


def test_reason_format() -> None:
    flagged = norm_outliers({"A": 3.0, "B": 3.02, "C": 41.2}, factor=10)
    assert flagged == {
        "C": "update norm 41.2 is 13.7x the median 3.01 of the other sites (limit 10x)"
    }


def test_one_huge_update_among_five_is_flagged() -> None:
    norms = {"A": 1.0, "B": 0.8, "C": 1.3, "D": 1.1, "E": 100.0}
    assert list(norm_outliers(norms, factor=10)) == ["E"]


@pytest.mark.parametrize("n", [3, 5])
def test_honest_spread_is_not_flagged(n: int) -> None:
    spread = [0.7, 1.3, 1.0, 0.85, 1.15][:n]  # ±30%
    assert norm_outliers({f"S{i}": x for i, x in enumerate(spread)}, factor=10) == {}
    # with a tight factor the same spread is still fine (max ratio 1.3/0.85 < 2)
    assert norm_outliers({f"S{i}": x for i, x in enumerate(spread)}, factor=2) == {}


def test_tiny_update_flags_nobody() -> None:
    # leave-one-out: the two honest sites are judged against each other's median, not the tiny one
    assert norm_outliers({"A": 1.0, "B": 1.3, "C": 1e-6}, factor=10) == {}


def test_fewer_than_min_sites_flags_nothing() -> None:
    assert norm_outliers({"A": 1.0, "B": 1000.0}, factor=10) == {}
    assert norm_outliers({"A": 1000.0}, factor=10) == {}
    assert norm_outliers({}, factor=10) == {}
    assert list(norm_outliers({"A": 1.0, "B": 1000.0}, factor=10, min_sites=2)) == ["B"]


def test_zero_median_of_others_flags_nothing() -> None:
    assert norm_outliers({"A": 0.0, "B": 0.0, "C": 5.0}, factor=10) == {}


def test_non_finite_norm_is_flagged_and_ignored_for_others() -> None:
    flagged = norm_outliers({"A": 1.0, "B": 1.1, "C": 0.9, "D": float("inf")}, factor=10)
    assert list(flagged) == ["D"]


def test_norm_outliers_bad_arguments() -> None:
    with pytest.raises(ValueError, match="factor"):
        norm_outliers({"A": 1.0}, factor=1.0)
    with pytest.raises(ValueError, match="min_sites"):
        norm_outliers({"A": 1.0}, factor=10, min_sites=1)
    with pytest.raises(ValueError, match="negative"):
        norm_outliers({"A": -1.0}, factor=10)


def test_outlier_found_from_model_updates() -> None:
    ref = _reference()
    norms = {
        f"S{i}": update_norm(_moved(ref, s, seed=i), ref)
        for i, s in enumerate([1.0, 0.8, 1.2, 1.1, 100.0])
    }
    assert list(norm_outliers(norms, factor=10)) == ["S4"]


# ------------------------------------------------------------------ screen


def test_screen_checks_then_norms() -> None:
    ref = _reference()
    nan = _moved(ref, 1.0, seed=9)
    name = next(iter(ref))
    nan[name] = nan[name].clone()
    nan[name].view(-1)[3] = float("inf")
    updates = {
        "A": (_moved(ref, 1.0, seed=1), 10),
        "B": (_moved(ref, 1.2, seed=2), 20),
        "bad": (nan, 30),
        "C": (_moved(ref, 0.9, seed=3), 30),
        "big": (_moved(ref, 100.0, seed=4), 40),
        "neg": (_moved(ref, 1.0, seed=5), -1),
    }
    result = screen(updates, ref, norm_factor=10)
    assert isinstance(result, Screening)
    accepted, rejected = result
    assert list(accepted) == ["A", "B", "C"]
    assert accepted["B"][1] == 20 and accepted["B"][0] is updates["B"][0]
    assert rejected["bad"] == f"{name!r} has 1 NaN/Inf value"
    assert rejected["neg"] == "reports -1 examples"
    assert rejected["big"].startswith("update norm 100 is ")
    assert set(rejected) == {"bad", "neg", "big"}


def test_screen_norm_check_can_be_disabled() -> None:
    ref = _reference()
    updates = {f"S{i}": (_moved(ref, s, seed=i), 5) for i, s in enumerate([1.0, 1.0, 100.0])}
    accepted, rejected = screen(updates, ref, norm_factor=0)
    assert list(accepted) == ["S0", "S1", "S2"] and rejected == {}
    accepted, rejected = screen(updates, ref, norm_factor=10)
    assert list(accepted) == ["S0", "S1"] and list(rejected) == ["S2"]


def test_screen_counts_only_passing_sites_for_min_sites() -> None:
    ref = _reference()
    broken = OrderedDict(ref)
    broken.pop(next(iter(ref)))
    updates = {
        "A": (_moved(ref, 1.0, seed=1), 5),
        "B": (_moved(ref, 100.0, seed=2), 5),
        "C": (broken, 5),
    }
    accepted, rejected = screen(updates, ref, norm_factor=10)
    assert list(accepted) == ["A", "B"]  # two well-formed sites: cannot tell which is abnormal
    assert list(rejected) == ["C"]


# ------------------------------------------------------------------ aggregate


def test_fedavg_matches_flower() -> None:
    ref = _reference()
    sites = [
        (_moved(ref, s, seed=i), n) for i, (s, n) in enumerate([(1.0, 120), (2.0, 30), (0.5, 7)])
    ]
    replies = [
        RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})})
        for state, n in sites
    ]
    flower = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()
    ours = aggregate(sites, method="fedavg")
    assert list(ours) == list(flower)
    for name, value in ours.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, flower[name].to(torch.float32), atol=1e-6, rtol=0)


def test_fedavg_weights_by_examples_and_rounds_integer_buffers() -> None:
    a, b = _small(), _small()
    b["fc.bias"] = torch.tensor([4.0, 8.0])
    a["steps"], b["steps"] = torch.tensor(10), torch.tensor(20)
    out = aggregate([(a, 1), (b, 3)], method="fedavg")
    torch.testing.assert_close(out["fc.bias"], torch.tensor([3.0, 6.0]))
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 18  # 17.5 rounds half to even
    assert out["fc.weight"].dtype == torch.float32


def test_aggregate_returns_new_tensors() -> None:
    ref = _reference()
    for method in AGGREGATIONS:
        out = aggregate([(ref, 3)], method=method)
        for name, value in out.items():
            torch.testing.assert_close(value, ref[name])
            assert value.data_ptr() != ref[name].data_ptr()


def _poisoned(n_honest: int) -> tuple[State, list[tuple[State, int]]]:
    ref = _reference()
    honest = [(_moved(ref, 0.1, seed=i), 10) for i in range(n_honest)]
    poison = OrderedDict((k, torch.full_like(v, 1e6)) for k, v in ref.items())
    return ref, [*honest, (poison, 10)]


def _max_abs_distance(a: State, b: State) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
@pytest.mark.parametrize("n_honest", [4, 5])
def test_robust_methods_resist_one_poisoned_site(method: str, n_honest: int) -> None:
    ref, updates = _poisoned(n_honest)
    # every honest coordinate is within 0.1 of the reference (norm 0.1 overall)
    assert all(_max_abs_distance(state, ref) <= 0.1 for state, _ in updates[:-1])
    robust = aggregate(updates, method=method, trim_fraction=0.2)
    assert _max_abs_distance(robust, ref) <= 0.1  # stays within the honest sites' range
    fedavg = aggregate(updates, method="fedavg")
    assert _max_abs_distance(fedavg, ref) > 1e5  # pulled far by the poisoned site


def test_trim_zero_is_the_unweighted_mean() -> None:
    ref = _reference()
    sites = [
        (_moved(ref, s, seed=i), n)
        for i, (s, n) in enumerate([(1.0, 1), (2.0, 100), (0.5, 7), (3.0, 2)])
    ]
    trimmed = aggregate(sites, method="trimmed-mean", trim_fraction=0.0)
    for name, value in trimmed.items():
        mean = torch.stack([state[name].double() for state, _ in sites]).mean(dim=0)
        torch.testing.assert_close(value, mean.float(), atol=1e-6, rtol=0)


def test_trimmed_mean_drops_k_per_side() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 100.0, -100.0, 5.0, 6.0, 7.0, 8.0]
    sites = [(OrderedDict(w=torch.tensor([v])), 1) for v in values]
    # n = 10, trim 0.2 -> k = 2: drop -100, 1 and 8, 100 -> mean of 2..7 = 4.5
    assert float(aggregate(sites, method="trimmed-mean", trim_fraction=0.2)["w"]) == pytest.approx(
        4.5
    )
    # 0.29 * 100 is 28.999... in floating point; still trims 29 per side
    many = [(OrderedDict(w=torch.tensor([float(i)])), 1) for i in range(100)]
    assert float(aggregate(many, method="trimmed-mean", trim_fraction=0.29)["w"]) == pytest.approx(
        49.5
    )


def test_median_odd_and_even() -> None:
    odd = [(OrderedDict(w=torch.tensor([v, -v])), 1) for v in [5.0, 1.0, 3.0]]
    torch.testing.assert_close(aggregate(odd, method="median")["w"], torch.tensor([3.0, -3.0]))
    even = [(OrderedDict(w=torch.tensor([v])), 1) for v in [4.0, 1.0, 100.0, 2.0]]
    torch.testing.assert_close(aggregate(even, method="median")["w"], torch.tensor([3.0]))


@pytest.mark.parametrize("method", AGGREGATIONS)
def test_dtypes_are_preserved(method: str) -> None:
    a, b, c = _small(), _small(), _small()
    for i, state in enumerate((a, b, c)):
        state["half"] = torch.full((3,), float(i), dtype=torch.float16)
        state["f64"] = torch.full((3,), float(i), dtype=torch.float64)
        state["flag"] = torch.tensor([i > 0, True])
        state["steps"] = torch.tensor(10 + i)
    out = aggregate([(a, 1), (b, 1), (c, 1)], method=method)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in a.items()}
    assert list(out) == list(a)
    assert int(out["steps"]) == 11 and out["flag"].tolist() == [True, True]


def test_aggregate_bad_arguments() -> None:
    ok = [(_small(), 1), (_small(), 1)]
    with pytest.raises(ValueError, match="unknown aggregation 'krum'"):
        aggregate(ok, method="krum")
    with pytest.raises(ValueError, match="no updates"):
        aggregate([], method="fedavg")
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"trim fraction must be in \[0, 0.5\)"):
            aggregate(ok, method="trimmed-mean", trim_fraction=bad)
    with pytest.raises(ValueError, match="no examples"):
        aggregate([(_small(), 0), (_small(), 0)], method="fedavg")
    with pytest.raises(ValueError, match="example counts"):
        aggregate([(_small(), -1), (_small(), 3)], method="fedavg")
    other = _small()
    other["x"] = torch.zeros(1)
    with pytest.raises(ValueError, match="tensor names"):
        aggregate([(_small(), 1), (other, 1)], method="median")
    wrong = _small()
    wrong["fc.weight"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="shape"):
        aggregate([(_small(), 1), (wrong, 1)], method="fedavg")


def test_robust_methods_ignore_example_counts() -> None:
    sites = [(OrderedDict(w=torch.tensor([v])), n) for v, n in [(1.0, 1), (2.0, 1), (3.0, 1000)]]
    assert float(aggregate(sites, method="median")["w"]) == 2.0
    assert float(aggregate(sites, method="trimmed-mean", trim_fraction=0.0)["w"]) == pytest.approx(
        2.0
    )
