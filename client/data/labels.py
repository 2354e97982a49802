"""Read a site's ``labels.csv`` and say what is wrong with it, row by row.

The header names the key column (``SOPInstanceUID``, ``StudyInstanceUID``, ``SeriesInstanceUID``
or ``path``, relative to the data folder and ``/``-separated) and a ``label`` column holding the
run's class names (``0``/``1`` by default). Only a file that cannot be used at all is an error;
row problems (unknown classes, conflicting labels for one key, empty keys) are collected and
reported, and those rows are not used.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import DataError

LABELS_FILE = "labels.csv"
# A key column → the column of the cache index (client.data.cache) it is matched against.
KEY_COLUMNS = {"SOPInstanceUID": "sop", "StudyInstanceUID": "study", "SeriesInstanceUID": "series", "path": "paths"}


@dataclass(frozen=True)
class Labels:
    """Usable labels by key, and every row that could not be used."""

    key: str  # which DICOM attribute (or ``path``) the key column holds
    classes: tuple[str, ...]
    by_key: dict[str, int]  # key → class index
    lines: dict[str, list[int]]  # key → labels.csv line numbers (usable keys only)
    conflicting: dict[str, list[int]] = field(default_factory=dict)  # key → lines with different classes
    unknown: dict[str, list[int]] = field(default_factory=dict)  # label value not in classes → lines
    unknown_keys: frozenset[str] = frozenset()  # keys whose only labels were unknown classes
    empty_key_lines: tuple[int, ...] = ()
    rows: int = 0


def normalise_path_key(value: str) -> str:
    """``.\\a\\b.dcm`` → ``a/b.dcm``: how a ``path`` key is compared with a file's relative path."""
    return value.strip().replace("\\", "/").removeprefix("./")


def read_labels(data_dir: Path, *, classes: tuple[str, ...] = ("0", "1")) -> Labels:
    """Parse ``data_dir/labels.csv`` against the run's ``classes``.

    Raises
    ------
    DataError
        When the file is missing or unreadable, has no recognised key column
        or ``label`` column, or has no data rows.
    """
    path = data_dir / LABELS_FILE
    if path.exists() and not path.is_file():
        raise DataError(f"{path} is not a file")
    if not path.is_file():
        raise DataError(f"No {LABELS_FILE} in {data_dir}; add one with columns SOPInstanceUID,label")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} cannot be read as UTF-8 CSV ({type(exc).__name__})") from None
    if not rows:
        raise DataError(f"{path} is empty; expected a header SOPInstanceUID,label")
    header = [h.strip() for h in rows[0]]
    key = next((h for h in header if h in KEY_COLUMNS), None)
    if key is None or "label" not in header:
        # The first row is not echoed: without a header it is data (a UID or a path).
        raise DataError(
            f"{path}: expected a first row naming one of {', '.join(KEY_COLUMNS)} and `label`, "
            f"but it names {'neither' if key is None and 'label' not in header else ('no key column' if key is None else 'no `label` column')}"
        )
    ki, li = header.index(key), header.index("label")
    index = {name: i for i, name in enumerate(classes)}
    by_key: dict[str, int] = {}
    lines: dict[str, list[int]] = {}
    conflicting: dict[str, list[int]] = {}
    unknown: dict[str, list[int]] = {}
    unknown_only: set[str] = set()
    empty: list[int] = []
    count = 0
    for line_no, row in enumerate(rows[1:], start=2):
        if not "".join(row).strip():
            continue
        count += 1
        k = row[ki].strip() if len(row) > ki else ""
        raw = row[li].strip() if len(row) > li else ""
        if key == "path":
            k = normalise_path_key(k)
        if not k:
            empty.append(line_no)
            continue
        if raw not in index:
            unknown.setdefault(raw, []).append(line_no)
            if k not in by_key and k not in conflicting:
                unknown_only.add(k)
            continue
        unknown_only.discard(k)
        if k in conflicting:
            conflicting[k].append(line_no)
        elif k in by_key and by_key[k] != index[raw]:
            conflicting[k] = [*lines.pop(k), line_no]
            del by_key[k]
        else:
            by_key[k] = index[raw]
            lines.setdefault(k, []).append(line_no)
    if count == 0:
        raise DataError(f"{path} has a header but no labels")
    return Labels(key=key, classes=classes, by_key=by_key, lines=lines, conflicting=conflicting, unknown=unknown,
                  unknown_keys=frozenset(unknown_only), empty_key_lines=tuple(empty), rows=count)
