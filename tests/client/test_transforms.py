"""Tests of the pure-numpy image steps in ``client.data.transforms``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.data import transforms
from client.data.transforms import (
    denoise,
    equalize,
    fit_square,
    min_max,
    normalise,
    window_preset,
)


def _resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The resize filter (``transforms._resample_taps``) as a dense ``(out_size, in_size)`` matrix."""
    index, weight = transforms._resample_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), index.shape[1]), index.ravel()), weight.ravel())
    return matrix


def _torch_resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(
        tensor, size=(rows, cols), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0, 0].numpy()


@pytest.mark.parametrize(
    ("shape", "size", "resized", "offset"),
    [
        ((64, 64), 32, (32, 32), (0, 0)),  # square downsample by 2
        ((100, 100), 64, (64, 64), (0, 0)),  # non-integer factor
        ((512, 512), 64, (64, 64), (0, 0)),  # large factor
        ((100, 60), 64, (64, 38), (0, 13)),  # portrait: padded left and right
        ((45, 10), 64, (64, 14), (0, 25)),  # narrow (JPEGLSNearLossless_08 shape)
        ((240, 320), 64, (48, 64), (8, 0)),  # landscape: padded top and bottom
        ((37, 91), 50, (20, 50), (15, 0)),  # odd sizes
        ((16, 16), 64, (64, 64), (0, 0)),  # upsample
        ((3, 3), 64, (64, 64), (0, 0)),  # tiny upsample
        ((20, 30), 64, (43, 64), (10, 0)),  # upsample, non-square
    ],
)
def test_fit_square_equals_torch_antialiased_bilinear(
    shape: tuple[int, int], size: int, resized: tuple[int, int], offset: tuple[int, int]
) -> None:
    image = np.random.default_rng(sum(shape)).random(shape)
    out = fit_square(image, size)
    assert out.shape == (size, size)
    top, left = offset
    rows, cols = resized
    expected = _torch_resize(image, rows, cols)
    np.testing.assert_allclose(
        out[top : top + rows, left : left + cols], expected, atol=1e-5, rtol=0
    )
    # Everything outside the centred image is padding (0).
    mask = np.ones((size, size), dtype=bool)
    mask[top : top + rows, left : left + cols] = False
    assert not out[mask].any()
    # Centred: the padding on each side differs by at most one pixel.
    assert abs((size - rows - top) - top) <= 1 and abs((size - cols - left) - left) <= 1


@pytest.mark.parametrize(
    ("in_size", "out_size"), [(64, 32), (100, 64), (45, 64), (7, 64), (512, 48), (48, 48)]
)
def test_resample_matrix_rows_are_normalised_and_local(in_size: int, out_size: int) -> None:
    matrix = _resample_matrix(in_size, out_size)
    assert matrix.shape == (out_size, in_size)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    assert (matrix >= 0).all()
    # Each output pixel reads only inputs within the filter support around its centre.
    scale = in_size / out_size
    support = max(scale, 1.0)
    for i in range(out_size):
        taps = np.nonzero(matrix[i])[0]
        center = (i + 0.5) * scale
        assert taps.min() >= center - support - 1 and taps.max() <= center + support
    # Same as torch applied to the identity (each column is the response to one input pixel).
    identity = np.eye(in_size, dtype=np.float32)
    expected = _torch_resize(identity, out_size, in_size)
    np.testing.assert_allclose(matrix, expected, atol=1e-6)


def test_fit_square_keeps_a_same_size_image_unchanged() -> None:
    image = np.random.default_rng(0).random((32, 32))
    np.testing.assert_array_equal(fit_square(image, 32), image)


def test_fit_square_preserves_a_constant_image() -> None:
    out = fit_square(np.full((90, 30), 0.7), 60)
    np.testing.assert_allclose(out[:, 20:40], 0.7, atol=1e-6)
    assert not out[:, :20].any() and not out[:, 40:].any()


def test_window_preset_brain_known_points() -> None:
    hu = np.array([-1000.0, -10.0, 0.0, 20.0, 40.0, 60.0, 80.0, 200.0, 3000.0])
    np.testing.assert_allclose(
        window_preset(hu, "brain"), [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0], atol=1e-12
    )


@pytest.mark.parametrize(
    ("window", "center", "width"),
    [
        ("brain", 40, 80),
        ("subdural", 75, 215),
        ("bone", 600, 2800),
        ("lung", -600, 1500),
        ("soft-tissue", 50, 400),
    ],
)
def test_window_preset_is_linear_between_the_window_edges(
    window: str, center: float, width: float
) -> None:
    hu = np.array(
        [
            center - width / 2 - 1,
            center - width / 2,
            center,
            center + width / 4,
            center + width / 2 + 1,
        ]
    )
    out = window_preset(hu.copy(), window)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 0.75, 1.0], atol=1e-12)


def test_window_preset_does_not_modify_its_input() -> None:
    hu = np.linspace(-100, 200, 50)
    before = hu.copy()
    window_preset(hu, "brain")
    np.testing.assert_array_equal(hu, before)


def test_min_max() -> None:
    np.testing.assert_allclose(
        min_max(np.array([[-5.0, 0.0], [5.0, 15.0]])), [[0.0, 0.25], [0.5, 1.0]]
    )
    constant = min_max(np.full((4, 4), 7.0))
    assert constant.shape == (4, 4) and not constant.any()


def test_equalize_keeps_a_uniform_ramp() -> None:
    ramp = np.linspace(0.0, 1.0, 256 * 64).reshape(128, 128)
    out = equalize(ramp)
    assert out.shape == ramp.shape
    np.testing.assert_allclose(out, ramp, atol=0.01)
    assert out.min() == pytest.approx(0.0, abs=1e-12) and out.max() == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(out.ravel()) >= -1e-12)  # monotonic


def test_equalize_spreads_a_low_contrast_image() -> None:
    rng = np.random.default_rng(0)
    low = 0.45 + 0.1 * rng.random((64, 64))
    out = equalize(low)
    assert low.max() - low.min() < 0.11
    assert out.min() <= 0.02 and out.max() >= 0.98
    assert out.std() > 3 * low.std()
    # Order is preserved (histogram equalisation is monotonic).
    order = np.argsort(low.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= -1e-12)


def test_equalize_constant_image_stays_in_range() -> None:
    out = equalize(np.full((8, 8), 0.3))
    assert out.shape == (8, 8) and np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize(
    "where", [(10, 12), (0, 0), (0, 15), (31, 31)], ids=["inside", "corner", "edge", "far-corner"]
)
def test_denoise_removes_an_isolated_salt_pixel(where: tuple[int, int]) -> None:
    image = np.full((32, 32), 0.2)
    image[where] = 1.0
    out = denoise(image)
    assert out.shape == image.shape
    np.testing.assert_allclose(out, 0.2)


def test_denoise_keeps_edges_and_smooth_content() -> None:
    image = np.zeros((16, 16))
    image[:, 8:] = 1.0  # a vertical step edge survives a median filter
    np.testing.assert_array_equal(denoise(image), image)
    ramp = np.tile(np.linspace(0, 1, 16), (16, 1))
    np.testing.assert_allclose(denoise(ramp)[:, 1:-1], ramp[:, 1:-1])


def test_normalise_range_and_dtype() -> None:
    unit = np.array([[-0.2, 0.0, 0.25], [0.5, 1.0, 1.3]], dtype=np.float64)
    out = normalise(unit)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(
        out, np.array([[-1.0, -1.0, -0.5], [0.0, 1.0, 1.0]], dtype=np.float32)
    )


def test_transforms_module_does_not_import_torch() -> None:
    """The cache decodes in worker processes that must start fast: no torch in this module."""
    assert "torch" not in vars(transforms)
    source = transforms.__file__
    with open(source, encoding="utf-8") as handle:
        text = handle.read()
    assert "import torch" not in text
