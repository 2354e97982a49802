"""Decode one DICOM file into model inputs, or reject it with a one-line reason.

Per frame: stored values → modality LUT (pydicom's ``apply_modality_lut``:
Rescale Slope/Intercept or Modality LUT Sequence, per frame for enhanced
multi-frame objects) → window: a named Hounsfield preset (CT only) or, with
``window = "voi"``, the file's own VOI LUT / window (pydicom's
``apply_voi_lut``; the full value range when the file has none) →
MONOCHROME1 inversion (``voi`` only: Hounsfield units are physical and are
never inverted) → optional enhancement → aspect-preserving resize and pad →
``[-1, 1]``.

Two readers give the same result (tests check that they agree):

* the *full* reader: ``pydicom.dcmread`` + ``pixel_array``, for every transfer
  syntax pydicom decodes with the pylibjpeg / pyjpegls plugins, big-endian,
  deflate, multi-frame, colour and LUT sequences;
* the *light* reader, for the common case of an uncompressed little-endian
  single-frame greyscale file without LUT sequences: it walks the elements with
  pydicom's own ``data_element_generator`` (only the attributes we use) and
  reads the pixel bytes with numpy, about three times faster. Anything it is
  not sure about goes to the full reader.

Every way a file can be unusable raises :class:`~common.errors.DicomRejected`.
Reasons name at most a modality, photometric interpretation, SOP class or
transfer syntax — never an identifier — so grouping them says how many files
share a problem and nothing identifies a patient.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.data import transforms
from common.config import WINDOW_PRESETS, PreprocessConfig
from common.errors import DicomRejected

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Objects that carry pixel data but are not images to classify.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTIMAGE", "REG", "PR", "SR", "KO", "DOC", "PLAN"})
_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_LATIN1_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO 2022 IR 6"})
_PAD = " \x00\t\r\n\f\v"  # stripped from text values by both readers alike
_EDGE = 1e-5  # a pixel this close to a window edge counts as clipped (readers round differently)
MAX_SIDE, MAX_PIXELS = 16384, 2**28  # larger headers are rejected before decoding (memory)
# Rejections that depend on this machine, not the file: the cache tries these files again.
RETRYABLE = ("no decoder installed", "not enough memory")
_CODE = re.compile(r"[A-Z0-9 _]{1,16}")


@dataclass(frozen=True)
class DicomInfo:
    """What the site keeps about a file besides its pixels (no identifier in clear)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_hash: str  # of PatientID; of the study UID when PatientID is empty
    patient_id_missing: bool
    sop_class: str
    modality: str
    manufacturer: str
    transfer_syntax: str
    photometric: str
    rows: int
    columns: int
    frames: int
    pixel_spacing: float | None  # mm between rows (PixelSpacing, else ImagerPixelSpacing)


@dataclass(frozen=True)
class DecodedFile:
    """A decoded file: one model input per accepted frame, plus what the report needs."""

    info: DicomInfo
    images: np.ndarray  # (frames, 1, S, S) float32 in [-1, 1]
    stats: dict[str, float] = field(compare=False)  # mean/min/max of modality values, in-window fraction
    reader: str = "full"
    warnings: int = 0


def hash_identifier(value: str) -> str:
    """One-way hash of an identifier; the raw value never leaves this module."""
    return hashlib.sha256(f"fedrad-id|{value}".encode()).hexdigest()[:16]


@dataclass
class _Header:
    """The attributes every check needs, filled by either reader."""

    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_id: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    manufacturer: str = ""
    transfer_syntax_uid: str = ""
    photometric: str = ""
    rows: int = 0
    columns: int = 0
    samples: int = 1
    frames: int = 1
    image_type: tuple[str, ...] = ()
    pixel_spacing: float | None = None
    has_pixels: bool = False
    has_modality_transform: bool = False


# ----------------------------------------------------------------- full reader


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """A dataset with the LUT attributes that apply to frame ``index``.

    Enhanced multi-frame objects keep Rescale and Window per frame (or shared)
    in functional groups; classic objects at the top level.
    """
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
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
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


@lru_cache(maxsize=1024)
def _uid_name(uid: str, unknown: str) -> str:
    """A standard UID's name; any other value (private, malformed) is not echoed."""
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else unknown


def _code(value: str) -> str:
    """A code string (Modality, Photometric Interpretation) as reported; anything odd becomes ``?``."""
    return value if _CODE.fullmatch(value) else "?"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip(_PAD)


def _spacing(ds: Dataset) -> float | None:
    from pydicom.multival import MultiValue

    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        first = value[0] if isinstance(value, MultiValue | list | tuple) and len(value) else value
        try:
            spacing = float(first)
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def _full_header(ds: Dataset) -> _Header:
    meta = getattr(ds, "file_meta", None)
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        raise DicomRejected("invalid NumberOfFrames") from None
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return _Header(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality").upper(),
        manufacturer=_text(ds, "Manufacturer"),
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        frames=frames,
        image_type=tuple(str(v).strip().upper() for v in image_type),
        pixel_spacing=_spacing(ds),
        has_pixels=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        has_modality_transform=_has_modality_transform(ds),
    )


def _has_modality_transform(ds: Dataset) -> bool:
    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return True
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    for groups in (shared, per_frame):
        if groups and groups[0].get("PixelValueTransformationSequence"):
            return True
    return False


def _read_full(
    content: bytes, config: PreprocessConfig, caught: list[warnings.WarningMessage]
) -> tuple[_Header, list[tuple[np.ndarray, Dataset]]]:
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
        header = _full_header(ds)
    except DicomRejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DicomRejected(f"invalid image attributes ({type(exc).__name__})") from None
    _check_header(header, config)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a rejection reason
        raise DicomRejected(_decode_failure(header, exc)) from None
    colour = header.samples != 1 or header.photometric == "PALETTE COLOR"
    if colour:
        pixels = _to_luminance(pixels, ds, header)
    expected = 3 if header.frames > 1 else 2
    if pixels.ndim != expected:
        raise DicomRejected(f"unexpected pixel array dimensions ({pixels.ndim}-D for {header.frames} frame(s))")
    stack = pixels if header.frames > 1 else pixels[None]
    return header, [(stack[i], _frame_view(ds, i)) for i in range(stack.shape[0])]


def _decode_failure(header: _Header, exc: Exception) -> str:
    name = _uid_name(header.transfer_syntax_uid, "unknown transfer syntax")
    text = str(exc)
    if "less than expected" in text or "truncated" in text.lower():
        return "pixel data is shorter than the image size says (truncated file)"
    if "exceptions were raised by all available plugins" in text:
        return f"pixel data cannot be decoded ({name}: every installed decoder failed)"
    if "No pixel data decoders" in text or "missing required dependencies" in text or "missing dependencies" in text:
        return f"no decoder installed for {name}"
    return f"pixel data cannot be decoded ({name}: {type(exc).__name__})"


def _to_luminance(pixels: np.ndarray, ds: Dataset, header: _Header) -> np.ndarray:
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


# ---------------------------------------------------------------- light reader

_T = {
    "TransferSyntaxUID": 0x00020010, "SpecificCharacterSet": 0x00080005, "ImageType": 0x00080008,
    "SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018, "Modality": 0x00080060,
    "Manufacturer": 0x00080070, "PatientID": 0x00100020, "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E, "SamplesPerPixel": 0x00280002,
    "PhotometricInterpretation": 0x00280004, "NumberOfFrames": 0x00280008, "Rows": 0x00280010,
    "Columns": 0x00280011, "PixelSpacing": 0x00280030, "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101, "PixelRepresentation": 0x00280103, "WindowCenter": 0x00281050,
    "WindowWidth": 0x00281051, "RescaleIntercept": 0x00281052, "RescaleSlope": 0x00281053,
    "RescaleType": 0x00281054, "VOILUTFunction": 0x00281056, "ImagerPixelSpacing": 0x00181164,
    "PixelData": 0x7FE00010,
}
# Present → the light reader steps aside for the full one.
_FULL_ONLY = frozenset({
    0x00283000,  # ModalityLUTSequence
    0x00283010,  # VOILUTSequence
    0x52009229,  # SharedFunctionalGroupsSequence
    0x52009230,  # PerFrameFunctionalGroupsSequence
    0x7FE00008,  # FloatPixelData
    0x7FE00009,  # DoubleFloatPixelData
    0x00281201, 0x00281202, 0x00281203,  # palette colour LUTs
})
_LIGHT_TAGS = frozenset(_T.values()) | _FULL_ONLY


def _not_meta(tag: Any, vr: Any, length: int) -> bool:
    return tag >> 16 != 2


def _s(raw: bytes | None) -> str:
    return raw.decode("latin-1").strip(_PAD) if raw else ""


def _us(raw: bytes | None, default: int) -> int:
    return int.from_bytes(raw[:2], "little") if raw and len(raw) >= 2 else default


def _read_light(content: bytes) -> tuple[_Header, np.ndarray, dict[str, Any]] | None:
    """Header, stored values and LUT attributes, or ``None`` when the full reader must decide."""
    from pydicom.filereader import data_element_generator

    if len(content) < 144 or content[128:132] != b"DICM":
        return None
    try:
        fp = io.BytesIO(content)
        fp.seek(132)
        # Plain int keys: a BaseTag key would compare through Python-level __eq__ on every lookup.
        meta = {int(e.tag): e.value for e in data_element_generator(fp, False, True, stop_when=_not_meta)}
        syntax = _s(meta.get(_T["TransferSyntaxUID"]))
        if syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
            return None
        raw: dict[int, Any] = {}
        for element in data_element_generator(fp, syntax == _IMPLICIT_LE, True, specific_tags=_LIGHT_TAGS):  # type: ignore[arg-type]
            raw[int(element.tag)] = element.value
        if _FULL_ONLY & raw.keys() or _s(raw.get(_T["SpecificCharacterSet"])) not in _LATIN1_CHARSETS:
            return None
        v = {name: raw.get(tag) for name, tag in _T.items() if name != "TransferSyntaxUID"}
        if any(not isinstance(x, bytes | None) for x in v.values()):
            return None  # an undefined-length sequence or similar: not the simple case
        rows, cols = _us(v["Rows"], 0), _us(v["Columns"], 0)
        bits, stored, signed = _us(v["BitsAllocated"], 0), _us(v["BitsStored"], 0), _us(v["PixelRepresentation"], 0)
        required = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
        if any(v[name] is None for name in required):
            return None  # the full reader says what is missing
        photometric = _s(v["PhotometricInterpretation"])
        frames = _s(v["NumberOfFrames"]) or "1"
        pixel_data = v["PixelData"]
        if (
            _us(v["SamplesPerPixel"], 1) != 1
            or photometric not in ("MONOCHROME1", "MONOCHROME2")
            or frames != "1"
            or bits not in (8, 16)
            or not 1 <= stored <= bits
            or pixel_data is None
            or rows < 1
            or cols < 1
            or len(pixel_data) not in (rows * cols * bits // 8, rows * cols * bits // 8 + 1)
        ):
            return None
        dtype = {(8, 0): "<u1", (8, 1): "<i1", (16, 0): "<u2", (16, 1): "<i2"}[(bits, signed)]
        pixels = np.frombuffer(pixel_data, dtype=dtype, count=rows * cols).reshape(rows, cols)
        if stored < bits:  # clear (unsigned) or sign-extend (signed) the unused high bits, as pydicom does
            if signed:
                shift = bits - stored
                pixels = np.right_shift(np.left_shift(pixels, shift), shift)
            else:
                pixels = np.bitwise_and(pixels, (1 << stored) - 1)
        spacing = None
        for name in ("PixelSpacing", "ImagerPixelSpacing"):
            parts = _s(v[name]).split("\\")
            try:
                value = float(parts[0]) if parts[0] else math.nan
            except ValueError:
                continue
            if math.isfinite(value) and value > 0:
                spacing = value
                break
        luts: dict[str, Any] = {
            "PhotometricInterpretation": photometric, "BitsStored": stored, "PixelRepresentation": signed,
        }
        for name in ("RescaleSlope", "RescaleIntercept"):
            if v[name] is not None:
                luts[name] = float(_s(v[name]))
        for name in ("WindowCenter", "WindowWidth"):
            if v[name] is not None:
                luts[name] = [float(x) for x in _s(v[name]).split("\\")]
        for name in ("VOILUTFunction", "RescaleType"):
            if v[name] is not None:
                luts[name] = _s(v[name])
        header = _Header(
            sop_instance_uid=_s(v["SOPInstanceUID"]),
            study_instance_uid=_s(v["StudyInstanceUID"]),
            series_instance_uid=_s(v["SeriesInstanceUID"]),
            patient_id=_s(v["PatientID"]),
            sop_class_uid=_s(v["SOPClassUID"]),
            modality=_s(v["Modality"]).upper(),
            manufacturer=_s(v["Manufacturer"]),
            transfer_syntax_uid=syntax,
            photometric=photometric,
            rows=rows,
            columns=cols,
            image_type=tuple(p.strip().upper() for p in _s(v["ImageType"]).split("\\") if p.strip()),
            pixel_spacing=spacing,
            has_pixels=True,
            has_modality_transform="RescaleSlope" in luts and "RescaleIntercept" in luts,
        )
    except Exception:  # noqa: BLE001 - anything odd is for the full reader to judge
        return None
    return header, pixels, luts


def _light_view(luts: dict[str, Any]) -> Dataset:
    from pydicom.dataset import Dataset

    view = Dataset()
    for keyword, value in luts.items():
        if keyword in ("WindowCenter", "WindowWidth") and len(value) == 1:
            value = value[0]
        setattr(view, keyword, value)
    return view


# ------------------------------------------------------------------- pipeline


def _check_header(header: _Header, config: PreprocessConfig) -> None:
    """Every rejection that needs no pixel decoding, cheapest first."""
    if not header.has_pixels:
        raise DicomRejected(f"no pixel data ({_uid_name(header.sop_class_uid, 'unknown object')})")
    if not header.sop_instance_uid:
        raise DicomRejected("no SOPInstanceUID")
    if header.modality in NON_IMAGE_MODALITIES:
        raise DicomRejected(f"not an image to classify (Modality {header.modality})")
    if header.frames < 1:
        raise DicomRejected("invalid NumberOfFrames")
    if max(header.rows, header.columns) > MAX_SIDE or header.rows * header.columns * header.frames * header.samples > MAX_PIXELS:
        raise DicomRejected(f"image too large ({header.rows}×{header.columns}×{header.frames} pixels)")
    if "LOCALIZER" in header.image_type:
        raise DicomRejected("localizer (scout) image")
    if header.frames > 1 and config.multiframe == "reject":
        raise DicomRejected('multi-frame image; set multiframe = "slices" to use its frames')
    colour = header.samples != 1 or header.photometric not in ("MONOCHROME1", "MONOCHROME2")
    if colour and config.color == "reject":
        raise DicomRejected(f'colour image ({_code(header.photometric)}); set color = "grey" to convert it')
    if config.window != "voi":
        if header.modality != "CT":
            raise DicomRejected(
                f"window preset `{config.window}` needs CT Hounsfield units, not "
                f'{_code(header.modality) if header.modality else "an image without Modality"}; use window = "voi"'
            )
        if colour:
            raise DicomRejected("colour CT image cannot carry Hounsfield units")
        if not header.has_modality_transform:
            raise DicomRejected("CT without Rescale Slope/Intercept (values are not Hounsfield units)")
    if header.rows < 2 or header.columns < 2:
        raise DicomRejected(f"image too small ({header.rows}×{header.columns} pixels)")


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
    values: np.ndarray,
    modality_values: np.ndarray,
    view: Dataset | None,
    header: _Header,
    config: PreprocessConfig,
    colour: bool,
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
    image = transforms.normalise(transforms.fit_square(unit, config.image_size))
    return [image], [(mean, min(ends), max(ends), _in_window(unit))]


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
) -> tuple[_Header, list[np.ndarray], list[tuple[float, float, float, float]], str]:
    """Header, one model input per frame, per-frame (mean, min, max, in-window) and the reader used."""
    from pydicom.pixels import apply_modality_lut

    light = _read_light(content)
    images: list[np.ndarray] = []
    stats: list[tuple[float, float, float, float]] = []  # mean, min, max, in-window fraction
    if light is not None:
        header, pixels, luts = light
        _check_header(header, config)
        reader = "light"
        if config.window != "voi" and config.enhance == "none":
            images, stats = _fast_preset(pixels, luts["RescaleSlope"], luts["RescaleIntercept"], config)
        else:
            view = _light_view(luts) if config.window == "voi" else None
            values: Any = pixels
            if "RescaleSlope" in luts and "RescaleIntercept" in luts:
                values = pixels.astype(np.float64) * luts["RescaleSlope"]
                values += luts["RescaleIntercept"]
            frames = [(values, view, False)]
    else:
        header, stored = _read_full(content, config, caught)
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
    """Decode ``path`` (or its already-read ``content``) into ``(frames, 1, S, S)`` inputs.

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
    patient_missing = not header.patient_id
    info = DicomInfo(
        sop_instance_uid=header.sop_instance_uid,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        patient_hash=hash_identifier(
            f"study:{header.study_instance_uid}" if patient_missing else f"patient:{header.patient_id}"
        ),
        patient_id_missing=patient_missing,
        sop_class=_uid_name(header.sop_class_uid, "unknown SOP class"),
        modality=_code(header.modality) if header.modality else "",
        manufacturer=header.manufacturer,
        transfer_syntax=_uid_name(header.transfer_syntax_uid, "unknown transfer syntax"),
        photometric=_code(header.photometric) if header.photometric else "",
        rows=header.rows,
        columns=header.columns,
        frames=len(images),
        pixel_spacing=header.pixel_spacing,
    )
    summary = {
        "mean": sum(x[0] for x in stats) / len(stats),
        "min": min(x[1] for x in stats),
        "max": max(x[2] for x in stats),
        "in_window": sum(x[3] for x in stats) / len(stats),
    }
    return DecodedFile(info=info, images=np.stack(images)[:, None], stats=summary, reader=reader, warnings=warned)
