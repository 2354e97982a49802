"""Pure-numpy image steps after decoding: window, enhance, resize, normalise.

Kept free of torch so the cache can decode in worker processes that start in
a fraction of a second. The resize is the same separable antialiased
("triangle") filter that PIL and ``torch.nn.functional.interpolate(...,
mode="bilinear", antialias=True)`` use; tests check it against torch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from common.config import WINDOW_PRESETS


def window_preset(values: np.ndarray, window: str) -> np.ndarray:
    """Map Hounsfield units to ``[0, 1]`` with a named preset (linear, clipped)."""
    center, width = WINDOW_PRESETS[window]
    unit = (values - (center - width / 2)) / width
    return np.clip(unit, 0.0, 1.0, out=unit)


def min_max(values: np.ndarray) -> np.ndarray:
    """Map the image's own value range to ``[0, 1]`` (a constant image maps to 0)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return (values - low) / (high - low)


def equalize(unit: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram equalisation of a ``[0, 1]`` image (contrast enhancement)."""
    hist, edges = np.histogram(unit, bins=bins, range=(0.0, 1.0))
    cdf = np.cumsum(hist).astype(np.float64)
    if cdf[-1] <= 0:
        return unit
    cdf = (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1.0)
    return np.interp(unit, edges[1:], cdf)


def denoise(unit: np.ndarray) -> np.ndarray:
    """3×3 median filter (edges replicated): removes salt-and-pepper and quantum noise."""
    padded = np.pad(unit, 1, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    return np.median(windows, axis=(-2, -1))


@lru_cache(maxsize=256)
def _resample_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights ``(out_size, taps)`` of the antialiased bilinear (triangle) filter.

    Output pixel ``i`` is centred at ``(i + 0.5) * in/out`` in input pixels; the
    triangle is stretched by the downscale factor (PIL's and torch's
    ``antialias=True``) and its weights normalised to sum to one.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    taps = int(np.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), dtype=np.intp)
    weight = np.zeros((out_size, taps), dtype=np.float32)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        positions = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((positions - center + 0.5) / support), 0.0, None)
        if w.sum() > 0:
            w = w / w.sum()
        index[i, : hi - lo] = positions
        weight[i, : hi - lo] = w
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


def _resample_rows(image: np.ndarray, out_rows: int) -> np.ndarray:
    # Gather + weighted sum instead of a matrix product: no BLAS threads, which
    # would oversubscribe the cores when several decoding processes run.
    index, weight = _resample_taps(image.shape[0], out_rows)
    return np.einsum("okc,ok->oc", image[index], weight)


def fit_square(unit: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio so the longer side is ``size``; pad the rest with 0.

    The image is centred; padding is black (0 in ``[0, 1]``, -1 after
    :func:`normalise`).
    """
    rows, cols = unit.shape
    scale = size / max(rows, cols)
    out_rows = min(size, max(1, round(rows * scale)))
    out_cols = min(size, max(1, round(cols * scale)))
    resized = unit
    if (rows, cols) != (out_rows, out_cols):
        image = unit.astype(np.float32, copy=False)
        resized = _resample_rows(_resample_rows(image, out_rows).T, out_cols).T
    if (out_rows, out_cols) == (size, size):
        return resized
    out = np.zeros((size, size), dtype=resized.dtype)
    top, left = (size - out_rows) // 2, (size - out_cols) // 2
    out[top : top + out_rows, left : left + out_cols] = resized
    return out


def normalise(unit: np.ndarray) -> np.ndarray:
    """``[0, 1]`` → ``[-1, 1]`` float32 (clipped, so resampling overshoot never leaks out)."""
    return (np.clip(unit, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
