"""Read one DICOM file and turn it into a model input.

modality LUT (RescaleSlope/Intercept → HU for CT) → window preset → MONOCHROME1
inversion → resize → normalise. Deterministic given the file bytes and the
:class:`~common.config.PreprocessConfig`. Every way a file can be unusable
raises :class:`~common.errors.DicomRejected` with a one-line reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import WINDOW_PRESETS, PreprocessConfig
from common.errors import DicomRejected


@dataclass(frozen=True)
class DicomInfo:
    """What the site keeps about a file besides its pixels (identifiers hashed)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_hash: str
    modality: str
    manufacturer: str


def hash_identifier(value: str) -> str:
    """One-way hash of an identifier; the raw value never leaves this module."""
    return hashlib.sha256(f"fedrad-id|{value}".encode()).hexdigest()[:16]


def read_dicom(path: Path) -> tuple[np.ndarray, DicomInfo]:
    """Decode ``path`` into float32 modality values (HU for CT) and its info.

    Raises
    ------
    DicomRejected
        When the file is not DICOM, has no usable pixel data or has a layout
        this version does not handle (multi-frame, colour).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomRejected("not a DICOM file (no DICM preamble)") from None
    except PermissionError:
        raise DicomRejected("file cannot be read (permission denied)") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise DicomRejected(f"unreadable DICOM ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise DicomRejected("no pixel data (e.g. a structured report or RT plan)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomRejected("multi-frame image (not supported yet)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomRejected(f"colour image ({ds.get('PhotometricInterpretation', '?')}), not greyscale")
    try:
        pixels = ds.pixel_array
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a rejection reason
        raise DicomRejected(f"pixel data cannot be decoded ({type(exc).__name__})") from None
    if values.ndim != 2 or min(values.shape) < 2:
        raise DicomRejected(f"unexpected pixel array shape {values.shape}")
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        # Keep a "bright = dense" convention for every modality.
        values = values.max() + values.min() - values
    info = DicomInfo(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        patient_hash=hash_identifier(str(ds.get("PatientID", "")) or str(path)),
        modality=str(ds.get("Modality", "")),
        manufacturer=str(ds.get("Manufacturer", "")),
    )
    if not info.sop_instance_uid:
        raise DicomRejected("no SOPInstanceUID")
    return values, info


def preprocess(values: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Window, resize and normalise modality values to a ``(1, S, S)`` float32 array.

    The window maps ``[center - width/2, center + width/2]`` to ``[0, 1]``
    (clipped); the result is normalised to ``[-1, 1]``.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    center, width = WINDOW_PRESETS[config.window]
    windowed = np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    tensor = torch.from_numpy(np.ascontiguousarray(windowed, dtype=np.float32))[None, None]
    size = config.image_size
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (tensor[0].clamp(0, 1).numpy() * 2.0 - 1.0).astype(np.float32)
