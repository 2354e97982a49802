"""Virtual sites for ``fl-sim``: split a real labelled DICOM folder by patient.

:func:`partition_folder` splits a folder laid out like a site's data (DICOM files under it plus
``labels.csv``; see :mod:`client.data.labels`) into ``out/site-001``, ``out/site-002``, ...:

* All files of one patient (PatientID; else the study, as the site loader groups them) go to one site.
* Site sizes are relative (fractions of the labelled files, equal by default); without ``alpha`` every
  class is split in those proportions. With ``alpha``, each class's patients are split by proportions
  drawn from ``Dirichlet(alpha)`` (Hsu et al., 2019), weighted by the sizes, and no site takes more
  than its share of all files: skew shows in the sites' label mix, not their sizes
  (:func:`simulations.partition.skew.assign`).
* Nothing is copied: a site holds symbolic links to the original files under the same relative paths,
  and a ``labels.csv`` with the original header and exactly the original rows of its keys.
* Nothing is silently dropped: unusable files (not DICOM, no usable label) are returned in
  :attr:`PartitionResult.skipped` with the reason, counted in ``out/partition.json`` and logged.
* Sites are built in a temporary folder next to ``out`` and renamed into place: a failure leaves no
  half-written site.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from client.data.labels import LABELS_FILE, read_labels
from common.errors import ConfigError, DataError
from common.files import replace_dir
from simulations.partition.skew import assign, check_alpha, check_fractions, check_seed, is_int
from simulations.partition.source import label_rows, read_folder

logger = logging.getLogger("simulations.partition")  # the name fl-sim's log lines have always shown

MANIFEST = "partition.json"


@dataclass(frozen=True)
class PartitionSummary:
    """What one virtual site received."""

    site: str  # folder name under ``out`` (site-001, ...)
    files: int  # labelled DICOM files linked into the site
    patients: int
    positives: int  # files whose label is not the first class (binary: label 1)


class PartitionResult(dict[str, PartitionSummary]):
    """Site name → :class:`PartitionSummary`, in site order, plus what was left out.

    Attributes
    ----------
    skipped : dict of str to str
        Relative path → reason, for every file not assigned to a site (not DICOM, unreadable, no usable label).
    unmatched_rows : int
        Rows of ``labels.csv`` whose key matches no assigned file.
    """

    def __init__(self, summaries: dict[str, PartitionSummary], *, skipped: dict[str, str], unmatched_rows: int) -> None:
        super().__init__(summaries)
        self.skipped = skipped
        self.unmatched_rows = unmatched_rows

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """How many files were left out, per reason (most common first)."""
        return dict(Counter(self.skipped.values()).most_common())


def _check_out(out: Path, data_dir: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Expected `out` to be a folder (new or empty), but got the file {out}")
    out_abs, data_abs = out.resolve(), data_dir.resolve()
    if out_abs == data_abs or data_abs in out_abs.parents or out_abs in data_abs.parents:
        raise ConfigError(
            f"Expected `out` to be outside the data folder {data_dir} and not to contain it, but got {out}"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"Expected {out} to be absent or empty, but got a non-empty folder; "
            "pass overwrite=True to replace an earlier partition, or choose another folder"
        )
    if not (out / MANIFEST).is_file():
        raise ConfigError(f"Expected {out} to hold an earlier partition (with {MANIFEST}) before overwriting "
                          "it, but it does not; choose another folder")


def partition_folder(data_dir: Path, out: Path, *, sites: int, alpha: float | None = None,
                     sizes: Sequence[float] | None = None, seed: int = 0, classes: tuple[str, ...] = ("0", "1"),
                     overwrite: bool = False) -> PartitionResult:
    """Split a labelled DICOM folder into ``sites`` virtual site folders under ``out``.

    Parameters
    ----------
    data_dir : Path
        A site-style data folder: DICOM files anywhere under it and ``labels.csv``.
    out : Path
        Output folder, absent or empty (or an earlier partition with ``overwrite``), not overlapping
        ``data_dir``; gets ``site-001``, ``site-002``, ... and ``partition.json``.
    sites : int
        Number of virtual sites (at least 1, at most the number of patients).
    alpha : float, optional
        Dirichlet concentration of the label skew (> 0; smaller: more skew); ``None``: every site gets
        the folder's label mix.
    sizes : sequence of float, optional
        Relative site sizes in labelled files, positive and summing to 1; equal by default.
    seed : int, optional
        Non-negative seed; same inputs, same partition.
    classes : tuple of str, optional
        The class names of ``labels.csv`` (the run's ``classes``).
    overwrite : bool, optional
        Replace an earlier partition in ``out``.

    Returns
    -------
    PartitionResult
        Site name → :class:`PartitionSummary`, with ``skipped`` (files not assigned, and why) and
        ``unmatched_rows``.

    Raises
    ------
    ConfigError
        For invalid arguments, or an ``out`` that is a file, overlaps ``data_dir`` or is not empty
        (without ``overwrite``).
    DataError
        If ``data_dir`` or its ``labels.csv`` is missing or unusable, or it has fewer patients with
        labelled files than ``sites``.
    """
    if not is_int(sites) or sites < 1:
        raise ConfigError(f"Expected `sites` to be a positive integer, but got {sites!r}")
    skew = None if alpha is None else check_alpha(alpha)
    fractions = check_fractions(sizes, sites)
    rng = np.random.default_rng(check_seed(seed))
    if isinstance(classes, str) or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"Expected `classes` to be two or more distinct names, but got {classes!r}")
    classes = tuple(str(c) for c in classes)
    data_dir, out = Path(data_dir), Path(out)
    if not data_dir.is_dir():
        raise DataError(f"Data folder {data_dir} does not exist or is not a folder")
    _check_out(out, data_dir, overwrite=overwrite)
    labels = read_labels(data_dir, classes=classes)

    patients, skipped = read_folder(data_dir, labels)
    if len(patients) < sites:
        n_files = sum(len(p.files) for p in patients)
        raise DataError(
            f"Expected at least {sites} patients with labelled DICOM files in {data_dir} to make {sites} sites, "
            f"but got {len(patients)} ({n_files} labelled files, {len(skipped)} other files)"
        )
    files = np.array([len(p.files) for p in patients], dtype=np.int64)
    patient_classes = np.array([p.label(len(classes)) for p in patients], dtype=np.int64)
    site_of = assign(files, patient_classes, n_classes=len(classes), fractions=fractions, alpha=skew, rng=rng)

    width = max(3, len(str(sites)))
    names = [f"site-{i:0{width}d}" for i in range(1, sites + 1)]
    header, rows = label_rows(data_dir, labels.key)
    source = data_dir.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partition-", dir=out.parent))
    try:
        summaries: dict[str, PartitionSummary] = {}
        class_counts: dict[str, dict[str, int]] = {}
        used_keys: set[str] = set()
        for index, name in enumerate(names):
            site_dir = tmp / name
            site_dir.mkdir()
            mine = [patients[i] for i in np.flatnonzero(site_of == index)]
            keys: set[str] = set()
            counts = np.zeros(len(classes), dtype=np.int64)
            for patient in mine:
                for rel, key, label in patient.files:
                    link = site_dir / rel
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(source / rel, link)
                    keys.add(key)
                    counts[label] += 1
            with (site_dir / LABELS_FILE).open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(row for key, row in rows if key in keys)
            used_keys |= keys
            summaries[name] = PartitionSummary(name, int(counts.sum()), len(mine), int(counts[1:].sum()))
            class_counts[name] = {c: int(n) for c, n in zip(classes, counts, strict=True)}
        unmatched = sum(1 for key, _ in rows if key not in used_keys)
        result = PartitionResult(summaries, skipped=skipped, unmatched_rows=unmatched)
        manifest = {
            "data_dir": str(source), "sites": sites, "alpha": skew, "sizes": [float(f) for f in fractions],
            "seed": seed, "classes": list(classes), "key": labels.key,
            "summaries": {name: {**asdict(s), "classes": class_counts[name]} for name, s in summaries.items()},
            "skipped": {"count": len(skipped), "by_reason": result.skipped_by_reason, "files": skipped},
            "unmatched_label_rows": result.unmatched_rows,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if skipped:
        reasons = "; ".join(f"{n} × {r}" for r, n in result.skipped_by_reason.items())
        logger.warning("partition: %d file(s) under %s not assigned: %s", len(skipped), data_dir, reasons)
    logger.info("partition: %d sites from %d patients (%d files) in %s", sites, len(patients), int(files.sum()), out)
    return result
