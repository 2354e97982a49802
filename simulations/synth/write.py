"""Write synthetic multi-site head-CT DICOM data (the work behind ``fl-synth``).

Each site gets CT Image Storage files ``<out>/<site>/<PatientID>/SE001/IM0001.dcm`` (one study with one
axial series of 3-8 contiguous slices per patient) and ``<out>/<site>/labels.csv``
(``SOPInstanceUID,label``: does the slice show a hyperdense, bleed-like lesion). Pixel data, UIDs and
labels are deterministic given (site name, images per site, seed, size).
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import astuple, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from common.files import pool_context
from simulations.synth.anatomy import LESIONS, LesionModel, _draw_patient
from simulations.synth.encoder import _SeriesEncoder
from simulations.synth.profiles import _stable_int, site_profile
from simulations.synth.render import _render_hu
from simulations.synth.series import _ds_number, _series_dataset, _set_slice
from simulations.synth.spec import (
    _OPTIONS,
    LABELS_FILENAME,
    LABELS_HEADER,
    SiteSpec,
    SynthConfigError,
    _check_site_dir,
    _validate_specs,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSummary:
    """What was written for one site.

    Its name, the DICOM files written, the patients (one study and one series each) and the files labelled 1.
    """

    site: str
    files: int
    patients: int
    positives: int


def _write_site(out: Path, spec: SiteSpec, *, seed: int, size: int, lesions: LesionModel) -> SiteSummary:
    """Write one site's DICOM files and ``labels.csv`` into ``out / spec.name`` (absent or empty).

    ``spec``, ``seed``, ``size`` and ``lesions`` fix every byte.
    """
    site = spec.name
    profile = site_profile(site, prevalence=spec.prevalence, scanner=spec.scanner)
    site_dir = out / site
    spacing_text = _ds_number(profile.fov_mm / size)
    spacing = float(spacing_text)
    site_key = _stable_int("fl-synth-patients", site)
    site_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    patients = written = 0
    while written < spec.images:
        rng = np.random.default_rng([seed, site_key, patients])
        patient = _draw_patient(rng, profile=profile, index=patients, model=lesions)
        n = min(patient.n_slices, spec.images - written)
        series_dir = site_dir / patient.patient_id / "SE001"
        series_dir.mkdir(parents=True, exist_ok=True)
        key = (seed, site, size, patient.index)
        ds = _series_dataset(patient, profile=profile, key=key, spacing_text=spacing_text)
        encoder = _SeriesEncoder(ds)
        for k in range(n):
            z = patient.z_start_mm + k * profile.slice_thickness_mm
            hu, label = _render_hu(patient, z=z, profile=profile, size=size, spacing=spacing, rng=rng)
            _set_slice(ds, key, slice_index=k, z=patient.table_z_mm + z, pixels=profile.encoding.stored(hu))
            (series_dir / f"IM{k + 1:04d}.dcm").write_bytes(encoder.encode(ds))
            rows.append((str(ds.SOPInstanceUID), label))
        written += n
        patients += 1
    with (site_dir / LABELS_FILENAME).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABELS_HEADER)
        writer.writerows(rows)
    summary = SiteSummary(site, written, patients, sum(label for _, label in rows))
    logger.info("Site %s: %d files, %d patients, %d positive", *astuple(summary))
    return summary


def synthesize_sites(out: Path, specs: Sequence[SiteSpec], *, seed: int = 0, size: int = 128, overwrite: bool = False,
                     lesions: LesionModel | None = None, workers: int = 1) -> dict[str, SiteSummary]:
    """Write synthetic head-CT DICOM data for several sites, each with its own spec.

    Parameters
    ----------
    out : Path
        Output folder (created if absent); each site gets ``out / <name>``.
    specs : sequence of SiteSpec
        One spec per site: distinct name, number of files and optional prevalence and scanner overrides.
    seed : int, optional
        Non-negative seed. Same inputs give byte-identical files; a site's files depend only on its own
        spec, the seed, the size and the lesion model, never on the other sites or on ``workers``.
    size : int, optional
        Rows and Columns of every image (16 to 1024).
    overwrite : bool, optional
        Replace a site folder that holds earlier fl-synth output instead of refusing to write into a
        non-empty folder.
    lesions : LesionModel, optional
        Lesion distribution; defaults to :data:`LESIONS`.
    workers : int, optional
        Write this many sites at a time in worker processes (1: in this process). The output is the same.

    Returns
    -------
    dict of str to SiteSummary
        One summary per site, in the order given.

    Raises
    ------
    SynthConfigError
        If an input is invalid or a site folder is not empty (checked for every site before anything is
        written).
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
    job = partial(_write_site, out, seed=seed, size=size, lesions=model)
    if workers == 1:
        summaries = [job(spec) for spec in specs]
    else:
        chunk = max(1, min(16, len(specs) // (workers * 4)))
        with ProcessPoolExecutor(workers, mp_context=pool_context()) as pool:
            summaries = list(pool.map(job, specs, chunksize=chunk))
    return {summary.site: summary for summary in summaries}


def synthesize(out: Path, *, sites: Sequence[str], images_per_site: int, seed: int = 0, size: int = 128,
               overwrite: bool = False, lesions: LesionModel | None = None) -> dict[str, SiteSummary]:
    """Write synthetic head-CT DICOM data for several sites, the same number of files each.

    :func:`synthesize_sites` with ``SiteSpec(site, images_per_site)`` for every site (same returns and
    errors), except that the messages of invalid input name the ``fl-synth`` options.

    Parameters
    ----------
    out : Path
        Output folder (created if absent); each site gets ``out / <site>``.
    sites : sequence of str
        Distinct site names made of letters, digits, ``_`` and ``-``.
    images_per_site : int
        Exact number of DICOM files per site (at least 1).
    seed, size, overwrite, lesions : optional
        As for :func:`synthesize_sites`. The default :data:`LESIONS` is tuned so that a small CNN on
        64x64 brain-windowed slices reaches AUROC ~0.9.
    """
    out = Path(out)
    if isinstance(sites, str):
        raise SynthConfigError(f"Expected --sites to be a list of names, but got the string {sites!r}")
    specs = [SiteSpec(name=site, images=images_per_site) for site in sites]
    if not specs:
        raise SynthConfigError("Expected --sites to name at least one site (e.g. A,B,C), but got none")
    _validate_specs(out, specs, seed=seed, size=size, names=_OPTIONS)
    return synthesize_sites(out, specs, seed=seed, size=size, overwrite=overwrite, lesions=lesions)
