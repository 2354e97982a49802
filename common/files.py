"""Atomic file writes (a reader never sees half a file), JSON-safe values, and the worker pools' start method."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    On any failure the temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : Path
        The file to write; its folder is created when missing, an existing file is replaced.
    data : bytes | str
        The whole content; a str is encoded as UTF-8.
    mode : int | None
        Permission bits, set before any byte is written; None leaves the temporary file's 0600, whatever the umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """A copy of ``value`` fit for strict JSON: recursively, non-finite floats become None, dict keys ``str(key)``
    and tuples lists; every other value is returned as is."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing any earlier ``dst``.

    Readers see the old folder or the new one, never a mix; if the final rename
    fails the old folder is put back. Both must be on the same filesystem.
    """
    if not dst.exists():
        os.replace(src, dst)
        return
    aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(dst, aside)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` (~50x faster to start) while this process has no other thread, else ``spawn``.

    fork is only safe before torch (and its thread pools) or any other thread exists.
    """
    if "torch" not in sys.modules and threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")
