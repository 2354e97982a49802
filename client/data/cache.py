"""The site-local cache of preprocessed images.

DICOM is decoded once per (data folder state, preprocessing config). The cache
is a folder ``<work-dir>/cache/<config-hash>/`` holding ``images.npy`` (opened
memory-mapped, so a fresh ClientApp process starts in milliseconds) and
``manifest.json`` (per-file size/mtime/sha256, labels, hashed patient ids,
rejections). It is built in a temporary folder and renamed into place, so an
interrupted build never leaves a cache that a later run trusts.

A cache is *fresh* when every file under the data folder still has the size and
modification time recorded in its manifest; otherwise it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.data.dicom import DicomInfo, preprocess, read_dicom
from client.data.labels import LABELS_FILE, Labels, read_labels
from common.config import PreprocessConfig
from common.errors import DataError, DicomRejected

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SiteData:
    """A site's preprocessed, labelled images, read from the cache only."""

    images: np.ndarray  # (n, 1, S, S) float32, memory-mapped
    labels: np.ndarray  # (n,) int64
    patients: tuple[str, ...]  # hashed patient id per image
    fingerprint: str  # hash of every accepted file's content + labels + preprocessing
    summary: dict[str, Any] = field(compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _file_state(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _scan(data_dir: Path, exclude: Path | None) -> dict[str, Path]:
    """Every regular file under ``data_dir`` except labels.csv and the work dir, by relative path."""
    files: dict[str, Path] = {}
    for root, dirs, names in os.walk(data_dir):
        root_path = Path(root)
        if exclude is not None:
            dirs[:] = [d for d in dirs if (root_path / d).resolve() != exclude]
        dirs.sort()
        for name in sorted(names):
            path = root_path / name
            rel = path.relative_to(data_dir).as_posix()
            if rel == LABELS_FILE or not path.is_file():
                continue
            files[rel] = path
    return files


def _cache_dir(work_dir: Path, config: PreprocessConfig) -> Path:
    return work_dir / "cache" / hashlib.sha256(config.key().encode()).hexdigest()[:12]


def _is_fresh(manifest: dict[str, Any], files: dict[str, Path], data_dir: Path, config: PreprocessConfig) -> bool:
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("preprocess") != config.key():
        return False
    if manifest.get("data_dir") != str(data_dir):
        return False
    labels = data_dir / LABELS_FILE
    if not labels.is_file() or manifest.get("labels_state") != _file_state(labels):
        return False
    recorded: dict[str, list[int]] = manifest.get("files", {})
    if recorded.keys() != files.keys():
        return False
    try:
        return all(recorded[rel] == _file_state(path) for rel, path in files.items())
    except OSError:
        return False


def _label_for(labels: Labels, rel: str, info: DicomInfo) -> int | None:
    key = {
        "SOPInstanceUID": info.sop_instance_uid,
        "StudyInstanceUID": info.study_instance_uid,
        "SeriesInstanceUID": info.series_instance_uid,
        "path": rel,
    }[labels.key]
    return labels.by_key.get(key)


def build_cache(*, data_dir: Path, work_dir: Path, config: PreprocessConfig) -> Path:
    """Decode every file under ``data_dir`` and write a fresh cache; return its folder."""
    data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
    files = _scan(data_dir, exclude=work_dir)
    labels = read_labels(data_dir)
    labels_state = _file_state(data_dir / LABELS_FILE)
    items: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    rejected: dict[str, str] = {}
    unlabelled = 0
    seen_uids: set[str] = set()
    states: dict[str, list[int]] = {}
    fingerprint = hashlib.sha256(config.key().encode())
    fingerprint.update(hashlib.sha256((data_dir / LABELS_FILE).read_bytes()).digest())
    for rel, path in files.items():
        try:
            states[rel] = _file_state(path)
            content = path.read_bytes()
        except OSError as exc:
            states.setdefault(rel, [-1, -1])
            rejected[rel] = f"file cannot be read ({exc.strerror or type(exc).__name__})"
            continue
        try:
            if not content:
                raise DicomRejected("empty file")
            values, info = read_dicom(path)
            if info.sop_instance_uid in seen_uids:
                raise DicomRejected("duplicate SOPInstanceUID (same image twice)")
            seen_uids.add(info.sop_instance_uid)
            label = _label_for(labels, rel, info)
            if label is None:
                unlabelled += 1
                raise DicomRejected(f"no label in {LABELS_FILE}")
            image = preprocess(values, config)
        except DicomRejected as exc:
            rejected[rel] = str(exc)
            continue
        digest = hashlib.sha256(content).hexdigest()
        fingerprint.update(digest.encode())
        arrays.append(image)
        items.append(
            {
                "path": rel,
                "sha256": digest,
                "label": label,
                "patient": info.patient_hash,
                "study": hash_study(info.study_instance_uid),
                "modality": info.modality,
                "manufacturer": info.manufacturer,
            }
        )
    reasons = Counter(rejected.values())
    if not items:
        summary = "; ".join(f"{n} × {r}" for r, n in reasons.most_common()) or "no files"
        raise DataError(f"No usable images in {data_dir} ({len(files)} files seen: {summary})")
    for reason, count in reasons.most_common():
        log.warning("Rejected %d file(s): %s", count, reason)

    target = _cache_dir(work_dir, config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        images = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.float32, shape=(len(arrays), *arrays[0].shape)
        )
        for i, image in enumerate(arrays):
            images[i] = image
        images.flush()
        del images
        manifest = {
            "version": MANIFEST_VERSION,
            "preprocess": config.key(),
            "data_dir": str(data_dir),
            "labels_key": labels.key,
            "labels_state": labels_state,
            "files": states,
            "items": items,
            "rejected": rejected,
            "unlabelled": unlabelled,
            "fingerprint": fingerprint.hexdigest(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Cached %d images (%d rejected) in %s", len(items), len(rejected), target)
    return target


def hash_study(study_uid: str) -> str:
    return hashlib.sha256(f"fedrad-study|{study_uid}".encode()).hexdigest()[:16]


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it; readers see the old or the new, never a mix."""
    old = None
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_site_data(*, data_dir: Path, work_dir: Path, config: PreprocessConfig) -> SiteData:
    """Open the site's cache, (re)building it first if it is missing or stale.

    Raises
    ------
    DataError
        When the data folder is missing or holds no usable labelled image.
    """
    if not data_dir.is_dir():
        raise DataError(f"Data folder {data_dir} does not exist or is not a folder")
    data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
    target = _cache_dir(work_dir, config)
    manifest_path = target / "manifest.json"
    manifest: dict[str, Any] | None = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = None
    if manifest is None or not _is_fresh(manifest, _scan(data_dir, work_dir), data_dir, config):
        build_cache(data_dir=data_dir, work_dir=work_dir, config=config)
        manifest = json.loads(manifest_path.read_text())
    images = np.load(target / "images.npy", mmap_mode="r")
    items = manifest["items"]
    labels = np.array([it["label"] for it in items], dtype=np.int64)
    if images.shape[0] != len(items):
        raise DataError(f"Cache {target} is inconsistent; delete it and run again")
    return SiteData(
        images=images,
        labels=labels,
        patients=tuple(it["patient"] for it in items),
        fingerprint=manifest["fingerprint"],
        summary=_summary(manifest),
    )


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    items = manifest["items"]
    return {
        "files_seen": len(manifest["files"]),
        "accepted": len(items),
        "rejected": dict(Counter(manifest["rejected"].values()).most_common()),
        "labels": {str(k): v for k, v in sorted(Counter(it["label"] for it in items).items())},
        "patients": len({it["patient"] for it in items}),
        "studies": len({it["study"] for it in items}),
        "modalities": dict(Counter(it["modality"] for it in items)),
        "manufacturers": dict(Counter(it["manufacturer"] for it in items)),
    }


def patient_split(patients: tuple[str, ...] | list[str], *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split image indices into train/validation by patient, never by image.

    Patients are ordered by a seeded hash of their (already hashed) id and the
    first ``round(n * val_fraction)`` go to validation (at least one, when
    there are at least two patients).
    """
    unique = sorted(set(patients))
    order = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}|{p}".encode()).hexdigest())
    n_val = int(round(len(unique) * val_fraction))
    if len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    else:
        n_val = 0
    val_patients = set(order[:n_val])
    is_val = np.array([p in val_patients for p in patients], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
