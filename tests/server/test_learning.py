"""server.app.learning: is the run learning? Pure functions over report rounds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from server.app.learning import (
    BELOW_CHANCE,
    LEARNING,
    NOT_LEARNING,
    UNCLEAR,
    RoundAuroc,
    assess,
    check_round,
    history,
    null_se,
)

CONFIG = {"batch-size": 64, "learning-rate": 0.03, "classes": "0,1", "window": "brain"}


def _rounds(aurocs: list[float], *, positives: int = 100, negatives: int = 300, sigma: float = 2.5) -> dict[int, Any]:
    """Report rounds 1..n: train facts of two DP sites and the pooled AUROC of each round."""
    return {
        r: {
            "round": r,
            "train": {"sites": {
                "A": {"num-examples": 900, "noise-multiplier": sigma, "sample-rate": 0.25, "steps": 12},
                "B": {"num-examples": 400, "noise-multiplier": 0.8, "sample-rate": 0.5, "steps": 6},
            }},
            "evaluate": {"pooled": {"auroc": a, "positives": float(positives), "negatives": float(negatives)}},
        }
        for r, a in enumerate(aurocs, start=1)
    }


def test_null_se_is_the_spread_of_random_rankings() -> None:
    """The Hanley–McNeil null SE against the AUROC (scikit-learn) of random scores."""
    rng = np.random.default_rng(0)
    pos, neg = 30, 50
    y = np.r_[np.ones(pos), np.zeros(neg)]
    aurocs = [roc_auc_score(y, rng.random(pos + neg)) for _ in range(2000)]
    assert np.std(aurocs) == pytest.approx(null_se(pos, neg), rel=0.06)
    assert np.mean(aurocs) == pytest.approx(0.5, abs=0.005)
    with pytest.raises(ValueError, match="at least one positive"):
        null_se(0, 10)


def test_a_learning_run_is_not_flagged() -> None:
    for r in range(1, 6):
        verdict = check_round(_rounds([0.52, 0.58, 0.66, 0.71, 0.75]), CONFIG, r)
        assert verdict is not None and not verdict.flagged
    assert verdict.status == LEARNING and verdict.causes == ()


def test_a_flat_run_is_flagged_after_window_rounds_not_before() -> None:
    rounds = _rounds([0.5, 0.47, 0.53, 0.51])
    early = [check_round(rounds, CONFIG, r) for r in (1, 2)]
    assert [v.status for v in early if v] == [UNCLEAR, UNCLEAR]
    verdict = check_round(rounds, CONFIG, 3)
    assert verdict is not None and verdict.status == NOT_LEARNING and verdict.rounds == (1, 2, 3)
    band = 2 * math.sqrt(401 / (12 * 100 * 300))
    assert verdict.band == pytest.approx(band) and (verdict.low, verdict.high) == (0.47, 0.53)
    message = verdict.message
    assert message.startswith(f"Round 3: pooled AUROC has not risen above chance (0.47–0.53, ±{band:.2f} around 0.5) "
                              "for 3 rounds: the model is not learning. Likely causes: too few patients per site")
    # the noisiest site's facts, and the learning rate with the noise it has to beat
    assert "site A: noise multiplier σ=2.50, sample rate 0.25, about 256 patients, 12 steps per round" in message
    assert "learning-rate=0.03" in message and "σ/batch-size = 0.039" in message
    assert "labels.csv" in message and "validation set too small" not in message
    assert check_round(rounds, CONFIG, 4).status == NOT_LEARNING  # type: ignore[union-attr]


def test_a_run_wandering_between_chance_and_below_it_is_not_learning() -> None:
    """The failed demo draw of issue 15: pooled AUROC 0.480, 0.488, 0.449, 0.529, 0.452 on ~1,500 images."""
    rounds = _rounds([0.480, 0.488, 0.449, 0.529, 0.452], positives=700, negatives=800)
    assert 0.449 < 0.5 - 2 * math.sqrt(1501 / (12 * 700 * 800))  # round 3 alone is significantly below 0.5
    assert [check_round(rounds, CONFIG, r).status for r in (3, 4, 5)] == [NOT_LEARNING] * 3  # type: ignore[union-attr]
    assert check_round(_rounds([0.44, 0.45, 0.44], positives=700, negatives=800), CONFIG, 3).status == BELOW_CHANCE  # type: ignore[union-attr]


def test_low_noise_puts_the_learning_rate_first() -> None:
    verdict = check_round(_rounds([0.5, 0.5, 0.5], sigma=0.6), CONFIG, 3)
    assert verdict is not None and verdict.causes[0].startswith("a learning rate too high for the noise")
    no_dp = _rounds([0.5, 0.5, 0.5])
    for r in no_dp.values():
        r["train"]["sites"] = {"A": {"num-examples": 900}}
    assert "no site adds DP noise" in check_round(no_dp, CONFIG, 3).causes[0]  # type: ignore[union-attr]


def test_small_validation_sets_use_a_wider_band() -> None:
    aurocs = [0.6, 0.62, 0.58]
    large = check_round(_rounds(aurocs, positives=200, negatives=600), CONFIG, 3)
    small = check_round(_rounds(aurocs, positives=8, negatives=12), CONFIG, 3)
    assert large is not None and large.status == LEARNING  # 0.58 is > 0.5 + 0.045
    assert small is not None and small.status == NOT_LEARNING and small.band > 0.25
    assert any("validation set too small to see learning (8 positives, 12 negatives" in c for c in small.causes)


def test_below_chance_is_a_separate_flag_naming_the_inverted_sites() -> None:
    rounds = _rounds([0.3, 0.28, 0.25])
    rounds[3]["evaluate"]["sites"] = {
        "A": {"auroc": 0.1, "positives": 40.0, "negatives": 100.0},
        "B": {"auroc": 0.55, "positives": 60.0, "negatives": 200.0},
    }
    verdict = check_round(rounds, CONFIG, 3)
    assert verdict is not None and verdict.status == BELOW_CHANCE
    assert "below chance" in verdict.message and "wrong way round" in verdict.message
    assert "labels swapped" in verdict.causes[0] and "A (0.10)" in verdict.causes[0] and "B (" not in verdict.causes[0]
    # one round below chance after flat ones: not learning (nothing rose above chance), not the below-chance flag
    assert check_round(_rounds([0.5, 0.5, 0.3]), CONFIG, 3).status == NOT_LEARNING  # type: ignore[union-attr]


def test_rounds_without_a_usable_auroc_are_skipped() -> None:
    rounds = _rounds([0.5, 0.5, 0.5, 0.5])
    rounds[2]["evaluate"]["pooled"]["auroc"] = None  # a class absent that round
    del rounds[3]["evaluate"]
    assert [h.round for h in history(rounds)] == [1, 4]
    assert check_round(rounds, CONFIG, 3) is None  # round 3 was not evaluated
    assert check_round(rounds, CONFIG, 4).status == UNCLEAR  # type: ignore[union-attr]  # two usable rounds only
    assert assess([]) is None
    assert assess([RoundAuroc(1, 0.5, 10, 10)], window=1).status == NOT_LEARNING  # type: ignore[union-attr]
