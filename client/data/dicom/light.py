"""The light reader: uncompressed little-endian single-frame greyscale files, no LUT sequences.

pydicom's own ``data_element_generator`` reads only the attributes we use, numpy the pixel
bytes, about three times faster than the full reader. Anything it is not sure about goes to
the full reader (:mod:`client.data.dicom.full`); tests check that both agree.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from client.data.dicom.header import PAD, Header, pixel_spacing

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_LATIN1_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO 2022 IR 6"})
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
# Present → the light reader steps aside for the full one: Modality / VOI LUT Sequence, shared and
# per-frame functional groups, float and double float pixel data, palette colour LUT data.
_FULL_ONLY = frozenset({0x00283000, 0x00283010, 0x52009229, 0x52009230, 0x7FE00008, 0x7FE00009, 0x00281201, 0x00281202, 0x00281203})
_LIGHT_TAGS = frozenset(_T.values()) | _FULL_ONLY


def _s(raw: bytes | None) -> str:
    return raw.decode("latin-1").strip(PAD) if raw else ""


def _us(raw: bytes | None, default: int) -> int:
    return int.from_bytes(raw[:2], "little") if raw and len(raw) >= 2 else default


def read_light(content: bytes) -> tuple[Header, np.ndarray, dict[str, Any]] | None:
    """Header, stored values and LUT attributes, or ``None`` when the full reader must decide."""
    from pydicom.filereader import data_element_generator

    if len(content) < 144 or content[128:132] != b"DICM":
        return None
    try:
        fp = io.BytesIO(content)
        fp.seek(132)
        # Plain int keys: a BaseTag key would compare through Python-level __eq__ on every lookup.
        meta = {int(e.tag): e.value for e in data_element_generator(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)}
        syntax = _s(meta.get(_T["TransferSyntaxUID"]))
        if syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
            return None
        raw: dict[int, Any] = {}
        for element in data_element_generator(fp, syntax == _IMPLICIT_LE, True, specific_tags=_LIGHT_TAGS):
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
        header = Header.of(
            lambda keyword: _s(v[keyword]),
            transfer_syntax_uid=syntax,
            photometric=photometric,
            rows=rows,
            columns=cols,
            image_type=tuple(p.strip().upper() for p in _s(v["ImageType"]).split("\\") if p.strip()),
            pixel_spacing=pixel_spacing(_s(v[k]).split("\\")[0] for k in ("PixelSpacing", "ImagerPixelSpacing")),
            has_pixels=True,
            has_modality_transform="RescaleSlope" in luts and "RescaleIntercept" in luts,
        )
    except Exception:  # noqa: BLE001 - anything odd is for the full reader to judge
        return None
    return header, pixels, luts


def light_view(luts: dict[str, Any]) -> Dataset:
    """A dataset holding the LUT attributes :func:`read_light` returned (for pydicom's VOI LUT)."""
    from pydicom.dataset import Dataset

    view = Dataset()
    for keyword, value in luts.items():
        if keyword in ("WindowCenter", "WindowWidth") and len(value) == 1:
            value = value[0]
        setattr(view, keyword, value)
    return view

