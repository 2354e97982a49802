"""The full reader: ``pydicom.dcmread`` + ``pixel_array``.

For every transfer syntax pydicom decodes with the pylibjpeg / pyjpegls
plugins, big-endian, deflate, multi-frame, colour and LUT sequences.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np

from client.data.dicom.header import PAD, Header, check_header, pixel_spacing, uid_name
from common.config import PreprocessConfig
from common.errors import DicomRejected

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """A dataset with the LUT attributes that apply to frame ``index``: at the top level of classic objects, in
    per-frame (or shared) functional groups of enhanced multi-frame ones."""
    from pydicom.dataset import Dataset

    view = Dataset()
    for keyword in (
        "PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
        "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
        "VOILUTFunction", "VOILUTSequence",
    ):
        if keyword in ds:
            view[keyword] = ds[keyword]
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    shared, per_frame = ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")
    groups = ([shared[0]] if shared else []) + ([per_frame[index]] if per_frame and index < len(per_frame) else [])
    for group in groups:
        for sequence, keywords in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            items = group.get(sequence)
            if items:
                for keyword in keywords:
                    if keyword in items[0]:
                        view[keyword] = items[0][keyword]
    return view


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip(PAD)


def _has_modality_transform(ds: Dataset) -> bool:
    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return True
    groups = (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence"))
    return any(g and g[0].get("PixelValueTransformationSequence") for g in groups)


def _header(ds: Dataset) -> Header:
    from pydicom.multival import MultiValue

    meta = getattr(ds, "file_meta", None)
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        raise DicomRejected("invalid NumberOfFrames") from None
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return Header.of(
        lambda keyword: _text(ds, keyword),
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        frames=frames,
        image_type=tuple(str(v).strip().upper() for v in image_type),
        pixel_spacing=pixel_spacing(
            v[0] if isinstance(v, MultiValue | list | tuple) and len(v) else v
            for v in map(ds.get, ("PixelSpacing", "ImagerPixelSpacing"))
        ),
        has_pixels=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        has_modality_transform=_has_modality_transform(ds),
    )


def _decode_failure(header: Header, exc: Exception) -> str:
    name = uid_name(header.transfer_syntax_uid, "unknown transfer syntax")
    text = str(exc)
    if "less than expected" in text or "truncated" in text.lower():
        return "pixel data is shorter than the image size says (truncated file)"
    if "exceptions were raised by all available plugins" in text:
        return f"pixel data cannot be decoded ({name}: every installed decoder failed)"
    if "No pixel data decoders" in text or "missing required dependencies" in text or "missing dependencies" in text:
        return f"no decoder installed for {name}"
    return f"pixel data cannot be decoded ({name}: {type(exc).__name__})"


def _to_luminance(pixels: np.ndarray, ds: Dataset, header: Header) -> np.ndarray:
    """RGB / YBR (already RGB from pydicom) / palette colour → luminance in stored-value units."""
    from pydicom.pixels import apply_color_lut

    if header.photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        top = float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else 1.0
        bits_top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        rgb = rgb.astype(np.float64) * (bits_top / top)
    else:
        rgb = pixels.astype(np.float64)
    if rgb.shape[-1] != 3:
        raise DicomRejected(f"colour image with {rgb.shape[-1]} samples per pixel")
    return rgb @ np.array([0.299, 0.587, 0.114])


def read_full(
    content: bytes, config: PreprocessConfig, caught: list[warnings.WarningMessage]
) -> tuple[Header, list[tuple[np.ndarray, Dataset]]]:
    """The checked header and each frame's stored values (luminance for colour) with its LUT view.

    Parameters
    ----------
    content : bytes
        The whole file.
    config : PreprocessConfig
        The preprocessing; :func:`check_header` rejects what it cannot use.
    caught : list[warnings.WarningMessage]
        The warnings the caller's ``warnings.catch_warnings(record=True)`` recorded so far; pydicom's
        "End of file reached" among them marks a truncated file.

    Raises
    ------
    DicomRejected
        For every way the file is unusable; the message is the reason.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(content))
        if any("End of file reached" in str(w.message) for w in caught):
            # pydicom stops quietly inside encapsulated pixel data and returns what it read
            raise DicomRejected("truncated file (ends inside its data)")
    except InvalidDicomError:
        raise DicomRejected("not a DICOM file (no DICM preamble or DICOM header)") from None
    except DicomRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt header can fail anywhere inside pydicom
        raise DicomRejected(f"corrupt or truncated DICOM header ({type(exc).__name__})") from None
    try:
        header = _header(ds)
    except DicomRejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DicomRejected(f"invalid image attributes ({type(exc).__name__})") from None
    check_header(header, config)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a rejection reason
        raise DicomRejected(_decode_failure(header, exc)) from None
    if header.samples != 1 or header.photometric == "PALETTE COLOR":
        pixels = _to_luminance(pixels, ds, header)
    expected = 3 if header.frames > 1 else 2
    if pixels.ndim != expected:
        raise DicomRejected(f"unexpected pixel array dimensions ({pixels.ndim}-D for {header.frames} frame(s))")
    stack = pixels if header.frames > 1 else pixels[None]
    return header, [(stack[i], _frame_view(ds, i)) for i in range(stack.shape[0])]
