"""Read a site's ``labels.csv``.

The first column names the key: ``SOPInstanceUID``, ``StudyInstanceUID``,
``SeriesInstanceUID`` or ``path`` (relative to the data folder, ``/``-separated).
The ``label`` column holds the class as an integer (0/1 for the binary task).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError

LABELS_FILE = "labels.csv"
KEY_COLUMNS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "path")


@dataclass(frozen=True)
class Labels:
    """Labels by key, and which DICOM attribute (or ``path``) the key is."""

    key: str
    by_key: dict[str, int]


def read_labels(data_dir: Path, *, num_classes: int = 2) -> Labels:
    """Parse ``data_dir/labels.csv``.

    Raises
    ------
    DataError
        When the file is missing, has no recognised key column or ``label``
        column, a label is not an integer in ``[0, num_classes)``, or one key
        carries two different labels.
    """
    path = data_dir / LABELS_FILE
    if not path.is_file():
        raise DataError(f"No {LABELS_FILE} in {data_dir}; add one with columns SOPInstanceUID,label")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} cannot be read as CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path} is empty; expected a header SOPInstanceUID,label")
    header = [h.strip() for h in rows[0]]
    key = next((h for h in header if h in KEY_COLUMNS), None)
    if key is None or "label" not in header:
        raise DataError(
            f"{path}: expected a header with one of {', '.join(KEY_COLUMNS)} and `label`, "
            f"but got {','.join(header)!r}"
        )
    ki, li = header.index(key), header.index("label")
    by_key: dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ki, li):
            raise DataError(f"{path}:{line_no}: expected {len(header)} columns, got {len(row)}")
        k, raw = row[ki].strip(), row[li].strip()
        try:
            label = int(raw)
        except ValueError:
            label = -1
        if not 0 <= label < num_classes:
            raise DataError(
                f"{path}:{line_no}: expected `label` to be an integer in [0, {num_classes}), "
                f"but got {raw!r}"
            )
        if key == "path":
            k = k.replace("\\", "/").removeprefix("./")
        if by_key.get(k, label) != label:
            raise DataError(f"{path}:{line_no}: conflicting labels for the same {key}")
        by_key[k] = label
    if not by_key:
        raise DataError(f"{path} has a header but no labels")
    return Labels(key=key, by_key=by_key)
