"""Scanner profiles of the synthetic sites: manufacturer, field of view, noise, pixel encoding, prevalence.

``A``-``D`` have hand-picked profiles; any other name gets one derived from a hash of the name, so the
same name always means the same scanner.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# CT numbers a scanner can represent (12-bit range starting at -1024).
_HU_MIN, _HU_MAX = -1024.0, 3071.0


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

    def stored(self, hu: np.ndarray) -> np.ndarray:
        """Return stored pixel values such that ``stored * slope + intercept == HU``."""
        hu = np.clip(hu, _HU_MIN, _HU_MAX)
        stored = np.rint((hu - self.rescale_intercept) / self.rescale_slope)
        stored = np.clip(stored, *self.stored_range())
        return stored.astype("<i2" if self.pixel_representation else "<u2")


@dataclass(frozen=True)
class SiteProfile:
    """Scanner and population characteristics of one synthetic site."""

    name: str
    manufacturer: str
    model: str  # ManufacturerModelName
    kernel: str  # ConvolutionKernel
    institution: str  # a fake InstitutionName
    kvp: float  # tube voltage
    fov_mm: float  # reconstruction field of view; PixelSpacing is fov_mm / size (0.40-0.50 mm at a 512 matrix)
    slice_thickness_mm: float  # SliceThickness, also the spacing between consecutive slices
    noise_hu: float  # standard deviation of the image noise
    hu_offset: float  # calibration offset added to every CT number
    prevalence: float  # probability that a patient has a lesion
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


def site_profile(name: str, *, prevalence: float | None = None, scanner: str | None = None) -> SiteProfile:
    """Return the scanner profile of a site.

    Parameters
    ----------
    name : str
        Site name. ``A``-``D`` have fixed profiles (GE, Siemens, Philips, Toshiba); any other name gets
        a profile derived from a hash of the name, the same on every machine and every run.
    prevalence : float, optional
        Replaces the profile's prevalence (not validated here; see :func:`synthesize_sites`).
    scanner : str, optional
        One of :data:`SCANNERS` (case-insensitive): replaces manufacturer, model, kernel and pixel
        encoding; the rest stays the site's own.
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
    return SiteProfile(
        name, *_SCANNERS[index], institution=f"Synthetic Teaching Hospital {name}", kvp=kvp,
        fov_mm=round(spacing512 * 512, 3), slice_thickness_mm=thickness, noise_hu=noise, hu_offset=offset,
        prevalence=own_prevalence if prevalence is None else float(prevalence), encoding=_ENCODINGS[encoding_index],
    )
