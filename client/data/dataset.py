"""A site's usable data: the cache joined with ``labels.csv``, split by patient, and its report.

:func:`load_site_data` is what training, evaluation and ``fl-client --check``
call. It brings the cache up to date (decoding only changed files), applies
the labels, settles duplicates, splits by patient and builds the data report.
The report holds counts, hashed identifiers' counts and statistics only; the
``files`` lists of rejections hold paths relative to the data folder and stay
on the site (``fl-client --check`` output, never a Flower message).
"""

from __future__ import annotations

import hashlib
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from client.data.cache import INFO_FIELDS, STATS_FIELDS, CacheUpdate, check_folders, read_details, update_cache
from client.data.labels import KEY_COLUMNS, LABELS_FILE, Labels, read_labels
from common.config import PreprocessConfig
from common.errors import DataError

MAX_LISTED = 20  # label-file line numbers listed per problem


@dataclass(frozen=True)
class SiteData:
    """A site's accepted, labelled images, read from the cache only."""

    store: np.ndarray  # (rows, 1, S, S) float32, memory-mapped: every cached frame
    rows: np.ndarray  # (n,) row in ``store`` of each accepted image
    labels: np.ndarray  # (n,) int64 class index
    patients: tuple[str, ...]  # hashed patient id per image
    classes: tuple[str, ...]
    train: np.ndarray  # indices (into the accepted images) of the training split
    validation: np.ndarray  # indices of the validation split (other patients)
    fingerprint: str  # the dataset's privacy identity: hash of the accepted files' contents (see below)
    usable: bool  # at least one labelled image to train on
    make_report: Callable[[], dict[str, Any]] = field(compare=False, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @cached_property
    def report(self) -> dict[str, Any]:
        """The data report (``fl-client --check``): built on first use, from the cache's details."""
        return self.make_report()

    def images(self, index: np.ndarray | None = None) -> np.ndarray:
        """The accepted images (those at ``index`` when given), copied into memory."""
        return np.asarray(self.store[self.rows if index is None else self.rows[index]])


def patient_split(patients: tuple[str, ...] | list[str], *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split image indices into train/validation by patient, never by image.

    Patients are ordered by a seeded hash of their (already hashed) id and the
    first ``round(n * val_fraction)`` go to validation (at least one, when
    there are at least two patients).

    Parameters
    ----------
    patients : tuple[str, ...] or list[str]
        The hashed patient id of each image.
    val_fraction : float
        Share of *patients* (not images) that go to validation.
    seed : int
        Seeds the patient order: same patients and seed, same split.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The image indices (into ``patients``) of the training split, then of the validation split.
    """
    unique = sorted(set(patients))
    order = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}|{p}".encode()).hexdigest())
    n_val = min(max(round(len(unique) * val_fraction), 1), len(unique) - 1) if len(unique) >= 2 else 0
    val_patients = set(order[:n_val])
    is_val = np.array([p in val_patients for p in patients], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _lines(values: list[int]) -> list[int]:
    return sorted(values)[:MAX_LISTED]


def load_site_data(
    *, data_dir: Path, work_dir: Path, config: PreprocessConfig, classes: tuple[str, ...] = ("0", "1"),
    val_fraction: float = 0.25, seed: int = 0, workers: int = 0, require_usable: bool = True,
) -> SiteData:
    """Open the site's data from its cache, updating the cache first if files changed.

    Parameters
    ----------
    data_dir, work_dir : Path
        The site's data folder (DICOM files anywhere under it and ``labels.csv``) and its work folder,
        which holds the cache.
    config : PreprocessConfig
        The run's preprocessing; it picks the cache folder.
    classes : tuple[str, ...]
        The run's class names; a file whose label is not one of them is rejected.
    val_fraction, seed
        Share of patients in the validation split and the seed of the split (:func:`patient_split`).
    workers : int
        Processes decoding DICOM (0 = one per CPU core).
    require_usable : bool
        Raise when nothing is left to train on; ``False`` (``fl-client --check``) returns the data with
        ``usable`` false and the reason in its report.

    Raises
    ------
    ConfigError
        When ``work_dir`` is ``data_dir``, or is a file.
    DataError
        When the data folder or ``labels.csv`` is unusable, or (with ``require_usable``) no labelled image is
        left to train on; the message summarises why.
    """
    data_dir, work_dir = check_folders(data_dir, work_dir, option="--workdir")
    labels = read_labels(data_dir, classes=classes)  # fail fast, before any decoding
    update = update_cache(data_dir=data_dir, work_dir=work_dir, config=config, workers=workers)
    store, index = update.store, update.index  # opened under the cache lock: they match
    paths, sop, sha, index_rows = index["paths"], index["sop"], index["sha256"], index["rows"]
    key_column = index[KEY_COLUMNS[labels.key]]
    ok = [i for i, status in enumerate(index["status"]) if status == "ok"]

    rejected: dict[str, str] = dict(index["reasons"])
    # Duplicates (one SOPInstanceUID, several files) keep one file: the first
    # with a usable label, else the first; the others are rejected.
    keep: dict[str, int] = {}
    for i in ok:
        first = keep.get(sop[i])
        if first is None or (labels.by_key.get(key_column[first]) is None and labels.by_key.get(key_column[i]) is not None):
            keep[sop[i]] = i
    accepted: list[tuple[int, int]] = []  # (file index, label)
    matched_keys: set[str] = set()
    unlabelled = duplicates = 0
    for i in ok:
        if keep[sop[i]] != i:
            duplicates += 1
            rejected[paths[i]] = (
                "duplicate file (identical copy of another file)"
                if sha[keep[sop[i]]] == sha[i]
                else "duplicate SOPInstanceUID (another file has the same image UID)"
            )
            continue
        key = key_column[i]
        label = labels.by_key.get(key)
        if label is not None:
            matched_keys.add(key)
            accepted.append((i, label))
        elif key in labels.conflicting:
            matched_keys.add(key)
            rejected[paths[i]] = f"conflicting labels in {LABELS_FILE}"
        elif key in labels.unknown_keys:
            matched_keys.add(key)
            rejected[paths[i]] = f"label in {LABELS_FILE} is not one of the classes ({','.join(classes)})"
        else:
            unlabelled += 1
            rejected[paths[i]] = f"no label in {LABELS_FILE}"

    rows = np.array([r for i, _ in accepted for r in range(index_rows[i][0], index_rows[i][0] + index_rows[i][1])], dtype=np.int64)
    image_labels = np.array([lab for i, lab in accepted for _ in range(index_rows[i][1])], dtype=np.int64)
    patients = tuple(index["patient"][i] for i, _ in accepted for _ in range(index_rows[i][1]))
    train_idx, val_idx = patient_split(patients, val_fraction=val_fraction, seed=seed)

    # The privacy ledger composes ε over everything trained on one fingerprint, so it names the
    # records (file contents) only: a new image size, window or label fix is the same dataset and
    # keeps spending the same budget; adding or removing files makes a new dataset.
    fingerprint = hashlib.sha256(b"fedrad-dataset-1")
    for item in sorted({sha[i] for i, _ in accepted}):
        fingerprint.update(f"{item};".encode())

    problems = _problems(seen=len(paths), accepted=len(accepted), train=len(train_idx), rejected=rejected)
    if require_usable and problems:
        raise DataError(f"No usable training data in {data_dir}: {problems[0]}")

    return SiteData(
        store=store, rows=rows, labels=image_labels, patients=patients, classes=classes, train=train_idx,
        validation=val_idx, fingerprint=fingerprint.hexdigest(), usable=not problems,
        make_report=partial(
            _report, update=update, accepted_files=[paths[i] for i, _ in accepted], rejected=rejected,
            problems=problems, labels=labels, matched_keys=matched_keys, unlabelled=unlabelled, duplicates=duplicates,
            image_labels=image_labels, patients=patients, train_idx=train_idx, val_idx=val_idx, config=config,
        ),
    )


def _problems(*, seen: int, accepted: int, train: int, rejected: dict[str, str]) -> list[str]:
    """Why the data cannot be trained on (empty when it can)."""
    if not accepted:
        reasons = Counter(rejected.values()).most_common()
        summary = "; ".join(f"{n} × {r}" for r, n in reasons) or "no files"
        return [f"no accepted labelled image ({seen} files seen: {summary})"]
    if train == 0:
        return ["no image left for training after the validation split"]
    return []


def _looks_like_a_class(value: str) -> bool:
    """Short names are shown; anything that could be an identifier (a UID, a long string) is not."""
    return len(value) <= 24 and not re.fullmatch(r"[0-9.]{9,}", value)


def _counts(values: Any) -> dict[str, int]:
    return dict(Counter(values).most_common())


def _class_counts(labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    return dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist(), strict=False))


def _report(
    *, update: CacheUpdate, accepted_files: list[str], rejected: dict[str, str], problems: list[str], labels: Labels,
    matched_keys: set[str], unlabelled: int, duplicates: int, image_labels: np.ndarray, patients: tuple[str, ...],
    train_idx: np.ndarray, val_idx: np.ndarray, config: PreprocessConfig,
) -> dict[str, Any]:
    """The data report, from the cache's details of the ``accepted_files`` (paths relative to the data folder)."""
    details = read_details(update.folder, update.index)
    infos = [dict(zip(INFO_FIELDS, details[rel]["info"], strict=True)) for rel in accepted_files]
    stats = [dict(zip(STATS_FIELDS, details[rel]["stats"], strict=True)) for rel in accepted_files]
    warned = sum(1 for rel in accepted_files if details[rel]["warnings"])
    seen = len(update.index["paths"])
    by_reason: dict[str, list[str]] = {}
    for rel, reason in sorted(rejected.items()):
        by_reason.setdefault(reason, []).append(rel)
    spacing = [i["pixel_spacing"] for i in infos if i["pixel_spacing"]]
    unmatched = {k: v for k, v in labels.lines.items() if k not in matched_keys}
    classes = labels.classes

    def split(index: np.ndarray) -> dict[str, Any]:
        patients_in = len({patients[i] for i in index})
        return {"images": len(index), "patients": patients_in, "classes": _class_counts(image_labels[index], classes)}

    accepted = len(infos)
    warnings: list[str] = []
    present = _class_counts(image_labels[train_idx], classes)
    if accepted and any(n == 0 for n in present.values()):
        missing = ", ".join(c for c, n in present.items() if n == 0)
        warnings.append(f"no training image of class {missing}")
    if accepted and len(val_idx) == 0:
        warnings.append("no validation image (fewer than two patients)")
    without_id = sum(1 for i in infos if i["patient_id_missing"])
    if without_id:
        warnings.append(f"{without_id} image file(s) without PatientID: grouped by study for the split")
    if unmatched:
        warnings.append(f"{len(unmatched)} label(s) in {LABELS_FILE} match no accepted file")
    n_images = len(image_labels)
    summary = (problems[0] if problems
               else f"{seen} files seen, {accepted} accepted ({n_images} images), {len(rejected)} rejected")
    return {
        "usable": not problems,
        "summary": summary,
        "problems": problems,
        "warnings": warnings,
        "preprocess": config.key(),
        "files": {"seen": seen, "accepted": accepted, "rejected": len(rejected)},
        "images": n_images,
        "rejections": [
            {"reason": reason, "count": len(files), "files": files}
            for reason, files in sorted(by_reason.items(), key=lambda x: (-len(x[1]), x[0]))
        ],
        "labels": {
            "key": labels.key,
            "rows": labels.rows,
            "classes": _class_counts(image_labels, classes),
            "unmatched_rows": {"count": len(unmatched), "lines": _lines([n for v in unmatched.values() for n in v])},
            "conflicting": {"count": len(labels.conflicting), "lines": _lines([n for v in labels.conflicting.values() for n in v])},
            "unknown_class": {
                "count": sum(len(v) for v in labels.unknown.values()),
                "values": [v for v in sorted(labels.unknown) if _looks_like_a_class(v)][:MAX_LISTED],
                "lines": _lines([n for v in labels.unknown.values() for n in v]),
            },
            "empty_key": {"count": len(labels.empty_key_lines), "lines": _lines(list(labels.empty_key_lines))},
            "files_without_label": unlabelled,
            "duplicate_files": duplicates,
        },
        "patients": len(set(patients)),
        "patients_without_id": without_id,
        "studies": len({i["study_instance_uid"] for i in infos}),
        "series": len({i["series_instance_uid"] for i in infos}),
        "modalities": _counts(i["modality"] or "?" for i in infos),
        "manufacturers": _counts(i["manufacturer"] or "?" for i in infos),
        "transfer_syntaxes": _counts(i["transfer_syntax"] or "?" for i in infos),
        "photometric": _counts(i["photometric"] or "?" for i in infos),
        "image_sizes": _counts(f"{i['rows']}x{i['columns']}" for i in infos),
        "multi_frame_files": sum(1 for i in infos if i["frames"] > 1),
        "pixel_spacing_mm": {
            "min": min(spacing) if spacing else None,
            "median": statistics.median(spacing) if spacing else None,
            "max": max(spacing) if spacing else None,
            "missing": len(infos) - len(spacing),
        },
        "intensity": {
            "min": min((s["min"] for s in stats), default=None),
            "median_of_means": statistics.median(s["mean"] for s in stats) if stats else None,
            "max": max((s["max"] for s in stats), default=None),
            "in_window_fraction": statistics.fmean(s["in_window"] for s in stats) if stats else None,
        },
        "decoder_warnings": warned,
        "split": {"train": split(train_idx), "validation": split(val_idx)},
        "cache": {"decoded": update.decoded, "reused": update.reused},
    }
