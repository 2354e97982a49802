"""The site-local cache of preprocessed images.

One folder per preprocessing config, ``<work-dir>/cache/<config-hash>/``: ``images.npy`` (every
decoded frame, memory-mapped so a fresh ClientApp process starts in milliseconds), ``index.json``
(per file, column by column: stat state, sha256, status, rows, the UIDs labels are keyed by, hashed
patient id, rejection reasons; all that training needs) and ``details.json`` (attributes and
statistics of accepted files, read only by the data report).

* **Per file.** Each open scans the data folder (``stat`` only). An unchanged file keeps its rows;
  a changed or new one is hashed, and decoded only when no cached file has the same content.
* **Atomic.** An update is built in a temporary folder and renamed over the old one under a lock:
  readers see the old cache or the new one, and an interrupted update leaves nothing trusted.
* **Labels are applied on open**, not cached: editing ``labels.csv`` never decodes anything again.

Decoding runs in worker processes (all cores) when there is enough to do.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.data.dicom import RETRYABLE, DicomInfo, quiet_pydicom_log
from client.data.labels import LABELS_FILE
from common.config import PreprocessConfig
from common.errors import ConfigError, DataError, DicomRejected
from common.files import pool_context as _pool_context  # tests replace it
from common.files import replace_dir

log = logging.getLogger(__name__)
INDEX_VERSION = 3
IMAGES, INDEX, DETAILS = "images.npy", "index.json", "details.json"
POOL_MIN_FILES = 256  # below this, decoding in-process beats starting workers
INFO_FIELDS = tuple(f.name for f in dataclasses.fields(DicomInfo))
STATS_FIELDS = ("mean", "min", "max", "in_window")


# ---------------------------------------------------------------- file scan


def scan(data_dir: Path, exclude: Path | None = None) -> dict[str, list[int] | None]:
    """Every file under ``data_dir`` (but ``labels.csv`` and the work dir) → its state.

    Paths are relative, ``/``-separated and sorted; symlinked folders are not
    followed (they are reported as not regular files). The state is ``None``
    when the file cannot even be ``stat``-ed; a folder that cannot be listed
    appears as ``"its/path/"`` with state ``None``.
    """
    files: dict[str, list[int] | None] = {}
    skip = str(exclude) if exclude is not None else None

    def walk(folder: str, prefix: str) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            if prefix:
                files[prefix] = None  # a folder we cannot list is reported, not skipped
            return
        for entry in entries:
            rel = prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.path != skip:
                        walk(entry.path, rel + "/")
                    continue
                st = entry.stat()
            except OSError:
                files[rel] = None
                continue
            files[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    walk(str(data_dir), "")
    files.pop(LABELS_FILE, None)
    return dict(sorted(files.items()))


def check_folders(data_dir: Path, work_dir: Path, *, option: str) -> tuple[Path, Path]:
    """Both folders resolved, once the data folder exists and the work folder can hold a cache.

    Parameters
    ----------
    data_dir
        The site's DICOM folder (read only).
    work_dir
        Where the cache goes; neither ``data_dir`` nor a file.
    option
        The command-line option that names ``work_dir``, for the message that suggests another one.

    Returns
    -------
    tuple[Path, Path]
        ``(data_dir, work_dir)``, resolved.

    Raises
    ------
    DataError
        When ``data_dir`` is not a folder.
    ConfigError
        When ``work_dir`` is ``data_dir`` (the message suggests another ``option``) or a file.
    """
    if not data_dir.is_dir():
        raise DataError(f"Data folder {data_dir} does not exist or is not a folder")
    data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
    if work_dir == data_dir:
        raise ConfigError(f"Expected the work folder to differ from the data folder {data_dir}; pick another {option}")
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(f"Expected the work folder {work_dir} to be a folder, but it is a file")
    return data_dir, work_dir


def cache_dir(work_dir: Path, config: PreprocessConfig) -> Path:
    """The cache folder of ``config``: ``<work_dir>/cache/<first 12 hex digits of SHA-256(config.key())>``."""
    return work_dir / "cache" / hashlib.sha256(config.key().encode()).hexdigest()[:12]


def read_index(folder: Path) -> dict[str, Any] | None:
    """The cache's index, or ``None`` when there is no complete cache of this version."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        return None
    return index


def read_details(folder: Path, index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per accepted file: ``info`` (INFO_FIELDS order), ``stats`` (STATS_FIELDS), reader, warnings.

    Raises :class:`DataError` when the cache was rebuilt since ``index`` was read.
    """
    try:
        details = json.loads((folder / DETAILS).read_text())
    except (OSError, ValueError):
        details = {}
    if details.get("build") != index.get("build"):
        raise DataError(f"The cache in {folder} changed while it was being read; run again")
    return details["files"]


def _open_store(folder: Path, index: dict[str, Any], config: PreprocessConfig) -> np.ndarray | None:
    """``images.npy`` memory-mapped, or ``None`` when it is missing or has another shape than the index says."""
    try:
        store = np.load(folder / IMAGES, mmap_mode="r")
    except (OSError, ValueError):
        return None
    expected = sum(rows[1] for rows in index["rows"] if rows)
    return store if store.shape == (expected, 1, config.image_size, config.image_size) else None


def _is_fresh(index: dict[str, Any], files: dict[str, list[int] | None]) -> bool:
    if any(reason.startswith(RETRYABLE) for reason in index["reasons"].values()):
        return False  # e.g. a decoder plugin was missing: try those files again
    return index["paths"] == list(files) and index["states"] == list(files.values())


def _entries(index: dict[str, Any], details: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Index columns + details → one entry per file (the form an update works on)."""
    entries: dict[str, dict[str, Any]] = {}
    for i, rel in enumerate(index["paths"]):
        entry: dict[str, Any] = {"state": index["states"][i], "status": index["status"][i]}
        if index["sha256"][i]:
            entry["sha256"] = index["sha256"][i]
        if entry["status"] == "ok":
            entry.update(details[rel], rows=index["rows"][i], frames=index["rows"][i][1])
        else:
            entry["reason"] = index["reasons"][rel]
        entries[rel] = entry
    return entries


def _write_index(folder: Path, *, config: PreprocessConfig, data_dir: Path, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def column(field: int) -> list[str]:
        return [e["info"][field] if e["status"] == "ok" else "" for e in entries.values()]

    build = uuid.uuid4().hex  # ties details.json to this index.json
    index = {
        "version": INDEX_VERSION,
        "build": build,
        "preprocess": config.key(),
        "data_dir": str(data_dir),
        "paths": list(entries),
        "states": [e["state"] for e in entries.values()],
        "status": [e["status"] for e in entries.values()],
        "sha256": [e.get("sha256", "") for e in entries.values()],
        "rows": [e.get("rows") for e in entries.values()],
        "sop": column(INFO_FIELDS.index("sop_instance_uid")),
        "study": column(INFO_FIELDS.index("study_instance_uid")),
        "series": column(INFO_FIELDS.index("series_instance_uid")),
        "patient": column(INFO_FIELDS.index("patient_hash")),
        "reasons": {rel: e["reason"] for rel, e in entries.items() if e["status"] == "rejected"},
    }
    details = {
        "build": build,
        "files": {
            rel: {"info": e["info"], "stats": e["stats"], "reader": e["reader"], "warnings": e["warnings"]}
            for rel, e in entries.items()
            if e["status"] == "ok"
        },
    }
    (folder / DETAILS).write_text(json.dumps(details, separators=(",", ":")))
    (folder / INDEX).write_text(json.dumps(index, separators=(",", ":")))
    return index


# ------------------------------------------------------------------- decoding

_WORKER_CONFIG: PreprocessConfig | None = None
_WORKER_KNOWN: frozenset[str] = frozenset()


def _init_worker(config: PreprocessConfig, known: frozenset[str]) -> None:
    global _WORKER_CONFIG, _WORKER_KNOWN
    _WORKER_CONFIG, _WORKER_KNOWN = config, known


def _decode_one(rel: str, path: Path, state: list[int] | None, config: PreprocessConfig, known: frozenset[str]) -> tuple[dict[str, Any], np.ndarray | None]:
    """One file → its cache entry and its frames (``None`` when rejected or already cached)."""
    from client.data.dicom import decode_file, read_bytes

    entry: dict[str, Any] = {"state": state}
    try:
        if state is None:
            raise DicomRejected(
                "folder cannot be listed (no access)" if rel.endswith("/") else "file cannot be read (no access, or a broken link)"
            )
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DicomRejected("not a regular file (device, pipe, socket or folder link)")
        content = read_bytes(path)
        entry["sha256"] = hashlib.sha256(content).hexdigest()
        if entry["sha256"] in known:
            entry["status"] = "known"
            return entry, None
        decoded = decode_file(path, config, content=content)
    except DicomRejected as exc:
        entry.update(status="rejected", reason=str(exc))
        return entry, None
    except OSError as exc:  # vanished between the scan and now
        entry.update(status="rejected", reason=f"file cannot be read ({exc.strerror or type(exc).__name__})")
        return entry, None
    entry.update(
        status="ok",
        info=[getattr(decoded.info, name) for name in INFO_FIELDS],
        stats=[decoded.stats[k] for k in STATS_FIELDS],
        reader=decoded.reader,
        warnings=decoded.warnings,
    )
    return entry, decoded.images


def _decode_chunk(chunk: list[tuple[str, str, list[int] | None]]) -> list[tuple[dict[str, Any], np.ndarray | None]]:
    assert _WORKER_CONFIG is not None
    with quiet_pydicom_log():
        return [_decode_one(rel, Path(p), s, _WORKER_CONFIG, _WORKER_KNOWN) for rel, p, s in chunk]


def _decode_all(
    todo: list[tuple[str, Path, list[int] | None]], config: PreprocessConfig, known: frozenset[str], workers: int
) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
    if workers <= 1 or len(todo) < POOL_MIN_FILES:
        _init_worker(config, known)
        yield from _decode_chunk([(r, str(p), s) for r, p, s in todo])
        return
    # Import pydicom's readers here once: forked workers inherit them instead of each paying ~0.4 s.
    import pydicom.filereader
    import pydicom.pixels  # noqa: F401

    size = max(16, min(256, len(todo) // (workers * 4)))
    chunks = [[(r, str(p), s) for r, p, s in todo[i : i + size]] for i in range(0, len(todo), size)]
    with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker, initargs=(config, known)) as pool:
        for results in pool.map(_decode_chunk, chunks):
            yield from results


# ---------------------------------------------------------------- cache update


@contextmanager
def _locked(folder: Path, work_dir: Path) -> Iterator[None]:
    """Hold the cache's lock; an :class:`OSError` inside means the cache cannot be written."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f".{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as exc:
        raise DataError(f"Cannot write the cache under {work_dir} ({exc.strerror or type(exc).__name__})") from None


@dataclass(frozen=True)
class CacheUpdate:
    folder: Path
    index: dict[str, Any]
    store: np.ndarray  # images.npy, memory-mapped while the lock was held (matches ``index``)
    decoded: int  # files decoded now
    reused: int  # files whose cached rows were kept (unchanged, or same content as a cached file)


def update_cache(*, data_dir: Path, work_dir: Path, config: PreprocessConfig, workers: int = 0) -> CacheUpdate:
    """Bring the cache for ``config`` up to date with ``data_dir``, decoding only what changed.

    Parameters
    ----------
    data_dir, work_dir : Path
        The site's data folder, scanned recursively (``labels.csv`` and ``work_dir`` left out), and its
        work folder, which holds the cache (:func:`cache_dir`).
    config : PreprocessConfig
        The preprocessing; each config has its own cache folder.
    workers : int
        Decoding processes (0 = one per CPU core); with one, or fewer than :data:`POOL_MIN_FILES` files
        to decode, decoding stays in this process.

    Raises
    ------
    DataError
        When the cache cannot be written.
    """
    data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
    folder = cache_dir(work_dir, config)
    with _locked(folder, work_dir):
        files = scan(data_dir, exclude=work_dir)
        old = read_index(folder)
        if old is not None and old.get("preprocess") != config.key():
            old = None
        if old is not None and _is_fresh(old, files):
            store = _open_store(folder, old, config)
            if store is not None:
                return CacheUpdate(folder, old, store, 0, len(files))
            old = None  # images.npy is missing or does not match the index: rebuild
        for stale in [*folder.parent.glob(f".build-{folder.name}-*"), *folder.parent.glob(f".old-{folder.name}-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # what an interrupted update left
        try:
            old_entries: dict[str, Any] = _entries(old, read_details(folder, old)) if old else {}
        except (DataError, KeyError, IndexError, TypeError):
            old, old_entries = None, {}  # an unreadable cache is rebuilt, not trusted
        old_store = _open_store(folder, old, config) if old else None
        if old is not None and old_store is None:
            old, old_entries = None, {}
        by_sha = {
            e["sha256"]: e
            for e in old_entries.values()
            if "sha256" in e and (e["status"] == "ok" or not e.get("reason", "").startswith(RETRYABLE))
        }

        entries: dict[str, dict[str, Any]] = {}
        todo: list[tuple[str, Path, list[int] | None]] = []
        for rel, state in files.items():
            previous = old_entries.get(rel)
            retry = previous is not None and previous.get("reason", "").startswith(RETRYABLE)
            if previous is not None and state is not None and previous["state"] == state and not retry:
                entries[rel] = previous
            else:
                todo.append((rel, data_dir / rel, state))
        reused, decoded = len(entries), 0
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".build-{folder.name}-"))
        try:
            # Decoded frames stream to disk as they arrive, so memory stays bounded
            # whatever the archive size; they are assembled below.
            new_rows: dict[str, int] = {}  # a decoded file's first row in new-frames.raw
            with open(tmp / "new-frames.raw", "wb") as raw:
                written = 0
                for (rel, _, _), (entry, frames) in zip(
                    todo, _decode_all(todo, config, frozenset(by_sha), workers or os.cpu_count() or 1), strict=True
                ):
                    if entry["status"] == "known":  # same bytes as a cached file (moved, copied or touched)
                        entry = {**by_sha[entry["sha256"]], "state": entry["state"]}
                        reused += 1
                    elif entry["status"] == "ok":
                        assert frames is not None
                        raw.write(np.ascontiguousarray(frames, dtype=np.float32).tobytes())
                        new_rows[rel] = written
                        entry["frames"] = int(frames.shape[0])
                        written += frames.shape[0]
                        decoded += 1
                    entries[rel] = entry
            entries = {rel: entries[rel] for rel in files}  # the scan's order: what the freshness check compares
            shape = (1, config.image_size, config.image_size)  # every decoded frame, and every cached one
            new_store = np.memmap(tmp / "new-frames.raw", dtype=np.float32, mode="r", shape=(written, *shape)) if written else None
            total = sum(e["frames"] for e in entries.values() if e["status"] == "ok")
            store = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.float32, shape=(total, *shape))
            row = 0
            for rel, entry in entries.items():
                if entry["status"] != "ok":
                    continue
                count = entry["frames"]
                source, start = (new_store, new_rows[rel]) if rel in new_rows else (old_store, entry["rows"][0])
                assert source is not None
                store[row : row + count] = source[start : start + count]
                entries[rel] = {**entry, "rows": [row, count]}
                row += count
            store.flush()
            del store, new_store
            (tmp / "new-frames.raw").unlink()
            index = _write_index(tmp, config=config, data_dir=data_dir, entries=entries)
            del old_store
            replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = _open_store(folder, index, config)
        assert store is not None
    rejected = sum(e["status"] == "rejected" for e in entries.values())
    log.info("Cache %s: %d files decoded, %d reused, %d rejected", folder.name, decoded, reused, rejected)
    return CacheUpdate(folder, index, store, decoded, reused)
