"""Synthetic multi-site head-CT DICOM data with per-slice bleed labels (``fl-synth``)."""

from simulations.synth.anatomy import LESIONS, LesionModel
from simulations.synth.cli import app, main
from simulations.synth.profiles import SCANNERS, PixelEncoding, SiteProfile, site_profile
from simulations.synth.series import BRAIN_WINDOW, CT_IMAGE_STORAGE
from simulations.synth.spec import LABELS_FILENAME, SiteSpec, SynthConfigError
from simulations.synth.write import SiteSummary, synthesize, synthesize_sites

__all__ = [
    "BRAIN_WINDOW", "CT_IMAGE_STORAGE", "LABELS_FILENAME", "LESIONS", "SCANNERS", "LesionModel",
    "PixelEncoding", "SiteProfile", "SiteSpec", "SiteSummary", "SynthConfigError", "app", "main",
    "site_profile", "synthesize", "synthesize_sites",
]
