"""Virtual sites for ``fl-sim``: split a real labelled DICOM folder, or skew synthetic labels.

:func:`partition_folder` splits a folder laid out like a real site's data
(DICOM files anywhere under it plus ``labels.csv``, keyed by SOPInstanceUID,
StudyInstanceUID, SeriesInstanceUID or relative path; see
:mod:`client.data.labels`) into ``out/site-001``, ``out/site-002``, ...:

* **By patient.** All files of one patient (PatientID; the study when a file
  has no PatientID, as the site loader groups them) go to the same site.
* **Sizes.** Optional relative sizes (fractions of the labelled files);
  equal by default. Without ``alpha`` every class is split in those
  proportions, so the sites' label mix matches the folder's.
* **Label skew.** With ``alpha``, each class's patients are split by site
  proportions drawn from ``Dirichlet(alpha)`` (Hsu et al., 2019; small alpha:
  each class concentrates on a few sites), weighted by the sizes. Sizes are
  then balanced as well as patients allow: no site takes more than its
  share of all files, and what it cannot take goes to the sites the class
  favours next, so skew shows in the sites' label mix, not their sizes.
  A patient's class is its files' majority class (binary: positive if any
  file is positive).
* **Nothing is copied.** A site folder holds symbolic links to the original
  files under the same relative paths, and its own ``labels.csv`` with the
  original header and exactly the original rows whose key belongs to it.
* **Nothing is silently dropped.** Files that cannot be used (not DICOM, no
  usable label) are not linked; they are returned in
  :attr:`PartitionResult.skipped` with the reason, counted in
  ``out/partition.json`` and logged.
* **Atomic.** Sites are built in a temporary folder next to ``out`` and
  renamed into place, so a failure leaves no half-written site.

:func:`dirichlet_prevalences` gives per-site prevalences with the same kind of
label skew for :func:`simulations.synth.synthesize_sites`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import os
import shutil
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from client.data.cache import scan
from client.data.labels import LABELS_FILE, Labels, normalise_path_key, read_labels
from common.errors import ConfigError, DataError
from common.files import replace_dir

logger = logging.getLogger(__name__)

MANIFEST = "partition.json"
MIN_PREVALENCE, MAX_PREVALENCE = 0.05, 0.95
_HEADER_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_PAD = " \x00\t\r\n\f\v"  # stripped from text values, as the site loader does


@dataclass(frozen=True)
class PartitionSummary:
    """What one virtual site received.

    Attributes
    ----------
    site : str
        Folder name under ``out`` (``site-001``, ...).
    files : int
        Labelled DICOM files linked into the site.
    patients : int
        Patients among them.
    positives : int
        Files whose label is not the first class (binary: label ``1``).
    """

    site: str
    files: int
    patients: int
    positives: int


class PartitionResult(dict[str, PartitionSummary]):
    """Site name → :class:`PartitionSummary`, in site order, plus what was left out.

    Attributes
    ----------
    skipped : dict of str to str
        Relative path → reason, for every file under the data folder that
        was not assigned to a site (not DICOM, unreadable, no usable label).
    unmatched_rows : int
        Rows of ``labels.csv`` whose key matches no assigned file.
    """

    def __init__(
        self,
        summaries: dict[str, PartitionSummary],
        *,
        skipped: dict[str, str],
        unmatched_rows: int,
    ) -> None:
        super().__init__(summaries)
        self.skipped = skipped
        self.unmatched_rows = unmatched_rows

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """How many files were left out, per reason (most common first)."""
        return dict(Counter(self.skipped.values()).most_common())


@dataclass
class _Patient:
    key: str
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (relative path, key, label)


# ---------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_alpha(alpha: object) -> float:
    if not _is_real(alpha) or not math.isfinite(float(alpha)) or float(alpha) <= 0:  # type: ignore[arg-type]
        raise ConfigError(
            f"Expected `alpha` to be a positive number (smaller: more label skew), but got {alpha!r}"
        )
    return float(alpha)  # type: ignore[arg-type]


def _check_seed(seed: object) -> int:
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        raise ConfigError(f"Expected `seed` to be a non-negative integer, but got {seed!r}")
    return int(seed)  # type: ignore[call-overload]


def _check_fractions(sizes: Sequence[float] | None, sites: int) -> np.ndarray:
    if sizes is None:
        return np.full(sites, 1.0 / sites)
    values = list(sizes) if not isinstance(sizes, str) else [sizes]
    if len(values) != sites:
        raise ConfigError(
            f"Expected `sizes` to give one fraction per site ({sites}), but got {len(values)}"
        )
    if not all(_is_real(v) and math.isfinite(float(v)) and float(v) > 0 for v in values):
        raise ConfigError(f"Expected `sizes` to be positive fractions, but got {values!r}")
    total = math.fsum(float(v) for v in values)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"Expected `sizes` to sum to 1, but they sum to {total:.6g}")
    return np.array([float(v) for v in values]) / total


# ---------------------------------------------------------------- label skew


def dirichlet_prevalences(
    n_sites: int, *, alpha: float, base: float = 0.45, seed: int = 0
) -> list[float]:
    """Per-site prevalences with Dirichlet label skew (for synthetic sites).

    For each site ``(p, 1 - p) ~ Dirichlet(alpha * [base, 1 - base])``, drawn
    with ``numpy.random.default_rng(seed)``, then ``p`` is clipped to
    ``[0.05, 0.95]`` so that every site can still see both classes. Large
    ``alpha``: every ``p`` is close to ``base``; small ``alpha``: most sites
    are almost all-negative or all-positive.

    Parameters
    ----------
    n_sites : int
        Number of sites (at least 1).
    alpha : float
        Concentration (> 0).
    base : float, optional
        Mean prevalence, strictly between 0 and 1.
    seed : int, optional
        Non-negative seed; same arguments, same list.

    Returns
    -------
    list of float
        One prevalence per site, each in ``[0.05, 0.95]``.

    Raises
    ------
    ConfigError
        If an argument is out of range.
    """
    if not _is_int(n_sites) or n_sites < 1:
        raise ConfigError(f"Expected `n_sites` to be a positive integer, but got {n_sites!r}")
    a = _check_alpha(alpha)
    if not _is_real(base) or not 0.0 < float(base) < 1.0:
        raise ConfigError(f"Expected `base` to be between 0 and 1 (exclusive), but got {base!r}")
    rng = np.random.default_rng(_check_seed(seed))
    draws = rng.dirichlet(a * np.array([float(base), 1.0 - float(base)]), size=n_sites)[:, 0]
    # A draw can underflow to exactly 0 (or be NaN for tiny alpha): clipping covers 0 and 1.
    draws = np.nan_to_num(draws, nan=float(base))
    return [float(p) for p in np.clip(draws, MIN_PREVALENCE, MAX_PREVALENCE)]


# ---------------------------------------------------------------- reading


def _header(path: Path) -> dict[str, str] | str:
    """The identifying attributes of a DICOM file (no pixel data read), or why it cannot be used."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from client.data.dicom import quiet_pydicom_log

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file (device, pipe, socket or folder link)"
        with quiet_pydicom_log(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except InvalidDicomError:
        return "not a DICOM file (no DICM preamble or DICOM header)"
    except OSError as exc:
        return f"file cannot be read ({exc.strerror or type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - a corrupt header can fail anywhere inside pydicom
        return f"corrupt or truncated DICOM header ({type(exc).__name__})"
    values: dict[str, str] = {}
    for keyword in _HEADER_TAGS:
        value = ds.get(keyword, "")
        values[keyword] = "" if value is None else str(value).strip(_PAD)
    return values


def _read_folder(
    data_dir: Path, labels: Labels
) -> tuple[list[_Patient], dict[str, str]]:
    """Group the labelled files by patient; everything else goes to ``skipped`` with a reason."""
    classes = ",".join(labels.classes)
    patients: dict[str, _Patient] = {}
    skipped: dict[str, str] = {}
    for rel, state in scan(data_dir).items():
        if state is None:
            skipped[rel] = (
                "folder cannot be listed (no access)"
                if rel.endswith("/")
                else "file cannot be read (no access, or a broken link)"
            )
            continue
        header = _header(data_dir / rel)
        if isinstance(header, str):
            skipped[rel] = header
            continue
        key = rel if labels.key == "path" else header[labels.key]
        label = labels.by_key.get(key)
        if label is None:
            if key in labels.conflicting:
                skipped[rel] = f"conflicting labels in {LABELS_FILE}"
            elif key in labels.unknown_keys:
                skipped[rel] = f"label in {LABELS_FILE} is not one of the classes ({classes})"
            else:
                skipped[rel] = f"no label in {LABELS_FILE}"
            continue
        pid = header["PatientID"]
        patient = f"patient:{pid}" if pid else f"study:{header['StudyInstanceUID']}"
        patients.setdefault(patient, _Patient(patient)).files.append((rel, key, label))
    return [patients[k] for k in sorted(patients)], skipped


def _patient_class(patient: _Patient, n_classes: int) -> int:
    """Binary: positive if any file is; multi-class: the majority class (ties: the first)."""
    labels = [label for _, _, label in patient.files]
    if n_classes == 2:
        return max(labels)
    counts = np.bincount(labels, minlength=n_classes)
    return int(np.argmax(counts))


# ---------------------------------------------------------------- assignment


def _waterfill(amount: float, weights: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Split ``amount`` in proportion to ``weights``, no site beyond its ``room``.

    What a full site cannot take goes to the others, again by weight; what
    no weighted site can take goes to the sites with room left, by room.
    """
    alloc = np.zeros_like(room)
    free = (weights > 0) & (room > 0)
    remaining = amount
    while remaining > 1e-9 and free.any():
        share = remaining * weights[free] / weights[free].sum()
        take = np.minimum(share, room[free] - alloc[free])
        alloc[free] += take
        remaining -= float(take.sum())
        free &= alloc < room - 1e-9
    left = np.maximum(room - alloc, 0.0)
    if remaining > 1e-9 and left.sum() > 0:
        alloc += np.minimum(left, remaining * left / left.sum())
    return alloc


def _assign(
    files: np.ndarray,
    classes: np.ndarray,
    *,
    n_classes: int,
    fractions: np.ndarray,
    alpha: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Site index of each patient (``files``: files per patient; ``classes``: its class).

    Classes are taken in a seeded order. Each class's files are shared out by
    weight — the size fractions, times a ``Dirichlet(alpha)`` draw with
    ``alpha`` — with no site taking more than its remaining share of all
    files (:func:`_waterfill`), and its patients, in seeded order, are cut
    into consecutive runs of those sizes (a patient goes where the middle of
    its files falls).
    """
    n_sites = len(fractions)
    order = rng.permutation(len(files))
    target = fractions * float(files.sum())
    load = np.zeros(n_sites)
    site = np.zeros(len(files), dtype=np.int64)
    for c in rng.permutation(n_classes):
        # Drawn for every class, present or not, so one class's absence does not shift the others.
        weights = fractions.copy()
        if alpha is not None:
            weights *= np.nan_to_num(rng.dirichlet(np.full(n_sites, alpha)))
        members = order[classes[order] == c]
        if len(members) == 0:
            continue
        sizes = files[members].astype(np.float64)
        cumulative = np.cumsum(sizes)
        room = np.maximum(target - load, 0.0)
        if not room.sum() > 0:
            room = fractions * cumulative[-1]
        alloc = _waterfill(float(cumulative[-1]), weights, room)
        bounds = np.cumsum(alloc) * (cumulative[-1] / alloc.sum())
        middle = cumulative - sizes / 2
        chosen = np.minimum(np.searchsorted(bounds, middle, side="right"), n_sites - 1)
        site[members] = chosen
        np.add.at(load, chosen, sizes)
    # Every site gets at least one patient: take the smallest patient of the site with the most.
    counts = np.bincount(site, minlength=n_sites)
    for empty in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        mine = np.flatnonzero(site == donor)
        moved = mine[np.argmin(files[mine])]
        site[moved] = empty
        counts[donor] -= 1
        counts[empty] += 1
    return site


# ---------------------------------------------------------------- writing


def _site_names(sites: int) -> list[str]:
    width = max(3, len(str(sites)))
    return [f"site-{i:0{width}d}" for i in range(1, sites + 1)]


def _check_out(out: Path, data_dir: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Expected `out` to be a folder (new or empty), but got the file {out}")
    out_abs, data_abs = out.resolve(), data_dir.resolve()
    if out_abs == data_abs or data_abs in out_abs.parents or out_abs in data_abs.parents:
        raise ConfigError(
            f"Expected `out` to be outside the data folder {data_dir} and not to contain it, "
            f"but got {out}"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"Expected {out} to be absent or empty, but got a non-empty folder; "
            "pass overwrite=True to replace an earlier partition, or choose another folder"
        )
    if not (out / MANIFEST).is_file():
        raise ConfigError(
            f"Expected {out} to hold an earlier partition (with {MANIFEST}) before overwriting "
            "it, but it does not; choose another folder"
        )


def _label_rows(data_dir: Path, key: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The header and the (normalised key, row) of every non-blank data row of ``labels.csv``."""
    with (data_dir / LABELS_FILE).open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    index = [h.strip() for h in header].index(key)
    keyed: list[tuple[str, list[str]]] = []
    for row in rows[1:]:
        if not "".join(row).strip():
            continue
        value = row[index].strip() if len(row) > index else ""
        keyed.append((normalise_path_key(value) if key == "path" else value, row))
    return header, keyed


def _install(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an empty or earlier ``out``."""
    replace_dir(tmp, out)


def partition_folder(
    data_dir: Path,
    out: Path,
    *,
    sites: int,
    alpha: float | None = None,
    sizes: Sequence[float] | None = None,
    seed: int = 0,
    classes: tuple[str, ...] = ("0", "1"),
    overwrite: bool = False,
) -> PartitionResult:
    """Split a labelled DICOM folder into ``sites`` virtual site folders under ``out``.

    Parameters
    ----------
    data_dir : Path
        A site-style data folder: DICOM files anywhere under it and
        ``labels.csv`` (see :mod:`client.data.labels`).
    out : Path
        Output folder, absent or empty (or an earlier partition with
        ``overwrite``); gets ``site-001``, ``site-002``, ... and
        ``partition.json``. Must not overlap ``data_dir``.
    sites : int
        Number of virtual sites (at least 1, at most the number of patients).
    alpha : float, optional
        Dirichlet concentration of the label skew (> 0; smaller: more skew).
        ``None``: no skew, every site gets the folder's label mix.
    sizes : sequence of float, optional
        Relative site sizes in labelled files, positive and summing to 1;
        equal by default.
    seed : int, optional
        Non-negative seed; same inputs, same partition.
    classes : tuple of str, optional
        The class names of ``labels.csv`` (the run's ``classes``).
    overwrite : bool, optional
        Replace an earlier partition in ``out``.

    Returns
    -------
    PartitionResult
        Site name → :class:`PartitionSummary`, with ``skipped`` (files not
        assigned, and why) and ``unmatched_rows``.

    Raises
    ------
    ConfigError
        For invalid arguments, or an ``out`` that is a file, overlaps
        ``data_dir`` or is not empty (without ``overwrite``).
    DataError
        If ``data_dir`` or its ``labels.csv`` is missing or unusable, or it
        has fewer patients with labelled files than ``sites``.
    """
    if not _is_int(sites) or sites < 1:
        raise ConfigError(f"Expected `sites` to be a positive integer, but got {sites!r}")
    skew = None if alpha is None else _check_alpha(alpha)
    fractions = _check_fractions(sizes, sites)
    rng = np.random.default_rng(_check_seed(seed))
    if isinstance(classes, str) or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"Expected `classes` to be two or more distinct names, but got {classes!r}")
    classes = tuple(str(c) for c in classes)
    data_dir, out = Path(data_dir), Path(out)
    if not data_dir.is_dir():
        raise DataError(f"Data folder {data_dir} does not exist or is not a folder")
    _check_out(out, data_dir, overwrite=overwrite)
    labels = read_labels(data_dir, classes=classes)

    patients, skipped = _read_folder(data_dir, labels)
    if len(patients) < sites:
        n_files = sum(len(p.files) for p in patients)
        raise DataError(
            f"Expected at least {sites} patients with labelled DICOM files in {data_dir} to make "
            f"{sites} sites, but got {len(patients)} ({n_files} labelled files, "
            f"{len(skipped)} other files)"
        )
    files = np.array([len(p.files) for p in patients], dtype=np.int64)
    patient_classes = np.array([_patient_class(p, len(classes)) for p in patients], dtype=np.int64)
    site_of = _assign(
        files, patient_classes, n_classes=len(classes), fractions=fractions, alpha=skew, rng=rng
    )

    names = _site_names(sites)
    header, label_rows = _label_rows(data_dir, labels.key)
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
                writer.writerows(row for key, row in label_rows if key in keys)
            used_keys |= keys
            summaries[name] = PartitionSummary(
                site=name,
                files=int(counts.sum()),
                patients=len(mine),
                positives=int(counts[1:].sum()),
            )
            class_counts[name] = {c: int(n) for c, n in zip(classes, counts, strict=True)}
        result = PartitionResult(
            summaries,
            skipped=skipped,
            unmatched_rows=sum(1 for key, _ in label_rows if key not in used_keys),
        )
        manifest = {
            "data_dir": str(source),
            "sites": sites,
            "alpha": skew,
            "sizes": [float(f) for f in fractions],
            "seed": seed,
            "classes": list(classes),
            "key": labels.key,
            "summaries": {
                name: {**asdict(s), "classes": class_counts[name]} for name, s in summaries.items()
            },
            "skipped": {
                "count": len(skipped),
                "by_reason": result.skipped_by_reason,
                "files": skipped,
            },
            "unmatched_label_rows": result.unmatched_rows,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if skipped:
        reasons = "; ".join(f"{n} × {r}" for r, n in result.skipped_by_reason.items())
        logger.warning("partition: %d file(s) under %s not assigned: %s", len(skipped), data_dir, reasons)
    logger.info(
        "partition: %d sites from %d patients (%d files) in %s",
        sites,
        len(patients),
        int(files.sum()),
        out,
    )
    return result
