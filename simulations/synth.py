"""Synthetic multi-site head-CT DICOM data (``fl-synth``).

Each virtual hospital ("site") gets a folder of CT Image Storage files laid out
as ``<out>/<site>/<PatientID>/SE001/IM0001.dcm`` plus ``<out>/<site>/labels.csv``
(``SOPInstanceUID,label``). One patient is one study with one axial series of
3-8 contiguous slices. The task is binary, per slice: does the slice show a
hyperdense, bleed-like lesion (1) or not (0)?

Images are rendered in Hounsfield units (air, scalp, skull with diploe, grey and
white matter with smooth texture, sulcal CSF, ventricles, falx, occasional
physiological calcifications, correlated noise) and stored with the site's own
encoding (signed or unsigned pixels, RescaleIntercept 0, -1000 or -1024), so
``stored * RescaleSlope + RescaleIntercept`` gives back the intended HU.

Sites differ like real scanners: manufacturer and model, field of view (pixel
spacing), slice thickness, noise level, a slight calibration offset, pixel
encoding and the prevalence of positive patients. Known names ``A``-``D`` have
hand-picked profiles; any other name gets a profile derived from a hash of the
name, so the same name always means the same scanner.

Everything is deterministic given (site name, images per site, seed, size):
pixel data, UIDs (``2.25.`` UUID-derived, from :func:`uuid.uuid5`) and labels.

:func:`synthesize_sites` takes one :class:`SiteSpec` per site, so each site can
have its own number of images, prevalence and scanner (``ge``, ``siemens``,
``philips``, ``toshiba``), and writes sites in parallel worker processes when
asked; :func:`synthesize` (the ``fl-synth`` CLI) is the same code path with one
image count for every site. Files are encoded with pydicom once per series and
only the per-slice elements are re-encoded per file: byte-identical to
``Dataset.save_as``, which made up most of the time at small image sizes
(fl-synth is about 1.6 times faster overall at 32x32).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import multiprocessing
import numbers
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from copy import deepcopy
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from common.errors import ConfigError

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
LABELS_FILENAME = "labels.csv"
LABELS_HEADER = ("SOPInstanceUID", "label")
MIN_SIZE = 16
MAX_SIZE = 1024
MAX_SITE_NAME_LENGTH = 32
BRAIN_WINDOW = (40.0, 80.0)  # (center, width) in HU

_SITE_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
# Fixed namespace: UIDs are uuid5(namespace, "<seed>/<site>/<size>/...") as 2.25.<int>.
_UID_NAMESPACE = uuid.UUID("6f1c1d8e-5b7a-4f0e-9a51-3c0de5a7f3b2")
# CT numbers a scanner can represent (12-bit range starting at -1024).
_HU_MIN, _HU_MAX = -1024.0, 3071.0
# Distance (mm) from the widest axial level of the head at which it closes.
_HEAD_HALF_HEIGHT_MM = 115.0


class SynthConfigError(ConfigError):
    """Invalid fl-synth input; the message says what was expected and what was given."""


@dataclass(frozen=True)
class SiteSummary:
    """What was written for one site.

    Attributes
    ----------
    site : str
        Site name (the folder name under ``out``).
    files : int
        Number of DICOM files written (equals ``images_per_site``).
    patients : int
        Number of patients (one study and one series each).
    positives : int
        Number of files labelled 1 (slices showing a lesion).
    """

    site: str
    files: int
    patients: int
    positives: int


@dataclass(frozen=True)
class SiteSpec:
    """What to write for one site (see :func:`synthesize_sites`).

    Attributes
    ----------
    name : str
        Site name (letters, digits, ``_`` and ``-``); the folder name under
        ``out`` and the key of the site's profile and UIDs.
    images : int
        Exact number of DICOM files to write (at least 1).
    prevalence : float, optional
        Probability that a patient has a lesion, strictly between 0 and 1;
        ``None`` keeps the site profile's own.
    scanner : str, optional
        One of :data:`SCANNERS` (``ge``, ``siemens``, ``philips``,
        ``toshiba``; case-insensitive): that scanner's manufacturer, model,
        kernel and pixel encoding, with the rest of the profile (field of
        view, slice thickness, noise, calibration, kVp) the site's own.
        ``None`` keeps the profile's scanner.
    """

    name: str
    images: int
    prevalence: float | None = None
    scanner: str | None = None


@dataclass(frozen=True)
class PixelEncoding:
    """How a scanner stores HU in the pixel data."""

    pixel_representation: int  # 0 unsigned, 1 signed (two's complement)
    bits_stored: int
    rescale_intercept: float
    rescale_slope: float = 1.0

    def stored_range(self) -> tuple[int, int]:
        """Return the (min, max) stored value allowed by BitsStored and signedness."""
        if self.pixel_representation == 0:
            return 0, 2**self.bits_stored - 1
        return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1


@dataclass(frozen=True)
class SiteProfile:
    """Scanner and population characteristics of one synthetic site.

    Attributes
    ----------
    name : str
        Site name.
    manufacturer, model, kernel : str
        Manufacturer, ManufacturerModelName and ConvolutionKernel.
    institution : str
        Fake InstitutionName.
    kvp : float
        Tube voltage.
    fov_mm : float
        Reconstruction field of view; PixelSpacing is ``fov_mm / size``
        (0.40-0.50 mm at a 512 matrix).
    slice_thickness_mm : float
        SliceThickness, also the spacing between consecutive slices.
    noise_hu : float
        Standard deviation of the image noise in HU.
    hu_offset : float
        Calibration offset added to every CT number.
    prevalence : float
        Probability that a patient has a lesion.
    encoding : PixelEncoding
        Pixel storage (signedness, bits stored, rescale).
    """

    name: str
    manufacturer: str
    model: str
    kernel: str
    institution: str
    kvp: float
    fov_mm: float
    slice_thickness_mm: float
    noise_hu: float
    hu_offset: float
    prevalence: float
    encoding: PixelEncoding


_ENCODINGS = (
    PixelEncoding(pixel_representation=0, bits_stored=12, rescale_intercept=-1024.0),
    PixelEncoding(pixel_representation=1, bits_stored=16, rescale_intercept=0.0),
    PixelEncoding(pixel_representation=0, bits_stored=16, rescale_intercept=-1024.0),
    PixelEncoding(pixel_representation=1, bits_stored=16, rescale_intercept=-1000.0),
)
_SCANNERS = (
    ("GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD"),
    ("SIEMENS", "SOMATOM Definition AS", "H31s"),
    ("Philips", "Brilliance 64", "UB"),
    ("TOSHIBA", "Aquilion ONE", "FC26"),
)
# Short names of the scanners above (SiteSpec.scanner), in the same order.
SCANNERS = ("ge", "siemens", "philips", "toshiba")
_KNOWN_SITES: dict[str, tuple[int, float, float, float, float, float, float]] = {
    # name: (scanner/encoding index, pixel spacing at 512, slice thickness,
    #        noise HU, HU offset, prevalence, kVp)
    "A": (0, 0.45, 5.0, 4.0, 0.0, 0.45, 120.0),
    "B": (1, 0.42, 4.0, 7.0, 3.0, 0.55, 120.0),
    "C": (2, 0.49, 5.0, 10.0, -2.0, 0.35, 120.0),
    "D": (3, 0.46, 3.0, 6.0, 1.5, 0.40, 135.0),
}


def _stable_int(*parts: object, bits: int = 64) -> int:
    """Return a platform-independent integer hash of ``parts``."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[: bits // 8], "little")


def site_profile(
    name: str, *, prevalence: float | None = None, scanner: str | None = None
) -> SiteProfile:
    """Return the scanner profile of a site.

    Parameters
    ----------
    name : str
        Site name. ``A``-``D`` have fixed profiles (GE, Siemens, Philips,
        Toshiba); any other name gets a profile derived from a hash of the
        name, so it is the same on every machine and every run.
    prevalence : float, optional
        Replaces the profile's prevalence (not validated here; see
        :func:`synthesize_sites`).
    scanner : str, optional
        One of :data:`SCANNERS` (case-insensitive): replaces manufacturer,
        model, kernel and pixel encoding; the rest stays the site's own.

    Returns
    -------
    SiteProfile
        The site's scanner and population characteristics.
    """
    if name in _KNOWN_SITES:
        index, spacing512, thickness, noise, offset, own_prevalence, kvp = _KNOWN_SITES[name]
        encoding_index = index
    else:
        rng = np.random.default_rng(_stable_int("fl-synth-site", name))
        index = int(rng.integers(len(_SCANNERS)))
        spacing512 = round(float(rng.uniform(0.40, 0.50)), 3)
        thickness = float(rng.choice([2.5, 3.0, 4.0, 5.0]))
        noise = round(float(rng.uniform(4.0, 10.0)), 1)
        offset = round(float(rng.uniform(-3.0, 3.0)), 1)
        own_prevalence = round(float(rng.uniform(0.3, 0.55)), 2)
        kvp = float(rng.choice([100.0, 120.0, 135.0, 140.0]))
        encoding_index = int(rng.integers(len(_ENCODINGS)))
    if scanner is not None:
        index = encoding_index = SCANNERS.index(scanner.casefold())
    manufacturer, model, kernel = _SCANNERS[index]
    encoding = _ENCODINGS[encoding_index]
    return SiteProfile(
        name=name,
        manufacturer=manufacturer,
        model=model,
        kernel=kernel,
        institution=f"Synthetic Teaching Hospital {name}",
        kvp=kvp,
        fov_mm=round(spacing512 * 512, 3),
        slice_thickness_mm=thickness,
        noise_hu=noise,
        hu_offset=offset,
        prevalence=own_prevalence if prevalence is None else float(prevalence),
        encoding=encoding,
    )


# --------------------------------------------------------------------------- #
# Task difficulty: the lesion model. Tuned for the project pipeline (HU -> brain
# window 40/80 -> 64x64 antialiased resize -> 3-block GroupNorm CNN, Adam 1e-3,
# batch 32, 10 epochs, 3 sites x 300 slices): pooled AUROC ~0.9, not 1.0.
# What the tuning showed: the bright skull ring, not noise, is what makes the
# task hard for that CNN (without a skull it is solved in 2 epochs), and the
# CNN learns the lesions suddenly after a plateau of 4-12 epochs. Large, mostly
# saturated bleeds and ~40% positive slices keep that plateau short; subtle,
# nearly isodense lesions (15%) set the ceiling below 1.0.
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LesionModel:
    """Distribution of the hyperdense lesions (all lengths in mm, contrasts in HU).

    Attributes
    ----------
    radius_mm : tuple of float
        In-plane radius of ordinary (intraparenchymal) lesions at their widest
        slice, uniform in this range.
    contrast_hu : tuple of float
        Attenuation of ordinary lesions above the surrounding parenchyma.
    subtle_fraction : float
        Fraction of lesions that are subtle: small and nearly isodense
        (e.g. subacute blood), drawn from the two ranges below.
    subtle_radius_mm, subtle_contrast_hu : tuple of float
        Radius and contrast of subtle lesions.
    z_extent_factor : tuple of float
        Half-extent along z as a multiple of the radius, uniform in this range.
    extra_axial_fraction : float
        Fraction of lesions that are crescents along the inner skull
        (subdural-like) rather than intraparenchymal blobs.
    crescent_thickness_mm : tuple of float
        Maximum thickness of a crescent.
    min_visible_fraction : float
        A slice counts as showing the lesion (label 1) only where the cut
        through the lesion is at least this fraction of its widest size;
        thinner cuts are not drawn at all, so labels match the pixels.
    """

    radius_mm: tuple[float, float] = (14.0, 26.0)
    contrast_hu: tuple[float, float] = (42.0, 62.0)
    subtle_fraction: float = 0.3
    subtle_radius_mm: tuple[float, float] = (6.0, 12.0)
    subtle_contrast_hu: tuple[float, float] = (4.0, 10.0)
    z_extent_factor: tuple[float, float] = (1.2, 2.0)
    extra_axial_fraction: float = 0.15
    crescent_thickness_mm: tuple[float, float] = (6.0, 14.0)
    min_visible_fraction: float = 0.5


LESIONS = LesionModel()


@dataclass(frozen=True)
class _Lesion:
    kind: str  # "blob" or "crescent"
    z_mm: float
    half_extent_mm: float
    contrast_hu: float
    min_visible_fraction: float
    # blob: centre as a fraction of the way from the head centre to the inner
    # skull (rel_x, rel_y), radius at the widest cut, aspect, angle, lobulation
    rel_x: float = 0.0
    rel_y: float = 0.0
    radius_mm: float = 0.0
    aspect: float = 1.0
    angle: float = 0.0
    lobulation: float = 0.0
    lobe_phase: float = 0.0
    edema_hu: float = 0.0
    edema_mm: float = 0.0
    # crescent: polar angle of its middle, angular half-width, max thickness
    arc_center: float = 0.0
    arc_width: float = 0.0
    thickness_mm: float = 0.0

    def visible_fraction(self, z: float) -> float:
        """Return the size of the cut at ``z`` relative to the widest cut (0 if outside)."""
        dz = (z - self.z_mm) / self.half_extent_mm
        return math.sqrt(1.0 - dz * dz) if abs(dz) < 1.0 else 0.0


@dataclass(frozen=True)
class _Patient:
    index: int
    patient_id: str
    name: str
    sex: str
    age: int
    study_date: date
    study_time: str
    n_slices: int
    z_start_mm: float  # first slice, relative to the widest level of the head
    table_z_mm: float  # table position of the widest level (for ImagePositionPatient)
    # head geometry (head frame: rotated by `angle`, centred at (cx, cy))
    head_a: float
    head_b: float
    cx: float
    cy: float
    angle: float
    scalp_mm: float
    skull_mm: float
    bone_hu: float
    diploe_drop_hu: float
    white_hu: float
    gray_hu: float
    cortex_mm: float
    csf_hu: float
    sulcal_mm: float
    vent_z_mm: float
    vent_width_mm: float
    vent_length_mm: float
    vent_sep_mm: float
    texture: np.ndarray  # (K, 5): fx, fy, fz, phase, amplitude
    calcifications: tuple[tuple[float, float, float, float, float], ...]  # x, y, z, r, HU
    noise_scale: float
    lesion: _Lesion | None


_FAMILY = (
    "Synthwood", "Voxelton", "Pixelby", "Hounsfield", "Rescaler", "Axialson",
    "Gantryman", "Kernelly", "Sliceberg", "Windower", "Tomograph", "Dicombe",
)
_GIVEN = (
    "Alex", "Sam", "Robin", "Jo", "Kim", "Lee", "Max", "Noa", "Ari", "Eli",
    "Mika", "Sasha", "Toni", "Rene", "Jules", "Ash",
)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _draw_lesion(
    rng: np.random.Generator, *, slice_z: np.ndarray, thickness: float, model: LesionModel
) -> _Lesion:
    """Draw one lesion centred on a random slice of the patient."""
    centre_slice = int(rng.integers(len(slice_z)))
    z_c = float(slice_z[centre_slice]) + _uniform(rng, (-0.4, 0.4)) * thickness
    subtle = rng.random() < model.subtle_fraction
    contrast = _uniform(rng, model.subtle_contrast_hu if subtle else model.contrast_hu)
    if rng.random() < model.extra_axial_fraction:
        thick = _uniform(rng, model.crescent_thickness_mm)
        return _Lesion(
            kind="crescent",
            z_mm=z_c,
            half_extent_mm=thick * 4.0 * _uniform(rng, (0.6, 1.2)),
            contrast_hu=contrast,
            min_visible_fraction=model.min_visible_fraction,
            arc_center=_uniform(rng, (-math.pi, math.pi)),
            arc_width=_uniform(rng, (0.35, 0.8)),
            thickness_mm=thick,
        )
    radius = _uniform(rng, model.subtle_radius_mm if subtle else model.radius_mm)
    has_edema = rng.random() < 0.5
    # Centre as a fraction of the room between the middle and the inner skull.
    rho = math.sqrt(rng.random())
    phi = _uniform(rng, (-math.pi, math.pi))
    return _Lesion(
        kind="blob",
        z_mm=z_c,
        half_extent_mm=max(radius * _uniform(rng, model.z_extent_factor), 0.6 * thickness),
        contrast_hu=contrast,
        min_visible_fraction=model.min_visible_fraction,
        rel_x=rho * math.cos(phi),
        rel_y=rho * math.sin(phi),
        radius_mm=radius,
        aspect=_uniform(rng, (0.6, 1.0)),
        angle=_uniform(rng, (0.0, math.pi)),
        lobulation=_uniform(rng, (0.0, 0.2)),
        lobe_phase=_uniform(rng, (0.0, 2 * math.pi)),
        edema_hu=_uniform(rng, (3.0, 8.0)) if has_edema else 0.0,
        edema_mm=_uniform(rng, (2.0, 5.0)) if has_edema else 0.0,
    )


def _draw_patient(
    rng: np.random.Generator, *, profile: SiteProfile, index: int, model: LesionModel
) -> _Patient:
    """Draw one patient's demographics, anatomy and (maybe) lesion."""
    thickness = profile.slice_thickness_mm
    n_slices = int(rng.integers(3, 9))
    z_start = _uniform(rng, (-5.0, 60.0 - thickness * (n_slices - 1) / 2))
    slice_z = z_start + thickness * np.arange(n_slices)
    age = int(rng.integers(18, 91))
    study_date = date(2019, 1, 1) + timedelta(days=int(rng.integers(0, 5 * 365)))
    k = 6
    wavelengths = rng.uniform(15.0, 60.0, size=k)
    directions = rng.uniform(0.0, 2 * math.pi, size=k)
    texture = np.stack(
        [
            2 * np.pi / wavelengths * np.cos(directions),
            2 * np.pi / wavelengths * np.sin(directions),
            rng.uniform(-0.15, 0.15, size=k),
            rng.uniform(0.0, 2 * np.pi, size=k),
            rng.uniform(0.6, 1.6, size=k),
        ],
        axis=1,
    )
    calcifications: list[tuple[float, float, float, float, float]] = []
    vent_z = _uniform(rng, (20.0, 40.0))
    vent_sep = _uniform(rng, (4.0, 7.0))
    if rng.random() < 0.3 + 0.004 * age:  # choroid plexus / pineal, commoner with age
        for _ in range(int(rng.integers(1, 3))):
            side = float(rng.choice([-1.0, 0.0, 1.0]))
            calcifications.append(
                (
                    side * (vent_sep + _uniform(rng, (2.0, 6.0))),
                    _uniform(rng, (8.0, 22.0)),
                    vent_z + _uniform(rng, (-12.0, 12.0)),
                    _uniform(rng, (1.2, 2.5)),
                    _uniform(rng, (90.0, 300.0)),
                )
            )
    positive = rng.random() < profile.prevalence
    lesion = (
        _draw_lesion(rng, slice_z=slice_z, thickness=thickness, model=model)
        if positive
        else None
    )
    atrophy = max(0.0, (age - 40) / 50.0)
    return _Patient(
        index=index,
        patient_id=f"SYN-{profile.name}-{index + 1:04d}",
        name=f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}",
        sex=str(rng.choice(["F", "M"])),
        age=age,
        study_date=study_date,
        study_time="{:02d}{:02d}{:02d}".format(*(int(v) for v in rng.integers(0, (24, 60, 60)))),
        n_slices=n_slices,
        z_start_mm=z_start,
        table_z_mm=_uniform(rng, (-120.0, -60.0)),
        head_a=_uniform(rng, (66.0, 76.0)),
        head_b=_uniform(rng, (84.0, 95.0)),
        cx=float(rng.normal(0.0, 3.0)),
        cy=float(rng.normal(0.0, 3.0)),
        angle=float(rng.normal(0.0, math.radians(4.0))),
        scalp_mm=_uniform(rng, (3.5, 6.0)),
        skull_mm=_uniform(rng, (4.0, 6.0)),
        bone_hu=_uniform(rng, (1100.0, 1500.0)),
        diploe_drop_hu=_uniform(rng, (200.0, 500.0)),
        white_hu=_uniform(rng, (25.0, 29.0)),
        gray_hu=_uniform(rng, (34.0, 39.0)),
        cortex_mm=_uniform(rng, (3.0, 5.0)),
        csf_hu=_uniform(rng, (2.0, 8.0)),
        sulcal_mm=_uniform(rng, (0.8, 1.6)) + 1.5 * atrophy,
        vent_z_mm=vent_z,
        vent_width_mm=_uniform(rng, (3.0, 5.0)) + 2.0 * atrophy,
        vent_length_mm=_uniform(rng, (14.0, 20.0)) + 4.0 * atrophy,
        vent_sep_mm=vent_sep,
        texture=texture,
        calcifications=tuple(calcifications),
        noise_scale=_uniform(rng, (0.85, 1.15)),
        lesion=lesion,
    )


def _soft(distance_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Soft indicator of ``distance > 0`` with a transition about ``2 * edge_mm`` wide."""
    return 0.5 * (1.0 + np.tanh(distance_mm / edge_mm))


def _ray_distance(xr: np.ndarray, yr: np.ndarray, a: float, b: float) -> np.ndarray:
    """Signed distance (mm, positive inside) to an axis-aligned ellipse, along its centre's ray."""
    r_point = np.hypot(xr, yr)
    rho = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    r_ellipse = np.where(rho > 1e-9, r_point / np.maximum(rho, 1e-9), min(a, b))
    return r_ellipse - r_point


def _render_hu(
    patient: _Patient,
    *,
    z: float,
    profile: SiteProfile,
    size: int,
    spacing: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """Render one axial slice in HU and return it with its label."""
    coords = ((np.arange(size) - (size - 1) / 2.0) * spacing).astype(np.float32)
    x = coords[np.newaxis, :]  # patient left-right (columns)
    y = coords[:, np.newaxis]  # anterior (top) to posterior (rows)
    cos_t, sin_t = math.cos(patient.angle), math.sin(patient.angle)
    xr = cos_t * (x - patient.cx) + sin_t * (y - patient.cy)
    yr = -sin_t * (x - patient.cx) + cos_t * (y - patient.cy)
    edge = max(0.45 * spacing, 0.3)

    shrink = math.sqrt(max(1.0 - (z / _HEAD_HALF_HEIGHT_MM) ** 2, 0.25))
    a, b = patient.head_a * shrink, patient.head_b * shrink
    d_head = _ray_distance(xr, yr, a, b)
    # The dome is cut obliquely higher up, so the skull looks thicker there.
    skull = patient.skull_mm * (1.0 + 0.3 * (1.0 - shrink))
    d_skull = d_head - patient.scalp_mm
    d_brain = d_skull - skull

    # Brain: white matter, cortical grey band, thin sulcal CSF at the surface.
    brain = patient.white_hu + (patient.gray_hu - patient.white_hu) * _soft(
        patient.cortex_mm - d_brain, 1.2
    )
    sulcal = _soft(patient.sulcal_mm - d_brain, 0.6)
    brain = brain * (1.0 - sulcal) + patient.csf_hu * sulcal
    # Smooth texture: a sum of plane waves, evaluated separably as matrix products.
    tex = patient.texture.astype(np.float32)
    u = tex[:, 0, None] * coords[None, :] + (tex[:, 2] * z + tex[:, 3])[:, None]
    v = tex[:, 1, None] * coords[None, :]
    amp = tex[:, 4, None]
    brain = brain + (np.cos(v).T @ (amp * np.cos(u)) - np.sin(v).T @ (amp * np.sin(u)))

    # Lateral ventricles: two ellipses diverging anteriorly, largest at vent_z.
    v = max(0.0, 1.0 - ((z - patient.vent_z_mm) / 22.0) ** 2)
    if v > 0.05:
        scale = math.sqrt(v)
        w, length = patient.vent_width_mm * scale, patient.vent_length_mm * scale
        vent = np.zeros_like(brain)
        for side in (-1.0, 1.0):
            ang = side * math.radians(12.0)
            ca, sa = math.cos(ang), math.sin(ang)
            dx, dy = xr - side * patient.vent_sep_mm * scale, yr + 4.0
            vx, vy = ca * dx + sa * dy, -sa * dx + ca * dy
            vent = np.maximum(vent, _soft(_ray_distance(vx, vy, w, length), edge))
        brain = brain * (1.0 - vent) + patient.csf_hu * vent
        gap = length + 4.0
    else:
        gap = 0.0
    # Falx: a faint hyperdense midline, interrupted around the ventricles.
    falx = np.exp(-0.5 * (xr / 0.8) ** 2) * _soft(np.abs(yr + 4.0) - gap, 2.0)
    brain = brain + 12.0 * falx

    for cx, cy, cz, radius, hu in patient.calcifications:
        if abs(z - cz) < radius:
            r_cut = math.sqrt(radius**2 - (z - cz) ** 2)
            blob = _soft(r_cut - np.hypot(xr - cx, yr - cy), edge)
            brain = brain * (1.0 - blob) + hu * blob

    label = 0
    lesion = patient.lesion
    if lesion is not None:
        frac = lesion.visible_fraction(z)
        if frac >= lesion.min_visible_fraction:
            label = 1
            brain = brain + _lesion_hu(lesion, frac, xr, yr, d_brain, a, b, patient, skull, edge)

    # Scalp: subcutaneous fat under a thin skin layer.
    scalp = -70.0 + 110.0 * _soft(1.5 - d_head, 0.5)
    # Bone: dense tables with a less dense diploe in between.
    depth = np.clip(d_skull / skull, 0.0, 1.0)
    bone = patient.bone_hu - patient.diploe_drop_hu * np.exp(-(((depth - 0.5) / 0.22) ** 2))

    hu = -1000.0 + _soft(d_head, edge) * (scalp + 1000.0)
    m_skull = _soft(d_skull, edge)
    hu = hu * (1.0 - m_skull) + bone * m_skull
    m_brain = _soft(d_brain, edge)
    hu = hu * (1.0 - m_brain) + brain * m_brain
    hu = hu + profile.hu_offset

    # Mildly correlated noise, as filtered back-projection gives.
    white = rng.standard_normal((size + 1, size + 1), dtype=np.float32)
    noise = (white[1:, 1:] + 0.5 * white[:-1, 1:] + 0.5 * white[1:, :-1]) / math.sqrt(1.5)
    hu = hu + profile.noise_hu * patient.noise_scale * noise
    return hu, label


def _lesion_hu(
    lesion: _Lesion,
    frac: float,
    xr: np.ndarray,
    yr: np.ndarray,
    d_brain: np.ndarray,
    a: float,
    b: float,
    patient: _Patient,
    skull: float,
    edge: float,
) -> np.ndarray:
    """Return the HU added by the lesion at one slice (``frac`` = relative cut size)."""
    inside_brain = d_brain > 0
    if lesion.kind == "crescent":
        theta = np.arctan2(yr / b, xr / a)
        off = (theta - lesion.arc_center + np.pi) % (2 * np.pi) - np.pi
        taper = np.clip(np.cos(0.5 * np.pi * off / lesion.arc_width), 0.0, 1.0) ** 0.7
        taper = np.where(np.abs(off) < lesion.arc_width, taper, 0.0)
        thickness = lesion.thickness_mm * frac * taper
        mask = _soft(thickness - d_brain, edge) * (thickness > 0.3) * inside_brain
        return lesion.contrast_hu * mask
    # Blob: centre given as a fraction of the room left between the middle of
    # the brain and a margin of (radius + 5 mm) from the inner skull.
    inner = patient.scalp_mm + skull
    phi = math.atan2(lesion.rel_y, lesion.rel_x)
    ray = 1.0 / math.sqrt((math.cos(phi) / a) ** 2 + (math.sin(phi) / b) ** 2) - inner
    ray = max(ray - lesion.radius_mm - 5.0, 0.0)
    rho = math.hypot(lesion.rel_x, lesion.rel_y)
    cx, cy = rho * ray * math.cos(phi), rho * ray * math.sin(phi)
    ca, sa = math.cos(lesion.angle), math.sin(lesion.angle)
    dx, dy = xr - cx, yr - cy
    lx, ly = ca * dx + sa * dy, -sa * dx + ca * dy
    radius = lesion.radius_mm * frac
    lobes = 1.0 + lesion.lobulation * np.cos(3.0 * np.arctan2(ly, lx) + lesion.lobe_phase)
    dist = _ray_distance(lx, ly, radius, radius * lesion.aspect) + (lobes - 1.0) * radius
    core = _soft(dist, max(edge, 0.8))
    added = lesion.contrast_hu * core
    if lesion.edema_hu > 0:
        halo = _soft(dist + lesion.edema_mm, 1.0) - core
        added = added - lesion.edema_hu * halo
    return added * inside_brain


def _encode(hu: np.ndarray, encoding: PixelEncoding) -> np.ndarray:
    """Return stored pixel values such that ``stored * slope + intercept == HU``."""
    hu = np.clip(hu, _HU_MIN, _HU_MAX)
    stored = np.rint((hu - encoding.rescale_intercept) / encoding.rescale_slope)
    low, high = encoding.stored_range()
    stored = np.clip(stored, low, high)
    return stored.astype("<i2" if encoding.pixel_representation else "<u2")


def _uid(*parts: object) -> UID:
    """Return a deterministic ``2.25.`` UUID-derived UID for ``parts``."""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}")


def _ds_number(value: float) -> str:
    """Format a number for a DS element (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _series_dataset(
    patient: _Patient, *, profile: SiteProfile, seed: int, size: int, spacing_text: str
) -> Dataset:
    """Build the dataset shared by a patient's slices; :func:`_set_slice` fills in the rest."""
    key = (seed, profile.name, size, patient.index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    spacing = float(spacing_text)
    origin = _ds_number(-(size - 1) / 2.0 * spacing)
    study_date = patient.study_date.strftime("%Y%m%d")
    enc = profile.encoding

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2"  # per slice
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = patient.study_time
    ds.AccessionNumber = f"A{_stable_int(*key, 'accession', bits=32):010d}"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = f"AXIAL {_ds_number(profile.slice_thickness_mm)}MM BRAIN"
    ds.ManufacturerModelName = profile.model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = f"{patient.study_date.year - patient.age:04d}0101"
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age:03d}Y"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds_number(profile.slice_thickness_mm)
    ds.KVP = _ds_number(profile.kvp)
    ds.ConvolutionKernel = profile.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(*key, "study")
    ds.SeriesInstanceUID = _uid(*key, "series")
    ds.StudyID = f"{patient.index + 1}"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1  # per slice
    ds.ImagePositionPatient = [origin, origin, "0"]  # z per slice
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid(*key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0"  # per slice
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.PixelSpacing = [spacing_text, spacing_text]
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = enc.pixel_representation
    ds.WindowCenter = _ds_number(BRAIN_WINDOW[0])
    ds.WindowWidth = _ds_number(BRAIN_WINDOW[1])
    ds.WindowCenterWidthExplanation = "BRAIN"
    ds.RescaleIntercept = _ds_number(enc.rescale_intercept)
    ds.RescaleSlope = _ds_number(enc.rescale_slope)
    ds.RescaleType = "HU"
    ds.add_new(0x7FE00010, "OW", b"")  # per slice
    return ds


def _set_slice(
    ds: Dataset, patient: _Patient, *, seed: int, site: str, size: int, slice_index: int, z: float,
    pixels: np.ndarray,
) -> None:
    """Fill in the slice-specific elements of a series dataset."""
    sop_uid = _uid(seed, site, size, patient.index, "image", slice_index)
    table_z = _ds_number(patient.table_z_mm + z)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = slice_index + 1
    position = list(ds.ImagePositionPatient)
    ds.ImagePositionPatient = [position[0], position[1], table_z]
    ds.SliceLocation = table_z
    ds.PixelData = pixels.tobytes()


# The elements _set_slice changes; the file meta's MediaStorageSOPInstanceUID follows SOPInstanceUID.
_SLICE_TAGS = frozenset(
    Tag(keyword)
    for keyword in (
        "SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "PixelData"
    )
)
_META_GROUP_LENGTH = Tag(0x00020000)
_MEDIA_STORAGE_SOP_INSTANCE = Tag(0x00020003)
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _new_buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    return fp


def _element_bytes(element: DataElement, encodings: str | list[str] | None = None) -> bytes:
    """Encode one element as Explicit VR Little Endian (pydicom's own writer)."""
    fp = _new_buffer()
    write_data_element(fp, element, encodings)
    return fp.getvalue()


def _encoded_runs(
    ds: Dataset, varying: frozenset[BaseTag], encodings: str | list[str] | None
) -> list[bytes | BaseTag]:
    """``ds`` encoded in tag order: bytes for runs of fixed elements, the tag of each varying one."""
    pieces: list[bytes | BaseTag] = []
    run = _new_buffer()
    for tag in sorted(ds.keys()):
        if tag in varying:
            if run.tell():
                pieces.append(run.getvalue())
                run = _new_buffer()
            pieces.append(tag)
        elif not (tag.element == 0 and tag.group > 6):  # write_dataset skips group lengths
            write_data_element(run, ds[tag], encodings)
    if run.tell():
        pieces.append(run.getvalue())
    return pieces


class _SeriesEncoder:
    """Encode a series' slices exactly as ``ds.save_as(path, enforce_file_format=True)`` does.

    ``save_as`` re-encodes all ~70 elements of every file, which is most of
    the time fl-synth takes at small image sizes. The elements shared by a
    series are encoded once here; per slice only those :func:`_set_slice`
    changes are, plus the file meta group length. The file meta gets what
    ``dcmwrite`` adds to it (version, implementation UID and name).
    """

    def __init__(self, ds: Dataset) -> None:
        meta = deepcopy(ds.file_meta)
        # As dcmwrite: the meta's SOP class and instance UIDs follow the dataset's.
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # replaced per slice
        validate_file_meta(meta, enforce_standard=True)
        meta.pop(_META_GROUP_LENGTH, None)
        self._meta = _encoded_runs(meta, frozenset({_MEDIA_STORAGE_SOP_INSTANCE}), None)
        self._encodings = ds.get("SpecificCharacterSet", None)
        # write_dataset corrects ambiguous VRs of a new dataset before writing it.
        self._body = _encoded_runs(
            correct_ambiguous_vr(ds, True), _SLICE_TAGS, self._encodings
        )

    def encode(self, ds: Dataset) -> bytes:
        """Return the file bytes of ``ds`` (the series dataset, filled in for one slice)."""
        instance = _element_bytes(DataElement(_MEDIA_STORAGE_SOP_INSTANCE, "UI", ds.SOPInstanceUID))
        meta = b"".join(p if isinstance(p, bytes) else instance for p in self._meta)
        length = _element_bytes(DataElement(_META_GROUP_LENGTH, "UL", len(meta)))
        body = b"".join(
            p if isinstance(p, bytes) else _element_bytes(ds[p], self._encodings)
            for p in self._body
        )
        return b"".join((_PREAMBLE, length, meta, body))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate_names(names: Sequence[object]) -> None:
    """Raise :class:`SynthConfigError` unless ``names`` are valid, distinct site names."""
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _SITE_NAME_RE.fullmatch(name):
            raise SynthConfigError(
                "Expected site names made of letters, digits, '_' or '-' (e.g. A,B,C), "
                f"but got {name!r}"
            )
        if len(name) > MAX_SITE_NAME_LENGTH:
            raise SynthConfigError(
                f"Expected site names of at most {MAX_SITE_NAME_LENGTH} characters, "
                f"but got {name!r} ({len(name)} characters)"
            )
        # Case-insensitive, as the site folders may live on a case-insensitive filesystem.
        if name.casefold() in seen:
            raise SynthConfigError(
                f"Expected distinct site names, but got {seen[name.casefold()]!r} and {name!r}"
            )
        seen[name.casefold()] = name


def _validate_run(
    out: Path, *, seed: int, size: int, names: tuple[str, str, str] = ("--seed", "--size", "--out")
) -> None:
    """Check seed, size and the output folder; ``names`` are how the messages call them."""
    seed_name, size_name, out_name = names
    if not _is_int(seed) or seed < 0:
        raise SynthConfigError(
            f"Expected {seed_name} to be a non-negative integer, but got {seed!r}"
        )
    if not _is_int(size) or not MIN_SIZE <= size <= MAX_SIZE:
        raise SynthConfigError(
            f"Expected {size_name} to be an integer from {MIN_SIZE} to {MAX_SIZE}, "
            f"but got {size!r}"
        )
    if out.exists() and not out.is_dir():
        raise SynthConfigError(
            f"Expected {out_name} to be a folder (new or existing), but got the file {out}"
        )


def _validate(
    out: Path, *, sites: Sequence[str], images_per_site: int, seed: int, size: int
) -> None:
    """Raise :class:`SynthConfigError` for any invalid input of :func:`synthesize`."""
    if isinstance(sites, str):
        raise SynthConfigError(
            f"Expected --sites to be a list of names, but got the string {sites!r}"
        )
    if not sites:
        raise SynthConfigError(
            "Expected --sites to name at least one site (e.g. A,B,C), but got none"
        )
    _validate_names(sites)
    if not _is_int(images_per_site) or images_per_site < 1:
        raise SynthConfigError(
            f"Expected --images-per-site to be a positive integer, but got {images_per_site!r}"
        )
    _validate_run(out, seed=seed, size=size)


def _validate_specs(
    out: Path, specs: list[SiteSpec], *, seed: int, size: int, workers: int
) -> None:
    """Raise :class:`SynthConfigError` for any invalid input of :func:`synthesize_sites`."""
    if not specs:
        raise SynthConfigError("Expected at least one SiteSpec, but got none")
    for spec in specs:
        if not isinstance(spec, SiteSpec):
            raise SynthConfigError(f"Expected `specs` to hold SiteSpec objects, but got {spec!r}")
    _validate_names([spec.name for spec in specs])
    for spec in specs:
        if not _is_int(spec.images) or spec.images < 1:
            raise SynthConfigError(
                f"Expected `images` of site {spec.name} to be a positive integer, "
                f"but got {spec.images!r}"
            )
        p = spec.prevalence
        if p is not None and (
            not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 < float(p) < 1.0
        ):
            raise SynthConfigError(
                f"Expected `prevalence` of site {spec.name} to be between 0 and 1 (exclusive), "
                f"but got {p!r}"
            )
        if spec.scanner is not None and (
            not isinstance(spec.scanner, str) or spec.scanner.casefold() not in SCANNERS
        ):
            raise SynthConfigError(
                f"Expected `scanner` of site {spec.name} to be one of {', '.join(SCANNERS)}, "
                f"but got {spec.scanner!r}"
            )
    if not _is_int(workers) or workers < 1:
        raise SynthConfigError(f"Expected `workers` to be a positive integer, but got {workers!r}")
    _validate_run(out, seed=seed, size=size, names=("`seed`", "`size`", "`out`"))


def _check_site_dir(site_dir: Path, *, overwrite: bool) -> bool:
    """Check that ``site_dir`` may be written; return True if earlier output must be removed."""
    if site_dir.exists() and not site_dir.is_dir():
        raise SynthConfigError(f"Expected {site_dir} to be a folder, but got a file")
    if not site_dir.is_dir() or not any(site_dir.iterdir()):
        return False
    if not overwrite:
        raise SynthConfigError(
            f"Expected {site_dir} to be absent or empty, but got a non-empty folder; "
            "pass --overwrite to replace earlier fl-synth output, or choose another --out"
        )
    try:
        header = (site_dir / LABELS_FILENAME).read_text(encoding="utf-8").splitlines()[:1]
    except OSError:
        header = []
    if header != [",".join(LABELS_HEADER)]:
        raise SynthConfigError(
            f"Expected {site_dir} to hold earlier fl-synth output (with {LABELS_FILENAME}) "
            "before overwriting it, but it does not; choose another --out"
        )
    return True


def _write_site(
    out: Path,
    spec: SiteSpec,
    *,
    seed: int = 0,
    size: int = 128,
    lesions: LesionModel = LESIONS,
) -> SiteSummary:
    """Write one site's DICOM files and ``labels.csv`` into ``out / spec.name``.

    Parameters
    ----------
    out : Path
        Parent folder; the site's folder ``out / spec.name`` should be absent
        or empty (not checked here; :func:`synthesize_sites` checks it).
    spec : SiteSpec
        Site name (selects the scanner profile, see :func:`site_profile`),
        exact number of files, and optional prevalence and scanner overrides.
    seed : int, optional
        Seed; together with the spec and size it fixes every byte.
    size : int, optional
        Rows and Columns of every image.
    lesions : LesionModel, optional
        Lesion distribution (task difficulty).

    Returns
    -------
    SiteSummary
        Files, patients and positive files written.
    """
    site = spec.name
    profile = site_profile(site, prevalence=spec.prevalence, scanner=spec.scanner)
    site_dir = out / site
    spacing_text = _ds_number(profile.fov_mm / size)
    spacing = float(spacing_text)
    site_key = _stable_int("fl-synth-patients", site)
    site_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    patients = 0
    written = 0
    while written < spec.images:
        rng = np.random.default_rng([seed, site_key, patients])
        patient = _draw_patient(rng, profile=profile, index=patients, model=lesions)
        n = min(patient.n_slices, spec.images - written)
        series_dir = site_dir / patient.patient_id / "SE001"
        series_dir.mkdir(parents=True, exist_ok=True)
        ds = _series_dataset(
            patient, profile=profile, seed=seed, size=size, spacing_text=spacing_text
        )
        encoder = _SeriesEncoder(ds)
        for k in range(n):
            z = patient.z_start_mm + k * profile.slice_thickness_mm
            hu, label = _render_hu(
                patient, z=z, profile=profile, size=size, spacing=spacing, rng=rng
            )
            _set_slice(
                ds,
                patient,
                seed=seed,
                site=site,
                size=size,
                slice_index=k,
                z=z,
                pixels=_encode(hu, profile.encoding),
            )
            (series_dir / f"IM{k + 1:04d}.dcm").write_bytes(encoder.encode(ds))
            rows.append((str(ds.SOPInstanceUID), label))
        written += n
        patients += 1
    with (site_dir / LABELS_FILENAME).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABELS_HEADER)
        writer.writerows(rows)
    summary = SiteSummary(
        site=site, files=written, patients=patients, positives=sum(label for _, label in rows)
    )
    logger.info(
        "Site %s: %d files, %d patients, %d positive",
        site,
        summary.files,
        summary.patients,
        summary.positives,
    )
    return summary


def _write_site_job(job: tuple[Path, SiteSpec, int, int, LesionModel]) -> SiteSummary:
    """:func:`_write_site` for a worker process."""
    out, spec, seed, size, lesions = job
    return _write_site(out, spec, seed=seed, size=size, lesions=lesions)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds, but is only safe while this process has no
    # other thread (torch starts thread pools); otherwise spawn.
    if (
        "torch" not in sys.modules
        and threading.active_count() == 1
        and "fork" in multiprocessing.get_all_start_methods()
    ):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def synthesize_sites(
    out: Path,
    specs: Sequence[SiteSpec],
    *,
    seed: int = 0,
    size: int = 128,
    overwrite: bool = False,
    lesions: LesionModel | None = None,
    workers: int = 1,
) -> dict[str, SiteSummary]:
    """Write synthetic head-CT DICOM data for several sites, each with its own spec.

    Parameters
    ----------
    out : Path
        Output folder (created if absent); each site gets ``out / <name>``.
    specs : sequence of SiteSpec
        One spec per site: distinct name, number of files and optional
        prevalence and scanner overrides.
    seed : int, optional
        Non-negative seed. Same inputs give byte-identical files; a site's
        files depend only on its own spec, the seed, the size and the lesion
        model, never on the other sites or on ``workers``.
    size : int, optional
        Rows and Columns of every image (16 to 1024).
    overwrite : bool, optional
        Replace a site folder that holds earlier fl-synth output instead of
        refusing to write into a non-empty folder.
    lesions : LesionModel, optional
        Lesion distribution; defaults to :data:`LESIONS`.
    workers : int, optional
        Write this many sites at a time in worker processes (1: in this
        process). The output is the same.

    Returns
    -------
    dict of str to SiteSummary
        One summary per site, in the order given.

    Raises
    ------
    SynthConfigError
        If an input is invalid or a site folder is not empty (checked for
        every site before anything is written).
    """
    out = Path(out)
    specs = [specs] if isinstance(specs, SiteSpec) else list(specs)
    _validate_specs(out, specs, seed=seed, size=size, workers=workers)
    model = LESIONS if lesions is None else lesions
    # Check every site folder before touching any of them.
    stale = [spec.name for spec in specs if _check_site_dir(out / spec.name, overwrite=overwrite)]
    for site in stale:
        logger.info("Replacing earlier fl-synth output in %s", out / site)
        shutil.rmtree(out / site)
    workers = min(workers, len(specs))
    if workers == 1:
        summaries = [_write_site(out, spec, seed=seed, size=size, lesions=model) for spec in specs]
    else:
        jobs = [(out, spec, seed, size, model) for spec in specs]
        chunk = max(1, min(16, len(jobs) // (workers * 4)))
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            summaries = list(pool.map(_write_site_job, jobs, chunksize=chunk))
    return {summary.site: summary for summary in summaries}


def synthesize(
    out: Path,
    *,
    sites: Sequence[str],
    images_per_site: int,
    seed: int = 0,
    size: int = 128,
    overwrite: bool = False,
    lesions: LesionModel | None = None,
) -> dict[str, SiteSummary]:
    """Write synthetic head-CT DICOM data for several sites.

    The same as :func:`synthesize_sites` with ``SiteSpec(site,
    images_per_site)`` for every site; the messages of invalid input name the
    ``fl-synth`` options.

    Parameters
    ----------
    out : Path
        Output folder (created if absent); each site gets ``out / <site>``.
    sites : sequence of str
        Distinct site names made of letters, digits, ``_`` and ``-``.
    images_per_site : int
        Exact number of DICOM files per site (at least 1).
    seed : int, optional
        Non-negative seed. Same inputs give byte-identical files.
    size : int, optional
        Rows and Columns of every image (16 to 1024).
    overwrite : bool, optional
        Replace a site folder that holds earlier fl-synth output instead of
        refusing to write into a non-empty folder.
    lesions : LesionModel, optional
        Lesion distribution; defaults to :data:`LESIONS`, tuned so that a
        small CNN on 64x64 brain-windowed slices reaches AUROC ~0.9.

    Returns
    -------
    dict of str to SiteSummary
        One summary per site, in the order given.

    Raises
    ------
    SynthConfigError
        If an input is invalid or a site folder is not empty.
    """
    out = Path(out)
    sites = list(sites) if not isinstance(sites, str) else sites
    _validate(out, sites=sites, images_per_site=images_per_site, seed=seed, size=size)
    return synthesize_sites(
        out,
        [SiteSpec(name=site, images=images_per_site) for site in sites],
        seed=seed,
        size=size,
        overwrite=overwrite,
        lesions=lesions,
    )


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Write realistic synthetic multi-site head-CT DICOM data with per-slice bleed labels.",
)


def _parse_int(option: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise SynthConfigError(f"Expected {option} to be an integer, but got {text!r}") from None


@app.command()
def synth(
    sites: Annotated[
        str, typer.Option("--sites", metavar="A,B,C", help="Comma-separated site names.")
    ],
    images_per_site: Annotated[
        str, typer.Option("--images-per-site", metavar="N", help="DICOM files per site.")
    ],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output folder.")],
    seed: Annotated[str, typer.Option("--seed", metavar="S", help="Random seed.")] = "0",
    size: Annotated[
        str, typer.Option("--size", metavar="PX", help="Rows and Columns of every image.")
    ] = "128",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace earlier fl-synth output in the site folders."),
    ] = False,
) -> None:
    """Write synthetic head-CT DICOM data for several hospitals, with per-slice bleed labels.

    Each site gets DIR/<site>/<PatientID>/SE001/IM0001.dcm ... (one study and
    one series of 3-8 slices per patient) and DIR/<site>/labels.csv
    (SOPInstanceUID,label). Sites A-D mimic GE, Siemens, Philips and Toshiba
    scanners; any other name gets a stable profile derived from the name.
    Same arguments, same bytes.
    """
    try:
        names = [name.strip() for name in sites.split(",")] if sites.strip() else []
        summaries = synthesize(
            out,
            sites=names,
            images_per_site=_parse_int("--images-per-site", images_per_site),
            seed=_parse_int("--seed", seed),
            size=_parse_int("--size", size),
            overwrite=overwrite,
        )
    except SynthConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as exc:
        typer.echo(f"error: Expected to write under {out}, but got: {exc}", err=True)
        raise typer.Exit(code=1) from None

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fl-synth → {out}", title_justify="left")
    for column in ("site", "manufacturer", "files", "patients", "positives"):
        table.add_column(column, justify="left" if column in ("site", "manufacturer") else "right")
    for name, summary in summaries.items():
        table.add_row(
            name,
            site_profile(name).manufacturer,
            str(summary.files),
            str(summary.patients),
            str(summary.positives),
        )
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``fl-synth`` command line; usage errors become one line and exit code 2."""
    import click

    command = typer.main.get_command(app)
    try:
        code = command.main(
            args=list(argv) if argv is not None else None,
            prog_name="fl-synth",
            standalone_mode=False,
        )
    except click.ClickException as exc:
        message = " ".join(exc.format_message().split())
        typer.echo(f"error: {message} (see fl-synth --help)", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
