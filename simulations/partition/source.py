"""Reading the labelled folder: files grouped by patient, and the rows of ``labels.csv``."""

from __future__ import annotations

import csv
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.data.cache import scan
from client.data.dicom import quiet_pydicom_log
from client.data.dicom.header import PAD
from client.data.labels import LABELS_FILE, Labels, normalise_path_key

_HEADER_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass
class Patient:
    """All labelled files of one patient (PatientID; the study when a file has none)."""

    key: str
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (relative path, key, label)

    def label(self, n_classes: int) -> int:
        """Binary: positive if any file is; multi-class: the majority class (ties: the first)."""
        labels = [label for _, _, label in self.files]
        return max(labels) if n_classes == 2 else int(np.argmax(np.bincount(labels, minlength=n_classes)))


def _header(path: Path) -> dict[str, str] | str:
    """The identifying attributes of a DICOM file (no pixel data read), or why it cannot be used."""
    import pydicom
    from pydicom.errors import InvalidDicomError

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
        values[keyword] = "" if value is None else str(value).strip(PAD)
    return values


def read_folder(data_dir: Path, labels: Labels) -> tuple[list[Patient], dict[str, str]]:
    """Group the labelled files by patient; everything else goes to ``skipped`` with a reason."""
    classes = ",".join(labels.classes)
    patients: dict[str, Patient] = {}
    skipped: dict[str, str] = {}
    for rel, state in scan(data_dir).items():
        if state is None:
            skipped[rel] = (
                "folder cannot be listed (no access)" if rel.endswith("/")
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
        patients.setdefault(patient, Patient(patient)).files.append((rel, key, label))
    return [patients[k] for k in sorted(patients)], skipped


def label_rows(data_dir: Path, key: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
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
