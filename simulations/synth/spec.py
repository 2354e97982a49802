"""What fl-synth is asked to write, and the checks of it before anything is written."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from simulations.synth.profiles import SCANNERS

LABELS_FILENAME = "labels.csv"
LABELS_HEADER = ("SOPInstanceUID", "label")
MIN_SIZE = 16
MAX_SIZE = 1024
MAX_SITE_NAME_LENGTH = 32

_SITE_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


class SynthConfigError(ConfigError):
    """Invalid fl-synth input; the message says what was expected and what was given."""


@dataclass(frozen=True)
class SiteSpec:
    """What to write for one site (see :func:`synthesize_sites`)."""

    name: str  # letters, digits, _ and -: the folder under ``out`` and the key of the site's profile and UIDs
    images: int  # exact number of DICOM files (at least 1)
    prevalence: float | None = None  # of patients with a lesion, in (0, 1); None: the site profile's own
    # One of SCANNERS (case-insensitive): that scanner's manufacturer, model, kernel and pixel encoding, the rest
    # of the profile the site's own; None: the profile's scanner.
    scanner: str | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# How the messages call the inputs (images, seed, size, out): SiteSpec fields or fl-synth options.
_FIELDS = ("`images` of site {}", "`seed`", "`size`", "`out`")
_OPTIONS = ("--images-per-site", "--seed", "--size", "--out")


def _check_name(name: object, seen: dict[str, str]) -> None:
    if not isinstance(name, str) or not _SITE_NAME_RE.fullmatch(name):
        raise SynthConfigError(
            f"Expected site names made of letters, digits, '_' or '-' (e.g. A,B,C), but got {name!r}"
        )
    if len(name) > MAX_SITE_NAME_LENGTH:
        raise SynthConfigError(f"Expected site names of at most {MAX_SITE_NAME_LENGTH} characters, "
                               f"but got {name!r} ({len(name)} characters)")
    # Case-insensitive, as the site folders may live on a case-insensitive filesystem.
    if name.casefold() in seen:
        raise SynthConfigError(f"Expected distinct site names, but got {seen[name.casefold()]!r} and {name!r}")
    seen[name.casefold()] = name


def _validate_specs(out: Path, specs: list[SiteSpec], *, seed: int, size: int, workers: int = 1,
                    names: tuple[str, str, str, str] = _FIELDS) -> None:
    """Raise :class:`SynthConfigError` for any invalid input of ``synthesize_sites``."""
    images_name, seed_name, size_name, out_name = names
    if not specs:
        raise SynthConfigError("Expected at least one SiteSpec, but got none")
    seen: dict[str, str] = {}
    for spec in specs:
        if not isinstance(spec, SiteSpec):
            raise SynthConfigError(f"Expected `specs` to hold SiteSpec objects, but got {spec!r}")
        _check_name(spec.name, seen)
    for spec in specs:
        if not _is_int(spec.images) or spec.images < 1:
            raise SynthConfigError(
                f"Expected {images_name.format(spec.name)} to be a positive integer, but got {spec.images!r}"
            )
        p = spec.prevalence
        if p is not None and (not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 < float(p) < 1.0):
            raise SynthConfigError(
                f"Expected `prevalence` of site {spec.name} to be between 0 and 1 (exclusive), but got {p!r}"
            )
        if spec.scanner is not None and (not isinstance(spec.scanner, str) or spec.scanner.casefold() not in SCANNERS):
            raise SynthConfigError(
                f"Expected `scanner` of site {spec.name} to be one of {', '.join(SCANNERS)}, but got {spec.scanner!r}"
            )
    if not _is_int(workers) or workers < 1:
        raise SynthConfigError(f"Expected `workers` to be a positive integer, but got {workers!r}")
    if not _is_int(seed) or seed < 0:
        raise SynthConfigError(f"Expected {seed_name} to be a non-negative integer, but got {seed!r}")
    if not _is_int(size) or not MIN_SIZE <= size <= MAX_SIZE:
        raise SynthConfigError(f"Expected {size_name} to be an integer from {MIN_SIZE} to {MAX_SIZE}, but got {size!r}")
    if out.exists() and not out.is_dir():
        raise SynthConfigError(f"Expected {out_name} to be a folder (new or existing), but got the file {out}")


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
