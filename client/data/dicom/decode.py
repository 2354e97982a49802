"""Decode one DICOM file into model inputs, or reject it with a one-line reason.

Per frame: stored values (the :mod:`~client.data.dicom.light` reader where it can, else the
:mod:`~client.data.dicom.full` one) → modality LUT (per frame for enhanced multi-frame objects) →
a named Hounsfield preset (CT only) or, with ``window = "voi"``, the file's own VOI LUT / window (the
full value range without one) → MONOCHROME1 inversion (``voi`` only: Hounsfield units are never
inverted) → optional enhancement → aspect-preserving resize and pad → ``[-1, 1]``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.data import transforms
from client.data.dicom.full import read_full
from client.data.dicom.header import DicomInfo, Header, check_header
from client.data.dicom.light import light_view, read_light
from common.config import WINDOW_PRESETS, PreprocessConfig
from common.errors import DicomRejected

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_EDGE = 1e-5  # a pixel this close to a window edge counts as clipped (readers round differently)
# Rejections that depend on this machine, not the file: the cache tries these files again.
RETRYABLE = ("no decoder installed", "not enough memory")


@dataclass(frozen=True)
class DecodedFile:
    """A decoded file: one model input per accepted frame, plus what the report needs."""

    info: DicomInfo
    images: np.ndarray  # (frames, 1, S, S) float32 in [-1, 1]
    stats: dict[str, float] = field(compare=False)  # mean/min/max of modality values, in-window fraction
    reader: str = "full"
    warnings: int = 0


def _present(view: Dataset, keyword: str) -> bool:
    """The attribute is there *and* has a value (an empty Window Center is no window)."""
    value = view.get(keyword)
    if value is None or isinstance(value, str | bytes):
        return bool(value)
    return not hasattr(value, "__len__") or len(value) > 0


def _voi_range(view: Dataset) -> tuple[float, float]:
    """The output range of pydicom's ``apply_voi_lut`` for this frame (to map it to [0, 1])."""
    if view.get("VOILUTSequence"):
        depth = int(view.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    if view.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(view.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(view.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2 ** int(view.BitsStored) - 1)
    else:
        low, high = float(-(2 ** (int(view.BitsStored) - 1))), float(2 ** (int(view.BitsStored) - 1) - 1)
    if "RescaleSlope" in view and "RescaleIntercept" in view:
        slope, intercept = float(view.RescaleSlope), float(view.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return min(low, high), max(low, high)


def _unit(
    values: np.ndarray, modality_values: np.ndarray, view: Dataset | None, header: Header, config: PreprocessConfig, colour: bool
) -> np.ndarray:
    """Modality values → ``[0, 1]`` display values (window or VOI, MONOCHROME1 inverted for VOI)."""
    if config.window != "voi":
        return transforms.window_preset(values, config.window)
    if colour:
        top = 2 ** int(view.get("BitsStored", 8)) - 1 if view is not None else 255
        return np.clip(values / max(top, 1), 0.0, 1.0)
    from pydicom.pixels import apply_voi_lut

    assert view is not None
    has_voi = bool(view.get("VOILUTSequence")) or (_present(view, "WindowCenter") and _present(view, "WindowWidth"))
    if has_voi:
        try:
            voi = np.asarray(apply_voi_lut(modality_values, view, prefer_lut=True), dtype=np.float64)
            low, high = _voi_range(view)
            unit = np.clip((voi - low) / max(high - low, 1e-12), 0.0, 1.0)
        except Exception:  # noqa: BLE001 - an unusable VOI (width < 1, bad LUT) falls back to the range
            unit = transforms.min_max(values)
    else:
        unit = transforms.min_max(values)
    if header.photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _in_window(unit: np.ndarray) -> float:
    """Fraction of pixels the window did not clip to black or white."""
    return 1.0 - float(np.count_nonzero((unit <= _EDGE) | (unit >= 1.0 - _EDGE))) / unit.size


def _fast_preset(
    pixels: np.ndarray, slope: float, intercept: float, config: PreprocessConfig
) -> tuple[list[np.ndarray], list[tuple[float, float, float, float]]]:
    """Rescale and preset window fused into one float32 pass (the common CT case)."""
    center, width = WINDOW_PRESETS[config.window]
    unit = pixels.astype(np.float32)
    unit *= np.float32(slope / width)
    unit += np.float32((intercept - (center - width / 2)) / width)
    np.clip(unit, 0.0, 1.0, out=unit)
    ends = (float(pixels.min()) * slope + intercept, float(pixels.max()) * slope + intercept)
    mean = float(pixels.mean()) * slope + intercept
    return [_to_input(unit, config)], [(mean, min(ends), max(ends), _in_window(unit))]


def _to_input(unit: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    if config.enhance == "equalize":
        unit = transforms.equalize(unit)
    elif config.enhance == "denoise":
        unit = transforms.denoise(unit)
    return transforms.normalise(transforms.fit_square(unit, config.image_size))


@contextmanager
def quiet_pydicom_log() -> Iterator[None]:
    """Keep pydicom's log quiet while decoding (its warnings are counted per file instead).

    pydicom logs each warning with the offending value, which can be a
    patient's name or ID; a site's log must not carry those.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    if level >= logging.ERROR:  # already quiet (a decoding worker): setLevel clears logging's caches
        yield
        return
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or :class:`DicomRejected` saying why they cannot be read."""
    try:
        return path.read_bytes()
    except PermissionError:
        raise DicomRejected("file cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise DicomRejected("not a regular file") from None
    except OSError as exc:
        raise DicomRejected(f"file cannot be read ({exc.strerror or type(exc).__name__})") from None


def _decode(
    content: bytes, config: PreprocessConfig, caught: list[warnings.WarningMessage]
) -> tuple[Header, list[np.ndarray], list[tuple[float, float, float, float]], str]:
    """Header, one model input per frame, per-frame (mean, min, max, in-window) and the reader used."""
    from pydicom.pixels import apply_modality_lut

    light = read_light(content)
    images: list[np.ndarray] = []
    stats: list[tuple[float, float, float, float]] = []  # mean, min, max, in-window fraction
    if light is not None:
        header, pixels, luts = light
        check_header(header, config)
        reader = "light"
        if config.window != "voi" and config.enhance == "none":
            images, stats = _fast_preset(pixels, luts["RescaleSlope"], luts["RescaleIntercept"], config)
        else:
            view = light_view(luts) if config.window == "voi" else None
            values: Any = pixels
            if "RescaleSlope" in luts and "RescaleIntercept" in luts:
                values = pixels.astype(np.float64) * luts["RescaleSlope"]
                values += luts["RescaleIntercept"]
            frames = [(values, view, False)]
    else:
        header, stored = read_full(content, config, caught)
        reader = "full"
        colour = header.samples != 1 or header.photometric == "PALETTE COLOR"
        frames = [
            (pixels if colour else apply_modality_lut(pixels, frame_view), frame_view, colour)
            for pixels, frame_view in stored
        ]
    if not images:
        for modality_values, view, colour in frames:
            values = np.asarray(modality_values, dtype=np.float64)
            if values.ndim != 2:
                raise DicomRejected("pixel values are not a 2-D image")
            low, high = float(values.min()), float(values.max())  # non-finite: rejected by the caller
            # VOI LUTs index integer values: give them the modality output as it is.
            unit = _unit(values, np.asarray(modality_values), view, header, config, colour)
            images.append(_to_input(unit, config))
            stats.append((float(values.mean()), low, high, _in_window(unit)))
    return header, images, stats, reader


def decode_file(path: Path, config: PreprocessConfig, *, content: bytes | None = None) -> DecodedFile:
    """Decode ``path`` (or its already-read ``content``) into ``(frames, 1, S, S)`` inputs in ``[-1, 1]``.

    Parameters
    ----------
    path : Path
        The DICOM file; read unless ``content`` is given.
    config : PreprocessConfig
        Window, colour, multi-frame, enhancement and image size choices of the run.
    content : bytes, optional
        The file's bytes, when the caller has read them already (e.g. to hash them).

    Raises
    ------
    DicomRejected
        With a one-line reason, for every way the file is unusable.
    """
    if content is None:
        content = read_bytes(path)
    if not content:
        raise DicomRejected("empty file (0 bytes)")
    with quiet_pydicom_log(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            header, images, stats, reader = _decode(content, config, caught)
        except DicomRejected:
            raise
        except MemoryError:
            raise DicomRejected("not enough memory to decode this image") from None
        except Exception as exc:  # noqa: BLE001 - malformed attributes fail anywhere inside numpy/pydicom
            raise DicomRejected(f"invalid image attributes or pixel data ({type(exc).__name__})") from None
        warned = len(caught)
    if not all(math.isfinite(x) for row in stats for x in row) or not all(np.isfinite(image).all() for image in images):
        raise DicomRejected("non-finite values after rescale or window (check Rescale Slope/Intercept and Window)")
    means, lows, highs, inside = zip(*stats, strict=True)
    summary = {"mean": sum(means) / len(stats), "min": min(lows), "max": max(highs), "in_window": sum(inside) / len(stats)}
    return DecodedFile(info=header.info(len(images)), images=np.stack(images)[:, None], stats=summary, reader=reader, warnings=warned)
