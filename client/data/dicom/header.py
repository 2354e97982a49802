"""Header attributes, what the site keeps of them, and every rejection that needs no pixels.

Every way a file can be unusable raises :class:`~common.errors.DicomRejected`.
Reasons name at most a modality, photometric interpretation, SOP class or
transfer syntax — never an identifier — so grouping them says how many files
share a problem and nothing identifies a patient.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from common.config import PreprocessConfig
from common.errors import DicomRejected

# Objects that carry pixel data but are not images to classify.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTIMAGE", "REG", "PR", "SR", "KO", "DOC", "PLAN"})
PAD = " \x00\t\r\n\f\v"  # stripped from text values by both readers alike
MAX_SIDE, MAX_PIXELS = 16384, 2**28  # larger headers are rejected before decoding (memory)
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


@dataclass
class Header:
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

    @classmethod
    def of(cls, text: Callable[[str], str], **values: Any) -> Header:
        """A header whose identifiers and codes are ``text(keyword)``; ``values`` set the rest."""
        return cls(
            sop_instance_uid=text("SOPInstanceUID"), study_instance_uid=text("StudyInstanceUID"),
            series_instance_uid=text("SeriesInstanceUID"), patient_id=text("PatientID"),
            sop_class_uid=text("SOPClassUID"), modality=text("Modality").upper(),
            manufacturer=text("Manufacturer"), **values,
        )

    def info(self, frames: int) -> DicomInfo:
        """What the site keeps of this header: identifiers hashed, codes and UID names checked."""
        missing = not self.patient_id
        return DicomInfo(
            sop_instance_uid=self.sop_instance_uid, study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            patient_hash=hash_identifier(f"study:{self.study_instance_uid}" if missing else f"patient:{self.patient_id}"),
            patient_id_missing=missing,
            sop_class=uid_name(self.sop_class_uid, "unknown SOP class"),
            modality=code(self.modality) if self.modality else "",
            manufacturer=self.manufacturer,
            transfer_syntax=uid_name(self.transfer_syntax_uid, "unknown transfer syntax"),
            photometric=code(self.photometric) if self.photometric else "",
            rows=self.rows, columns=self.columns, frames=frames, pixel_spacing=self.pixel_spacing,
        )


def hash_identifier(value: str) -> str:
    """One-way hash of an identifier; the raw value never leaves this package."""
    return hashlib.sha256(f"fedrad-id|{value}".encode()).hexdigest()[:16]


@lru_cache(maxsize=1024)
def uid_name(uid: str, unknown: str) -> str:
    """A standard UID's name; any other value (private, malformed) is not echoed."""
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else unknown


def code(value: str) -> str:
    """A code string (Modality, Photometric Interpretation) as reported; anything odd becomes ``?``."""
    return value if _CODE.fullmatch(value) else "?"


def pixel_spacing(firsts: Iterable[object]) -> float | None:
    """The first positive finite value among the first values of PixelSpacing, ImagerPixelSpacing."""
    for first in firsts:
        try:
            spacing = float(first)  # type: ignore[arg-type]
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def check_header(header: Header, config: PreprocessConfig) -> None:
    """Every rejection that needs no pixel decoding, cheapest first."""
    if not header.has_pixels:
        raise DicomRejected(f"no pixel data ({uid_name(header.sop_class_uid, 'unknown object')})")
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
        raise DicomRejected(f'colour image ({code(header.photometric)}); set color = "grey" to convert it')
    if config.window != "voi":
        if header.modality != "CT":
            raise DicomRejected(
                f"window preset `{config.window}` needs CT Hounsfield units, not "
                f'{code(header.modality) if header.modality else "an image without Modality"}; use window = "voi"'
            )
        if colour:
            raise DicomRejected("colour CT image cannot carry Hounsfield units")
        if not header.has_modality_transform:
            raise DicomRejected("CT without Rescale Slope/Intercept (values are not Hounsfield units)")
    if header.rows < 2 or header.columns < 2:
        raise DicomRejected(f"image too small ({header.rows}×{header.columns} pixels)")
