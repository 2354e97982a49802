"""The site's side of SecAgg+: no update is masked that the encoding would clip or overflow."""

from __future__ import annotations

import numpy as np
import pytest

from client.app.secure import check_bounds
from common.config import SecAggConfig
from common.errors import UpdateOutOfRange


def test_an_update_inside_the_bounds_passes() -> None:
    check_bounds([np.array([7.9, -7.9]), np.zeros(0)], num_examples=10_000, secagg=SecAggConfig())


@pytest.mark.parametrize(
    ("arrays", "n", "words"),
    [
        ([np.array([0.1])], 10_001, "secagg-max-weight"),
        ([np.array([8.5])], 10_000, "secagg-clipping-range"),
        ([np.array([np.nan])], 10, "not finite"),
        ([np.array([np.inf])], 10, "not finite"),
    ],
)
def test_an_update_the_encoding_would_change_is_refused(arrays: list[np.ndarray], n: int, words: str) -> None:
    with pytest.raises(UpdateOutOfRange, match=words):
        check_bounds(arrays, num_examples=n, secagg=SecAggConfig())


def test_the_bound_is_on_the_scaled_weights_the_mod_encodes() -> None:
    # 20 × 1,000/10,000 = 2 lies inside ±8: the mod encodes num-examples/max-weight × weights.
    check_bounds([np.array([20.0])], num_examples=1_000, secagg=SecAggConfig())
